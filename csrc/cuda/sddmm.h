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

// out[p] = product[i, col_indices[p]] for the nonzeros p of rows i in [0, m) of a CSR whose
// row_offsets may start anywhere (pass row_offsets + r0 for rows r0.. of a larger mask): the
// gather of the dense path, after a GEMM has formed `product` (m x n, row stride
// `product_row_stride`). Launches on `stream`; never synchronizes.
template <typename T>
void sddmm_gather(const T* product, int64_t product_row_stride, const int32_t* row_offsets,
                  const int32_t* col_indices, T* out, int64_t m, cudaStream_t stream);

// Whether the dense path (one GEMM a @ bt^T, then sddmm_gather) is expected to beat the sparse
// kernel: 16-bit values (tensor cores) at density nnz / (m n) >= kSddmmDenseDensity and a GEMM
// big enough for cuBLAS to run near peak. A host computation; no synchronization.
inline constexpr double kSddmmDenseDensity = 0.005;
bool sddmm_dense_is_faster(int64_t m, int64_t n, int64_t k, int64_t nnz, int value_bytes);

}  // namespace rosa::cuda
