// Entry points of the anchored-KL extension, shared by the bindings and the CPU/CUDA files.
// All tensors are 2-D [rows, V_local] and contiguous; the Python layer reshapes and validates,
// the bindings check every argument and allocate every output, and these functions fill the
// outputs. Only TensorBase appears here, so that the CUDA file compiles without the full torch
// headers (nvcc's front end over torch/extension.h took ~70 of the ~110 s per architecture).
#pragma once

#include <ATen/core/TensorBase.h>

#include <optional>

#include "anchored_kl_math.h"

namespace anchored_kl {

struct Inputs {
  at::TensorBase z;                 // policy logits
  std::optional<at::TensorBase> c;  // current-model logits; absent in live mode (c = z)
  at::TensorBase r;                 // reference logits
  double alpha;
  double inv_tau;  // 1 / temperature
  Interp mode;
};

// The CPU kernels also take per-row weights [rows] fp32 (undefined: none), cpu_rows.h's
// RowWeights: a row's gradient is scaled by its weight, a row of weight 0 is skipped.

// Local softmax statistics stats [rows, streams, 2] (max, sum of exp(x - max)), fp32.
void row_stats_cpu(const Inputs& in, const at::TensorBase& weights, const at::TensorBase& stats);
// Given the full-vocabulary LSEs as (max, log_sum) pairs lse [rows, streams, 2]: the partial KL
// kl [rows] fp32 and grad = weight x (p - q) / tau in the policy's dtype (not written when
// undefined).
void kl_grad_cpu(const Inputs& in, const at::TensorBase& weights, const at::TensorBase& lse,
                 const at::TensorBase& kl, const at::TensorBase& grad);
// Unsharded rows: both passes per row in one call.
void fused_cpu(const Inputs& in, const at::TensorBase& weights, const at::TensorBase& kl,
               const at::TensorBase& grad);

// The backward of every loss here, on the CPU: grad [rows, V_local] (float32, bfloat16 or
// float16) *= scale [rows] (float32) row by row, in place, rounded once to grad's dtype.
void scale_rows_cpu(const at::TensorBase& grad, const at::TensorBase& scale);

#ifdef WITH_CUDA
void row_stats_cuda(const Inputs& in, const at::TensorBase& stats);
void kl_grad_cuda(const Inputs& in, const at::TensorBase& lse, const at::TensorBase& kl,
                  const at::TensorBase& grad);
void fused_cuda(const Inputs& in, const at::TensorBase& kl, const at::TensorBase& grad);
#endif

}  // namespace anchored_kl
