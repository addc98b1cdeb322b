// Checks shared by the CPU and CUDA registrations of the fused LoRA dropout ops.
#pragma once

#include <ATen/ATen.h>

#include "dropout_keep.h"

namespace rosa {

// The dropout key of a one-element int64 CPU seed tensor and a drop probability p in [0, 1).
DropoutKey check_dropout_key(const at::Tensor& seed, double p);

// x: 2-D values; other: 2-D, same dtype and device, size `other_columns` in dimension
// `other_columns_dim`.
void check_lora_operands(const at::Tensor& x, const char* x_name, const at::Tensor& other, const char* other_name,
                         int64_t other_columns_dim, int64_t other_columns);

}  // namespace rosa
