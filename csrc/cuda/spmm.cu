// CUDA SpMM: out (m x k) = A (m x n, CSR) @ dense (n x k), float32 accumulation.
//
// The `rows` kernel (what `auto` runs): one block per (position in row_indices, column chunk of
// 128 16-byte slices); each thread owns a 16-byte slice of the output row and walks the row's
// nonzeros, loading the matching 16 bytes of each nonzero's dense row from L2 (__ldg), 4 nonzeros
// in flight. Every nonzero moves 2k bytes through L2 (nnz * 8 KB, 1.4 GB at 4096 x 4096, d = 1%),
// at ~8.5 TB/s on an H100 (docs/benchmarks.md; history in git at c550a82).
//
// `rows2` (selectable) does the same work in another order: a grid-stride list of (position,
// chunk) items, the longest rows first with all their chunks at once, then the rest chunk by
// chunk. It is 12-25% faster than `rows` on RoSA masks with rows of 500-2000 nonzeros and 20-25%
// slower on uniform ones (H200; docs/benchmarks.md), so `auto` keeps `rows`.
//
// The `slab` kernels (kept for measurements, several times slower so far) are the route to reuse
// of dense rows across nonzeros: a block copies an n x 32 (or 16) byte slab of `dense` into shared
// memory once and serves every nonzero of its rows from there. Global traffic is one read of
// `dense` per row split, one write of `out`, and the sparse indices once per tile.
//
// Reading those indices per tile must be coalesced, or the L1 spends its cycles on them. So a
// pre-pass re-lays the CSR in the launcher's workspace as SELL-C: rows taken C at a time in
// `row_indices` order (longest first, so the C rows of a chunk have similar lengths), padded to the
// chunk's longest row, entry e of the chunk's row r at chunk_offsets[c] + e * C + r (column -1 for
// padding). Then lane group r of a warp reads entry e of its row while the whole warp reads one
// contiguous C-entry line.
//
// Work inside a slab block: warps take chunks from a shared counter (heaviest rows first). kGroup
// lanes serve one row, each a 16-byte slice of the tile with its accumulators in registers, so a
// chunk is C = 32 / kGroup rows. Rows longer than kLightCap stay out of the SELL copy (bounding its
// size by 4 * C * chunks entries) and are done by the whole warp together: lanes split the
// nonzeros, read the CSR directly (coalesced), and reduce with shuffles.
//
// Assumes a validated CSR; all address arithmetic is 64-bit; any of m, n, k, nnz may be 0.
#include "cuda/spmm.h"

#include <algorithm>

#include "cuda/common.cuh"

namespace rosa::cuda {
namespace {

constexpr int kSlabThreads = 1024;
constexpr int kRowsThreads = 128;
constexpr int kScanThreads = 1024;
constexpr int kRows2Depth = 4;  // dense slices loaded per step by the rows2 kernel

template <int kGroup>
struct SlabShape {
  static constexpr int kChunkRows = 32 / kGroup;     // C of SELL-C
  static constexpr int kLightCap = 4 * kChunkRows;   // longer rows are "heavy"
  static constexpr int kSliceBytes = 16 * kGroup;    // bytes of one dense row in the slab
};

inline size_t round_up16(size_t bytes) { return (bytes + 15) / 16 * 16; }

inline unsigned blocks_for(int64_t count, int threads) {
  const int64_t blocks = (count + threads - 1) / threads;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t(1) << 20)));
}

// ---------------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------------

// Loads 16 bytes (kVectorElements<T> elements) of a dense row starting at column `column`, with
// zeros past k. `vector_ok` says rows are 16-byte aligned so a full slice is one 16-byte load.
template <typename T>
__device__ __forceinline__ uint4 load_slice(const T* row, int64_t column, int64_t k,
                                            bool vector_ok) {
  constexpr int kVec = kVectorElements<T>;
  if (vector_ok && column + kVec <= k) return __ldg(reinterpret_cast<const uint4*>(row + column));
  uint4 slice = make_uint4(0, 0, 0, 0);
  T* elements = reinterpret_cast<T*>(&slice);
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    if (column + e < k) elements[e] = row[column + e];
  }
  return slice;
}

// acc[e] += v * slice[e]. `slice` is taken by value: a reference into shared memory let the compiler read it as
// kVectorElements<T> narrow loads (8 shared-memory wavefronts instead of one, per nonzero).
template <typename T>
__device__ __forceinline__ void multiply_add(accumulator_t<T> (&acc)[kVectorElements<T>],
                                             accumulator_t<T> v, const uint4 slice) {
  const T* elements = reinterpret_cast<const T*>(&slice);
#pragma unroll
  for (int e = 0; e < kVectorElements<T>; ++e) acc[e] += v * to_acc(elements[e]);
}

// Writes the accumulators of one 16-byte slice of an output row (elements past k are dropped).
template <typename T>
__device__ __forceinline__ void store_slice(T* row, int64_t column, int64_t k, bool vector_ok,
                                            const accumulator_t<T> (&acc)[kVectorElements<T>]) {
  constexpr int kVec = kVectorElements<T>;
  uint4 slice;
  T* elements = reinterpret_cast<T*>(&slice);
#pragma unroll
  for (int e = 0; e < kVec; ++e) elements[e] = from_acc<T>(acc[e]);
  if (vector_ok && column + kVec <= k) {
    *reinterpret_cast<uint4*>(row + column) = slice;
    return;
  }
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    if (column + e < k) row[column + e] = elements[e];
  }
}

// ---------------------------------------------------------------------------------------------
// SELL-C pre-pass: chunk lengths, their scan, the padded copy
// ---------------------------------------------------------------------------------------------

// chunk_length[c] = the longest light row among positions [cC, cC + C) of row_indices.
template <int kChunkRows, int kLightCap>
__global__ void sell_lengths_kernel(const int32_t* __restrict__ row_offsets,
                                    const int32_t* __restrict__ row_indices, int64_t m,
                                    int64_t chunks, int32_t* __restrict__ chunk_length) {
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < chunks;
       c += int64_t(gridDim.x) * blockDim.x) {
    int32_t longest = 0;
    for (int64_t position = c * kChunkRows; position < std::min(m, (c + 1) * kChunkRows);
         ++position) {
      const int64_t row = row_indices[position];
      const int32_t length = row_offsets[row + 1] - row_offsets[row];
      if (length <= kLightCap) longest = max(longest, length);
    }
    chunk_length[c] = longest;
  }
}

// chunk_offsets[c] = C * (chunk_length[0] + ... + chunk_length[c - 1]), c in [0, chunks]. One
// block: each thread sums a contiguous run, the block scans the run sums, threads write their run.
template <int kChunkRows>
__global__ void __launch_bounds__(kScanThreads)
    sell_scan_kernel(const int32_t* __restrict__ chunk_length, int64_t chunks,
                     int64_t* __restrict__ chunk_offsets) {
  __shared__ int64_t run_sums[kScanThreads];
  const int64_t per_thread = (chunks + kScanThreads - 1) / kScanThreads;
  const int64_t begin = std::min(chunks, threadIdx.x * per_thread);
  const int64_t end = std::min(chunks, begin + per_thread);
  int64_t sum = 0;
  for (int64_t c = begin; c < end; ++c) sum += int64_t(chunk_length[c]) * kChunkRows;
  run_sums[threadIdx.x] = sum;
  __syncthreads();
  for (int offset = 1; offset < kScanThreads; offset *= 2) {  // inclusive Hillis-Steele scan
    const int64_t add = threadIdx.x >= offset ? run_sums[threadIdx.x - offset] : 0;
    __syncthreads();
    run_sums[threadIdx.x] += add;
    __syncthreads();
  }
  int64_t running = run_sums[threadIdx.x] - sum;
  for (int64_t c = begin; c < end; ++c) {
    chunk_offsets[c] = running;
    running += int64_t(chunk_length[c]) * kChunkRows;
  }
  if (threadIdx.x == kScanThreads - 1) chunk_offsets[chunks] = run_sums[threadIdx.x];
}

// The padded SELL-C copy of the light rows: one warp per chunk, lane r writes its row's entries.
template <typename T, int kChunkRows, int kLightCap>
__global__ void sell_fill_kernel(const T* __restrict__ values,
                                 const int32_t* __restrict__ row_offsets,
                                 const int32_t* __restrict__ row_indices,
                                 const int32_t* __restrict__ col_indices, int64_t m,
                                 int64_t chunks, const int32_t* __restrict__ chunk_length,
                                 const int64_t* __restrict__ chunk_offsets,
                                 int32_t* __restrict__ sell_cols, T* __restrict__ sell_values) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  if (lane >= kChunkRows) return;
  for (int64_t c = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32; c < chunks; c += warps) {
    const int64_t position = c * kChunkRows + lane;
    int64_t begin = 0, length = 0;
    if (position < m) {
      const int64_t row = row_indices[position];
      begin = row_offsets[row];
      length = row_offsets[row + 1] - begin;
      if (length > kLightCap) length = 0;  // heavy: done from the CSR directly
    }
    const int64_t base = chunk_offsets[c] + lane;
    const int64_t entries = chunk_length[c];
    for (int64_t e = 0; e < entries; ++e) {
      const bool real = e < length;
      sell_cols[base + e * kChunkRows] = real ? col_indices[begin + e] : -1;
      sell_values[base + e * kChunkRows] = real ? values[begin + e] : from_acc<T>(0);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The slab kernel: one block per (column tile, row split). See the file comment.
// ---------------------------------------------------------------------------------------------

template <typename T, int kGroup>
__global__ void __launch_bounds__(kSlabThreads)
    spmm_slab_kernel(const T* __restrict__ values, const int32_t* __restrict__ row_offsets,
                     const int32_t* __restrict__ row_indices,
                     const int32_t* __restrict__ col_indices, const T* __restrict__ dense,
                     int64_t dense_row_stride, T* __restrict__ out, int64_t m, int64_t n,
                     int64_t k, bool dense_vector_ok, bool out_vector_ok,
                     const int32_t* __restrict__ chunk_length,
                     const int64_t* __restrict__ chunk_offsets,
                     const int32_t* __restrict__ sell_cols, const T* __restrict__ sell_values) {
  using Acc = accumulator_t<T>;
  using Shape = SlabShape<kGroup>;
  constexpr int kVec = kVectorElements<T>;
  constexpr int kChunkRows = Shape::kChunkRows;
  extern __shared__ uint4 slab[];  // n rows of kGroup 16-byte slices
  __shared__ unsigned long long next_chunk;

  const int64_t tile_begin = static_cast<int64_t>(blockIdx.x) * kGroup * kVec;
  if (threadIdx.x == 0) next_chunk = 0;
  // Several loads in flight per thread before the first store.
  constexpr int kBatch = 4;
  for (int64_t s0 = threadIdx.x; s0 < n * kGroup; s0 += int64_t(kBatch) * blockDim.x) {
    uint4 batch[kBatch];
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int64_t s = s0 + int64_t(b) * blockDim.x;
      if (s < n * kGroup) {
        batch[b] = load_slice(dense + (s / kGroup) * dense_row_stride,
                              tile_begin + (s % kGroup) * kVec, k, dense_vector_ok);
      }
    }
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int64_t s = s0 + int64_t(b) * blockDim.x;
      if (s < n * kGroup) slab[s] = batch[b];
    }
  }
  __syncthreads();

  const int lane = threadIdx.x % 32;
  const int member = lane % kGroup;  // this lane's 16-byte slice of the tile
  const int slot = lane / kGroup;    // this lane's row inside a chunk
  const int64_t column = tile_begin + member * kVec;
  const int64_t chunks = (m + kChunkRows - 1) / kChunkRows;
  const int64_t splits = gridDim.y;

  for (;;) {
    unsigned long long taken = 0;
    if (lane == 0) taken = atomicAdd(&next_chunk, 1ull);
    taken = __shfl_sync(0xffffffffu, taken, 0);
    // Chunks interleave over the row splits so every split gets heavy and light rows alike.
    const int64_t chunk = static_cast<int64_t>(taken) * splits + blockIdx.y;
    if (chunk >= chunks) break;
    const int64_t position = chunk * kChunkRows + slot;
    int64_t row = -1, begin = 0, end = 0;
    if (position < m) {
      row = row_indices[position];
      begin = row_offsets[row];
      end = row_offsets[row + 1];
    }
    const bool heavy = end - begin > Shape::kLightCap;

    // Heavy rows: the whole warp; the lanes of one member stride over the nonzeros.
    unsigned heavy_lanes = __ballot_sync(0xffffffffu, heavy && member == 0);
    while (heavy_lanes != 0) {
      const int source = __ffs(heavy_lanes) - 1;
      heavy_lanes &= heavy_lanes - 1;
      const int64_t h_row = __shfl_sync(0xffffffffu, row, source);
      const int64_t h_begin = __shfl_sync(0xffffffffu, begin, source);
      const int64_t h_end = __shfl_sync(0xffffffffu, end, source);
      Acc acc[kVec] = {};
#pragma unroll 4
      for (int64_t p = h_begin + slot; p < h_end; p += kChunkRows) {
        const uint4 slice = slab[int64_t(col_indices[p]) * kGroup + member];  // one 16-byte load
        multiply_add<T>(acc, to_acc(values[p]), slice);
      }
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
#pragma unroll
        for (int offset = kGroup; offset < 32; offset *= 2) {
          acc[e] += __shfl_xor_sync(0xffffffffu, acc[e], offset);
        }
      }
      if (slot == 0) store_slice(out + h_row * k, column, k, out_vector_ok, acc);
    }

    // Light rows from the SELL copy: entry e of every row of the chunk is one contiguous line.
    const int64_t entries = chunk_length[chunk];
    const int64_t base = chunk_offsets[chunk] + slot;
    Acc acc[kVec] = {};
#pragma unroll 4
    for (int64_t e = 0; e < entries; ++e) {
      const int64_t j = sell_cols[base + e * kChunkRows];
      const Acc v = to_acc(sell_values[base + e * kChunkRows]);
      if (j >= 0) {
        const uint4 slice = slab[j * kGroup + member];  // one 16-byte load
        multiply_add<T>(acc, v, slice);
      }
    }
    if (row >= 0 && !heavy) store_slice(out + row * k, column, k, out_vector_ok, acc);
  }
}

// ---------------------------------------------------------------------------------------------
// The rows kernel: one block per (position in row_indices, column chunk of kRowsThreads slices).
// ---------------------------------------------------------------------------------------------

// Grid (positions, chunks); `#pragma unroll 4` keeps 4 loads in flight per thread.
template <typename T>
__global__ void __launch_bounds__(kRowsThreads)
    spmm_rows_kernel(const T* __restrict__ values, const int32_t* __restrict__ row_offsets,
                     const int32_t* __restrict__ row_indices,
                     const int32_t* __restrict__ col_indices, const T* __restrict__ dense,
                     int64_t dense_row_stride, T* __restrict__ out, int64_t k,
                     bool dense_vector_ok, bool out_vector_ok) {
  using Acc = accumulator_t<T>;
  constexpr int kVec = kVectorElements<T>;
  const int64_t row = row_indices[blockIdx.x];
  const int64_t begin = row_offsets[row], end = row_offsets[row + 1];
  for (int64_t chunk = blockIdx.y; chunk * kRowsThreads * kVec < k; chunk += gridDim.y) {
    const int64_t column = (chunk * kRowsThreads + threadIdx.x) * kVec;
    if (column >= k) continue;
    Acc acc[kVec] = {};
#pragma unroll 4
    for (int64_t p = begin; p < end; ++p) {
      const int64_t j = col_indices[p];
      multiply_add<T>(acc, to_acc(values[p]),
                      load_slice(dense + j * dense_row_stride, column, k, dense_vector_ok));
    }
    store_slice(out + row * k, column, k, out_vector_ok, acc);
  }
}

// ---------------------------------------------------------------------------------------------
// The rows2 kernel: the same work per (row, chunk), long rows first across all chunks.
// ---------------------------------------------------------------------------------------------

// out[row, column chunk] for one (row, chunk): each thread a 16-byte slice. The dense slices of
// kDepth nonzeros are loaded before any is used (the last, partial step too), and added in
// nonzero order.
template <typename T, int kDepth>
__device__ __forceinline__ void rows2_item(const T* __restrict__ values,
                                           const int32_t* __restrict__ col_indices,
                                           const T* __restrict__ dense, int64_t dense_row_stride,
                                           T* __restrict__ out, int64_t k, int64_t row,
                                           int64_t begin, int64_t end, int64_t column,
                                           bool dense_vector_ok, bool out_vector_ok) {
  using Acc = accumulator_t<T>;
  constexpr int kVec = kVectorElements<T>;
  Acc acc[kVec] = {};
  for (int64_t p = begin; p < end; p += kDepth) {
    const int64_t here = end - p;  // > 0; the step's nonzeros are min(here, kDepth)
    int32_t j[kDepth];
    Acc v[kDepth];
    uint4 slice[kDepth];
#pragma unroll
    for (int u = 0; u < kDepth; ++u) {
      j[u] = u < here ? col_indices[p + u] : 0;
      v[u] = u < here ? to_acc(values[p + u]) : Acc(0);
    }
#pragma unroll
    for (int u = 0; u < kDepth; ++u) {
      if (u < here) {
        slice[u] = load_slice(dense + int64_t(j[u]) * dense_row_stride, column, k, dense_vector_ok);
      }
    }
#pragma unroll
    for (int u = 0; u < kDepth; ++u) {
      if (u < here) multiply_add<T>(acc, v[u], slice[u]);
    }
  }
  store_slice(out + row * k, column, k, out_vector_ok, acc);
}

// Grid-stride over (position, chunk) items: the first `first` positions of row_indices (the
// longest rows) with the chunk fastest, so all chunks of a long row start at once (in the rows
// kernel's grid the chunks of a RoSA row of 1000-2000 nonzeros start a chunk-sweep apart and the
// last one ends the kernel); then the other positions chunk by chunk, so the blocks running
// together share a k / chunks-wide slice of `dense` in L2.
template <typename T, int kDepth>
__global__ void __launch_bounds__(kRowsThreads)
    spmm_rows2_kernel(const T* __restrict__ values, const int32_t* __restrict__ row_offsets,
                      const int32_t* __restrict__ row_indices,
                      const int32_t* __restrict__ col_indices, const T* __restrict__ dense,
                      int64_t dense_row_stride, T* __restrict__ out, int64_t m, int64_t k,
                      int64_t chunks, int64_t first, bool dense_vector_ok, bool out_vector_ok) {
  constexpr int kVec = kVectorElements<T>;
  const int64_t head = first * chunks, rest = m - first;
  for (int64_t item = blockIdx.x; item < m * chunks; item += gridDim.x) {
    int64_t position, chunk;
    if (item < head) {
      position = item / chunks, chunk = item % chunks;
    } else {
      chunk = (item - head) / rest, position = first + (item - head) % rest;
    }
    const int64_t column = (chunk * kRowsThreads + threadIdx.x) * kVec;
    if (column >= k) continue;
    const int64_t row = row_indices[position];
    rows2_item<T, kDepth>(values, col_indices, dense, dense_row_stride, out, k, row,
                          row_offsets[row], row_offsets[row + 1], column, dense_vector_ok,
                          out_vector_ok);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

struct SellLayout {  // byte offsets of the SELL-C arrays inside the workspace
  size_t chunk_length, chunk_offsets, cols, values, total;
};

SellLayout sell_layout(int group, int64_t m, int64_t nnz, int value_bytes) {
  const int64_t chunk_rows = 32 / group, cap = 4 * chunk_rows;
  const int64_t chunks = (m + chunk_rows - 1) / chunk_rows;
  // Each chunk holds C * (its longest light row) entries: at most C * nnz, at most C * cap.
  const int64_t entries = std::min(chunk_rows * nnz, chunks * chunk_rows * cap);
  SellLayout layout{};
  layout.chunk_length = 0;
  layout.chunk_offsets = layout.chunk_length + round_up16(size_t(chunks) * sizeof(int32_t));
  layout.cols = layout.chunk_offsets + round_up16(size_t(chunks + 1) * sizeof(int64_t));
  layout.values = layout.cols + round_up16(size_t(entries) * sizeof(int32_t));
  layout.total = layout.values + round_up16(size_t(entries) * value_bytes);
  return layout;
}

int slab_group(SpmmKernel kernel) { return kernel == SpmmKernel::kSlab32 ? 2 : 1; }

template <typename T, int kGroup>
void launch_slab(const T* values, const int32_t* row_offsets, const int32_t* row_indices,
                 const int32_t* col_indices, const T* dense, int64_t dense_row_stride, T* out,
                 int64_t m, int64_t n, int64_t k, int64_t nnz, bool dense_vector_ok,
                 bool out_vector_ok, void* workspace, cudaStream_t stream) {
  using Shape = SlabShape<kGroup>;
  constexpr int64_t kWidth = kGroup * kVectorElements<T>;
  constexpr int64_t kChunkRows = Shape::kChunkRows;
  const int64_t chunks = (m + kChunkRows - 1) / kChunkRows;
  const SellLayout layout = sell_layout(kGroup, m, nnz, sizeof(T));
  char* base = static_cast<char*>(workspace);
  auto* chunk_length = reinterpret_cast<int32_t*>(base + layout.chunk_length);
  auto* chunk_offsets = reinterpret_cast<int64_t*>(base + layout.chunk_offsets);
  auto* sell_cols = reinterpret_cast<int32_t*>(base + layout.cols);
  auto* sell_values = reinterpret_cast<T*>(base + layout.values);

  sell_lengths_kernel<kChunkRows, Shape::kLightCap>
      <<<blocks_for(chunks, 256), 256, 0, stream>>>(row_offsets, row_indices, m, chunks, chunk_length);
  sell_scan_kernel<kChunkRows><<<1, kScanThreads, 0, stream>>>(chunk_length, chunks, chunk_offsets);
  sell_fill_kernel<T, kChunkRows, Shape::kLightCap><<<blocks_for(chunks * 32, 256), 256, 0, stream>>>(
      values, row_offsets, row_indices, col_indices, m, chunks, chunk_length, chunk_offsets,
      sell_cols, sell_values);

  const size_t shared_bytes = size_t(n) * Shape::kSliceBytes;
  auto kernel = spmm_slab_kernel<T, kGroup>;
  if (shared_bytes > 48 * 1024) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         static_cast<int>(shared_bytes));
  }
  const int64_t tiles = (k + kWidth - 1) / kWidth;
  // About two blocks per multiprocessor; each extra row split re-reads the slab.
  const int64_t target = 2 * static_cast<int64_t>(multiprocessor_count());
  const int64_t splits =
      std::max<int64_t>(1, std::min<int64_t>({(target + tiles - 1) / tiles, chunks, 65535}));
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(splits));
  kernel<<<grid, kSlabThreads, shared_bytes, stream>>>(
      values, row_offsets, row_indices, col_indices, dense, dense_row_stride, out, m, n, k,
      dense_vector_ok, out_vector_ok, chunk_length, chunk_offsets, sell_cols, sell_values);
}

// A grid-stride 1-D grid: one block per item up to 2^24 blocks.
unsigned items_grid(int64_t items) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(items, int64_t(1) << 24)));
}

}  // namespace

SpmmKernel spmm_select(SpmmKernel requested, int64_t m, int64_t n, int64_t k, int64_t nnz,
                       int value_bytes) {
  (void)value_bytes;
  (void)nnz;
  if (m == 0 || k == 0) return SpmmKernel::kRows;
  const int64_t shared_limit = max_shared_memory_per_block() - 1024;
  const bool fits32 = n * 32 <= shared_limit, fits16 = n * 16 <= shared_limit;
  SpmmKernel kernel = requested;
  if (kernel == SpmmKernel::kAuto) {
    // Measured on H100 and H200 (docs/benchmarks.md; history in git at c550a82): the rows kernel wins at every LLaMA shape
    // and density 0.1-3% over the slab kernels here and the panel kernel of git history (8afc41b).
    kernel = SpmmKernel::kRows;
  }
  if (kernel == SpmmKernel::kSlab32 && !fits32) kernel = SpmmKernel::kSlab16;
  if (kernel == SpmmKernel::kSlab16 && !fits16) kernel = SpmmKernel::kRows;
  return kernel;
}

bool spmm_dense_is_faster(int64_t m, int64_t n, int64_t k, int64_t nnz, int value_bytes) {
  // Rates measured on H100 and H200 at LLaMA shapes (docs/benchmarks.md; history in git at c550a82): the rows kernel streams
  // ~7.9 TB/s of dense slices from L2; cuBLAS runs a bf16 GEMM at ~850 TFLOP/s; zeroing and
  // filling the dense A runs at ~2.5 TB/s; the extra launches cost ~5 us. A 5% margin keeps the
  // sparse kernel where the two are close (d ~ 1% at k = 4096).
  constexpr double kRowsL2Rate = 7.9e12, kGemmRate = 8.5e14, kFillRate = 2.5e12, kLaunch = 5e-6;
  if (value_bytes != 2 || m <= 0 || n <= 0 || k <= 0) return false;
  const double mn = double(m) * double(n);
  if (mn * double(k) < 4294967296.0) return false;
  const double rows_seconds = double(nnz) * double(k) * value_bytes / kRowsL2Rate;
  const double dense_seconds = 2.0 * mn * double(k) / kGemmRate + mn * value_bytes / kFillRate + kLaunch;
  return dense_seconds < 0.95 * rows_seconds;
}

size_t spmm_workspace_bytes(SpmmKernel selected, int64_t m, int64_t nnz, int value_bytes) {
  if (m == 0 || (selected != SpmmKernel::kSlab32 && selected != SpmmKernel::kSlab16)) return 0;
  return sell_layout(slab_group(selected), m, nnz, value_bytes).total;
}

template <typename T>
void spmm(const T* values, const int32_t* row_offsets, const int32_t* row_indices,
          const int32_t* col_indices, const T* dense, int64_t dense_row_stride, T* out, int64_t m,
          int64_t n, int64_t k, int64_t nnz, SpmmKernel selected, void* workspace,
          size_t /*workspace_bytes*/, cudaStream_t stream) {
  if (m == 0 || k == 0) return;
  constexpr int kVec = kVectorElements<T>;
  const bool dense_vector_ok = is_aligned16(dense) && dense_row_stride % kVec == 0;
  const bool out_vector_ok = is_aligned16(out) && k % kVec == 0;
  if (selected == SpmmKernel::kSlab32) {
    launch_slab<T, 2>(values, row_offsets, row_indices, col_indices, dense, dense_row_stride, out,
                      m, n, k, nnz, dense_vector_ok, out_vector_ok, workspace, stream);
    return;
  }
  if (selected == SpmmKernel::kSlab16) {
    launch_slab<T, 1>(values, row_offsets, row_indices, col_indices, dense, dense_row_stride, out,
                      m, n, k, nnz, dense_vector_ok, out_vector_ok, workspace, stream);
    return;
  }
  const int64_t per_block = int64_t(kRowsThreads) * kVec;
  const int64_t chunks = (k + per_block - 1) / per_block;
  if (selected == SpmmKernel::kRows2) {
    // The longest rows: the first max(256, m / 8) positions of row_indices.
    const int64_t first = std::min<int64_t>(m, std::max<int64_t>(256, m / 8));
    spmm_rows2_kernel<T, kRows2Depth><<<items_grid(m * chunks), kRowsThreads, 0, stream>>>(
        values, row_offsets, row_indices, col_indices, dense, dense_row_stride, out, m, k, chunks,
        first, dense_vector_ok, out_vector_ok);
    return;
  }
  const dim3 grid(static_cast<unsigned>(m), static_cast<unsigned>(std::min<int64_t>(chunks, 65535)));
  spmm_rows_kernel<T><<<grid, kRowsThreads, 0, stream>>>(values, row_offsets, row_indices,
                                                        col_indices, dense, dense_row_stride, out,
                                                        k, dense_vector_ok, out_vector_ok);
}

#define ROSA_INSTANTIATE_SPMM(T)                                                               \
  template void spmm<T>(const T*, const int32_t*, const int32_t*, const int32_t*, const T*,    \
                        int64_t, T*, int64_t, int64_t, int64_t, int64_t, SpmmKernel, void*,     \
                        size_t, cudaStream_t);
ROSA_INSTANTIATE_SPMM(float)
ROSA_INSTANTIATE_SPMM(double)
ROSA_INSTANTIATE_SPMM(__half)
ROSA_INSTANTIATE_SPMM(__nv_bfloat16)

}  // namespace rosa::cuda
