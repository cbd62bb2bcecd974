// CPU kernels of the SFT-stage losses: per-row softmax statistics, the column pass (the
// cross-entropy's or reverse KL's gradient, and the KL's partial sum), and the unsharded row in
// one call that keeps the row's exps. The same scheme as anchored_kl_cpu.cpp: blocks of kBlock
// columns in fp32 on the stack (cpu_rows.h), double row accumulators, rows split over threads.
#include "sharded_losses.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "anchored_kl_math.h"
#include "cpu_rows.h"

namespace anchored_kl {
namespace {

// stats [2 or 4]: (max, sum) of z, then of r when r is not null, with *weighted = the row's sum
// of exp(z - max_z) (z - r).
template <typename T>
AKL_CPU_CLONES void row_stats(const T* z, const T* r, int64_t cols, float* stats, float* weighted) {
  float zb[kBlock], rb[kBlock], e[kBlock], t[kBlock];
  RowSoftmax policy, reference;
  double policy_weighted = 0.0;
  for (int64_t j0 = 0; j0 < cols; j0 += kBlock) {
    const int64_t n = std::min(kBlock, cols - j0);
    if (r == nullptr)
      prefetch_ahead(j0, cols, z);
    else
      prefetch_ahead(j0, cols, z, r);
    const float* zs = fp32_block(z + j0, n, zb);
    const double rescale = policy.add(zs, n, e);
    if (r == nullptr) continue;
    const float* rs = fp32_block(r + j0, n, rb);
    reference.add(rs, n);
    for (int64_t j = 0; j < n; ++j) t[j] = weighted_difference(e[j], zs[j], rs[j]);
    policy_weighted = policy_weighted * rescale + lane_sum(t, n);
  }
  stats[0] = policy.max;
  stats[1] = static_cast<float>(policy.sum);
  if (r == nullptr) return;
  stats[2] = reference.max;
  stats[3] = static_cast<float>(reference.sum);
  *weighted = static_cast<float>(policy_weighted);
}

// grad = weight x (p - onehot(label)) for one row; lse: the policy's global (max, log_sum).
template <typename T>
AKL_CPU_CLONES void row_cross_entropy_grad(const T* z, int64_t cols, int64_t label,
                                           const float* lse, float weight, T* grad) {
  float zb[kBlock], gb[kBlock];
  for (int64_t j0 = 0; j0 < cols; j0 += kBlock) {
    const int64_t n = std::min(kBlock, cols - j0);
    prefetch_ahead(j0, cols, z);
    const float* zs = fp32_block(z + j0, n, zb);
    for (int64_t j = 0; j < n; ++j)
      gb[j] =
          weight * cross_entropy_element<CpuMath>(log_softmax_at(zs[j], lse, 0), j0 + j == label);
    store_gradient(gb, n, grad + j0);
  }
}

// Writes the row's reverse-KL gradient x weight (when grad != nullptr) and returns its partial
// KL.
template <typename T>
AKL_CPU_CLONES double row_reverse_kl(const T* z, const T* r, int64_t cols, const float* lse,
                                     float mean_difference, float weight, T* grad) {
  float zb[kBlock], rb[kBlock], gb[kBlock], kb[kBlock];
  double kl = 0.0;
  for (int64_t j0 = 0; j0 < cols; j0 += kBlock) {
    const int64_t n = std::min(kBlock, cols - j0);
    prefetch_ahead(j0, cols, z, r);
    const float* zs = fp32_block(z + j0, n, zb);
    const float* rs = fp32_block(r + j0, n, rb);
    for (int64_t j = 0; j < n; ++j) {
      const ReverseKlElement e = reverse_kl_element<CpuMath>(zs[j], rs[j], lse, mean_difference);
      gb[j] = weight * e.grad;
      kb[j] = e.kl_term;
    }
    kl += lane_sum(kb, n);
    if (grad != nullptr) store_gradient(gb, n, grad + j0);
  }
  return kl;
}

// The unsharded rows (the *_fused_cpu calls) in two passes while the row stays in cache, as in
// anchored_kl_cpu.cpp's row_fused: the first keeps each block's exps in `e` (BlockSoftmax), the
// second forms the probabilities from them, so a column takes one exp per distribution where
// the sharded rows' statistics and gradient passes take two. As there too, the first pass asks
// for its blocks ahead (prefetch_ahead) and the second prefetches the thread's next row into
// the L2 (next_z, next_r: null after its last row).

// Returns the row's cross-entropy and writes weight x (p - onehot(label)) when grad != nullptr.
// e: cols floats; block: 2 per block of kBlock columns.
template <typename T>
AKL_CPU_CLONES float row_cross_entropy_fused(const T* z, const T* next_z, int64_t cols,
                                             int64_t label, float* e, float* block, float weight,
                                             T* grad) {
  const int64_t blocks = blocks_of(cols);
  BlockSoftmax p{block, block + blocks};
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t j0 = b * kBlock, n = std::min(kBlock, cols - j0);
    prefetch_ahead(j0, cols, z);
    p.add(b, fp32_block(z + j0, n, e + j0), n, e + j0);
  }
  float lse[2];
  p.finish(blocks, lse);
  if (grad != nullptr) {
    float gb[kBlock];
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t j0 = b * kBlock, n = std::min(kBlock, cols - j0);
      if (next_z != nullptr) prefetch_columns<kL2>(j0, n, next_z);
      const float factor = p.factor[b];
      for (int64_t j = 0; j < n; ++j)
        gb[j] = weight * cross_entropy_element_of(e[j0 + j] * factor, j0 + j == label);
      store_gradient(gb, n, grad + j0);
    }
  }
  const float label_logit = 0 <= label && label < cols ? static_cast<float>(z[label]) : NAN;
  return (lse[0] - label_logit) + lse[1];
}

// Returns the row's KL(p || p_ref) and writes its gradient x weight when grad != nullptr. e: 2 x
// cols floats; block: 5 per block (z's and r's maxima and factors, then each block's share of
// E_p[z - r] before its factor).
template <typename T>
AKL_CPU_CLONES double row_reverse_kl_fused(const T* z, const T* r, const T* next_z, const T* next_r,
                                           int64_t cols, float* e, float* block, float weight,
                                           T* grad) {
  const int64_t blocks = blocks_of(cols);
  float* const ez = e;
  float* const er = e + cols;
  BlockSoftmax p{block, block + 2 * blocks}, ref{block + blocks, block + 3 * blocks};
  float* const weighted = block + 4 * blocks;
  float zb[kBlock], rb[kBlock], t[kBlock];
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t j0 = b * kBlock, n = std::min(kBlock, cols - j0);
    prefetch_ahead(j0, cols, z, r);
    const float* zs = fp32_block(z + j0, n, zb);
    const float* rs = fp32_block(r + j0, n, rb);
    p.add(b, zs, n, ez + j0);
    ref.add(b, rs, n, er + j0);
    for (int64_t j = 0; j < n; ++j) t[j] = weighted_difference(ez[j0 + j], zs[j], rs[j]);
    weighted[b] = lane_sum(t, n);
  }
  float lse[4];
  p.finish(blocks, lse);
  ref.finish(blocks, lse + 2);
  // E_p[z - r]. A block whose factor is 0 has no policy mass (its share would be 0 x inf = NaN
  // where r is -inf but z is not).
  double mean = 0.0;
  for (int64_t b = 0; b < blocks; ++b)
    if (p.factor[b] != 0.f) mean += double{weighted[b]} * p.factor[b];
  const float mean_difference = static_cast<float>(mean);
  float gb[kBlock], kb[kBlock];
  double kl = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t j0 = b * kBlock, n = std::min(kBlock, cols - j0);
    const float* zs = fp32_block(z + j0, n, zb);
    const float* rs = fp32_block(r + j0, n, rb);
    if (next_z != nullptr) prefetch_columns<kL2>(j0, n, next_z, next_r);
    const float fp = p.factor[b], fr = ref.factor[b];
    for (int64_t j = 0; j < n; ++j) {
      const ReverseKlElement el = reverse_kl_element_of(ez[j0 + j] * fp, er[j0 + j] * fr,
                                                        zs[j] - rs[j], lse, mean_difference);
      gb[j] = weight * el.grad;
      kb[j] = el.kl_term;
    }
    kl += lane_sum(kb, n);
    if (grad != nullptr) store_gradient(gb, n, grad + j0);
  }
  return kl;
}

// Calls fn(T*) with a null pointer of the logits' element type.
template <class Fn>
void dispatch(const at::TensorBase& z, Fn&& fn) {
  switch (z.scalar_type()) {
    case at::kFloat:
      return fn(static_cast<float*>(nullptr));
    case at::kBFloat16:
      return fn(static_cast<c10::BFloat16*>(nullptr));
    case at::kHalf:
      return fn(static_cast<c10::Half*>(nullptr));
    default:
      TORCH_CHECK(false, "the fused kernels take float32, bfloat16 or float16 logits, got ",
                  z.scalar_type());
  }
}

// Row i of a [rows, cols] tensor of T (null for an undefined tensor or i = -1, for_each_row's
// "no next row").
template <typename T>
const T* row_of(const at::TensorBase& x, int64_t i) {
  return x.defined() && i >= 0 ? static_cast<const T*>(x.const_data_ptr()) + i * x.size(1)
                               : nullptr;
}

}  // namespace

void loss_stats_cpu(const at::TensorBase& z, const at::TensorBase& r, const at::TensorBase& weights,
                    const at::TensorBase& stats, const at::TensorBase& weighted) {
  const int64_t cols = z.size(1), width = stats.size(1) * 2;
  float* out = stats.data_ptr<float>();
  float* w = r.defined() ? weighted.data_ptr<float>() : nullptr;
  dispatch(z, [&](auto type_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    for_each_row<T>(z, weights, at::TensorBase(), [&](int64_t i, int64_t, float, float*, float*) {
      row_stats<T>(row_of<T>(z, i), row_of<T>(r, i), cols, out + i * width, w ? w + i : nullptr);
    });
  });
}

void cross_entropy_grad_cpu(const at::TensorBase& z, const at::TensorBase& labels,
                            const at::TensorBase& weights, const at::TensorBase& lse,
                            const at::TensorBase& grad) {
  const int64_t* label = labels.const_data_ptr<int64_t>();
  const float* lse_ptr = lse.const_data_ptr<float>();
  dispatch(z, [&](auto type_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    for_each_row<T>(z, weights, grad, [&](int64_t i, int64_t, float weight, float*, float*) {
      row_cross_entropy_grad<T>(row_of<T>(z, i), z.size(1), label[i], lse_ptr + 2 * i, weight,
                                grad_row<T>(grad, i));
    });
  });
}

void cross_entropy_fused_cpu(const at::TensorBase& z, const at::TensorBase& labels,
                             const at::TensorBase& weights, const at::TensorBase& loss,
                             const at::TensorBase& grad) {
  const int64_t* label = labels.const_data_ptr<int64_t>();
  float* loss_ptr = loss.data_ptr<float>();
  dispatch(z, [&](auto type_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    for_each_row<T>(
        z, weights, grad,
        [&](int64_t i, int64_t next, float weight, float* e, float* block) {
          loss_ptr[i] =
              row_cross_entropy_fused<T>(row_of<T>(z, i), row_of<T>(z, next), z.size(1), label[i],
                                         e, block, weight, grad_row<T>(grad, i));
        },
        1, 2);
  });
}

void reverse_kl_grad_cpu(const at::TensorBase& z, const at::TensorBase& r,
                         const at::TensorBase& weights, const at::TensorBase& lse,
                         const at::TensorBase& mean_difference, const at::TensorBase& kl,
                         const at::TensorBase& grad) {
  const float* lse_ptr = lse.const_data_ptr<float>();
  const float* mean = mean_difference.const_data_ptr<float>();
  float* kl_ptr = kl.data_ptr<float>();
  dispatch(z, [&](auto type_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    for_each_row<T>(z, weights, grad, [&](int64_t i, int64_t, float weight, float*, float*) {
      kl_ptr[i] = static_cast<float>(row_reverse_kl<T>(row_of<T>(z, i), row_of<T>(r, i), z.size(1),
                                                       lse_ptr + 4 * i, mean[i], weight,
                                                       grad_row<T>(grad, i)));
    });
  });
}

void reverse_kl_fused_cpu(const at::TensorBase& z, const at::TensorBase& r,
                          const at::TensorBase& weights, const at::TensorBase& kl,
                          const at::TensorBase& grad) {
  float* kl_ptr = kl.data_ptr<float>();
  dispatch(z, [&](auto type_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    for_each_row<T>(
        z, weights, grad,
        [&](int64_t i, int64_t next, float weight, float* e, float* block) {
          kl_ptr[i] = static_cast<float>(row_reverse_kl_fused<T>(
              row_of<T>(z, i), row_of<T>(r, i), row_of<T>(z, next), row_of<T>(r, next), z.size(1),
              e, block, weight, grad_row<T>(grad, i)));
        },
        2, 5);
  });
}

}  // namespace anchored_kl
