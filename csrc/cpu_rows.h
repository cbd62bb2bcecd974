// What the CPU kernels share: exp and log1p as vectorizable float arithmetic, sums in
// independent lanes, and the running softmax of a row, all over blocks of kBlock columns in fp32
// (converted on the kernel's stack, or the row itself when it is fp32), so the hot loops run
// over plain float arrays that the compiler vectorizes, with -fno-trapping-math, which lets it
// turn the selects into blends; and the prefetches, the gradient's streaming stores and the row
// loop around them.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/TensorBase.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace anchored_kl {

// A kernel's per-row functions are compiled for AVX-512 and AVX2 too and picked at load time by
// the CPU (GCC function multiversioning), so one build is fast on any x86-64 machine.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define AKL_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define AKL_CPU_CLONES
#endif
// A function the clones call keeps the baseline (SSE2) code unless it is inlined into them:
// the clones' target does not reach their callees.
#if defined(__GNUC__)
#define AKL_INLINE inline __attribute__((always_inline))
#else
#define AKL_INLINE inline
#endif

constexpr int64_t kBlock = 512;

// Blocks of kBlock columns in a row of n.
constexpr int64_t blocks_of(int64_t n) { return (n + kBlock - 1) / kBlock; }
constexpr int kLanes = 16;  // independent partial sums: lets the reductions vectorize

// exp and log1p as straight-line float arithmetic that vectorizes (libm calls do not).
struct CpuMath {
  // Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, Taylor to degree 7 (rel. error < 1e-8
  // before rounding). Underflows to 0 below -87.3 (no subnormals); NaN stays NaN. n is rounded
  // by adding 1.5 x 2^23 + 127, which leaves n + 127 in the sum's low bits, so a shift makes the
  // scale 2^n. The kernels' arguments are <= 0 but for rounding, so there is no upper clamp:
  // +inf from 88.4 (a little early: n = 128 puts the all-ones exponent into the scale) and wrong
  // above 89; +inf gives NaN. Against a float-to-int conversion and an upper clamp, this took
  // exp_block from 0.17 to 0.12 ns per value on one core of the benchmark's Zen 5, bitwise the
  // same (scalar build) on all but 23 of the 2e9 floats in [-100, 88.3]: 1 ulp, where n ties.
  static inline float exp(float x) {
    const bool underflow = x < -87.3f;
    const float xc = underflow ? -87.3f : x;  // not max(): a NaN x stays NaN
    const float t = xc * 1.44269504f + (12582912.f + 127.f);
    const float n = t - (12582912.f + 127.f);
    const float r = (xc - n * 0.693145752f) - n * 1.42860677e-6f;
    float p = 1.f / 5040.f;
    p = p * r + 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    int32_t bits;
    std::memcpy(&bits, &t, sizeof(bits));
    bits = static_cast<int32_t>(static_cast<uint32_t>(bits) << 23);
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return underflow ? 0.f : p * scale;
  }
  // log(1 + t) for t in [0, 1] as 2 atanh(s), s = t / (2 + t) in [0, 1/3] (rel. error < 1e-8).
  static inline float log1p(float t) {
    const float s = t / (2.f + t);
    const float s2 = s * s;
    float p = 1.f / 15.f;
    p = p * s2 + 1.f / 13.f;
    p = p * s2 + 1.f / 11.f;
    p = p * s2 + 1.f / 9.f;
    p = p * s2 + 1.f / 7.f;
    p = p * s2 + 1.f / 5.f;
    p = p * s2 + 1.f / 3.f;
    p = p * s2 + 1.f;
    return 2.f * s * p;
  }
};

// Sum of n <= kBlock floats in kLanes independent partial sums (a reduction that vectorizes).
AKL_INLINE float lane_sum(const float* x, int64_t n) {
  float acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int k = 0; k < kLanes; ++k) acc[k] += x[j + k];
  float total = 0.f;
  for (; j < n; ++j) total += x[j];
  for (int k = 0; k < kLanes; ++k) total += acc[k];
  return total;
}

// Max of n floats. A NaN may or may not be skipped (the vector max keeps its second operand):
// either way the exps and sums that follow are NaN. The OpenMP reduction is what vectorizes
// it: GCC keeps the kLanes-lanes form of lane_sum, spelled with a select, in scalar registers.
AKL_INLINE float lane_max(const float* x, int64_t n) {
  float max = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : max)
  for (int64_t j = 0; j < n; ++j) max = x[j] > max ? x[j] : max;
  return max;
}

// e[j] = exp(x[j] - max) over n <= kBlock values whose max is known (e may be x), 0s when max is
// -inf (nothing but -inf so far); returns their sum.
AKL_INLINE float exp_block(const float* x, int64_t n, float max, float* e) {
  if (max == -std::numeric_limits<float>::infinity()) {
    for (int64_t j = 0; j < n; ++j) e[j] = 0.f;
    return 0.f;
  }
  for (int64_t j = 0; j < n; ++j) e[j] = CpuMath::exp(x[j] - max);
  return lane_sum(e, n);
}

// Running (max, sum of exp(x - max)) of one stream over a row; double sums across blocks, so
// 1e5+ columns cost no precision.
struct RowSoftmax {
  float max = -std::numeric_limits<float>::infinity();
  double sum = 0.0;

  // Merges n <= kBlock values and leaves e[k] = exp(x[k] - max) (the new max; 0 while the row
  // has nothing but -inf) for callers that also sum something weighted by p. Returns the factor
  // exp(old max - new max) by which such sums over the earlier columns must be rescaled. A NaN
  // or +inf input makes the sum NaN, so the row's loss is NaN.
  AKL_INLINE double add(const float* x, int64_t n, float* e) {
    const float block_max = lane_max(x, n);
    const float new_max = block_max > max ? block_max : max;
    const double rescale = new_max == -std::numeric_limits<float>::infinity()
                               ? 1.0  // nothing but -inf so far: the sum stays 0
                               : std::exp(static_cast<double>(max) - new_max);
    sum = sum * rescale + exp_block(x, n, new_max, e);
    max = new_max;
    return rescale;
  }

  AKL_INLINE void add(const float* x, int64_t n) {
    float e[kBlock];
    add(x, n, e);
  }
};

// A row's softmax over blocks whose values stay in memory (the unsharded rows' scratch): each
// block's exps relative to the block's own max, taken while the block is in the L1, and per
// block the factor exp(block max - row max) / row sum that turns them into probabilities, so a
// second pass over the row takes no exp. (RowSoftmax serves sharded rows, whose statistics are
// merged across ranks before any probability is formed.)
struct BlockSoftmax {
  float* block_max;  // [blocks]
  float* factor;     // [blocks]: each block's sum of exps until finish(), then its factor
  float max = -std::numeric_limits<float>::infinity();

  // e[j] = exp(x[j] - the block's max) for the n <= kBlock values x of block b (e may be x).
  AKL_INLINE void add(int64_t b, const float* x, int64_t n, float* e) {
    block_max[b] = lane_max(x, n);
    factor[b] = exp_block(x, n, block_max[b], e);
    max = block_max[b] > max ? block_max[b] : max;
  }

  // After the row's last block: the factors, and the row's (max, log of the sum) into lse[0],
  // lse[1]. A block of nothing but -inf gets the factor 0; a row of nothing but -inf gets NaN
  // factors (0 x 1 / 0), as exp(x - max) / sum would give.
  AKL_INLINE void finish(int64_t blocks, float* lse) {
    const auto scale = [&](int64_t b) {
      return block_max[b] == -std::numeric_limits<float>::infinity()
                 ? 0.0
                 : std::exp(static_cast<double>(block_max[b]) - max);
    };
    double sum = 0.0;
    for (int64_t b = 0; b < blocks; ++b) sum += factor[b] * scale(b);
    for (int64_t b = 0; b < blocks; ++b) factor[b] = static_cast<float>(scale(b) / sum);
    lse[0] = max;
    lse[1] = std::log(static_cast<float>(sum));
  }
};

// Asks for columns [j0, j0 + n) of one or more rows (of one element type), one request per
// 64-byte line, the rows' lines interleaved, into the L1 (kL1, prefetcht0) or the L2 (kL2,
// prefetcht1).
enum CacheLevel : int { kL2 = 2, kL1 = 3 };
template <int Level, typename T, typename... More>
AKL_INLINE void prefetch_columns(int64_t j0, int64_t n, const T* row, const More*... more) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t j = j0; j < j0 + n; j += kLine) {
    __builtin_prefetch(row + j, 0, Level);
    (__builtin_prefetch(more + j, 0, Level), ...);
  }
}

// A pass that reads rows from DRAM asks for them kAhead blocks (4 KiB of fp32 per row) before
// it reads them (j0: the block it is about to read): the hardware prefetchers alone leave the
// arithmetic waiting. On the operator benchmark's 2-core Zen 5 (4096 x 32000 fp32, anchored
// KL in logit live mode), row_fused's first pass took 69 ms from DRAM against 42 ms on rows
// already in the L3, and 53 ms with this; the whole row_fused without a gradient 90 -> 78 ms,
// row_kl_grad on a 16000-column shard 48-55 -> 37-42 ms, row_stats within 2 ms either way. Two
// blocks ahead did better than one or three.
constexpr int64_t kAhead = 2;
template <typename T, typename... More>
AKL_INLINE void prefetch_ahead(int64_t j0, int64_t cols, const T* row, const More*... more) {
  const int64_t ahead = j0 + kAhead * kBlock;
  if (ahead < cols) prefetch_columns<kL1>(ahead, std::min(kBlock, cols - ahead), row, more...);
}

// n values of a row as fp32: the row itself when it is fp32, else converted into dst. (Copied,
// fp32 values compile to a `rep movsq` that took 28% of the reverse KL's unsharded row on the
// operator benchmark's Zen 5, the second pass's copies from the L2 half of it.)
template <typename T>
AKL_INLINE const float* fp32_block(const T* src, int64_t n, float* dst) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
    return dst;
  }
}

#if defined(__SSE2__)
// `lines` 64-byte lines from src to dst (64-byte aligned) with AVX-512 streaming stores, one
// per line. Compiled for AVX-512 whichever clone calls it (a clone for another target could not
// inline it), and called only where the CPU has AVX-512, once per block of kBlock columns.
__attribute__((target("avx512f"), noinline)) inline void stream_lines_avx512(const char* src,
                                                                             int64_t lines,
                                                                             char* dst) {
  for (int64_t k = 0; k < lines; ++k)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + 64 * k), _mm512_loadu_si512(src + 64 * k));
}
#endif

// The gradient rows go to memory with streaming (non-temporal) stores. A gradient of [rows, V]
// is far larger than the caches and is read again only by the backward: an ordinary store first
// reads each line it misses (a read of the whole gradient that nothing uses) and evicts the
// row's inputs and scratch for it. On the operator benchmark's 2-core Zen 5 (4096 x 32000 fp32,
// logit live), writing the gradient into memory already mapped (cpu_gradient.cpp) added 7-10 ms
// to the 70-76 ms forward this way, 26-31 ms with ordinary stores. A CPU with AVX-512 takes a
// store per 64-byte line, others one per 16 bytes (SSE2, which every clone has); fp32 values go
// out straight from g, other types through a rounded copy on the stack. Against 16-byte stores
// from a copy for every type, the fused call with the gradient (4096 x 32000 fp32) took 0.73 of
// the time for the cross-entropy, whose gain is the skipped copy's, and 0.88-0.98 for the other
// losses, whose gain is the wider stores' (docs/design/cpu_performance.md, change 15, has the
// measurements). dst[j] = g[j] rounded to T for n <= kBlock values.
template <typename T>
AKL_INLINE void store_gradient(const float* g, int64_t n, T* dst) {
#if defined(__SSE2__)
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  constexpr int64_t kSize = sizeof(T);
  alignas(16) T converted[kBlock];
  const T* src;
  if constexpr (std::is_same_v<T, float>) {
    src = g;
  } else {
    for (int64_t j = 0; j < n; ++j) converted[j] = static_cast<T>(g[j]);
    src = converted;
  }
  const int64_t line = avx512 ? 64 : 16;
  int64_t j = 0;
  for (; j < n && reinterpret_cast<uintptr_t>(dst + j) % line != 0; ++j) dst[j] = src[j];
  if (avx512) {
    const int64_t lines = (n - j) * kSize / 64;
    stream_lines_avx512(reinterpret_cast<const char*>(src + j), lines,
                        reinterpret_cast<char*>(dst + j));
    j += lines * 64 / kSize;
  } else {
    for (; j + 16 / kSize <= n; j += 16 / kSize)
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + j),
                       _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j)));
  }
  for (; j < n; ++j) dst[j] = src[j];
#else
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<T>(g[j]);
#endif
}

// A skipped row's gradient (a row of weight 0, below): zeros, written as store_gradient writes.
// The buffer may hold an earlier gradient (cpu_gradient.cpp), so every row must be written.
template <typename T>
inline void store_zero_gradient(int64_t cols, T* dst) {
  const float zeros[kBlock] = {};
  for (int64_t j0 = 0; j0 < cols; j0 += kBlock)
    store_gradient(zeros, std::min(kBlock, cols - j0), dst + j0);
}

// A loss's per-token weights (absent: every row weighs 1). The kernels scale a row's gradient by
// its weight as they write it, so the backward need not rescale it when its incoming gradient
// is 1 (a plain sum); a row of weight 0 is skipped: its inputs are not read, its gradient is
// zeros and its outputs keep the zeros the bindings allocate them with. In a fine-tuning batch
// the loss mask drops the prompt and padding tokens, most of them in short examples.
struct RowWeights {
  const float* w;  // [rows] or null

  float operator[](int64_t i) const { return w == nullptr ? 1.f : w[i]; }
  bool skipped(int64_t i) const { return w != nullptr && w[i] == 0.f; }
};

inline RowWeights row_weights(const at::TensorBase& weights) {
  return {weights.defined() ? weights.const_data_ptr<float>() : nullptr};
}

// Ends a thread's store_gradient calls: streaming stores are not ordered with the stores around
// them, so the thread's part of the gradient is fenced before the parallel region's end
// publishes it.
inline void gradient_stored() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// Row i of a [rows, cols] gradient of T (null for an undefined tensor).
template <typename T>
T* grad_row(const at::TensorBase& grad, int64_t i) {
  return grad.defined() ? static_cast<T*>(grad.data_ptr()) + i * grad.size(1) : nullptr;
}

// Calls row(i, next, weight, e, block) for every row of z but the skipped ones (weight 0,
// RowWeights), whose gradient rows (of T, when grad is defined) it writes as zeros; the rows
// split over threads. next: the row the same thread computes after i (the unsharded rows
// prefetch its inputs while they compute i), -1 after its last. e and block: each thread's
// scratch of `streams` x cols floats for the row's exps and `per_block` floats per block of
// kBlock columns (the unsharded rows'; none for the others).
template <typename T, class Row>
void for_each_row(const at::TensorBase& z, const at::TensorBase& weights,
                  const at::TensorBase& grad, Row&& row, int streams = 0, int per_block = 0) {
  const int64_t cols = z.size(1);
  const RowWeights weight = row_weights(weights);
  at::parallel_for(0, z.size(0), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> e(streams * cols), block(per_block * blocks_of(cols));
    for (int64_t i = begin; i < end; ++i) {
      if (weight.skipped(i)) {
        if (grad.defined()) store_zero_gradient(cols, grad_row<T>(grad, i));
        continue;
      }
      int64_t next = i + 1;
      while (next < end && weight.skipped(next)) ++next;
      row(i, next < end ? next : -1, weight[i], e.data(), block.data());
    }
    gradient_stored();
  });
}

}  // namespace anchored_kl
