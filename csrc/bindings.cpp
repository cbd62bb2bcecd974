// Python bindings: one function per pass, dispatched on the tensors' device. They check every
// argument and allocate every output (anchored_kl.h, sharded_losses.h).
#include <torch/extension.h>

#include "anchored_kl.h"
#include "cpu_gradient.h"
#include "sharded_losses.h"

namespace anchored_kl {
namespace {

// The dtypes the kernels take (their dispatch also instantiates double, refused here).
bool kernel_dtype(const torch::Tensor& x) {
  return x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16 ||
         x.scalar_type() == torch::kHalf;
}

Inputs make_inputs(const torch::Tensor& z, const std::optional<torch::Tensor>& c,
                   const torch::Tensor& r, double alpha, double inv_tau, int64_t mode) {
  TORCH_CHECK(z.dim() == 2 && z.is_contiguous(), "policy logits must be 2-D and contiguous");
  TORCH_CHECK(r.sizes() == z.sizes() && r.scalar_type() == z.scalar_type() &&
                  r.device() == z.device() && r.is_contiguous(),
              "reference logits must match the policy logits");
  if (c.has_value())
    TORCH_CHECK(c->sizes() == z.sizes() && c->scalar_type() == z.scalar_type() &&
                    c->device() == z.device() && c->is_contiguous(),
                "current logits must match the policy logits");
  TORCH_CHECK(kernel_dtype(z), "the fused kernels take float32, bfloat16 or float16 logits");
  TORCH_CHECK(mode == 0 || mode == 1, "mode must be 0 (logit) or 1 (prob)");
  std::optional<at::TensorBase> current;
  if (c.has_value()) current = *c;
  return {z, current, r, alpha, inv_tau, static_cast<Interp>(mode)};
}

bool built_with_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

void check_device(const torch::Tensor& z) {
  TORCH_CHECK(z.is_cpu() || (z.is_cuda() && built_with_cuda()),
              "the anchored_kl extension was built without kernels for device ", z.device());
}

// Per-row outputs start as zeros: a row of weight 0 (below) keeps them.
torch::Tensor per_row_f32(const torch::Tensor& z) {
  return torch::zeros({z.size(0)}, z.options().dtype(torch::kFloat32));
}

// The per-row weights a CPU kernel takes (anchored_kl.h), as a TensorBase (undefined: none).
// The CUDA kernels take none: the Python layer weighs their gradient after them.
at::TensorBase check_weights(const std::optional<torch::Tensor>& weights, const torch::Tensor& z) {
  if (!weights.has_value()) return at::TensorBase();
  TORCH_CHECK(z.is_cpu(), "weights: only the CPU kernels take them");
  TORCH_CHECK(weights->dim() == 1 && weights->size(0) == z.size(0) &&
                  weights->scalar_type() == torch::kFloat && weights->is_cpu() &&
                  weights->is_contiguous(),
              "weights must be a contiguous float32 CPU vector of one value per row");
  return *weights;
}

// An uninitialised tensor like z for a gradient that a kernel writes in full.
torch::Tensor gradient_like(const torch::Tensor& z) {
  return z.is_cpu() ? cpu_gradient_like(z) : torch::empty_like(z);
}

torch::Tensor grad_if(const torch::Tensor& z, bool need_grad) {
  return need_grad ? gradient_like(z) : torch::Tensor();
}

torch::Tensor row_stats(const torch::Tensor& z, const std::optional<torch::Tensor>& c,
                        const torch::Tensor& r, double alpha, double inv_tau, int64_t mode,
                        const std::optional<torch::Tensor>& weights) {
  check_device(z);
  const Inputs in = make_inputs(z, c, r, alpha, inv_tau, mode);
  const at::TensorBase w = check_weights(weights, z);
  auto stats =
      torch::zeros({z.size(0), num_streams(in.mode), 2}, z.options().dtype(torch::kFloat32));
#ifdef WITH_CUDA
  if (z.is_cuda()) {
    row_stats_cuda(in, stats);
    return stats;
  }
#endif
  row_stats_cpu(in, w, stats);
  return stats;
}

std::tuple<torch::Tensor, torch::Tensor> kl_grad(const torch::Tensor& z,
                                                 const std::optional<torch::Tensor>& c,
                                                 const torch::Tensor& r, const torch::Tensor& lse,
                                                 double alpha, double inv_tau, int64_t mode,
                                                 bool need_grad,
                                                 const std::optional<torch::Tensor>& weights) {
  check_device(z);
  const Inputs in = make_inputs(z, c, r, alpha, inv_tau, mode);
  const at::TensorBase w = check_weights(weights, z);
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == z.size(0) && lse.size(1) == num_streams(in.mode) &&
                  lse.size(2) == 2 && lse.scalar_type() == torch::kFloat &&
                  lse.device() == z.device() && lse.is_contiguous(),
              "lse must be a contiguous float32 [rows, streams, 2] tensor on the logits' device");
  auto kl = per_row_f32(z);
  auto grad = grad_if(z, need_grad);
#ifdef WITH_CUDA
  if (z.is_cuda()) {
    kl_grad_cuda(in, lse, kl, grad);
    return {kl, grad};
  }
#endif
  kl_grad_cpu(in, w, lse, kl, grad);
  return {kl, grad};
}

std::tuple<torch::Tensor, torch::Tensor> fused(const torch::Tensor& z,
                                               const std::optional<torch::Tensor>& c,
                                               const torch::Tensor& r, double alpha, double inv_tau,
                                               int64_t mode, bool need_grad,
                                               const std::optional<torch::Tensor>& weights) {
  check_device(z);
  const Inputs in = make_inputs(z, c, r, alpha, inv_tau, mode);
  const at::TensorBase w = check_weights(weights, z);
  auto kl = per_row_f32(z);
  auto grad = grad_if(z, need_grad);
#ifdef WITH_CUDA
  if (z.is_cuda()) {
    fused_cuda(in, kl, grad);
    return {kl, grad};
  }
#endif
  fused_cpu(in, w, kl, grad);
  return {kl, grad};
}

// ---------------------------------------------------------------------------------------------
// The SFT-stage losses. An undefined tensor stands for an absent reference or gradient.

void check_loss_logits(const torch::Tensor& z, const torch::Tensor& r) {
  check_device(z);
  TORCH_CHECK(z.dim() == 2 && z.is_contiguous(), "policy logits must be 2-D and contiguous");
  TORCH_CHECK(kernel_dtype(z), "the fused kernels take float32, bfloat16 or float16 logits");
  if (r.defined())
    TORCH_CHECK(r.sizes() == z.sizes() && r.scalar_type() == z.scalar_type() &&
                    r.device() == z.device() && r.is_contiguous(),
                "reference logits must match the policy logits");
}

// A contiguous [rows, ...] tensor of `dtype` on the logits' device.
void check_per_row(const torch::Tensor& x, const torch::Tensor& z, at::IntArrayRef shape,
                   torch::ScalarType dtype, const char* what) {
  TORCH_CHECK(x.sizes() == shape && x.scalar_type() == dtype && x.device() == z.device() &&
                  x.is_contiguous(),
              what, " must be a contiguous ", dtype, " tensor of shape ", shape,
              " on the logits' device");
}

std::tuple<torch::Tensor, torch::Tensor> loss_stats(const torch::Tensor& z,
                                                    const std::optional<torch::Tensor>& r_opt,
                                                    const std::optional<torch::Tensor>& weights) {
  const torch::Tensor r = r_opt.value_or(torch::Tensor());
  check_loss_logits(z, r);
  const at::TensorBase w = check_weights(weights, z);
  auto stats =
      torch::zeros({z.size(0), r.defined() ? 2 : 1, 2}, z.options().dtype(torch::kFloat32));
  auto weighted = r.defined() ? per_row_f32(z) : torch::Tensor();
#ifdef WITH_CUDA
  if (z.is_cuda()) {
    loss_stats_cuda(z, r, stats, weighted);
    return {stats, weighted};
  }
#endif
  loss_stats_cpu(z, r, w, stats, weighted);
  return {stats, weighted};
}

torch::Tensor cross_entropy_grad(const torch::Tensor& z, const torch::Tensor& labels,
                                 const torch::Tensor& lse,
                                 const std::optional<torch::Tensor>& weights) {
  check_loss_logits(z, torch::Tensor());
  const at::TensorBase w = check_weights(weights, z);
  check_per_row(labels, z, {z.size(0)}, torch::kInt64, "labels");
  check_per_row(lse, z, {z.size(0), 1, 2}, torch::kFloat32, "lse");
  auto grad = gradient_like(z);
#ifdef WITH_CUDA
  if (z.is_cuda()) {
    cross_entropy_grad_cuda(z, labels, lse, grad);
    return grad;
  }
#endif
  cross_entropy_grad_cpu(z, labels, w, lse, grad);
  return grad;
}

std::tuple<torch::Tensor, torch::Tensor> cross_entropy_fused(
    const torch::Tensor& z, const torch::Tensor& labels, bool need_grad,
    const std::optional<torch::Tensor>& weights) {
  check_loss_logits(z, torch::Tensor());
  const at::TensorBase w = check_weights(weights, z);
  check_per_row(labels, z, {z.size(0)}, torch::kInt64, "labels");
  auto loss = per_row_f32(z);
  auto grad = grad_if(z, need_grad);
#ifdef WITH_CUDA
  if (z.is_cuda()) {
    cross_entropy_fused_cuda(z, labels, loss, grad);
    return {loss, grad};
  }
#endif
  cross_entropy_fused_cpu(z, labels, w, loss, grad);
  return {loss, grad};
}

std::tuple<torch::Tensor, torch::Tensor> reverse_kl_grad(
    const torch::Tensor& z, const torch::Tensor& r, const torch::Tensor& lse,
    const torch::Tensor& mean_difference, bool need_grad,
    const std::optional<torch::Tensor>& weights) {
  TORCH_CHECK(r.defined(), "reference logits are required");
  check_loss_logits(z, r);
  const at::TensorBase w = check_weights(weights, z);
  check_per_row(lse, z, {z.size(0), 2, 2}, torch::kFloat32, "lse");
  check_per_row(mean_difference, z, {z.size(0)}, torch::kFloat32, "mean_difference");
  auto kl = per_row_f32(z);
  auto grad = grad_if(z, need_grad);
#ifdef WITH_CUDA
  if (z.is_cuda()) {
    reverse_kl_grad_cuda(z, r, lse, mean_difference, kl, grad);
    return {kl, grad};
  }
#endif
  reverse_kl_grad_cpu(z, r, w, lse, mean_difference, kl, grad);
  return {kl, grad};
}

std::tuple<torch::Tensor, torch::Tensor> reverse_kl_fused(
    const torch::Tensor& z, const torch::Tensor& r, bool need_grad,
    const std::optional<torch::Tensor>& weights) {
  TORCH_CHECK(r.defined(), "reference logits are required");
  check_loss_logits(z, r);
  const at::TensorBase w = check_weights(weights, z);
  auto kl = per_row_f32(z);
  auto grad = grad_if(z, need_grad);
#ifdef WITH_CUDA
  if (z.is_cuda()) {
    reverse_kl_fused_cuda(z, r, kl, grad);
    return {kl, grad};
  }
#endif
  reverse_kl_fused_cpu(z, r, w, kl, grad);
  return {kl, grad};
}

// grad *= scale row by row, in place (anchored_kl.h): the CPU backward of every loss here.
void scale_rows_(const torch::Tensor& grad, const torch::Tensor& scale) {
  TORCH_CHECK(grad.is_cpu() && scale.is_cpu(), "scale_rows_ runs on CPU tensors");
  TORCH_CHECK(grad.dim() == 2 && grad.is_contiguous(), "grad must be 2-D and contiguous");
  TORCH_CHECK(kernel_dtype(grad), "grad must be float32, bfloat16 or float16");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == grad.size(0) &&
                  scale.scalar_type() == torch::kFloat && scale.is_contiguous(),
              "scale must be a contiguous float32 vector of one value per row of grad");
  scale_rows_cpu(grad, scale);
  // As torch's own in-place ops do: autograd then refuses a second backward through the
  // gradient it saved (a write through data_ptr alone would go unseen).
  grad.unsafeGetTensorImpl()->bump_version();
}

}  // namespace
}  // namespace anchored_kl

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace anchored_kl;
  m.doc() =
      "Fused anchored-KL and SFT-stage loss kernels on vocab-sharded logits; each loss kernel's "
      "last argument is its per-row weights (CPU tensors only; None: every row weighs 1)";
  m.def("row_stats", &row_stats, "Local softmax statistics [rows, streams, 2]");
  m.def("kl_grad", &kl_grad, "Partial KL per row and the gradient shard, given global LSEs");
  m.def("fused", &fused, "KL per row and gradient for unsharded rows");
  m.def("built_with_cuda", &built_with_cuda);
  m.def("idle_cpu_gradient_bytes", &idle_cpu_gradient_bytes,
        "Bytes kept for the next CPU gradient (cpu_gradient.cpp)");
  m.def("scale_rows_", &scale_rows_, "grad[i, :] *= scale[i] in place (CPU), rounded once");
  m.def("loss_stats", &loss_stats,
        "Local softmax statistics of the policy (and reference) [rows, streams, 2], and with a "
        "reference the weighted difference sum [rows]");
  m.def("cross_entropy_grad", &cross_entropy_grad,
        "Cross-entropy gradient shard p - onehot(label), given the global LSE");
  m.def("cross_entropy_fused", &cross_entropy_fused,
        "Cross-entropy per row and its gradient for unsharded rows");
  m.def("reverse_kl_grad", &reverse_kl_grad,
        "Partial KL(p || p_ref) per row and the gradient shard, given global LSEs and E_p[z - r]");
  m.def("reverse_kl_fused", &reverse_kl_fused,
        "KL(p || p_ref) per row and its gradient for unsharded rows");
}
