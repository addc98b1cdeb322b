// CUDA CSR transpose: count, scan, ordered scatter -- deterministic, no host synchronization.
//
// The nonzeros, numbered p = 0..nnz-1 in row-major order, are cut into B contiguous segments.
//   1. `histogram`: each block counts its segment's columns in shared memory (order does not
//      matter for counts) and writes its row of the B x n histogram; it also records the old row
//      of every nonzero (a binary search in row_offsets).
//   2. `column_prefix`: per column j, an exclusive scan over the segments gives where segment b's
//      entries of column j start, relative to the column, and the column's total.
//   3. `scan`: one block turns the n totals into row_offsets_t.
//   4. `scatter`: one block per segment loads its n cursors, then its first warp walks its nonzeros in order, 32 at a time; lanes holding the
//      same column find each other with __match_any_sync and take consecutive slots in p order,
//      so every new row lists its entries by ascending old row, i.e. ascending column index.
// Shared memory holds n counters, so this path serves n <= kMaxColumns; larger n falls back to a
// stable cub radix sort of (column, p) pairs, which yields the same permutation.
// Every output size (nnz, n + 1) is known on the host, so nothing synchronizes.
//
// Assumes a validated CSR. Index arithmetic is 64-bit; nnz, m, n may be 0.
#include "cuda/csr_transpose.h"

#include <algorithm>

#include <cub/device/device_radix_sort.cuh>

#include "cuda/common.cuh"

namespace rosa::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxColumns = 12288;  // n int32 counters in 48 KB of shared memory
constexpr int kScanThreads = 1024;

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


// The old row of nonzero p: the last i with row_offsets[i] <= p.
__device__ __forceinline__ int64_t row_of(const int32_t* __restrict__ row_offsets, int64_t m,
                                          int64_t p) {
  int64_t low = 0, high = m - 1;
  while (low < high) {
    const int64_t mid = (low + high + 1) / 2;
    if (row_offsets[mid] <= p) low = mid; else high = mid - 1;
  }
  return low;
}

__global__ void histogram_kernel(const int32_t* __restrict__ row_offsets, int64_t m,
                                 const int32_t* __restrict__ col_indices, int64_t nnz,
                                 int64_t segment, int64_t n, int32_t* __restrict__ histogram,
                                 int32_t* __restrict__ old_rows) {
  extern __shared__ int32_t counts[];
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) counts[j] = 0;
  __syncthreads();
  const int64_t begin = blockIdx.x * segment, end = std::min(nnz, begin + segment);
  for (int64_t p = begin + threadIdx.x; p < end; p += blockDim.x) {
    atomicAdd(&counts[col_indices[p]], 1);
    old_rows[p] = static_cast<int32_t>(row_of(row_offsets, m, p));
  }
  __syncthreads();
  int32_t* row = histogram + blockIdx.x * n;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) row[j] = counts[j];
}

// histogram[b][j] becomes the number of column-j entries in segments before b; the column's total
// goes to row_offsets_t[j + 1]. The loads of a batch of segments are issued before the running sum
// needs them, so a thread waits on memory once per batch, not once per segment.
__global__ void column_prefix_kernel(int32_t* __restrict__ histogram, int64_t segments, int64_t n,
                                     int32_t* __restrict__ row_offsets_t) {
  constexpr int kBatch = 16;
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < n;
       j += int64_t(gridDim.x) * blockDim.x) {
    int32_t running = 0;
    for (int64_t b0 = 0; b0 < segments; b0 += kBatch) {
      int32_t counts[kBatch];
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        counts[i] = b0 + i < segments ? histogram[(b0 + i) * n + j] : 0;
      }
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        if (b0 + i < segments) histogram[(b0 + i) * n + j] = running;
        running += counts[i];
      }
    }
    row_offsets_t[j + 1] = running;
  }
}

// In place: row_offsets_t[0] = 0 and row_offsets_t[1..n] (column totals) become their inclusive
// prefix sums. One block; each thread owns a contiguous run.
__global__ void __launch_bounds__(kScanThreads) offsets_scan_kernel(int32_t* __restrict__ row_offsets_t,
                                                                    int64_t n) {
  __shared__ int32_t run_sums[kScanThreads];
  int32_t* totals = row_offsets_t + 1;
  const int64_t per_thread = (n + kScanThreads - 1) / kScanThreads;
  const int64_t begin = std::min(n, threadIdx.x * per_thread);
  const int64_t end = std::min(n, begin + per_thread);
  int32_t sum = 0;
  for (int64_t j = begin; j < end; ++j) sum += totals[j];
  run_sums[threadIdx.x] = sum;
  __syncthreads();
  for (int offset = 1; offset < kScanThreads; offset *= 2) {
    const int32_t add = threadIdx.x >= offset ? run_sums[threadIdx.x - offset] : 0;
    __syncthreads();
    run_sums[threadIdx.x] += add;
    __syncthreads();
  }
  int32_t running = run_sums[threadIdx.x] - sum;
  for (int64_t j = begin; j < end; ++j) {
    running += totals[j];
    totals[j] = running;
  }
  if (threadIdx.x == 0) row_offsets_t[0] = 0;
}

// One block per segment: all its threads fill cursor[j] (where the segment's next column-j entry
// goes), then its first warp walks the segment in order.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    scatter_kernel(const T* __restrict__ values, const int32_t* __restrict__ col_indices,
                   const int32_t* __restrict__ old_rows, int64_t nnz, int64_t segment, int64_t n,
                   const int32_t* __restrict__ histogram, const int32_t* __restrict__ row_offsets_t,
                   T* __restrict__ values_t, int32_t* __restrict__ col_indices_t,
                   int32_t* __restrict__ permutation) {
  extern __shared__ int32_t cursor[];
  const int32_t* before = histogram + blockIdx.x * n;
#pragma unroll 4
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) cursor[j] = row_offsets_t[j] + before[j];
  __syncthreads();
  if (threadIdx.x >= 32) return;
  const int lane = threadIdx.x;
  const unsigned lower_lanes = (1u << lane) - 1u;
  const int64_t begin = blockIdx.x * segment, end = std::min(nnz, begin + segment);
  constexpr int kBatch = 8;  // columns of 8 rounds loaded up front: loads stay off the chain
  for (int64_t base = begin; base < end; base += 32 * kBatch) {
    int32_t columns[kBatch];
#pragma unroll
    for (int w = 0; w < kBatch; ++w) {
      const int64_t p = base + w * 32 + lane;
      columns[w] = p < end ? col_indices[p] : -1 - lane;  // distinct keys for idle lanes
    }
#pragma unroll
    for (int w = 0; w < kBatch; ++w) {
      const int64_t p = base + w * 32 + lane;
      const int32_t j = columns[w];
      const unsigned peers = __match_any_sync(0xffffffffu, j);
      int32_t slot = 0;
      if (j >= 0) slot = cursor[j];
      __syncwarp();
      if (j >= 0 && lane == __ffs(peers) - 1) cursor[j] = slot + __popc(peers);
      __syncwarp();
      if (j >= 0) {
        const int64_t q = slot + __popc(peers & lower_lanes);
        permutation[q] = static_cast<int32_t>(p);
        col_indices_t[q] = old_rows[p];
        values_t[q] = values[p];
      }
    }
  }
}

struct CountLayout {  // byte offsets inside the workspace of the count-scan-scatter path
  int64_t segments, segment;
  size_t histogram, old_rows, total;
};

CountLayout count_layout(int64_t nnz, int64_t n) {
  CountLayout layout{};
  const int64_t most = 2 * static_cast<int64_t>(multiprocessor_count());
  // Enough segments to fill the GPU, each long enough (>= 1024 nonzeros) that the per-segment
  // work (n counters, n prefix entries) stays small next to the nonzeros it serves.
  layout.segments = std::max<int64_t>(1, std::min<int64_t>(most, (nnz + 1023) / 1024));
  layout.segment = (nnz + layout.segments - 1) / layout.segments;
  layout.histogram = 0;
  layout.old_rows = round_up16(static_cast<size_t>(layout.segments * n) * sizeof(int32_t));
  layout.total = layout.old_rows + round_up16(static_cast<size_t>(nnz) * sizeof(int32_t));
  return layout;
}

bool use_counting(int64_t n) { return n <= kMaxColumns; }

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
  if (use_counting(n)) return count_layout(nnz, n).total;
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
  if (use_counting(n)) {
    const CountLayout layout = count_layout(nnz, n);
    char* base = static_cast<char*>(workspace);
    auto* histogram = reinterpret_cast<int32_t*>(base + layout.histogram);
    auto* old_rows = reinterpret_cast<int32_t*>(base + layout.old_rows);
    const size_t shared_bytes = static_cast<size_t>(n) * sizeof(int32_t);
    const auto segments = static_cast<unsigned>(layout.segments);
    histogram_kernel<<<segments, kThreads, shared_bytes, stream>>>(
        row_offsets, m, col_indices, nnz, layout.segment, n, histogram, old_rows);
    column_prefix_kernel<<<grid_for(n), kThreads, 0, stream>>>(histogram, layout.segments, n,
                                                               row_offsets_t);
    offsets_scan_kernel<<<1, kScanThreads, 0, stream>>>(row_offsets_t, n);
    scatter_kernel<T><<<segments, kThreads, shared_bytes, stream>>>(
        values, col_indices, old_rows, nnz, layout.segment, n, histogram, row_offsets_t, values_t,
        col_indices_t, permutation);
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
