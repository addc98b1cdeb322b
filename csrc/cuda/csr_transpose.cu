// CUDA CSR transpose as a stable sort. The nonzeros, numbered p = 0..nnz-1 in row-major order,
// are sorted by column with cub's stable radix sort (keys = col_indices, items = p, only the
// ceil(log2 n) low key bits): the sorted items are exactly the permutation of the transpose, and
// stability keeps the old rows -- the new column indices -- ascending inside each new row. Then
// one pass over the n + 1 new offsets (a binary search in the sorted columns) and one pass over
// the nonzeros (a binary search of each p in row_offsets gives its old row; values are gathered)
// finish the job. No atomics anywhere, so the result is deterministic; every size is known on the
// host, so nothing synchronizes. Work: O(nnz * log(n) / 8 + (n + nnz) log) with all loads coalesced
// except the gathers.
//
// Assumes a validated CSR. Index arithmetic is 64-bit; nnz, m, n may be 0.
#include "cuda/csr_transpose.h"

#include <algorithm>

#include <cub/device/device_radix_sort.cuh>

#include "cuda/common.cuh"

namespace rosa::cuda {
namespace {

constexpr int kThreads = 256;

inline unsigned grid_for(int64_t count) {
  const int64_t blocks = (count + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(blocks, 65535LL * 32)));
}

// Key bits the sort must look at: enough for every column index in [0, n).
inline int key_bits(int64_t n) {
  int bits = 1;
  while (bits < 31 && (int64_t(1) << bits) < n) ++bits;
  return bits;
}

inline size_t round_up16(size_t bytes) { return (bytes + 15) / 16 * 16; }

__global__ void iota_kernel(int32_t* __restrict__ items, int64_t count) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x) {
    items[i] = static_cast<int32_t>(i);
  }
}

// row_offsets_t[j] = number of nonzeros with column < j = lower_bound(sorted_columns, j).
__global__ void offsets_kernel(const int32_t* __restrict__ sorted_columns, int64_t nnz, int64_t n,
                               int32_t* __restrict__ row_offsets_t) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j <= n;
       j += int64_t(gridDim.x) * blockDim.x) {
    int64_t low = 0, high = nnz;
    while (low < high) {
      const int64_t mid = (low + high) / 2;
      if (sorted_columns[mid] < j) low = mid + 1; else high = mid;
    }
    row_offsets_t[j] = static_cast<int32_t>(low);
  }
}

// col_indices_t[q] = the old row of nonzero permutation[q]; values_t[q] = values[permutation[q]].
template <typename T>
__global__ void gather_kernel(const T* __restrict__ values, const int32_t* __restrict__ row_offsets,
                              int64_t m, const int32_t* __restrict__ permutation, int64_t nnz,
                              T* __restrict__ values_t, int32_t* __restrict__ col_indices_t) {
  for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < nnz;
       q += int64_t(gridDim.x) * blockDim.x) {
    const int64_t p = permutation[q];
    // The old row is the last i with row_offsets[i] <= p (empty rows share an offset and are
    // skipped because we look for the last one).
    int64_t low = 0, high = m;  // invariant: row_offsets[low] <= p < row_offsets[high + 1]
    while (low < high) {
      const int64_t mid = (low + high + 1) / 2;
      if (row_offsets[mid] <= p) low = mid; else high = mid - 1;
    }
    col_indices_t[q] = static_cast<int32_t>(low);
    values_t[q] = values[p];
  }
}

// Bytes cub needs for the sort (a host computation: no launch, no synchronization).
size_t sort_bytes(int64_t nnz, int64_t n) {
  size_t bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const int32_t*>(nullptr),
                                  static_cast<int32_t*>(nullptr),
                                  static_cast<const int32_t*>(nullptr),
                                  static_cast<int32_t*>(nullptr), nnz, 0, key_bits(n));
  return bytes;
}

}  // namespace

size_t csr_transpose_workspace_bytes(int64_t nnz, int64_t n) {
  if (nnz == 0) return 0;
  // sorted keys, the identity items, cub's own storage
  return 2 * round_up16(static_cast<size_t>(nnz) * sizeof(int32_t)) + round_up16(sort_bytes(nnz, n));
}

template <typename T>
void csr_transpose(const T* values, const int32_t* row_offsets, const int32_t* col_indices,
                   int64_t m, int64_t n, int64_t nnz, T* values_t, int32_t* row_offsets_t,
                   int32_t* col_indices_t, int32_t* permutation, void* workspace,
                   size_t workspace_bytes, cudaStream_t stream) {
  if (nnz == 0) {
    cudaMemsetAsync(row_offsets_t, 0, static_cast<size_t>(n + 1) * sizeof(int32_t), stream);
    return;
  }
  char* cursor = static_cast<char*>(workspace);
  const size_t index_bytes = round_up16(static_cast<size_t>(nnz) * sizeof(int32_t));
  int32_t* sorted_columns = reinterpret_cast<int32_t*>(cursor);
  int32_t* items = reinterpret_cast<int32_t*>(cursor + index_bytes);
  void* sort_storage = cursor + 2 * index_bytes;
  size_t sort_storage_bytes = workspace_bytes - 2 * index_bytes;

  iota_kernel<<<grid_for(nnz), kThreads, 0, stream>>>(items, nnz);
  cub::DeviceRadixSort::SortPairs(sort_storage, sort_storage_bytes, col_indices, sorted_columns,
                                  items, permutation, nnz, 0, key_bits(n), stream);
  offsets_kernel<<<grid_for(n + 1), kThreads, 0, stream>>>(sorted_columns, nnz, n, row_offsets_t);
  gather_kernel<T><<<grid_for(nnz), kThreads, 0, stream>>>(values, row_offsets, m, permutation,
                                                           nnz, values_t, col_indices_t);
}

#define ROSA_INSTANTIATE_CSR_TRANSPOSE(T)                                                      \
  template void csr_transpose<T>(const T*, const int32_t*, const int32_t*, int64_t, int64_t,  \
                                 int64_t, T*, int32_t*, int32_t*, int32_t*, void*, size_t,      \
                                 cudaStream_t);
ROSA_INSTANTIATE_CSR_TRANSPOSE(float)
ROSA_INSTANTIATE_CSR_TRANSPOSE(double)
ROSA_INSTANTIATE_CSR_TRANSPOSE(__half)
ROSA_INSTANTIATE_CSR_TRANSPOSE(__nv_bfloat16)

}  // namespace rosa::cuda
