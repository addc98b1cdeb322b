// Launcher of the CUDA SpMM (torch-free): out (m x k) = A (m x n, CSR) @ dense (n x k), float32
// accumulation (float64 for double). T is float, double, __half or __nv_bfloat16.
//
// `dense` has contiguous rows with row stride `dense_row_stride` (elements); `out` is contiguous.
// Rows without nonzeros are written as zeros. Launches on `stream`, never synchronizes, and
// trusts a validated CSR (offsets nondecreasing from 0 to nnz, columns in [0, n), row_indices a
// permutation of 0..m-1 -- ideally by nonincreasing row length, which only affects speed).
//
// Use: kernel = spmm_select(...); allocate spmm_workspace_bytes(kernel, ...) bytes (16-byte
// aligned) on the device; call spmm(..., kernel, workspace, bytes, stream).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace rosa::cuda {

// Which kernel runs (docs/cuda.md). kAuto lets spmm_select pick by shape.
enum class SpmmKernel : int {
  kAuto = 0,
  kSlab32 = 1,  // a block keeps a 32-byte-wide column slab of all of `dense` in shared memory
  kSlab16 = 2,  // the same with a 16-byte-wide slab (half the shared memory, for larger n)
  kRows = 3,    // one block per (row, column chunk), dense rows read straight from global memory
  kRows2 = 5,   // kRows' work, longest rows first across all column chunks (RoSA masks with long
                // rows; slower on uniform ones)
};

// The kernel that will run for `requested` (kAuto or a forced one that may not fit): a host
// computation on the current device's properties; no launch, no synchronization.
SpmmKernel spmm_select(SpmmKernel requested, int64_t m, int64_t n, int64_t k, int64_t nnz,
                       int value_bytes);

// Device workspace the selected kernel needs (0 for kRows and kRows2).
size_t spmm_workspace_bytes(SpmmKernel selected, int64_t m, int64_t nnz, int value_bytes);

// Whether the dense path (write A densely with csr_add, then one GEMM) is expected to beat the
// sparse kernels: 16-bit values (tensor cores), a GEMM big enough for cuBLAS to run near peak,
// and a rows kernel whose L2 traffic (nnz * k * value_bytes) costs more than the GEMM plus
// writing A. A host computation from sizes alone; no synchronization.
bool spmm_dense_is_faster(int64_t m, int64_t n, int64_t k, int64_t nnz, int value_bytes);

template <typename T>
void spmm(const T* values, const int32_t* row_offsets, const int32_t* row_indices,
          const int32_t* col_indices, const T* dense, int64_t dense_row_stride, T* out, int64_t m,
          int64_t n, int64_t k, int64_t nnz, SpmmKernel selected, void* workspace,
          size_t workspace_bytes, cudaStream_t stream);

}  // namespace rosa::cuda
