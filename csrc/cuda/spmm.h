// Launcher of the CUDA SpMM (torch-free): out (m x k) = A (m x n, CSR) @ dense (n x k), float32
// accumulation (float64 for double). T is float, double, __half or __nv_bfloat16.
//
// `dense` has contiguous rows with row stride `dense_row_stride` (elements); `out` is contiguous.
// Rows without nonzeros are written as zeros. Launches on `stream`, never synchronizes, and
// trusts a validated CSR (offsets nondecreasing from 0 to nnz, columns in [0, n), row_indices a
// permutation of 0..m-1 -- ideally by nonincreasing row length, which only affects speed).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace rosa::cuda {

// Which kernel runs. kAuto picks by shape (docs/cuda.md); the others exist for measurements.
enum class SpmmKernel : int {
  kAuto = 0,
  kSlab32 = 1,  // the block keeps a 32-byte-wide column slab of all of `dense` in shared memory
  kSlab16 = 2,  // the same with a 16-byte-wide slab (half the shared memory)
  kRows = 3,    // one block per (row, column chunk), dense rows read straight from global memory
};

template <typename T>
void spmm(const T* values, const int32_t* row_offsets, const int32_t* row_indices,
          const int32_t* col_indices, const T* dense, int64_t dense_row_stride, T* out, int64_t m,
          int64_t n, int64_t k, int64_t nnz, SpmmKernel kernel, cudaStream_t stream);

}  // namespace rosa::cuda
