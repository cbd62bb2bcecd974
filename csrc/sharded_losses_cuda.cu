// CUDA kernels of the SFT-stage losses: the entry points of sharded_losses_cpu.cpp with the
// same semantics, for float32, bfloat16 and float16 logits, all arithmetic in fp32.
//
// The scheme of anchored_kl_cuda.cu's streaming kernels (cuda_rows.cuh): the work is
// memory-bound, so each pass streams its rows once at full width, one thread block per row in
// 16-byte packs with kGlobalUnroll packs per stream in flight per thread, and combines the
// threads' partial results in a fixed order (deterministic, no float atomics). The unsharded
// calls walk a row twice in one block, the second time backwards so that it starts with the
// bytes loaded last, the ones most likely still in L2. (Unlike anchored_kl's, they do not hold
// the row in shared memory: the cross-entropy reads one stream, half or a third of the
// anchored KL's bytes per column, and its second pass is a write-mostly sweep; whether a
// resident variant pays is for a GPU measurement to say.)
//
// The file includes only TensorBase and the CUDA runtime's headers, not torch/extension.h,
// which keeps nvcc's time (one front-end run per architecture) small.
#include "sharded_losses.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "cuda_rows.cuh"

namespace anchored_kl {
namespace {

// The policy's online softmax together with the sum of exp(z - max) (z - r), rescaled with it
// (sharded_losses.h: E_p[z - r] after the merge). A plain aggregate, like SoftmaxState.
struct WeightedSoftmax {
  float max, sum, weighted;

  template <int W>
  __device__ __forceinline__ void add(const float (&z)[W], const float (&r)[W]) {
    float m = max;
#pragma unroll
    for (int i = 0; i < W; ++i) m = fmaxf(m, z[i]);
    if (m == -INFINITY) return;
    if (m > max) {
      const float rescale = expf(max - m);
      sum *= rescale;
      weighted *= rescale;
      max = m;
    }
    float s = 0.f, w = 0.f;
#pragma unroll
    for (int i = 0; i < W; ++i) {
      const float e = expf(z[i] - max);
      s += e;
      w += weighted_difference(e, z[i], r[i]);
    }
    sum += s;
    weighted += w;
  }
};

__device__ __forceinline__ WeightedSoftmax empty_weighted() { return {-INFINITY, 0.f, 0.f}; }

// Commutative bit for bit, as SoftmaxState's combine.
__device__ __forceinline__ WeightedSoftmax combine(WeightedSoftmax a, WeightedSoftmax b) {
  const float m = fmaxf(a.max, b.max);
  if (m == -INFINITY) return a;
  const float ea = expf(a.max - m), eb = expf(b.max - m);
  return {m, __fmul_rn(a.sum, ea) + __fmul_rn(b.sum, eb),
          __fmul_rn(a.weighted, ea) + __fmul_rn(b.weighted, eb)};
}
__device__ __forceinline__ WeightedSoftmax shfl_xor(WeightedSoftmax s, int lane_mask) {
  // Qualified: this overload hides the float one from unqualified lookup.
  return {anchored_kl::shfl_xor(s.max, lane_mask), anchored_kl::shfl_xor(s.sum, lane_mask),
          anchored_kl::shfl_xor(s.weighted, lane_mask)};
}

// The rows of one call; r is null for the cross-entropy.
template <typename T>
struct LossRows {
  const T* z;
  const T* r;
  int cols;

  template <int W>
  __device__ __forceinline__ const Pack<T, W>* row(const T* base, int64_t i) const {
    return reinterpret_cast<const Pack<T, W>*>(base + i * cols);
  }
};

template <typename T, int W>
__device__ __forceinline__ Pack<T, W>* grad_row(T* grad, int64_t row, int cols) {
  return grad == nullptr ? nullptr : reinterpret_cast<Pack<T, W>*>(grad + row * cols);
}

template <typename T, int W>
struct PackPair {
  Pack<T, W> z, r;
};

template <int W, typename T>
__device__ __forceinline__ void unpack(const Pack<T, W>& x, float (&f)[W]) {
#pragma unroll
  for (int i = 0; i < W; ++i) f[i] = to_float(x.v[i]);
}

// Visits packs t, t + T, ... of a row's n packs for thread t of T, loading Unroll packs of z
// (and of r, when WithReference) before using any. mirror: pack n - 1 - i instead of i.
template <bool WithReference, int Unroll, typename T, int W, class Visit>
__device__ __forceinline__ void walk(const Pack<T, W>* z, const Pack<T, W>* r, int n, bool mirror,
                                     Visit&& visit) {
  const int stride = blockDim.x;
  for (int i0 = threadIdx.x; i0 < n; i0 += Unroll * stride) {
    PackPair<T, W> x[Unroll];
#pragma unroll
    for (int u = 0; u < Unroll; ++u) {
      const int i = i0 + u * stride;
      const int j = mirror ? n - 1 - i : i;
      if (i < n) {
        x[u].z = z[j];
        if constexpr (WithReference) x[u].r = r[j];
      }
    }
#pragma unroll
    for (int u = 0; u < Unroll; ++u) {
      const int i = i0 + u * stride;
      if (i < n) visit(mirror ? n - 1 - i : i, x[u]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Block-level passes over row `row`; every thread gets the results.

// The policy's (max, sum of exp(z - max)) over the row.
template <typename T, int W>
__device__ __forceinline__ SoftmaxState policy_stats(const LossRows<T>& pb, int64_t row) {
  __shared__ SoftmaxState scratch[32][1];
  SoftmaxState s[1] = {empty_state()};
  walk<false, kGlobalUnroll>(pb.template row<W>(pb.z, row), pb.template row<W>(pb.z, row),
                             pb.cols / W, false, [&](int, const PackPair<T, W>& x) {
                               float f[W];
                               unpack(x.z, f);
                               s[0].add(f);
                             });
  block_reduce(s, scratch);
  return s[0];
}

// Local statistics of z and r, and the weighted difference sum.
template <typename T, int W>
__device__ __forceinline__ void pair_stats(const LossRows<T>& pb, int64_t row,
                                           WeightedSoftmax& policy, SoftmaxState& reference) {
  __shared__ WeightedSoftmax policy_scratch[32][1];
  __shared__ SoftmaxState reference_scratch[32][1];
  WeightedSoftmax p[1] = {empty_weighted()};
  SoftmaxState q[1] = {empty_state()};
  walk<true, kGlobalUnroll>(pb.template row<W>(pb.z, row), pb.template row<W>(pb.r, row),
                            pb.cols / W, false, [&](int, const PackPair<T, W>& x) {
                              float z[W], r[W];
                              unpack(x.z, z);
                              unpack(x.r, r);
                              p[0].add(z, r);
                              q[0].add(r);
                            });
  block_reduce(p, policy_scratch);
  block_reduce(q, reference_scratch);
  policy = p[0];
  reference = q[0];
}

// Writes p - onehot(label) over the row.
template <typename T, int W>
__device__ __forceinline__ void cross_entropy_grad_pass(const LossRows<T>& pb, int64_t row,
                                                        int64_t label, const float (&lse)[2],
                                                        T* grad, bool mirror) {
  Pack<T, W>* out = grad_row<T, W>(grad, row, pb.cols);
  walk<false, kGlobalUnroll>(pb.template row<W>(pb.z, row), pb.template row<W>(pb.z, row),
                             pb.cols / W, mirror, [&](int j, const PackPair<T, W>& x) {
                               float f[W], g[W];
                               unpack(x.z, f);
#pragma unroll
                               for (int i = 0; i < W; ++i)
                                 g[i] = cross_entropy_element<CudaMath>(
                                     log_softmax_at(f[i], lse, 0), int64_t{j} * W + i == label);
                               store(out + j, g);
                             });
}

// The row's partial KL(p || p_ref) (every thread); writes the gradient unless grad is null.
template <typename T, int W>
__device__ __forceinline__ float reverse_kl_pass(const LossRows<T>& pb, int64_t row,
                                                 const float (&lse)[4], float mean_difference,
                                                 T* grad, bool mirror) {
  __shared__ float scratch[32][1];
  Pack<T, W>* out = grad_row<T, W>(grad, row, pb.cols);
  float kl[1] = {0.f};
  walk<true, kGlobalUnroll>(pb.template row<W>(pb.z, row), pb.template row<W>(pb.r, row),
                            pb.cols / W, mirror, [&](int j, const PackPair<T, W>& x) {
                              float z[W], r[W], g[W];
                              unpack(x.z, z);
                              unpack(x.r, r);
                              float pack_kl = 0.f;  // per pack first, as in SoftmaxState::add
#pragma unroll
                              for (int i = 0; i < W; ++i) {
                                const ReverseKlElement e =
                                    reverse_kl_element<CudaMath>(z[i], r[i], lse, mean_difference);
                                g[i] = e.grad;
                                pack_kl += e.kl_term;
                              }
                              kl[0] += pack_kl;
                              if (out != nullptr) store(out + j, g);
                            });
  block_reduce(kl, scratch);
  return kl[0];
}

// ---------------------------------------------------------------------------------------------
// Kernels: one block per row.

template <typename T, int W, bool WithReference>
__global__ void __launch_bounds__(kMaxThreads, kStreamingBlocksPerSm)
    loss_stats_kernel(LossRows<T> pb, float* __restrict__ stats, float* __restrict__ weighted) {
  const int64_t row = blockIdx.x;
  if constexpr (WithReference) {
    WeightedSoftmax policy;
    SoftmaxState reference;
    pair_stats<T, W>(pb, row, policy, reference);
    if (threadIdx.x == 0) {
      stats[row * 4] = policy.max;
      stats[row * 4 + 1] = policy.sum;
      stats[row * 4 + 2] = reference.max;
      stats[row * 4 + 3] = reference.sum;
      weighted[row] = policy.weighted;
    }
  } else {
    const SoftmaxState s = policy_stats<T, W>(pb, row);
    if (threadIdx.x == 0) {
      stats[row * 2] = s.max;
      stats[row * 2 + 1] = s.sum;
    }
  }
}

template <typename T, int W>
__global__ void __launch_bounds__(kMaxThreads, kStreamingBlocksPerSm)
    cross_entropy_grad_kernel(LossRows<T> pb, const int64_t* __restrict__ labels,
                              const float* __restrict__ lse_in, T* __restrict__ grad) {
  const int64_t row = blockIdx.x;
  const float lse[2] = {lse_in[2 * row], lse_in[2 * row + 1]};
  cross_entropy_grad_pass<T, W>(pb, row, labels[row], lse, grad, false);
}

template <typename T, int W>
__global__ void __launch_bounds__(kMaxThreads, kStreamingBlocksPerSm)
    cross_entropy_fused_kernel(LossRows<T> pb, const int64_t* __restrict__ labels,
                               float* __restrict__ loss, T* __restrict__ grad) {
  const int64_t row = blockIdx.x;
  const SoftmaxState s = policy_stats<T, W>(pb, row);
  const float lse[2] = {s.max, logf(s.sum)};
  const int64_t label = labels[row];
  if (grad != nullptr) cross_entropy_grad_pass<T, W>(pb, row, label, lse, grad, true);
  if (threadIdx.x == 0) {
    const float label_logit =
        0 <= label && label < pb.cols ? to_float(pb.z[row * pb.cols + label]) : NAN;
    loss[row] = (lse[0] - label_logit) + lse[1];
  }
}

template <typename T, int W>
__global__ void __launch_bounds__(kMaxThreads, kStreamingBlocksPerSm)
    reverse_kl_grad_kernel(LossRows<T> pb, const float* __restrict__ lse_in,
                           const float* __restrict__ mean_difference, float* __restrict__ kl_out,
                           T* __restrict__ grad) {
  const int64_t row = blockIdx.x;
  float lse[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) lse[k] = lse_in[4 * row + k];
  const float kl = reverse_kl_pass<T, W>(pb, row, lse, mean_difference[row], grad, false);
  if (threadIdx.x == 0) kl_out[row] = kl;
}

template <typename T, int W>
__global__ void __launch_bounds__(kMaxThreads, kStreamingBlocksPerSm)
    reverse_kl_fused_kernel(LossRows<T> pb, float* __restrict__ kl_out, T* __restrict__ grad) {
  const int64_t row = blockIdx.x;
  WeightedSoftmax policy;
  SoftmaxState reference;
  pair_stats<T, W>(pb, row, policy, reference);
  const float lse[4] = {policy.max, logf(policy.sum), reference.max, logf(reference.sum)};
  const float kl = reverse_kl_pass<T, W>(pb, row, lse, policy.weighted / policy.sum, grad, true);
  if (threadIdx.x == 0) kl_out[row] = kl;
}

// ---------------------------------------------------------------------------------------------
// Host side.

// Calls fn(T*) with a null pointer of the logits' CUDA element type.
template <class Fn>
void dispatch(const at::TensorBase& z, Fn&& fn) {
  switch (z.scalar_type()) {
    case at::kFloat:
      return fn(static_cast<float*>(nullptr));
    case at::kBFloat16:
      return fn(static_cast<__nv_bfloat16*>(nullptr));
    case at::kHalf:
      return fn(static_cast<__half*>(nullptr));
    default:
      TORCH_CHECK(false, "the fused kernels take float32, bfloat16 or float16 logits, got ",
                  z.scalar_type());
  }
}

// Whether every row of every defined tensor starts on a 16-byte boundary.
bool rows_aligned(const at::TensorBase& z, std::initializer_list<const at::TensorBase*> others) {
  if (z.size(1) % (kPackBytes / z.element_size()) != 0) return false;
  const auto aligned = [](const at::TensorBase& t) {
    return !t.defined() || reinterpret_cast<uintptr_t>(t.const_data_ptr()) % kPackBytes == 0;
  };
  bool all = aligned(z);
  for (const at::TensorBase* t : others) all = all && aligned(*t);
  return all;
}

template <typename T>
T* data_or_null(const at::TensorBase& t) {
  return t.defined() ? static_cast<T*>(t.data_ptr()) : nullptr;
}

// Calls launch(T-tag, W-tag, LossRows, grid, threads, stream) for the logits' type and pack
// width, after the device guard and the size checks; nothing for zero rows.
template <class Launch>
void launch_rows(const at::TensorBase& z, const at::TensorBase& r, bool aligned, Launch&& launch) {
  const c10::cuda::CUDAGuard guard(z.device());
  TORCH_CHECK(z.size(0) <= std::numeric_limits<int32_t>::max(),
              "sharded loss CUDA kernels: at most 2^31 - 1 rows, got ", z.size(0));
  TORCH_CHECK(z.size(1) <= kMaxCols, "sharded loss CUDA kernels: at most ", kMaxCols,
              " columns per row, got ", z.size(1));
  if (z.size(0) == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch(z, [&](auto type_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    const LossRows<T> pb{static_cast<const T*>(z.const_data_ptr()), data_or_null<const T>(r),
                         static_cast<int>(z.size(1))};
    with_pack_width<T>(aligned, [&](auto width) {
      constexpr int W = decltype(width)::value;
      launch(type_tag, width, pb, static_cast<unsigned>(z.size(0)), block_threads(pb.cols / W),
             stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace

void loss_stats_cuda(const at::TensorBase& z, const at::TensorBase& r, const at::TensorBase& stats,
                     const at::TensorBase& weighted) {
  launch_rows(z, r, rows_aligned(z, {&r}),
              [&](auto type_tag, auto width, const auto& pb, unsigned rows, int threads,
                  cudaStream_t stream) {
                using T = std::remove_pointer_t<decltype(type_tag)>;
                constexpr int W = decltype(width)::value;
                float* out = stats.data_ptr<float>();
                if (r.defined())
                  loss_stats_kernel<T, W, true>
                      <<<rows, threads, 0, stream>>>(pb, out, weighted.data_ptr<float>());
                else
                  loss_stats_kernel<T, W, false><<<rows, threads, 0, stream>>>(pb, out, nullptr);
              });
}

void cross_entropy_grad_cuda(const at::TensorBase& z, const at::TensorBase& labels,
                             const at::TensorBase& lse, const at::TensorBase& grad) {
  launch_rows(z, {}, rows_aligned(z, {&grad}),
              [&](auto type_tag, auto width, const auto& pb, unsigned rows, int threads,
                  cudaStream_t stream) {
                using T = std::remove_pointer_t<decltype(type_tag)>;
                constexpr int W = decltype(width)::value;
                cross_entropy_grad_kernel<T, W><<<rows, threads, 0, stream>>>(
                    pb, labels.const_data_ptr<int64_t>(), lse.const_data_ptr<float>(),
                    data_or_null<T>(grad));
              });
}

void cross_entropy_fused_cuda(const at::TensorBase& z, const at::TensorBase& labels,
                              const at::TensorBase& loss, const at::TensorBase& grad) {
  launch_rows(z, {}, rows_aligned(z, {&grad}),
              [&](auto type_tag, auto width, const auto& pb, unsigned rows, int threads,
                  cudaStream_t stream) {
                using T = std::remove_pointer_t<decltype(type_tag)>;
                constexpr int W = decltype(width)::value;
                cross_entropy_fused_kernel<T, W>
                    <<<rows, threads, 0, stream>>>(pb, labels.const_data_ptr<int64_t>(),
                                                   loss.data_ptr<float>(), data_or_null<T>(grad));
              });
}

void reverse_kl_grad_cuda(const at::TensorBase& z, const at::TensorBase& r,
                          const at::TensorBase& lse, const at::TensorBase& mean_difference,
                          const at::TensorBase& kl, const at::TensorBase& grad) {
  launch_rows(z, r, rows_aligned(z, {&r, &grad}),
              [&](auto type_tag, auto width, const auto& pb, unsigned rows, int threads,
                  cudaStream_t stream) {
                using T = std::remove_pointer_t<decltype(type_tag)>;
                constexpr int W = decltype(width)::value;
                reverse_kl_grad_kernel<T, W><<<rows, threads, 0, stream>>>(
                    pb, lse.const_data_ptr<float>(), mean_difference.const_data_ptr<float>(),
                    kl.data_ptr<float>(), data_or_null<T>(grad));
              });
}

void reverse_kl_fused_cuda(const at::TensorBase& z, const at::TensorBase& r,
                           const at::TensorBase& kl, const at::TensorBase& grad) {
  launch_rows(z, r, rows_aligned(z, {&r, &grad}),
              [&](auto type_tag, auto width, const auto& pb, unsigned rows, int threads,
                  cudaStream_t stream) {
                using T = std::remove_pointer_t<decltype(type_tag)>;
                constexpr int W = decltype(width)::value;
                reverse_kl_fused_kernel<T, W>
                    <<<rows, threads, 0, stream>>>(pb, kl.data_ptr<float>(), data_or_null<T>(grad));
              });
}

}  // namespace anchored_kl
