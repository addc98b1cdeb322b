// Checks shared by the CPU and CUDA registrations of the LoRA dropout ops.
#pragma once

#include <ATen/ATen.h>

#include "dropout_keep.h"

namespace rosa {

// The dropout key of a one-element int64 seed tensor and a drop probability p in [0, 1), for inputs
// on `device`: a CPU seed is read here; a seed on the (CUDA) input's device is read by the kernel.
DropoutKey check_dropout_key(const at::Tensor& seed, double p, const at::Device& device);

// dx (2-D, floating, unit column stride) and g of the same shape, dtype and device.
void check_dropout_add(const at::Tensor& dx, const at::Tensor& g);

}  // namespace rosa
