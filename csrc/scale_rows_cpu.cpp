// The backward of every loss in this extension (nemo_anchored/ops/vocab_parallel.py) scales the
// gradient rows that its forward wrote by the incoming per-token gradient, in place: grad[i, :]
// *= scale[i], in fp32, rounded once to grad's dtype, as torch's mixed-dtype multiply does. On
// the CPU, torch's in-place bf16 x fp32 multiply took 310-360 ms at 4096 x 32000 on the
// operator benchmark's 2-core Zen 5 (it goes through fp32 copies of the whole tensor), against
// 60 ms for the anchored kernel's whole forward and 7.5 ms for a bf16 x bf16 multiply; this is
// one pass over the gradient. (On the GPU torch's multiply already runs at memory speed.) A row
// whose scale is 1 is not touched, bitwise what the multiply would leave: a loss that took its
// tokens' weights in the forward (anchored_kl.h) gets 1 for every row from a plain sum, as in
// the trainer's backward in bf16 or fp32 (a loss scale of 1), which then costs no pass at all.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "anchored_kl.h"
#include "cpu_rows.h"

namespace anchored_kl {
namespace {

template <typename T>
AKL_CPU_CLONES void scale_row(T* row, int64_t cols, float s) {
  for (int64_t j = 0; j < cols; ++j) row[j] = static_cast<T>(static_cast<float>(row[j]) * s);
}

}  // namespace

void scale_rows_cpu(const at::TensorBase& grad, const at::TensorBase& scale) {
  const int64_t rows = grad.size(0), cols = grad.size(1);
  const float* s = scale.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "scale_rows", [&] {
    scalar_t* g = grad.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        if (s[i] != 1.f) scale_row(g + i * cols, cols, s[i]);
    });
  });
}

}  // namespace anchored_kl
