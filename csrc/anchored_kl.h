// Entry points of the anchored-KL extension, shared by the bindings and the CPU/CUDA files.
// All tensors are 2-D [rows, V_local] and contiguous; the Python layer reshapes and validates.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <tuple>

#include "anchored_kl_math.h"

namespace anchored_kl {

struct Inputs {
  torch::Tensor z;                 // policy logits
  std::optional<torch::Tensor> c;  // current-model logits; absent in live mode (c = z)
  torch::Tensor r;                 // reference logits
  double alpha;
  double inv_tau;  // 1 / temperature
  Interp mode;
};

// An uninitialised tensor like z for a gradient that a kernel writes in full (on the CPU backed
// by huge pages where the OS allows: cpu_rows.h, advise_huge_pages).
torch::Tensor gradient_like(const torch::Tensor& z);

// Local softmax statistics [rows, streams, 2] (max, sum of exp(x - max)), fp32.
torch::Tensor row_stats_cpu(const Inputs& in);
// Given the full-vocabulary LSEs as (max, log_sum) pairs [rows, streams, 2]:
// (partial KL [rows] fp32, grad (p - q)/tau in
// the policy's dtype, or an undefined tensor when need_grad is false).
std::tuple<torch::Tensor, torch::Tensor> kl_grad_cpu(const Inputs& in, const torch::Tensor& lse,
                                                     bool need_grad);
// Unsharded rows: both passes per row in one call.
std::tuple<torch::Tensor, torch::Tensor> fused_cpu(const Inputs& in, bool need_grad);

#ifdef WITH_CUDA
torch::Tensor row_stats_cuda(const Inputs& in);
std::tuple<torch::Tensor, torch::Tensor> kl_grad_cuda(const Inputs& in, const torch::Tensor& lse,
                                                      bool need_grad);
std::tuple<torch::Tensor, torch::Tensor> fused_cuda(const Inputs& in, bool need_grad);
#endif

}  // namespace anchored_kl
