// What the CUDA kernels of anchored_kl_cuda.cu and sharded_losses_cuda.cu share (the first file's
// header argues the scheme): the accurate libdevice functions, element types and 16-byte packs,
// the online softmax of a thread, and the deterministic warp and block reductions. One thread
// block per row; thread t of T takes the packs t, t + T, ... of its row.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "anchored_kl_math.h"

namespace anchored_kl {

// The accurate libdevice functions (the build uses no fast-math flags).
struct CudaMath {
  static AKL_HD float exp(float x) { return expf(x); }
  static AKL_HD float log1p(float t) { return log1pf(t); }
};

constexpr int kPackBytes = 16;
// Packs per stream each thread loads from global memory before using them. With the block
// shapes below that is 48-72 KB in flight per SM, more than DRAM latency needs (~25 KB per SM
// on an H100), while the kernels stay within the ~80 registers that the shapes allow.
constexpr int kGlobalUnroll = 2;
// Streaming kernels: up to 256 threads, at least 3 blocks per SM, so that some block is
// loading while another reduces at the end of its row.
constexpr int kMaxThreads = 256;
constexpr int kStreamingBlocksPerSm = 3;
constexpr int64_t kMaxCols = int64_t{1} << 30;  // keeps in-row indices in int

template <typename T>
constexpr int kPackWidth = kPackBytes / sizeof(T);

// ---------------------------------------------------------------------------------------------
// Element types and packs.

__device__ __forceinline__ float to_float(float x) { return x; }
// bf16 is the top half of an fp32 (spelled out: fewer registers than __bfloat162float).
__device__ __forceinline__ float to_float(__nv_bfloat16 x) {
  return __uint_as_float(static_cast<uint32_t>(__bfloat16_as_ushort(x)) << 16);
}
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}

// W consecutive columns of one stream, loaded or stored as one access.
template <typename T, int W>
struct alignas(sizeof(T) * W) Pack {
  T v[W];
};

template <typename T, int W>
__device__ __forceinline__ void store(Pack<T, W>* dst, const float (&g)[W]) {
  Pack<T, W> out;
#pragma unroll
  for (int i = 0; i < W; ++i) out.v[i] = from_float<T>(g[i]);
  *dst = out;
}

// ---------------------------------------------------------------------------------------------
// Reductions.

// Running (max, sum of exp(x - max)) of one stream, as RowSoftmax in cpu_rows.h: a column
// block whose running max is still -inf has no mass and is skipped; NaN or +inf make sum NaN.
// A plain aggregate so that it can live in __shared__ arrays.
struct SoftmaxState {
  float max, sum;

  template <int W>
  __device__ __forceinline__ void add(const float (&x)[W]) {
    float m = max;
#pragma unroll
    for (int i = 0; i < W; ++i) m = fmaxf(m, x[i]);  // ignores NaN, like the CPU's select
    if (m == -INFINITY) return;
    if (m > max) {
      sum *= expf(max - m);
      max = m;
    }
    float s = 0.f;  // summed per pack first: W times fewer roundings in the running sum
#pragma unroll
    for (int i = 0; i < W; ++i) s += expf(x[i] - max);
    sum += s;
  }
};

__device__ __forceinline__ SoftmaxState empty_state() { return {-INFINITY, 0.f}; }

// Both combines are commutative bit for bit, so a butterfly leaves every lane the same value
// (the products are rounded on their own: an FMA would round a's and b's differently).
__device__ __forceinline__ SoftmaxState combine(SoftmaxState a, SoftmaxState b) {
  const float m = fmaxf(a.max, b.max);
  if (m == -INFINITY) return a;  // both empty
  return {m, __fmul_rn(a.sum, expf(a.max - m)) + __fmul_rn(b.sum, expf(b.max - m))};
}
__device__ __forceinline__ float combine(float a, float b) { return a + b; }

__device__ __forceinline__ float shfl_xor(float v, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}
__device__ __forceinline__ SoftmaxState shfl_xor(SoftmaxState s, int lane_mask) {
  return {shfl_xor(s.max, lane_mask), shfl_xor(s.sum, lane_mask)};
}

template <typename V, int N>
__device__ __forceinline__ void warp_reduce(V (&v)[N]) {
#pragma unroll
  for (int k = 0; k < N; ++k)
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) v[k] = combine(v[k], shfl_xor(v[k], m));
}

// Combines v over the block; every thread gets the result. Each thread folds the warp results
// in warp order, a fixed order, so the result does not depend on timing.
template <typename V, int N>
__device__ __forceinline__ void block_reduce(V (&v)[N], V (*scratch)[N]) {
  warp_reduce(v);
  if (threadIdx.x % 32 == 0)
#pragma unroll
    for (int k = 0; k < N; ++k) scratch[threadIdx.x / 32][k] = v[k];
  __syncthreads();
  const int warps = blockDim.x / 32;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    v[k] = scratch[0][k];
    for (int w = 1; w < warps; ++w) v[k] = combine(v[k], scratch[w][k]);
  }
  __syncthreads();  // scratch may be reused right away
}

// ---------------------------------------------------------------------------------------------
// Host side.

// Threads of a streaming block for rows of n packs: enough for kGlobalUnroll packs per thread.
inline int block_threads(int64_t n) {
  int threads = 128;
  while (threads < kMaxThreads && int64_t{threads} * kGlobalUnroll < n) threads *= 2;
  return threads;
}

// Calls launch(width) with the pack width as a compile-time constant: 16 bytes when the rows
// are aligned, else one column.
template <typename T, class Launch>
void with_pack_width(bool aligned, Launch&& launch) {
  if (aligned)
    launch(std::integral_constant<int, kPackWidth<T>>{});
  else
    launch(std::integral_constant<int, 1>{});
}

}  // namespace anchored_kl
