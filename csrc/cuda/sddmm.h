// Launcher of the CUDA SDDMM (torch-free): out[p] = <a[i, :], bt[j, :]> for each nonzero p = (i, j)
// of the m x n CSR mask, accumulated in float32 (float64 for double).
//
// a is m x k and bt is n x k, each given by two element strides (row, column): the binding passes
// either row-major operands (column stride 1) or transposed views of row-major activations (row
// stride 1, e.g. a = dY.t() for dY of shape T x m), and the launcher picks the kernel for each.
// T is float, double, __half or __nv_bfloat16. Launches on `stream`; never synchronizes and never
// allocates.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace rosa::cuda {

template <typename T>
void sddmm(const int32_t* row_offsets, const int32_t* row_indices, const int32_t* col_indices,
           const T* a, int64_t a_row_stride, int64_t a_col_stride, const T* bt,
           int64_t bt_row_stride, int64_t bt_col_stride, T* out, int64_t m, int64_t n, int64_t k,
           int64_t nnz, void* workspace, size_t workspace_bytes, cudaStream_t stream);

// Bytes of float32 (float64 for double) workspace that `sddmm` uses to split the token
// reduction over more blocks on the current device; 0 when it would not split. The caller
// allocates it (torch's caching allocator in the binding); with less, sddmm does not split.
template <typename T>
size_t sddmm_workspace_bytes(int64_t m, int64_t n, int64_t k, int64_t nnz);

}  // namespace rosa::cuda
