// Per-column math of the anchored KL, shared by the CPU and CUDA kernels.
//
// Notation (one row = one token, V_local columns on this rank), logits already divided by
// the temperature:  z policy,  c current model (== z in live mode),  r frozen reference.
//   logit mode:  q = softmax(a),  a = (1 - alpha) c + alpha r
//   prob mode:   q = (1 - alpha) softmax(c) + alpha softmax(r)
//   p = softmax(z).  Every LSE is over the FULL vocabulary (combined across TP ranks) and
//   kept as the pair (max, log of the sum of exp(x - max)): log-probabilities are formed as
//   (x - max) - log_sum, where x - max is exact for the columns that carry the mass, instead
//   of x - LSE, which loses ~1e-3 absolute in fp32 once logits reach 1e4.
//
// The row's KL(q || p) is accumulated as sum_v p_v g(x_v) with x_v = log q_v - log p_v and
// g(x) = x e^x - e^x + 1. Since sum q = sum p = 1 this equals sum q x, but every term is >= 0
// and second order in x (for |x| < 1/2 g comes from its own series, which cancels nothing),
// so small alpha (q close to p) costs no precision, and an error delta in the global LSEs
// moves the result by only about delta * KL. The gradient p - q is -p expm1(x): the small
// difference of close numbers without subtracting them.
//
// `Math` supplies exp(x) and log1p(t) for t in [0, 1]: a vectorizable polynomial on the CPU,
// the libdevice functions on the GPU.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define AKL_HD __host__ __device__ __forceinline__
#else
#define AKL_HD inline
#endif

namespace anchored_kl {

enum class Interp : int { kLogit = 0, kProb = 1 };

// Softmax statistics a row needs, in the order of the stats tensor [rows, streams, 2]
// (local: max and sum of exp(x - max); global: max and log of that sum):
//   logit mode: policy z, anchor a
//   prob mode : policy z, current c, reference r   (live: c == z, so slot 1 repeats slot 0)
AKL_HD int num_streams(Interp mode) { return mode == Interp::kLogit ? 2 : 3; }

// x is a finite number (not inf, not NaN); written without isfinite so it also holds on the
// host and device alike.
AKL_HD bool finite(float x) { return x - x == 0.f; }

// Anchor logit (logit mode). alpha == 1 (plain distillation toward r) and alpha == 0 (used by
// the diagnostics for KL(p_c || .)) are spelled out so that 0 * (-inf) cannot become NaN.
AKL_HD float anchor_logit(float c, float r, float alpha) {
  return alpha == 1.f ? r : alpha == 0.f ? c : (1.f - alpha) * c + alpha * r;
}

// expm1 for |x| < 0.5: Taylor to degree 8, relative error < 2e-8 there.
AKL_HD float expm1_small(float x) {
  float p = 1.f / 40320.f;
  p = p * x + 1.f / 5040.f;
  p = p * x + 1.f / 720.f;
  p = p * x + 1.f / 120.f;
  p = p * x + 1.f / 24.f;
  p = p * x + 1.f / 6.f;
  p = p * x + 0.5f;
  p = p * x + 1.f;
  return p * x;
}

// g(x) = x e^x - e^x + 1 for |x| < 0.5: sum of (k-1)/k! x^k, k = 2..9 (rel. error < 2e-8).
AKL_HD float g_small(float x) {
  float p = 1.f / 45360.f;
  p = p * x + 1.f / 5760.f;
  p = p * x + 1.f / 840.f;
  p = p * x + 1.f / 144.f;
  p = p * x + 1.f / 30.f;
  p = p * x + 1.f / 8.f;
  p = p * x + 1.f / 3.f;
  p = p * x + 0.5f;
  return p * x * x;
}

// log of the softmax of stream k at logit x, and LSE_i - LSE_j, from the (max, log_sum) pairs.
AKL_HD float log_softmax_at(float x, const float* lse, int k) {
  return (x - lse[2 * k]) - lse[2 * k + 1];
}
AKL_HD float lse_difference(const float* lse, int i, int j) {
  return (lse[2 * i] - lse[2 * j]) + (lse[2 * i + 1] - lse[2 * j + 1]);
}

// log(e^u + e^w), exact when either or both are -inf.
template <class Math>
AKL_HD float log_add_exp(float u, float w) {
  const float hi = u > w ? u : w;
  const float lo = u > w ? w : u;
  const float sum = hi + Math::log1p(Math::exp(lo - hi));
  return hi == -INFINITY ? -INFINITY : sum;
}

struct Element {
  float kl_term;    // this column's share of KL(q || p), >= 0
  float p_minus_q;  // gradient of the KL w.r.t. z_v (before the 1/temperature factor)
};

// One column from p, q and x = log q - log p computed from input differences (more accurate
// than log q - log p), which the caller has made exact where it is not finite (-inf columns).
// No branches (both forms, then a select) so the CPU loop vectorizes.
AKL_HD Element kl_element_of(float p, float q, float x) {
  const bool small = fabsf(x) < 0.5f;
  const float xs = small ? x : 0.f;
  Element e;
  // q == 0: the column carries no anchor mass; its term is p (and 0 * x could be NaN).
  // Tested as q == 0, not q > 0, so that a NaN q keeps the row NaN.
  e.kl_term = small ? p * g_small(xs) : (q == 0.f ? p : q * x - q + p);
  e.p_minus_q = small ? -p * expm1_small(xs) : p - q;
  return e;
}

// The same from lp = log p and lq = log q (x non-finite only at -inf columns, where lq - lp is
// exact).
template <class Math>
AKL_HD Element kl_element(float lp, float lq, float x) {
  return kl_element_of(Math::exp(lp), Math::exp(lq), finite(x) ? x : lq - lp);
}

// x where it is not finite, from p and q alone (the CPU's unsharded rows have p and q but not
// their logs): +inf where only q has mass, -inf where only p has, and NaN where both have
// (which finite inputs never give), so that a row with such a column stays NaN.
AKL_HD float nonfinite_x(float p, float q) {
  return p == 0.f ? INFINITY : q == 0.f ? -INFINITY : NAN;
}

// x = log q - log p in logit mode, a - z as a combination of input differences (exactly 0 from
// c - z in live mode) less the LSEs' difference.
AKL_HD float logit_log_ratio(float z, float c, float r, float alpha, const float* lse) {
  return ((1.f - alpha) * (c - z) + alpha * (r - z)) - lse_difference(lse, 1, 0);
}

// x = log q - log p in prob mode, relative to log p from input differences (for x when q is
// close to p); lq - lp would lose |lp| * eps when the policy puts almost no mass on the column.
template <class Math>
AKL_HD float prob_log_ratio(float z, float c, float r, const float* lse, float log_one_minus_alpha,
                            float log_alpha) {
  return log_add_exp<Math>(log_one_minus_alpha + (c - z) + lse_difference(lse, 0, 1),
                           log_alpha + (r - z) + lse_difference(lse, 0, 2));
}

// log q in prob mode: log((1 - alpha) p_c + alpha p_r), each stream from its own max. (The CPU
// kernels form q itself from two exps instead: anchored_kl_cpu.cpp's prob_q.)
template <class Math>
AKL_HD float prob_log_q(float c, float r, const float* lse, float log_one_minus_alpha,
                        float log_alpha) {
  return log_add_exp<Math>(log_one_minus_alpha + log_softmax_at(c, lse, 1),
                           log_alpha + log_softmax_at(r, lse, 2));
}

// Logit mode's element given the anchor logit a = anchor_logit(c, r, alpha). Apart from
// column_element so that the CPU can form a in a loop of its own: GCC does not vectorize a
// loop around anchor_logit's tests of alpha (the loop is too large for it to unswitch).
template <class Math>
AKL_HD Element logit_element(float z, float c, float r, float a, float alpha, const float* lse) {
  const float lp = log_softmax_at(z, lse, 0);
  const float lq = log_softmax_at(a, lse, 1);
  return kl_element<Math>(lp, lq, logit_log_ratio(z, c, r, alpha, lse));
}

// The element of one column given the row's global (max, log_sum) pairs, order above.
template <class Math, Interp Mode>
AKL_HD Element column_element(float z, float c, float r, float alpha, const float* lse,
                              float log_one_minus_alpha, float log_alpha) {
  if (Mode == Interp::kLogit)
    return logit_element<Math>(z, c, r, anchor_logit(c, r, alpha), alpha, lse);
  // log q twice: absolute (for q itself) and relative to log p (prob_log_ratio).
  return kl_element<Math>(log_softmax_at(z, lse, 0),
                          prob_log_q<Math>(c, r, lse, log_one_minus_alpha, log_alpha),
                          prob_log_ratio<Math>(z, c, r, lse, log_one_minus_alpha, log_alpha));
}

// ---------------------------------------------------------------------------------------------
// The SFT-stage losses (nemo_anchored/ops/sharded_losses.py), one row = one token, p = softmax(z)
// and p_ref = softmax(r) over the full vocabulary, LSE pairs as above: slot 0 the policy, slot 1
// the reference.

// Cross-entropy: d(-log p_y) / d z_v = p_v - [v == y], lp = log p_v. (Near p_y = 1, 1 - p_y is
// limited by the fp32 rounding of the row's sum-exp near 1, so an expm1 form would gain nothing.)
AKL_HD float cross_entropy_element_of(float p, bool is_label) { return p - (is_label ? 1.f : 0.f); }
template <class Math>
AKL_HD float cross_entropy_element(float lp, bool is_label) {
  return cross_entropy_element_of(Math::exp(lp), is_label);
}

// Reverse KL, KL(p || p_ref) = E_p[y] with y = log p - log p_ref: the statistics pass also sums
// exp(z - max_z) (z - r), whose merge over the ranks gives E_p[z - r] (the mean difference).
// A column where p has no mass adds 0 (its z - r may be NaN: both -inf).
AKL_HD float weighted_difference(float exp_z, float z, float r) {
  return exp_z == 0.f ? 0.f : exp_z * (z - r);
}

struct ReverseKlElement {
  float kl_term;  // this column's share of KL(p || p_ref), >= 0
  float grad;     // d KL / d z_v = p_v (y_v - KL)
};

// One column. The KL is summed as sum_v p_ref g(y_v), the same non-negative terms as the
// anchored KL's (with the roles of the two distributions swapped: p = p_ref e^y). The gradient
// p (y - E_p[y]) is formed as p ((z - r) - E_p[z - r]): the two LSEs, and their rounding, drop
// out of it, and z - r is exact where the two models agree (where KL-SFT starts).
// mean_difference = E_p[z - r]. Padded columns (-inf in both) give 0 and 0; a NaN p (a row
// with a NaN or +inf) keeps the gradient NaN, as the test is p == 0, not p > 0.
// From p, p_ref and d = z - r (the CPU's unsharded rows have p and p_ref without an exp).
AKL_HD ReverseKlElement reverse_kl_element_of(float p, float p_ref, float d, const float* lse,
                                              float mean_difference) {
  const float y = d - lse_difference(lse, 0, 1);  // +-inf or NaN only at -inf columns
  const bool small = fabsf(y) < 0.5f;
  ReverseKlElement e;
  // p == 0: the term is p_ref (and 0 * y could be NaN); p > 0 with p_ref = 0 gives +inf.
  e.kl_term = small ? p_ref * g_small(small ? y : 0.f) : (p == 0.f ? p_ref : p * y - p + p_ref);
  e.grad = p == 0.f ? 0.f : p * (d - mean_difference);
  return e;
}
template <class Math>
AKL_HD ReverseKlElement reverse_kl_element(float z, float r, const float* lse,
                                           float mean_difference) {
  return reverse_kl_element_of(Math::exp(log_softmax_at(z, lse, 0)),
                               Math::exp(log_softmax_at(r, lse, 1)), z - r, lse, mean_difference);
}

}  // namespace anchored_kl
