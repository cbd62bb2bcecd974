// CPU kernels of the anchored KL: per-row softmax statistics, the column pass (partial KL and
// the gradient p - q), and the unsharded row in one call that keeps the row's exps (row_fused).
//
// Each row is walked in blocks of kBlock columns converted to fp32 on the stack, the
// temperature folded in (cpu_rows.h: why that vectorizes), so no [rows x V] temporary exists
// besides the gradient. Block results go into double row accumulators, so summing 1e5+ columns
// costs no precision. Rows are split over threads with at::parallel_for.
#include "anchored_kl.h"
#include "cpu_rows.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace anchored_kl {
namespace {

// Pointers to one row of each input (c == z in live mode).
template <typename T>
struct RowPtrs {
  const T* z;
  const T* c;
  const T* r;
};

template <typename T>
inline void load_scaled(const T* src, int64_t n, float inv_tau, float* dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]) * inv_tau;
}

struct Params {
  float alpha, inv_tau, log_one_minus_alpha, log_alpha;
  bool live;
  float grad_scale;  // the gradient's factor: the row's weight / tau (weighted, below)
};

Params make_params(double alpha, double inv_tau, bool live) {
  return {static_cast<float>(alpha),
          static_cast<float>(inv_tau),
          static_cast<float>(std::log1p(-alpha)),
          static_cast<float>(std::log(alpha)),
          live,
          static_cast<float>(inv_tau)};
}

// prm for a row of the given weight.
Params weighted(Params prm, float weight) {
  prm.grad_scale = prm.inv_tau * weight;
  return prm;
}

// Columns [j0, j0 + n) of z and r, and of c in snapshot mode, scaled into zb, rb and cb;
// returns the current model's block (zb in live mode).
template <typename T>
AKL_INLINE const float* load_columns(const RowPtrs<T>& row, int64_t j0, int64_t n,
                                     const Params& prm, float* zb, float* cb, float* rb) {
  load_scaled(row.z + j0, n, prm.inv_tau, zb);
  load_scaled(row.r + j0, n, prm.inv_tau, rb);
  if (prm.live) return zb;
  load_scaled(row.c + j0, n, prm.inv_tau, cb);
  return cb;
}

// Asks for columns [j0, j0 + n) of a row's inputs (cpu_rows.h's prefetch_columns), or for the
// block kAhead blocks past j0 (prefetch_ahead).
template <int Level, typename T>
AKL_INLINE void prefetch_inputs(const RowPtrs<T>& row, int64_t j0, int64_t n, bool live) {
  if (live)
    prefetch_columns<Level>(j0, n, row.z, row.r);
  else
    prefetch_columns<Level>(j0, n, row.z, row.r, row.c);
}

template <typename T>
AKL_INLINE void prefetch_inputs_ahead(const RowPtrs<T>& row, int64_t j0, int64_t cols, bool live) {
  if (live)
    prefetch_ahead(j0, cols, row.z, row.r);
  else
    prefetch_ahead(j0, cols, row.z, row.r, row.c);
}

template <typename T, Interp Mode>
AKL_CPU_CLONES void row_stats(const RowPtrs<T>& row, int64_t cols, const Params& prm, float* out) {
  float zb[kBlock], cb[kBlock], rb[kBlock], ab[kBlock];
  RowSoftmax s[3];
  for (int64_t j0 = 0; j0 < cols; j0 += kBlock) {
    const int64_t n = std::min(kBlock, cols - j0);
    prefetch_inputs_ahead(row, j0, cols, prm.live);
    load_scaled(row.z + j0, n, prm.inv_tau, zb);
    s[0].add(zb, n);
    load_scaled(row.r + j0, n, prm.inv_tau, rb);
    const float* cur = zb;
    if (!prm.live) {
      load_scaled(row.c + j0, n, prm.inv_tau, cb);
      cur = cb;
    }
    if (Mode == Interp::kLogit) {
      for (int64_t j = 0; j < n; ++j) ab[j] = anchor_logit(cur[j], rb[j], prm.alpha);
      s[1].add(ab, n);
    } else {
      if (!prm.live) s[1].add(cb, n);
      s[2].add(rb, n);
    }
  }
  if (Mode == Interp::kProb && prm.live) s[1] = s[0];
  for (int k = 0; k < num_streams(Mode); ++k) {
    out[2 * k] = s[k].max;
    out[2 * k + 1] = static_cast<float>(s[k].sum);
  }
}

// Prob mode's q = (1 - alpha) p_c + alpha p_r from two exps, as row_fused forms it from its kept
// exps. column_element's exp of log q (a log_add_exp: an exp and a log1p) takes a log1p more,
// and rounds log q to within |log q| eps before its exp. Formed with the element, not in x's
// loop: row_stats + row_kl_grad on a 4096 x 16000 fp32 shard in prob snapshot mode took 0.92 of
// the time they took with the exp of log q on 2 threads (0.94 on one, 0.94 in bf16; the operator
// benchmark's Zen 5, bench/compare_builds.py --sharded), and 0.96 of it with q in x's loop.
AKL_INLINE float prob_q(float c, float r, const float* lse, float alpha) {
  return (1.f - alpha) * CpuMath::exp(log_softmax_at(c, lse, 1)) +
         alpha * CpuMath::exp(log_softmax_at(r, lse, 2));
}

// Writes grad = the row's weight x (p - q) / tau for the row (when grad != nullptr) and returns
// its partial KL. lse: the row's global (max, log_sum) per stream.
template <typename T, Interp Mode>
AKL_CPU_CLONES double row_kl_grad(const RowPtrs<T>& row, int64_t cols, const Params& prm,
                                  const float* lse, T* grad) {
  float zb[kBlock], cb[kBlock], rb[kBlock], ab[kBlock], gb[kBlock], kb[kBlock];
  double kl = 0.0;
  for (int64_t j0 = 0; j0 < cols; j0 += kBlock) {
    const int64_t n = std::min(kBlock, cols - j0);
    prefetch_inputs_ahead(row, j0, cols, prm.live);
    const float* cur = load_columns(row, j0, n, prm, zb, cb, rb);
    if constexpr (Mode == Interp::kLogit)  // in a loop of its own: see logit_element
      for (int64_t j = 0; j < n; ++j) ab[j] = anchor_logit(cur[j], rb[j], prm.alpha);
    else  // x, a log_add_exp, in a loop of its own (into gb): see row_fused
      for (int64_t j = 0; j < n; ++j)
        gb[j] = prob_log_ratio<CpuMath>(zb[j], cur[j], rb[j], lse, prm.log_one_minus_alpha,
                                        prm.log_alpha);
    for (int64_t j = 0; j < n; ++j) {
      Element e;
      if constexpr (Mode == Interp::kLogit) {
        e = logit_element<CpuMath>(zb[j], cur[j], rb[j], ab[j], prm.alpha, lse);
      } else {
        const float p = CpuMath::exp(log_softmax_at(zb[j], lse, 0)),
                    q = prob_q(cur[j], rb[j], lse, prm.alpha), x = gb[j];
        e = kl_element_of(p, q, finite(x) ? x : nonfinite_x(p, q));
      }
      gb[j] = e.p_minus_q * prm.grad_scale;
      kb[j] = e.kl_term;
    }
    const float block_kl = lane_sum(kb, n);
    kl += block_kl;
    if (grad != nullptr) store_gradient(gb, n, grad + j0);
  }
  return kl;
}

// The unsharded row (fused_cpu) in two passes while it stays in cache. The first takes each
// block's exps relative to the block's own max, exp(x - block max), into `e` (3 x cols fp32)
// while the block is in the L1, with the block's max and sum; the second forms p and q as
// e x factor, the block's factor exp(block max - row max) / row sum being one scalar per block
// and stream. row_stats + row_kl_grad, which serve sharded rows and so cannot keep the exps,
// take 4 exps per column in logit mode (2 + p and q again) and 6-7 in prob mode (+ p, q's two
// and x's log_add_exp, with a log1p); this takes 2, and 3-4 in prob mode (x's log_add_exp),
// and reads e once, in the pass that needs it. A row of 32k fp32
// columns (256 KB of inputs, as much again of e) stays in the L2 (2 MiB per core on the
// benchmark's Xeon), so DRAM sees one read per input; 152k columns spill to the L3. The first
// pass waits on DRAM (little arithmetic per byte), so the second, the one with the most
// arithmetic, prefetches the next row into the L2 as it goes (`next`: the thread's next row of
// non-zero weight, null after its last), and the first asks for its own blocks ahead
// (prefetch_inputs_ahead) for what that leaves out: the next row does not all fit beside this row
// and e in a 1 MiB L2 (Zen 5). `block` holds 2 x 3 floats per block of kBlock columns: maxima, then
// sums and factors.
//
// Prob mode's x, a log_add_exp (an exp, a division, a log1p), is formed in a loop of its own
// before the element's (row_kl_grad does the same with x and log q): in one loop each column
// is a chain of ~45 dependent operations, more than the out-of-order window overlaps across
// columns. Split, the prob-snapshot call took 19-20% less at 4096 x 32000 and 2048 x 19008
// on the operator benchmark's Zen 5 (fp32 and bf16, bench/compare_builds.py), and row_stats +
// row_kl_grad on one 16000-column shard 15% less. The same split gained nothing in logit mode,
// whose x is three operations. The gradient is written as in row_kl_grad.
template <typename T, Interp Mode>
AKL_CPU_CLONES double row_fused(const RowPtrs<T>& row, const RowPtrs<T>* next, int64_t cols,
                                const Params& prm, float* e, float* block, T* grad) {
  const int64_t blocks = blocks_of(cols);
  // e's streams: 0 policy z; 1 anchor a (logit) or current c (prob snapshot); 2 reference r
  // (prob). Prob live uses no slot 1: c == z.
  float* const es[3] = {e, e + cols, e + 2 * cols};
  BlockSoftmax s[3] = {{block, block + 3 * blocks},
                       {block + blocks, block + 4 * blocks},
                       {block + 2 * blocks, block + 5 * blocks}};
  const bool used[3] = {true, Mode == Interp::kLogit || !prm.live, Mode == Interp::kProb};
  float zb[kBlock], cb[kBlock], rb[kBlock], gb[kBlock], kb[kBlock];
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t j0 = b * kBlock, n = std::min(kBlock, cols - j0);
    prefetch_inputs_ahead(row, j0, cols, prm.live);
    if constexpr (Mode == Interp::kLogit) {
      const float* cur = load_columns(row, j0, n, prm, es[0] + j0, cb, rb);
      for (int64_t j = 0; j < n; ++j) es[1][j0 + j] = anchor_logit(cur[j], rb[j], prm.alpha);
    } else {
      load_scaled(row.z + j0, n, prm.inv_tau, es[0] + j0);
      if (!prm.live) load_scaled(row.c + j0, n, prm.inv_tau, es[1] + j0);
      load_scaled(row.r + j0, n, prm.inv_tau, es[2] + j0);
    }
    for (int k = 0; k < 3; ++k)
      if (used[k]) s[k].add(b, es[k] + j0, n, es[k] + j0);
  }
  // The (max, log_sum) pairs in the stats' stream order (logit: z, a; prob: z, c, r).
  float lse[6];
  for (int k = 0; k < 3; ++k)
    if (used[k]) s[k].finish(blocks, lse + 2 * k);
  if (Mode == Interp::kProb && prm.live) {
    lse[2] = lse[0];
    lse[3] = lse[1];
  }
  const int current = prm.live ? 0 : 1;  // prob mode's p_c
  double kl = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t j0 = b * kBlock, n = std::min(kBlock, cols - j0);
    const float* cur = load_columns(row, j0, n, prm, zb, cb, rb);
    if (next != nullptr) prefetch_inputs<kL2>(*next, j0, n, prm.live);
    const float fp = s[0].factor[b], fq = s[1].factor[b], fc = s[current].factor[b],
                fr = s[2].factor[b];
    if constexpr (Mode == Interp::kProb)  // x in a loop of its own (into gb): see above
      for (int64_t j = 0; j < n; ++j)
        gb[j] = prob_log_ratio<CpuMath>(zb[j], cur[j], rb[j], lse, prm.log_one_minus_alpha,
                                        prm.log_alpha);
    for (int64_t j = 0; j < n; ++j) {
      const float p = es[0][j0 + j] * fp;
      float q, x;
      if constexpr (Mode == Interp::kLogit) {
        q = es[1][j0 + j] * fq;
        x = logit_log_ratio(zb[j], cur[j], rb[j], prm.alpha, lse);
      } else {
        q = (1.f - prm.alpha) * (es[current][j0 + j] * fc) + prm.alpha * (es[2][j0 + j] * fr);
        x = gb[j];
      }
      const Element el = kl_element_of(p, q, finite(x) ? x : nonfinite_x(p, q));
      gb[j] = el.p_minus_q * prm.grad_scale;
      kb[j] = el.kl_term;
    }
    kl += lane_sum(kb, n);
    if (grad != nullptr) store_gradient(gb, n, grad + j0);
  }
  return kl;
}

template <typename T>
RowPtrs<T> row_ptrs(const Inputs& in, int64_t i) {
  const int64_t cols = in.z.size(1);
  const T* z = in.z.data_ptr<T>() + i * cols;
  const T* c = in.c.has_value() ? in.c->data_ptr<T>() + i * cols : z;
  return {z, c, in.r.data_ptr<T>() + i * cols};
}

// Calls fn(T*, ModeTag) with a null pointer of the inputs' element type and the mode as a
// compile-time constant. The double kernels this builds are never called (make_inputs refuses
// double) but stay: GCC's inlining, and so its code for the other kernels, depends on them.
// Every dispatch without them that was tried changed that code: bf16 and fp16 results by an
// ulp, and the float32 kernels for CPUs without AVX-512.
template <class Fn>
void dispatch(const Inputs& in, Fn&& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.z.scalar_type(), "anchored_kl", [&] {
    if (in.mode == Interp::kLogit)
      fn(static_cast<scalar_t*>(nullptr), std::integral_constant<Interp, Interp::kLogit>{});
    else
      fn(static_cast<scalar_t*>(nullptr), std::integral_constant<Interp, Interp::kProb>{});
  });
}

}  // namespace

void row_stats_cpu(const Inputs& in, const at::TensorBase& weights, const at::TensorBase& stats) {
  const int64_t cols = in.z.size(1);
  const int streams = num_streams(in.mode);
  const Params prm = make_params(in.alpha, in.inv_tau, !in.c.has_value());
  float* out = stats.data_ptr<float>();
  dispatch(in, [&](auto type_tag, auto mode_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    constexpr Interp Mode = decltype(mode_tag)::value;
    for_each_row<T>(in.z, weights, at::TensorBase(),
                    [&](int64_t i, int64_t, float, float*, float*) {
                      row_stats<T, Mode>(row_ptrs<T>(in, i), cols, prm, out + i * streams * 2);
                    });
  });
}

void kl_grad_cpu(const Inputs& in, const at::TensorBase& weights, const at::TensorBase& lse,
                 const at::TensorBase& kl, const at::TensorBase& grad) {
  const int64_t cols = in.z.size(1);
  const int streams = num_streams(in.mode);
  const Params prm = make_params(in.alpha, in.inv_tau, !in.c.has_value());
  const float* lse_ptr = lse.data_ptr<float>();
  float* kl_ptr = kl.data_ptr<float>();
  dispatch(in, [&](auto type_tag, auto mode_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    constexpr Interp Mode = decltype(mode_tag)::value;
    for_each_row<T>(in.z, weights, grad, [&](int64_t i, int64_t, float weight, float*, float*) {
      kl_ptr[i] =
          static_cast<float>(row_kl_grad<T, Mode>(row_ptrs<T>(in, i), cols, weighted(prm, weight),
                                                  lse_ptr + i * streams * 2, grad_row<T>(grad, i)));
    });
  });
}

void fused_cpu(const Inputs& in, const at::TensorBase& weights, const at::TensorBase& kl,
               const at::TensorBase& grad) {
  const int64_t cols = in.z.size(1);
  const Params prm = make_params(in.alpha, in.inv_tau, !in.c.has_value());
  float* kl_ptr = kl.data_ptr<float>();
  dispatch(in, [&](auto type_tag, auto mode_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    constexpr Interp Mode = decltype(mode_tag)::value;
    for_each_row<T>(
        in.z, weights, grad,
        [&](int64_t i, int64_t next, float weight, float* e, float* block) {
          const RowPtrs<T> following = row_ptrs<T>(in, next < 0 ? i : next);
          kl_ptr[i] = static_cast<float>(
              row_fused<T, Mode>(row_ptrs<T>(in, i), next < 0 ? nullptr : &following, cols,
                                 weighted(prm, weight), e, block, grad_row<T>(grad, i)));
        },
        3, 6);
  });
}

}  // namespace anchored_kl
