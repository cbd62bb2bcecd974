// CPU kernels of the anchored KL: per-row softmax statistics, the column pass (partial KL and
// the gradient p - q), and both fused per row for the unsharded case.
//
// Each row is walked in blocks of kBlock columns converted to fp32 on the stack, the
// temperature folded in (cpu_rows.h: why that vectorizes), so no [rows x V] temporary exists
// besides the gradient. Block results go into double row accumulators, so summing 1e5+ columns
// costs no precision. Rows are split over threads with at::parallel_for.
#include "anchored_kl.h"
#include "cpu_rows.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

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
};

Params make_params(double alpha, double inv_tau, bool live) {
  return {static_cast<float>(alpha), static_cast<float>(inv_tau),
          static_cast<float>(std::log1p(-alpha)), static_cast<float>(std::log(alpha)), live};
}

template <typename T, Interp Mode>
AKL_CPU_CLONES void row_stats(const RowPtrs<T>& row, int64_t cols, const Params& prm, float* out) {
  float zb[kBlock], cb[kBlock], rb[kBlock], ab[kBlock];
  RowSoftmax s[3];
  for (int64_t j0 = 0; j0 < cols; j0 += kBlock) {
    const int64_t n = std::min(kBlock, cols - j0);
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

// Writes grad = (p - q) / tau for the row (when grad != nullptr) and returns its partial KL.
// lse: the row's global (max, log_sum) per stream.
template <typename T, Interp Mode>
AKL_CPU_CLONES double row_kl_grad(const RowPtrs<T>& row, int64_t cols, const Params& prm,
                                  const float* lse, T* grad) {
  float zb[kBlock], cb[kBlock], rb[kBlock], ab[kBlock], gb[kBlock], kb[kBlock];
  double kl = 0.0;
  for (int64_t j0 = 0; j0 < cols; j0 += kBlock) {
    const int64_t n = std::min(kBlock, cols - j0);
    load_scaled(row.z + j0, n, prm.inv_tau, zb);
    load_scaled(row.r + j0, n, prm.inv_tau, rb);
    const float* cur = zb;
    if (!prm.live) {
      load_scaled(row.c + j0, n, prm.inv_tau, cb);
      cur = cb;
    }
    if constexpr (Mode == Interp::kLogit)  // in a loop of its own: see logit_element
      for (int64_t j = 0; j < n; ++j) ab[j] = anchor_logit(cur[j], rb[j], prm.alpha);
    for (int64_t j = 0; j < n; ++j) {
      Element e;
      if constexpr (Mode == Interp::kLogit)
        e = logit_element<CpuMath>(zb[j], cur[j], rb[j], ab[j], prm.alpha, lse);
      else
        e = column_element<CpuMath, Mode>(zb[j], cur[j], rb[j], prm.alpha, lse,
                                          prm.log_one_minus_alpha, prm.log_alpha);
      gb[j] = e.p_minus_q * prm.inv_tau;
      kb[j] = e.kl_term;
    }
    const float block_kl = lane_sum(kb, n);
    kl += block_kl;
    if (grad != nullptr)
      for (int64_t jj = 0; jj < n; ++jj) grad[j0 + jj] = static_cast<T>(gb[jj]);
  }
  return kl;
}

// Local (max, sum) -> (max, log sum): the row's global pairs when the row is not sharded.
void lse_from_stats(const float* stats, int streams, float* lse) {
  for (int k = 0; k < streams; ++k) {
    lse[2 * k] = stats[2 * k];
    lse[2 * k + 1] = std::log(stats[2 * k + 1]);
  }
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

torch::Tensor row_stats_cpu(const Inputs& in) {
  const int64_t rows = in.z.size(0), cols = in.z.size(1);
  const int streams = num_streams(in.mode);
  auto stats = torch::empty({rows, streams, 2}, in.z.options().dtype(torch::kFloat32));
  const Params prm = make_params(in.alpha, in.inv_tau, !in.c.has_value());
  float* out = stats.data_ptr<float>();
  dispatch(in, [&](auto type_tag, auto mode_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    constexpr Interp Mode = decltype(mode_tag)::value;
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        row_stats<T, Mode>(row_ptrs<T>(in, i), cols, prm, out + i * streams * 2);
    });
  });
  return stats;
}

std::tuple<torch::Tensor, torch::Tensor> kl_grad_cpu(const Inputs& in, const torch::Tensor& lse,
                                                     bool need_grad) {
  const int64_t rows = in.z.size(0), cols = in.z.size(1);
  const int streams = num_streams(in.mode);
  auto kl = torch::empty({rows}, in.z.options().dtype(torch::kFloat32));
  auto grad = need_grad ? torch::empty_like(in.z) : torch::Tensor();
  const Params prm = make_params(in.alpha, in.inv_tau, !in.c.has_value());
  const float* lse_ptr = lse.data_ptr<float>();
  float* kl_ptr = kl.data_ptr<float>();
  dispatch(in, [&](auto type_tag, auto mode_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    constexpr Interp Mode = decltype(mode_tag)::value;
    T* g = need_grad ? grad.data_ptr<T>() : nullptr;
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        kl_ptr[i] = static_cast<float>(row_kl_grad<T, Mode>(
            row_ptrs<T>(in, i), cols, prm, lse_ptr + i * streams * 2, g ? g + i * cols : nullptr));
    });
  });
  return {kl, grad};
}

std::tuple<torch::Tensor, torch::Tensor> fused_cpu(const Inputs& in, bool need_grad) {
  const int64_t rows = in.z.size(0), cols = in.z.size(1);
  const int streams = num_streams(in.mode);
  auto kl = torch::empty({rows}, in.z.options().dtype(torch::kFloat32));
  auto grad = need_grad ? torch::empty_like(in.z) : torch::Tensor();
  const Params prm = make_params(in.alpha, in.inv_tau, !in.c.has_value());
  float* kl_ptr = kl.data_ptr<float>();
  dispatch(in, [&](auto type_tag, auto mode_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    constexpr Interp Mode = decltype(mode_tag)::value;
    T* g = need_grad ? grad.data_ptr<T>() : nullptr;
    // Both passes per row while the row is still in cache.
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      float stats[6], lse[6];
      for (int64_t i = begin; i < end; ++i) {
        const RowPtrs<T> row = row_ptrs<T>(in, i);
        row_stats<T, Mode>(row, cols, prm, stats);
        lse_from_stats(stats, streams, lse);
        kl_ptr[i] = static_cast<float>(
            row_kl_grad<T, Mode>(row, cols, prm, lse, g ? g + i * cols : nullptr));
      }
    });
  });
  return {kl, grad};
}

}  // namespace anchored_kl
