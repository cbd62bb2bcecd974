// Entry points of the SFT-stage loss kernels (nemo_anchored/ops/sharded_losses.py), shared by
// the bindings and the CPU/CUDA files. The bindings check every argument and allocate every
// output; these functions fill the outputs. Logits are 2-D [rows, V_local], contiguous,
// float32, bfloat16 or float16: z the policy's, r the reference's (same shape and dtype; an
// undefined tensor where a loss has none). Labels are int64 [rows] column indices into this
// shard; a label outside [0, V_local) marks no column here. A gradient output left undefined
// is not written. Only TensorBase appears here, so that the CUDA file compiles without the
// full torch headers.
#pragma once

#include <ATen/core/TensorBase.h>

namespace anchored_kl {

// The CPU kernels also take per-row weights [rows] fp32 (undefined: none), as anchored_kl.h's.

// Softmax statistics [rows, streams, 2] (local max, sum of exp(x - max)) of z, then of r when
// it is defined; with r, also weighted [rows] = sum_v exp(z_v - max_z) (z_v - r_v).
void loss_stats_cpu(const at::TensorBase& z, const at::TensorBase& r, const at::TensorBase& weights,
                    const at::TensorBase& stats, const at::TensorBase& weighted);
// Cross-entropy: the gradient shard p - onehot(label), given the policy's global (max, log_sum)
// lse [rows, 1, 2].
void cross_entropy_grad_cpu(const at::TensorBase& z, const at::TensorBase& labels,
                            const at::TensorBase& weights, const at::TensorBase& lse,
                            const at::TensorBase& grad);
// Unsharded rows: loss [rows] (NaN for a label outside the row: the Python layer refuses those
// first) and the gradient, both passes per row.
void cross_entropy_fused_cpu(const at::TensorBase& z, const at::TensorBase& labels,
                             const at::TensorBase& weights, const at::TensorBase& loss,
                             const at::TensorBase& grad);
// Reverse KL(p || p_ref): this shard's partial KL [rows] and gradient p (y - KL), given the
// global lse [rows, 2, 2] of (policy, reference) and mean_difference [rows] = E_p[z - r].
void reverse_kl_grad_cpu(const at::TensorBase& z, const at::TensorBase& r,
                         const at::TensorBase& weights, const at::TensorBase& lse,
                         const at::TensorBase& mean_difference, const at::TensorBase& kl,
                         const at::TensorBase& grad);
// Unsharded rows: KL [rows] and the gradient, both passes per row.
void reverse_kl_fused_cpu(const at::TensorBase& z, const at::TensorBase& r,
                          const at::TensorBase& weights, const at::TensorBase& kl,
                          const at::TensorBase& grad);

#ifdef WITH_CUDA
void loss_stats_cuda(const at::TensorBase& z, const at::TensorBase& r, const at::TensorBase& stats,
                     const at::TensorBase& weighted);
void cross_entropy_grad_cuda(const at::TensorBase& z, const at::TensorBase& labels,
                             const at::TensorBase& lse, const at::TensorBase& grad);
void cross_entropy_fused_cuda(const at::TensorBase& z, const at::TensorBase& labels,
                              const at::TensorBase& loss, const at::TensorBase& grad);
void reverse_kl_grad_cuda(const at::TensorBase& z, const at::TensorBase& r,
                          const at::TensorBase& lse, const at::TensorBase& mean_difference,
                          const at::TensorBase& kl, const at::TensorBase& grad);
void reverse_kl_fused_cuda(const at::TensorBase& z, const at::TensorBase& r,
                           const at::TensorBase& kl, const at::TensorBase& grad);
#endif

}  // namespace anchored_kl
