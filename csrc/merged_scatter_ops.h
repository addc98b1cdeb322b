// merged_scatter_'s argument checks (rosa_linear_ops.cpp), shared with its CUDA registration
// (merged_scatter_cuda.cpp).
#pragma once

#include <ATen/ATen.h>

namespace rosa {

// Lengths of the lists, per layer: a 2-D floating weight, int32 or int64 row_offsets (m + 1,) and
// col_indices (nnz,) of one dtype, floating base_values and values (nnz,), all on the weight's device.
void check_merged_scatter(at::TensorList weights, at::TensorList row_offsets, at::TensorList col_indices,
                          at::TensorList base_values, at::TensorList values);

}  // namespace rosa
