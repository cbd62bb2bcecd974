// Python bindings: one function per pass, dispatched on the tensors' device.
#include "anchored_kl.h"

namespace anchored_kl {
namespace {

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
  TORCH_CHECK(z.scalar_type() == torch::kFloat || z.scalar_type() == torch::kBFloat16 ||
                  z.scalar_type() == torch::kHalf,
              "the fused kernels take float32, bfloat16 or float16 logits");
  TORCH_CHECK(mode == 0 || mode == 1, "mode must be 0 (logit) or 1 (prob)");
  return {z, c, r, alpha, inv_tau, static_cast<Interp>(mode)};
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

torch::Tensor row_stats(const torch::Tensor& z, const std::optional<torch::Tensor>& c,
                        const torch::Tensor& r, double alpha, double inv_tau, int64_t mode) {
  check_device(z);
  const Inputs in = make_inputs(z, c, r, alpha, inv_tau, mode);
#ifdef WITH_CUDA
  if (z.is_cuda()) return row_stats_cuda(in);
#endif
  return row_stats_cpu(in);
}

std::tuple<torch::Tensor, torch::Tensor> kl_grad(const torch::Tensor& z,
                                                 const std::optional<torch::Tensor>& c,
                                                 const torch::Tensor& r, const torch::Tensor& lse,
                                                 double alpha, double inv_tau, int64_t mode,
                                                 bool need_grad) {
  check_device(z);
  const Inputs in = make_inputs(z, c, r, alpha, inv_tau, mode);
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == z.size(0) && lse.size(1) == num_streams(in.mode) &&
                  lse.size(2) == 2 && lse.scalar_type() == torch::kFloat &&
                  lse.device() == z.device() && lse.is_contiguous(),
              "lse must be a contiguous float32 [rows, streams, 2] tensor on the logits' device");
#ifdef WITH_CUDA
  if (z.is_cuda()) return kl_grad_cuda(in, lse, need_grad);
#endif
  return kl_grad_cpu(in, lse, need_grad);
}

std::tuple<torch::Tensor, torch::Tensor> fused(const torch::Tensor& z,
                                               const std::optional<torch::Tensor>& c,
                                               const torch::Tensor& r, double alpha, double inv_tau,
                                               int64_t mode, bool need_grad) {
  check_device(z);
  const Inputs in = make_inputs(z, c, r, alpha, inv_tau, mode);
#ifdef WITH_CUDA
  if (z.is_cuda()) return fused_cuda(in, need_grad);
#endif
  return fused_cpu(in, need_grad);
}

}  // namespace
}  // namespace anchored_kl

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace anchored_kl;
  m.doc() = "Fused anchored-KL kernels on vocab-sharded logits";
  m.def("row_stats", &row_stats, "Local softmax statistics [rows, streams, 2]");
  m.def("kl_grad", &kl_grad, "Partial KL per row and the gradient shard, given global LSEs");
  m.def("fused", &fused, "KL per row and gradient for unsharded rows");
  m.def("built_with_cuda", &built_with_cuda);
}
