// Launcher of the CUDA CSR transpose (torch-free). The m x n CSR (values, row_offsets,
// col_indices) becomes the n x m CSR (values_t, row_offsets_t, col_indices_t), column indices
// ascending in every new row, plus `permutation` (nnz,) with values_t[q] == values[permutation[q]].
// Deterministic, entirely on the GPU, launches on `stream` and never synchronizes: every output
// size (nnz, n + 1) is known on the host beforehand. T is float, double, __half or __nv_bfloat16.
//
// The caller provides `workspace` of csr_transpose_workspace_bytes(nnz, n) bytes, 16-byte aligned.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace rosa::cuda {

size_t csr_transpose_workspace_bytes(int64_t nnz, int64_t n);

template <typename T>
void csr_transpose(const T* values, const int32_t* row_offsets, const int32_t* col_indices,
                   int64_t m, int64_t n, int64_t nnz, T* values_t, int32_t* row_offsets_t,
                   int32_t* col_indices_t, int32_t* permutation, void* workspace,
                   size_t workspace_bytes, cudaStream_t stream);

}  // namespace rosa::cuda
