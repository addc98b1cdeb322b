// Checks shared by the CPU and CUDA registrations of the LoRA dropout ops.
#pragma once

#include <ATen/ATen.h>

#include "dropout_keep.h"

namespace rosa {

// The dropout key of a one-element int64 CPU seed tensor and a drop probability p in [0, 1).
DropoutKey check_dropout_key(const at::Tensor& seed, double p);

// dx (2-D, floating, unit column stride) and g of the same shape, dtype and device.
void check_dropout_add(const at::Tensor& dx, const at::Tensor& g);

}  // namespace rosa
