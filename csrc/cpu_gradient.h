// Gradient buffers of the CPU losses (cpu_gradient.cpp): why they are not torch::empty.
#pragma once

#include <ATen/core/Tensor.h>

namespace anchored_kl {

// An uninitialised contiguous CPU tensor with z's sizes and dtype, for a gradient that a kernel
// writes in full.
at::Tensor cpu_gradient_like(const at::Tensor& z);

// Bytes of the buffer kept for the next gradient (0 when none): memory the extension holds
// between calls, which a measurement of its footprint must count.
int64_t idle_cpu_gradient_bytes();

}  // namespace anchored_kl
