// CPU kernels of the SFT-stage losses: per-row softmax statistics, the column pass (the
// cross-entropy's or reverse KL's gradient, and the KL's partial sum), and both per row for
// the unsharded case. The same scheme as anchored_kl_cpu.cpp: blocks of kBlock columns in fp32
// on the stack (cpu_rows.h), double row accumulators, rows split over threads.
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
    load_block(z + j0, n, zb);
    const double rescale = policy.add(zb, n, e);
    if (r == nullptr) continue;
    load_block(r + j0, n, rb);
    reference.add(rb, n);
    for (int64_t j = 0; j < n; ++j) t[j] = weighted_difference(e[j], zb[j], rb[j]);
    policy_weighted = policy_weighted * rescale + lane_sum(t, n);
  }
  stats[0] = policy.max;
  stats[1] = static_cast<float>(policy.sum);
  if (r == nullptr) return;
  stats[2] = reference.max;
  stats[3] = static_cast<float>(reference.sum);
  *weighted = static_cast<float>(policy_weighted);
}

// Local (max, sum) pairs -> the row's global (max, log_sum) pairs when it is not sharded.
void lse_from_stats(const float* stats, int streams, float* lse) {
  for (int k = 0; k < streams; ++k) {
    lse[2 * k] = stats[2 * k];
    lse[2 * k + 1] = std::log(stats[2 * k + 1]);
  }
}

// grad = p - onehot(label) for one row; lse: the policy's global (max, log_sum).
template <typename T>
AKL_CPU_CLONES void row_cross_entropy_grad(const T* z, int64_t cols, int64_t label,
                                           const float* lse, T* grad) {
  float zb[kBlock], gb[kBlock];
  for (int64_t j0 = 0; j0 < cols; j0 += kBlock) {
    const int64_t n = std::min(kBlock, cols - j0);
    load_block(z + j0, n, zb);
    for (int64_t j = 0; j < n; ++j)
      gb[j] = cross_entropy_element<CpuMath>(log_softmax_at(zb[j], lse, 0), j0 + j == label);
    for (int64_t j = 0; j < n; ++j) grad[j0 + j] = static_cast<T>(gb[j]);
  }
}

// Writes the row's reverse-KL gradient (when grad != nullptr) and returns its partial KL.
template <typename T>
AKL_CPU_CLONES double row_reverse_kl(const T* z, const T* r, int64_t cols, const float* lse,
                                     float mean_difference, T* grad) {
  float zb[kBlock], rb[kBlock], gb[kBlock], kb[kBlock];
  double kl = 0.0;
  for (int64_t j0 = 0; j0 < cols; j0 += kBlock) {
    const int64_t n = std::min(kBlock, cols - j0);
    load_block(z + j0, n, zb);
    load_block(r + j0, n, rb);
    for (int64_t j = 0; j < n; ++j) {
      const ReverseKlElement e = reverse_kl_element<CpuMath>(zb[j], rb[j], lse, mean_difference);
      gb[j] = e.grad;
      kb[j] = e.kl_term;
    }
    kl += lane_sum(kb, n);
    if (grad != nullptr)
      for (int64_t j = 0; j < n; ++j) grad[j0 + j] = static_cast<T>(gb[j]);
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

// Row i of a [rows, cols] tensor of T (null for an undefined tensor).
template <typename T>
const T* row_of(const at::TensorBase& x, int64_t i) {
  return x.defined() ? static_cast<const T*>(x.const_data_ptr()) + i * x.size(1) : nullptr;
}
template <typename T>
T* grad_row(const at::TensorBase& grad, int64_t i) {
  return grad.defined() ? static_cast<T*>(grad.data_ptr()) + i * grad.size(1) : nullptr;
}

// Calls row(i) for every row, the rows split over threads.
template <class Row>
void for_each_row(const at::TensorBase& z, Row&& row) {
  at::parallel_for(0, z.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) row(i);
  });
}

}  // namespace

void loss_stats_cpu(const at::TensorBase& z, const at::TensorBase& r, const at::TensorBase& stats,
                    const at::TensorBase& weighted) {
  const int64_t cols = z.size(1), width = stats.size(1) * 2;
  float* out = stats.data_ptr<float>();
  float* w = r.defined() ? weighted.data_ptr<float>() : nullptr;
  dispatch(z, [&](auto type_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    for_each_row(z, [&](int64_t i) {
      row_stats<T>(row_of<T>(z, i), row_of<T>(r, i), cols, out + i * width, w ? w + i : nullptr);
    });
  });
}

void cross_entropy_grad_cpu(const at::TensorBase& z, const at::TensorBase& labels,
                            const at::TensorBase& lse, const at::TensorBase& grad) {
  const int64_t* label = labels.const_data_ptr<int64_t>();
  const float* lse_ptr = lse.const_data_ptr<float>();
  dispatch(z, [&](auto type_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    for_each_row(z, [&](int64_t i) {
      row_cross_entropy_grad<T>(row_of<T>(z, i), z.size(1), label[i], lse_ptr + 2 * i,
                                grad_row<T>(grad, i));
    });
  });
}

void cross_entropy_fused_cpu(const at::TensorBase& z, const at::TensorBase& labels,
                             const at::TensorBase& loss, const at::TensorBase& grad) {
  const int64_t* label = labels.const_data_ptr<int64_t>();
  float* loss_ptr = loss.data_ptr<float>();
  dispatch(z, [&](auto type_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    // Both passes per row while the row is still in cache.
    for_each_row(z, [&](int64_t i) {
      const T* zi = row_of<T>(z, i);
      float stats[2], lse[2];
      row_stats<T>(zi, nullptr, z.size(1), stats, nullptr);
      lse_from_stats(stats, 1, lse);
      if (grad.defined())
        row_cross_entropy_grad<T>(zi, z.size(1), label[i], lse, grad_row<T>(grad, i));
      const int64_t y = label[i];
      const float label_logit = 0 <= y && y < z.size(1) ? static_cast<float>(zi[y]) : NAN;
      loss_ptr[i] = (lse[0] - label_logit) + lse[1];
    });
  });
}

void reverse_kl_grad_cpu(const at::TensorBase& z, const at::TensorBase& r,
                         const at::TensorBase& lse, const at::TensorBase& mean_difference,
                         const at::TensorBase& kl, const at::TensorBase& grad) {
  const float* lse_ptr = lse.const_data_ptr<float>();
  const float* mean = mean_difference.const_data_ptr<float>();
  float* kl_ptr = kl.data_ptr<float>();
  dispatch(z, [&](auto type_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    for_each_row(z, [&](int64_t i) {
      kl_ptr[i] =
          static_cast<float>(row_reverse_kl<T>(row_of<T>(z, i), row_of<T>(r, i), z.size(1),
                                               lse_ptr + 4 * i, mean[i], grad_row<T>(grad, i)));
    });
  });
}

void reverse_kl_fused_cpu(const at::TensorBase& z, const at::TensorBase& r,
                          const at::TensorBase& kl, const at::TensorBase& grad) {
  float* kl_ptr = kl.data_ptr<float>();
  dispatch(z, [&](auto type_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    for_each_row(z, [&](int64_t i) {
      const T* zi = row_of<T>(z, i);
      const T* ri = row_of<T>(r, i);
      float stats[4], lse[4], weighted;
      row_stats<T>(zi, ri, z.size(1), stats, &weighted);
      lse_from_stats(stats, 2, lse);
      kl_ptr[i] = static_cast<float>(
          row_reverse_kl<T>(zi, ri, z.size(1), lse, weighted / stats[1], grad_row<T>(grad, i)));
    });
  });
}

}  // namespace anchored_kl
