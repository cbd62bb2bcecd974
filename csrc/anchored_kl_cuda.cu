// CUDA kernels of the anchored KL: the entry points of anchored_kl_cpu.cpp with the same
// semantics, for float32, bfloat16 and float16 logits, all arithmetic in fp32.
//
// The work is memory-bound, so every kernel streams its rows once per pass at full width: one
// thread block per row, thread t of T taking the 16-byte packs t, t + T, ... (8 bf16/fp16 or 4
// fp32 columns; single columns when a row is not 16-byte aligned), with kGlobalUnroll packs per
// stream loaded before any is used so that enough bytes are in flight. Each thread keeps an
// online softmax (max, sum of exp) and a KL partial; they are merged by warp shuffles and then
// across warps in a fixed order, so every result is deterministic (no float atomics). These
// pieces, shared with sharded_losses_cuda.cu, are in cuda_rows.cuh.
//
// fused_cuda (unsharded rows) needs both passes over a row but should read it from DRAM once.
// A 128K-column bf16 row of two or three streams is 0.5-0.9 MB; one row per SM in flight is
// 66-120 MB on an H100, more than its 50 MB L2, so a second pass would mostly miss. The row is
// therefore kept in shared memory instead: split over a cluster of up to 8 blocks (sm_90; one
// block on older GPUs, for rows that fit), each holding its slice as loaded, the blocks
// exchanging softmax statistics and KL partials through distributed shared memory. Rows that do
// not fit (or are not 16-byte aligned) fall back to one block walking its row twice, the second
// time backwards so that it starts with the bytes loaded last, the ones most likely still in L2.
#include "anchored_kl.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "cuda_rows.cuh"

namespace anchored_kl {
namespace {

// fused_resident_kernel: 2 blocks per SM, each with up to half of the SM's shared memory.
constexpr int kResidentThreads = 384;
constexpr int kResidentBlocksPerSm = 2;
constexpr int kMaxCluster = 8;  // the portable cluster size limit

template <Interp Mode>
constexpr int kStreams = Mode == Interp::kLogit ? 2 : 3;
constexpr int kLseSize = 6;  // (max, log_sum) pairs of up to 3 streams

struct Params {
  float alpha, inv_tau, log_one_minus_alpha, log_alpha;
  bool live;  // c == z: the current-model stream is not read
};

Params make_params(const Inputs& in) {
  return {static_cast<float>(in.alpha), static_cast<float>(in.inv_tau),
          static_cast<float>(std::log1p(-in.alpha)), static_cast<float>(std::log(in.alpha)),
          !in.c.has_value()};
}

// ---------------------------------------------------------------------------------------------
// The streams' packs and rows.

// The same W columns of every stream (c is not loaded in live mode).
template <typename T, int W>
struct Packs {
  Pack<T, W> z, c, r;
};

// Those columns in fp32 with the temperature folded in; c repeats z in live mode.
template <int W>
struct Columns {
  float z[W], c[W], r[W];
};

template <typename T, int W>
__device__ __forceinline__ Columns<W> unpack(const Packs<T, W>& x, const Params& p) {
  Columns<W> f;
#pragma unroll
  for (int i = 0; i < W; ++i) {
    f.z[i] = to_float(x.z.v[i]) * p.inv_tau;
    f.r[i] = to_float(x.r.v[i]) * p.inv_tau;
    f.c[i] = p.live ? f.z[i] : to_float(x.c.v[i]) * p.inv_tau;
  }
  return f;
}

// One row of each stream as packs, in global or shared memory (c == z in live mode).
template <typename T, int W>
struct RowView {
  const Pack<T, W>* z;
  const Pack<T, W>* c;
  const Pack<T, W>* r;

  __device__ __forceinline__ Packs<T, W> load(int j, bool live) const {
    Packs<T, W> x;
    x.z = z[j];
    x.r = r[j];
    if (!live) x.c = c[j];
    return x;
  }
};

template <typename T>
struct Problem {
  const T* z;
  const T* c;  // == z in live mode
  const T* r;
  int cols;
  Params prm;

  // Row i from its pack first_pack on.
  template <int W>
  __device__ __forceinline__ RowView<T, W> row(int64_t i, int first_pack = 0) const {
    const int64_t offset = i * cols;
    const auto at = [&](const T* base) {
      return reinterpret_cast<const Pack<T, W>*>(base + offset) + first_pack;
    };
    return {at(z), at(c), at(r)};
  }
};

template <int W, typename T>
__device__ __forceinline__ Pack<T, W>* grad_row(T* grad, int64_t row, int cols,
                                                int first_pack = 0) {
  return grad == nullptr ? nullptr : reinterpret_cast<Pack<T, W>*>(grad + row * cols) + first_pack;
}

// ---------------------------------------------------------------------------------------------
// The row's statistics.

template <Interp Mode>
__device__ __forceinline__ void finish_row_stats(SoftmaxState (&s)[kStreams<Mode>],
                                                 const Params& p) {
  if constexpr (Mode == Interp::kProb)
    if (p.live) s[1] = s[0];
}

// The row's global LSE of each stream as the (max, log_sum) pairs column_element takes.
template <Interp Mode>
__device__ __forceinline__ void lse_of(const SoftmaxState (&s)[kStreams<Mode>],
                                       float (&lse)[kLseSize]) {
#pragma unroll
  for (int k = 0; k < kStreams<Mode>; ++k) {
    lse[2 * k] = s[k].max;
    lse[2 * k + 1] = logf(s[k].sum);
  }
}

// ---------------------------------------------------------------------------------------------
// The two passes over a row.

// Visits packs t, t + T, ... of [0, n) for thread t of T, loading Unroll packs per stream
// before using any. mirror: visit pack n - 1 - i instead of i (a backward sweep).
template <int Unroll, typename T, int W, class Visit>
__device__ __forceinline__ void walk(const RowView<T, W>& row, int n, bool live, bool mirror,
                                     Visit&& visit) {
  const int stride = blockDim.x;
  for (int i0 = threadIdx.x; i0 < n; i0 += Unroll * stride) {
    Packs<T, W> x[Unroll];
#pragma unroll
    for (int u = 0; u < Unroll; ++u) {
      const int i = i0 + u * stride;
      if (i < n) x[u] = row.load(mirror ? n - 1 - i : i, live);
    }
#pragma unroll
    for (int u = 0; u < Unroll; ++u) {
      const int i = i0 + u * stride;
      if (i < n) visit(mirror ? n - 1 - i : i, x[u]);
    }
  }
}

// Pass 1: this thread's softmax statistics over packs [0, n) of row (in global memory).
// keep(j, packs) sees every pack as it is loaded.
template <Interp Mode, typename T, int W, class Keep>
__device__ __forceinline__ void stats_pass(const RowView<T, W>& row, int n, const Params& p,
                                           SoftmaxState (&s)[kStreams<Mode>], Keep&& keep) {
#pragma unroll
  for (int k = 0; k < kStreams<Mode>; ++k) s[k] = empty_state();
  walk<kGlobalUnroll>(row, n, p.live, false, [&](int j, const Packs<T, W>& x) {
    keep(j, x);
    const Columns<W> f = unpack(x, p);
    s[0].add(f.z);
    if constexpr (Mode == Interp::kLogit) {
      float a[W];
#pragma unroll
      for (int i = 0; i < W; ++i) a[i] = anchor_logit(f.c[i], f.r[i], p.alpha);
      s[1].add(a);
    } else {
      if (!p.live) s[1].add(f.c);
      s[2].add(f.r);
    }
  });
}

// Pass 2: this thread's share of the row's KL over packs [0, n) of row, given the row's global
// LSEs; writes (p - q) / tau to grad (unless null) at the same pack indices. Unroll as in walk.
template <Interp Mode, int Unroll, typename T, int W>
__device__ __forceinline__ float kl_grad_pass(const RowView<T, W>& row, int n, const Params& p,
                                              const float* lse, Pack<T, W>* grad, bool mirror) {
  float kl = 0.f;
  walk<Unroll>(row, n, p.live, mirror, [&](int j, const Packs<T, W>& x) {
    const Columns<W> f = unpack(x, p);
    float g[W];
    float pack_kl = 0.f;  // per pack first, as in SoftmaxState::add
#pragma unroll
    for (int i = 0; i < W; ++i) {
      const Element e = column_element<CudaMath, Mode>(f.z[i], f.c[i], f.r[i], p.alpha, lse,
                                                       p.log_one_minus_alpha, p.log_alpha);
      g[i] = e.p_minus_q * p.inv_tau;
      pack_kl += e.kl_term;
    }
    kl += pack_kl;
    if (grad != nullptr) store(grad + j, g);
  });
  return kl;
}

// ---------------------------------------------------------------------------------------------
// Streaming kernels: one block per row, W columns per pack (1 when rows are not aligned).

template <typename T, Interp Mode, int W>
__global__ void __launch_bounds__(kMaxThreads, kStreamingBlocksPerSm)
    row_stats_kernel(Problem<T> pb, float* __restrict__ stats) {
  constexpr int N = kStreams<Mode>;
  __shared__ SoftmaxState scratch[32][N];
  const int64_t row = blockIdx.x;
  SoftmaxState s[N];
  stats_pass<Mode>(pb.template row<W>(row), pb.cols / W, pb.prm, s, [](int, const auto&) {});
  block_reduce(s, scratch);
  finish_row_stats<Mode>(s, pb.prm);
  if (threadIdx.x == 0)
#pragma unroll
    for (int k = 0; k < N; ++k) {
      stats[(row * N + k) * 2] = s[k].max;
      stats[(row * N + k) * 2 + 1] = s[k].sum;
    }
}

template <typename T, Interp Mode, int W>
__global__ void __launch_bounds__(kMaxThreads, kStreamingBlocksPerSm)
    kl_grad_kernel(Problem<T> pb, const float* __restrict__ lse_in, float* __restrict__ kl_out,
                   T* __restrict__ grad) {
  constexpr int N = kStreams<Mode>;
  __shared__ float scratch[32][1];
  const int64_t row = blockIdx.x;
  float lse[kLseSize];
#pragma unroll
  for (int k = 0; k < 2 * N; ++k) lse[k] = lse_in[row * 2 * N + k];
  float kl[1] = {kl_grad_pass<Mode, kGlobalUnroll>(pb.template row<W>(row), pb.cols / W, pb.prm,
                                                   lse, grad_row<W>(grad, row, pb.cols), false)};
  block_reduce(kl, scratch);
  if (threadIdx.x == 0) kl_out[row] = kl[0];
}

// Both passes with the second from L2 at best; for rows fused_resident_kernel cannot hold.
template <typename T, Interp Mode, int W>
__global__ void __launch_bounds__(kMaxThreads, kStreamingBlocksPerSm)
    fused_streaming_kernel(Problem<T> pb, float* __restrict__ kl_out, T* __restrict__ grad) {
  constexpr int N = kStreams<Mode>;
  __shared__ SoftmaxState stats_scratch[32][N];
  __shared__ float kl_scratch[32][1];
  const int64_t row = blockIdx.x;
  const RowView<T, W> view = pb.template row<W>(row);
  const int n = pb.cols / W;
  SoftmaxState s[N];
  stats_pass<Mode>(view, n, pb.prm, s, [](int, const auto&) {});
  block_reduce(s, stats_scratch);
  finish_row_stats<Mode>(s, pb.prm);
  float lse[kLseSize];
  lse_of<Mode>(s, lse);
  float kl[1] = {kl_grad_pass<Mode, kGlobalUnroll>(view, n, pb.prm, lse,
                                                   grad_row<W>(grad, row, pb.cols),
                                                   /*mirror=*/true)};
  block_reduce(kl, kl_scratch);
  if (threadIdx.x == 0) kl_out[row] = kl[0];
}

// ---------------------------------------------------------------------------------------------
// fused_resident_kernel: a cluster of blocks per row, the row held in their shared memory.
// Compiled for sm_80 too, where the host launches it only with one block per row (no cluster).

__device__ __forceinline__ unsigned cluster_rank() {
#if __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().block_rank();
#else
  return 0;
#endif
}

// Barrier over the cluster that also orders shared-memory accesses across its blocks.
__device__ __forceinline__ void cluster_sync() {
#if __CUDA_ARCH__ >= 900
  cooperative_groups::this_cluster().sync();
#else
  __syncthreads();
#endif
}

// The address of *p in the shared memory of the cluster's block `rank`.
template <typename V>
__device__ __forceinline__ V* peer_shared(V* p, unsigned rank) {
#if __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().map_shared_rank(p, rank);
#else
  return p;
#endif
}

template <typename T, Interp Mode>
__global__ void __launch_bounds__(kResidentThreads, kResidentBlocksPerSm)
    fused_resident_kernel(Problem<T> pb, int cluster_size, float* __restrict__ kl_out,
                          T* __restrict__ grad) {
  constexpr int W = kPackWidth<T>;
  constexpr int N = kStreams<Mode>;
  extern __shared__ __align__(kPackBytes) unsigned char slice[];
  __shared__ SoftmaxState stats_scratch[32][N];
  __shared__ float kl_scratch[32][1];
  __shared__ SoftmaxState block_stats[N];
  __shared__ float block_kl[kMaxCluster];  // used in the cluster's block 0

  // This block's packs of the row: [begin, begin + n).
  const unsigned rank = cluster_rank();
  const int64_t row = blockIdx.x / cluster_size;
  const int packs = pb.cols / W;
  const int begin = static_cast<int>(int64_t{packs} * rank / cluster_size);
  const int n = static_cast<int>(int64_t{packs} * (rank + 1) / cluster_size) - begin;
  const int capacity = (packs + cluster_size - 1) / cluster_size;
  const Params& p = pb.prm;

  // The slice as loaded, stream by stream: z | r | c (snapshot mode only).
  auto* kept_z = reinterpret_cast<Pack<T, W>*>(slice);
  Pack<T, W>* kept_r = kept_z + capacity;
  Pack<T, W>* kept_c = p.live ? kept_z : kept_r + capacity;

  SoftmaxState s[N];
  stats_pass<Mode>(pb.template row<W>(row, begin), n, p, s, [&](int j, const Packs<T, W>& x) {
    kept_z[j] = x.z;
    kept_r[j] = x.r;
    if (!p.live) kept_c[j] = x.c;
  });
  block_reduce(s, stats_scratch);
  if (threadIdx.x == 0)
#pragma unroll
    for (int k = 0; k < N; ++k) block_stats[k] = s[k];
  cluster_sync();

  // Every warp of every block combines the cluster's statistics in the same butterfly, so all
  // of them get the same LSEs bit for bit.
  const unsigned lane = threadIdx.x % 32;
#pragma unroll
  for (int k = 0; k < N; ++k)
    s[k] = lane < static_cast<unsigned>(cluster_size) ? peer_shared(block_stats, lane)[k]
                                                      : empty_state();
  warp_reduce(s);
  finish_row_stats<Mode>(s, p);
  float lse[kLseSize];
  lse_of<Mode>(s, lse);

  // Pass 2 from shared memory (short latency: one pack at a time). Each thread reads back only
  // the packs it stored itself (walk gives thread t the packs i = t mod T whatever its Unroll),
  // so no barrier is needed for them.
  const RowView<T, W> kept{kept_z, kept_c, kept_r};
  float kl[1] = {
      kl_grad_pass<Mode, 1>(kept, n, p, lse, grad_row<W>(grad, row, pb.cols, begin), false)};
  block_reduce(kl, kl_scratch);
  if (threadIdx.x == 0) peer_shared(block_kl, 0)[rank] = kl[0];
  // Also keeps every block's shared memory alive until the reads of block_stats are done.
  cluster_sync();
  if (rank == 0 && threadIdx.x == 0) {
    float total = 0.f;
    for (int k = 0; k < cluster_size; ++k) total += block_kl[k];
    kl_out[row] = total;
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

// Calls fn(T*, ModeTag) with a null pointer of the logits' CUDA element type and the mode as a
// compile-time constant.
template <class Fn>
void dispatch(const Inputs& in, Fn&& fn) {
  const auto with_mode = [&](auto type_tag) {
    if (in.mode == Interp::kLogit)
      fn(type_tag, std::integral_constant<Interp, Interp::kLogit>{});
    else
      fn(type_tag, std::integral_constant<Interp, Interp::kProb>{});
  };
  switch (in.z.scalar_type()) {
    case at::kFloat:
      return with_mode(static_cast<float*>(nullptr));
    case at::kBFloat16:
      return with_mode(static_cast<__nv_bfloat16*>(nullptr));
    case at::kHalf:
      return with_mode(static_cast<__half*>(nullptr));
    default:
      TORCH_CHECK(false, "the fused kernels take float32, bfloat16 or float16 logits, got ",
                  in.z.scalar_type());
  }
}

template <typename T>
Problem<T> make_problem(const Inputs& in) {
  const auto* z = static_cast<const T*>(in.z.const_data_ptr());
  const auto* c = in.c.has_value() ? static_cast<const T*>(in.c->const_data_ptr()) : z;
  return {z, c, static_cast<const T*>(in.r.const_data_ptr()), static_cast<int>(in.z.size(1)),
          make_params(in)};
}

void check_sizes(const Inputs& in) {
  TORCH_CHECK(in.z.size(0) <= std::numeric_limits<int32_t>::max(),
              "anchored_kl CUDA kernels: at most 2^31 - 1 rows, got ", in.z.size(0));
  TORCH_CHECK(in.z.size(1) <= kMaxCols, "anchored_kl CUDA kernels: at most ", kMaxCols,
              " columns per row, got ", in.z.size(1));
}

// Whether every row of every tensor (grad too, when defined) starts on a 16-byte boundary.
bool rows_aligned(const Inputs& in, const at::TensorBase& grad) {
  if (in.z.size(1) % (kPackBytes / in.z.element_size()) != 0) return false;
  const auto aligned = [](const at::TensorBase& t) {
    return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % kPackBytes == 0;
  };
  return aligned(in.z) && aligned(in.r) && (!in.c.has_value() || aligned(*in.c)) &&
         (!grad.defined() || aligned(grad));
}

int device_attribute(cudaDeviceAttr attribute, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, device));
  return value;
}

// Launches fused_resident_kernel with the smallest cluster whose blocks can each hold their
// slice of a row in shared memory, preferring slices small enough for kResidentBlocksPerSm
// blocks per SM (one loads while another computes), else up to a whole SM's. Returns false,
// launching nothing, when no size fits.
template <typename T, Interp Mode>
bool launch_resident(const Problem<T>& pb, int64_t rows, float* kl, T* grad, cudaStream_t stream) {
  constexpr int W = kPackWidth<T>;
  const auto kernel = fused_resident_kernel<T, Mode>;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  cudaFuncAttributes func{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&func, kernel));
  // Clusters need the device's support and device code built for sm_90 or later (not sm_80
  // code JIT-compiled from PTX for a newer GPU, where cluster_sync is a block barrier).
  const int max_cluster =
      device_attribute(cudaDevAttrClusterLaunch, device) != 0 && func.ptxVersion >= 90 ? kMaxCluster
                                                                                       : 1;
  const int64_t per_sm = device_attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
  const int64_t reserved = device_attribute(cudaDevAttrReservedSharedMemoryPerBlock, device);
  const int64_t per_block = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  const int64_t packs = pb.cols / W;
  const int64_t pack_bytes = sizeof(Pack<T, W>) * (pb.prm.live ? 2 : 3);
  // The ceiling, not the request: the same value from every caller, so concurrent launches
  // from several host threads cannot lower it under each other.
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(per_block - func.sharedSizeBytes)));

  for (const int64_t budget : {per_sm / kResidentBlocksPerSm - reserved, per_block}) {
    for (int size = 1; size <= max_cluster; size *= 2) {
      const int64_t smem = (packs + size - 1) / size * pack_bytes;
      if (smem + static_cast<int64_t>(func.sharedSizeBytes) > budget ||
          rows * size > std::numeric_limits<int32_t>::max())
        continue;
      cudaLaunchConfig_t config{};
      config.gridDim = dim3(static_cast<unsigned>(rows * size));
      config.blockDim = dim3(kResidentThreads);
      config.dynamicSmemBytes = static_cast<size_t>(smem);
      config.stream = stream;
      cudaLaunchAttribute cluster{};
      cluster.id = cudaLaunchAttributeClusterDimension;
      cluster.val.clusterDim.x = size;
      cluster.val.clusterDim.y = 1;
      cluster.val.clusterDim.z = 1;
      if (size > 1) {
        config.attrs = &cluster;
        config.numAttrs = 1;
        int active = 0;  // 0: this cluster shape cannot be scheduled on the device
        C10_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&active, kernel, &config));
        if (active == 0) continue;
      }
      C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, pb, size, kl, grad));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return true;
    }
  }
  return false;
}

}  // namespace

void row_stats_cuda(const Inputs& in, const at::TensorBase& stats) {
  const c10::cuda::CUDAGuard guard(in.z.device());
  check_sizes(in);
  const int64_t rows = in.z.size(0);
  if (rows == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch(in, [&](auto type_tag, auto mode_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    constexpr Interp Mode = decltype(mode_tag)::value;
    const Problem<T> pb = make_problem<T>(in);
    with_pack_width<T>(rows_aligned(in, {}), [&](auto width) {
      constexpr int W = decltype(width)::value;
      row_stats_kernel<T, Mode, W>
          <<<static_cast<unsigned>(rows), block_threads(pb.cols / W), 0, stream>>>(
              pb, stats.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void kl_grad_cuda(const Inputs& in, const at::TensorBase& lse, const at::TensorBase& kl,
                  const at::TensorBase& grad) {
  const c10::cuda::CUDAGuard guard(in.z.device());
  check_sizes(in);
  const int64_t rows = in.z.size(0);
  if (rows == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch(in, [&](auto type_tag, auto mode_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    constexpr Interp Mode = decltype(mode_tag)::value;
    const Problem<T> pb = make_problem<T>(in);
    T* g = grad.defined() ? static_cast<T*>(grad.data_ptr()) : nullptr;
    with_pack_width<T>(rows_aligned(in, grad), [&](auto width) {
      constexpr int W = decltype(width)::value;
      kl_grad_kernel<T, Mode, W>
          <<<static_cast<unsigned>(rows), block_threads(pb.cols / W), 0, stream>>>(
              pb, lse.data_ptr<float>(), kl.data_ptr<float>(), g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void fused_cuda(const Inputs& in, const at::TensorBase& kl, const at::TensorBase& grad) {
  const c10::cuda::CUDAGuard guard(in.z.device());
  check_sizes(in);
  const int64_t rows = in.z.size(0);
  if (rows == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch(in, [&](auto type_tag, auto mode_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    constexpr Interp Mode = decltype(mode_tag)::value;
    const Problem<T> pb = make_problem<T>(in);
    T* g = grad.defined() ? static_cast<T*>(grad.data_ptr()) : nullptr;
    const bool aligned = rows_aligned(in, grad);
    if (aligned && launch_resident<T, Mode>(pb, rows, kl.data_ptr<float>(), g, stream)) return;
    with_pack_width<T>(aligned, [&](auto width) {
      constexpr int W = decltype(width)::value;
      fused_streaming_kernel<T, Mode, W>
          <<<static_cast<unsigned>(rows), block_threads(pb.cols / W), 0, stream>>>(
              pb, kl.data_ptr<float>(), g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace anchored_kl
