// CUDA CSR add in place: dense[i, col_indices[p]] += values[p] for every nonzero p of row i.
//
// One warp per row (grid-stride over rows), lanes striding over the row's nonzeros: the reads of
// values and col_indices are coalesced, the read-modify-writes of `dense` are scattered 2-8 byte
// accesses (the minimum: nothing else of `dense` is touched). Columns are distinct inside a row,
// so no two lanes ever touch the same entry and no atomics are needed. Empty rows cost one read
// of two offsets. Assumes a validated CSR; 64-bit addresses; m or nnz may be 0.
#include "cuda/csr_add.h"

#include <algorithm>

#include "cuda/common.cuh"

namespace rosa::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    csr_add_kernel(const T* __restrict__ values, const int32_t* __restrict__ row_offsets,
                   const int32_t* __restrict__ col_indices, T* __restrict__ dense,
                   int64_t dense_row_stride, int64_t m) {
  const int lane = threadIdx.x % 32;
  for (int64_t row = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / 32; row < m;
       row += int64_t(gridDim.x) * kWarpsPerBlock) {
    const int64_t begin = row_offsets[row], end = row_offsets[row + 1];
    T* dense_row = dense + row * dense_row_stride;
    for (int64_t p = begin + lane; p < end; p += 32) {
      T& entry = dense_row[col_indices[p]];
      entry = from_acc<T>(to_acc(entry) + to_acc(values[p]));
    }
  }
}

}  // namespace

template <typename T>
void csr_add(const T* values, const int32_t* row_offsets, const int32_t* col_indices, T* dense,
             int64_t dense_row_stride, int64_t m, int64_t nnz, cudaStream_t stream) {
  if (m == 0 || nnz == 0) return;
  const int64_t blocks = std::min<int64_t>((m + kWarpsPerBlock - 1) / kWarpsPerBlock,
                                           int64_t(multiprocessor_count()) * 16);
  csr_add_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      values, row_offsets, col_indices, dense, dense_row_stride, m);
}

#define ROSA_INSTANTIATE_CSR_ADD(T)                                                             \
  template void csr_add<T>(const T*, const int32_t*, const int32_t*, T*, int64_t, int64_t,     \
                           int64_t, cudaStream_t);
ROSA_INSTANTIATE_CSR_ADD(float)
ROSA_INSTANTIATE_CSR_ADD(double)
ROSA_INSTANTIATE_CSR_ADD(__half)
ROSA_INSTANTIATE_CSR_ADD(__nv_bfloat16)

}  // namespace rosa::cuda
