// Launcher of the CUDA CSR add (torch-free), in place: dense (m x n) += A (m x n, CSR).
// `dense` has contiguous rows with row stride `dense_row_stride` (elements). The sum of each
// entry is formed in float32 (float64 for double) and rounded once. T is float, double, __half
// or __nv_bfloat16. Launches on `stream`; never synchronizes.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace rosa::cuda {

template <typename T>
void csr_add(const T* values, const int32_t* row_offsets, const int32_t* col_indices, T* dense,
             int64_t dense_row_stride, int64_t m, int64_t nnz, cudaStream_t stream);

}  // namespace rosa::cuda
