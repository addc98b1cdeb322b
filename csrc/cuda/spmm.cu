// CUDA SpMM: out (m x k) = A (m x n, CSR) @ dense (n x k), float32 accumulation.
//
// Bytes decide the design. At LLaMA shapes with k = 4096 every nonzero needs a 2k-byte row of
// `dense`; read straight from L2 that is nnz * 8 KB (1.4 GB at 4096 x 4096, d = 1%), which L2
// delivers at ~8.5 TB/s (measured, docs/perf-notes.md): as slow as a dense GEMM. So the main
// kernel, `slab`, splits k into tiles of 32 (or 16) bytes per dense row: a block copies the n x tile
// slab of `dense` into shared memory once (n * 32 B = 128 KB for n = 4096) and then serves every
// nonzero of its rows from shared memory. Global traffic is one read of `dense` per row split, one
// write of `out`, and the sparse indices once per tile.
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
// The `rows` kernel serves very sparse inputs (where re-reading indices per tile costs more than
// the dense reads it saves) and shapes whose slab does not fit in shared memory: one block per
// (row, column chunk), each thread a 16-byte slice, dense rows read from global memory.
//
// Assumes a validated CSR; all address arithmetic is 64-bit; any of m, n, k, nnz may be 0.
#include "cuda/spmm.h"

#include <algorithm>
#include <cstdlib>

#include "cuda/common.cuh"

namespace rosa::cuda {
namespace {

constexpr int kSlabThreads = 1024;
constexpr int kRowsThreads = 128;
constexpr int kScanThreads = 1024;
constexpr int kRowsDepth = 8;  // dense slices in flight per thread of the rows kernel
constexpr int kTilesMaxWarps = 16;

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

// acc[e] += v * slice[e]
template <typename T>
__device__ __forceinline__ void multiply_add(accumulator_t<T> (&acc)[kVectorElements<T>],
                                             accumulator_t<T> v, const uint4& slice) {
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
        multiply_add<T>(acc, to_acc(values[p]), slab[int64_t(col_indices[p]) * kGroup + member]);
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
      if (j >= 0) multiply_add<T>(acc, v, slab[j * kGroup + member]);
    }
    if (row >= 0 && !heavy) store_slice(out + row * k, column, k, out_vector_ok, acc);
  }
}

// ---------------------------------------------------------------------------------------------
// The rows kernel: one block per (position in row_indices, column chunk of kRowsThreads slices).
// ---------------------------------------------------------------------------------------------

// out[row, column chunk] for one (row, chunk): each thread a 16-byte slice, kDepth nonzeros' dense
// slices loaded before any is used (the loads of a long row are a chain of kDepth-wide steps).
template <typename T, int kDepth>
__device__ __forceinline__ void rows_item(const T* __restrict__ values,
                                          const int32_t* __restrict__ col_indices,
                                          const T* __restrict__ dense, int64_t dense_row_stride,
                                          T* __restrict__ out, int64_t k, int64_t row,
                                          int64_t begin, int64_t end, int64_t column,
                                          bool dense_vector_ok, bool out_vector_ok) {
  using Acc = accumulator_t<T>;
  constexpr int kVec = kVectorElements<T>;
  Acc acc[kVec] = {};
  int64_t p = begin;
  for (; p + kDepth <= end; p += kDepth) {
    int64_t j[kDepth];
    Acc v[kDepth];
    uint4 slice[kDepth];
#pragma unroll
    for (int u = 0; u < kDepth; ++u) {
      j[u] = col_indices[p + u];
      v[u] = to_acc(values[p + u]);
    }
#pragma unroll
    for (int u = 0; u < kDepth; ++u) {
      slice[u] = load_slice(dense + j[u] * dense_row_stride, column, k, dense_vector_ok);
    }
#pragma unroll
    for (int u = 0; u < kDepth; ++u) multiply_add<T>(acc, v[u], slice[u]);
  }
  for (; p < end; ++p) {
    multiply_add<T>(acc, to_acc(values[p]),
                    load_slice(dense + col_indices[p] * dense_row_stride, column, k,
                               dense_vector_ok));
  }
  store_slice(out + row * k, column, k, out_vector_ok, acc);
}

// kChunkFastest: block b serves (position b / chunks, chunk b % chunks), grid-stride, so all chunks
// of the longest rows (first in row_indices) start at once. Otherwise (the first version, kept for
// measurements) the grid is (positions, chunks) and the chunks of a row start a chunk-sweep apart:
// a RoSA row of 2000 nonzeros then ran at the very end.
template <typename T, int kDepth, bool kChunkFastest>
__global__ void __launch_bounds__(kRowsThreads)
    spmm_rows_kernel(const T* __restrict__ values, const int32_t* __restrict__ row_offsets,
                     const int32_t* __restrict__ row_indices,
                     const int32_t* __restrict__ col_indices, const T* __restrict__ dense,
                     int64_t dense_row_stride, T* __restrict__ out, int64_t m, int64_t k,
                     int64_t chunks, bool dense_vector_ok, bool out_vector_ok) {
  constexpr int kVec = kVectorElements<T>;
  if (kChunkFastest) {
    for (int64_t item = blockIdx.x; item < m * chunks; item += gridDim.x) {
      const int64_t position = item / chunks, chunk = item % chunks;
      const int64_t row = row_indices[position];
      const int64_t column = (chunk * kRowsThreads + threadIdx.x) * kVec;
      if (column >= k) continue;
      rows_item<T, kDepth>(values, col_indices, dense, dense_row_stride, out, k, row,
                           row_offsets[row], row_offsets[row + 1], column, dense_vector_ok,
                           out_vector_ok);
    }
    return;
  }
  const int64_t row = row_indices[blockIdx.x];
  const int64_t begin = row_offsets[row], end = row_offsets[row + 1];
  for (int64_t chunk = blockIdx.y; chunk < chunks; chunk += gridDim.y) {
    const int64_t column = (chunk * kRowsThreads + threadIdx.x) * kVec;
    if (column >= k) continue;
    rows_item<T, kDepth>(values, col_indices, dense, dense_row_stride, out, k, row, begin, end,
                         column, dense_vector_ok, out_vector_ok);
  }
}

// ---------------------------------------------------------------------------------------------
// The tiles kernel: one block per (column tile of kLanes 16-byte slices, row split); the n x tile
// slab of `dense` in shared memory, the indices staged per warp in shared memory.
// ---------------------------------------------------------------------------------------------

template <typename T, int kLanes>
struct TileShape {
  static constexpr int kRows = 32 / kLanes;        // rows a warp serves at once
  static constexpr int kEntries = 512 / kRows;     // staged nonzeros per row per round
  static constexpr int kPerLane = 512 / 32;        // staged nonzeros per lane per round
  static constexpr int kStride = kEntries + 1;     // odd: lanes of different rows hit different banks
  static constexpr size_t kWarpBytes =
      size_t(kRows) * kStride * (sizeof(int32_t) + sizeof(accumulator_t<T>));
};

template <typename T, int kLanes>
__global__ void __launch_bounds__(32 * kTilesMaxWarps)
    spmm_tiles_kernel(const T* __restrict__ values, const int32_t* __restrict__ row_offsets,
                      const int32_t* __restrict__ row_indices,
                      const int32_t* __restrict__ col_indices, const T* __restrict__ dense,
                      int64_t dense_row_stride, T* __restrict__ out, int64_t m, int64_t n,
                      int64_t k, bool dense_vector_ok, bool out_vector_ok,
                      T* __restrict__ scratch) {
  using Acc = accumulator_t<T>;
  using Shape = TileShape<T, kLanes>;
  constexpr int kVec = kVectorElements<T>;
  constexpr int kRows = Shape::kRows, kEntries = Shape::kEntries, kStride = Shape::kStride;
  extern __shared__ uint4 shared[];
  uint4* slab = shared;  // n rows of kLanes 16-byte slices
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warps = blockDim.x / 32;
  char* staging = reinterpret_cast<char*>(shared + n * kLanes) + warp * Shape::kWarpBytes;
  int32_t* staged_cols = reinterpret_cast<int32_t*>(staging);
  Acc* staged_values = reinterpret_cast<Acc*>(staged_cols + kRows * kStride);

  const int64_t tile_begin = static_cast<int64_t>(blockIdx.x) * kLanes * kVec;
  constexpr int kBatch = 8;  // loads in flight per thread before the first store
  for (int64_t s0 = threadIdx.x; s0 < n * kLanes; s0 += int64_t(kBatch) * blockDim.x) {
    uint4 batch[kBatch];
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int64_t s = s0 + int64_t(b) * blockDim.x;
      if (s < n * kLanes) {
        batch[b] = load_slice(dense + (s / kLanes) * dense_row_stride,
                              tile_begin + (s % kLanes) * kVec, k, dense_vector_ok);
      }
    }
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int64_t s = s0 + int64_t(b) * blockDim.x;
      if (s < n * kLanes) slab[s] = batch[b];
    }
  }
  __syncthreads();

  const int slot = lane / kLanes;  // this lane's row among the warp's kRows
  const int part = lane % kLanes;  // this lane's 16-byte slice of the tile
  const int64_t column = tile_begin + part * kVec;
  const int64_t batches = (m + kRows - 1) / kRows;
  const int64_t step = int64_t(gridDim.y) * warps;

  // Row of this lane's slot in batch b: (row, begin, length); length 0 past m.
  auto row_of = [&](int64_t b, int64_t& row, int32_t& begin, int32_t& length) {
    const int64_t position = b * kRows + slot;
    row = -1, begin = 0, length = 0;
    if (b < batches && position < m) {
      row = row_indices[position];
      begin = row_offsets[row];
      length = row_offsets[row + 1] - begin;
    }
  };
  int64_t b = blockIdx.y + int64_t(gridDim.y) * warp;
  int64_t row;
  int32_t begin, length;
  row_of(b, row, begin, length);
  for (; b < batches; b += step) {
    int32_t longest = length;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      longest = max(longest, __shfl_xor_sync(0xffffffffu, longest, offset));
    }
    Acc acc[kVec] = {};
    // The next batch's rows are loaded while this batch's staged entries are in flight, so a
    // warp waits on one dependent load per round rather than three per batch.
    int64_t next_row = -1;
    int32_t next_begin = 0, next_length = 0;
    bool prefetched = false;
    auto prefetch_row = [&]() {
      const int64_t position = (b + step) * kRows + slot;
      if (b + step < batches && position < m) next_row = row_indices[position];
    };
    auto prefetch_offsets = [&]() {
      if (next_row >= 0) {
        next_begin = row_offsets[next_row];
        next_length = row_offsets[next_row + 1] - next_begin;
      }
    };
    for (int32_t e0 = 0; e0 < longest; e0 += kEntries) {
      // Stage entries [e0, e0 + kEntries) of the warp's rows: all loads first, then the stores.
      int32_t cols[Shape::kPerLane];
      Acc vals[Shape::kPerLane];
#pragma unroll
      for (int u = 0; u < Shape::kPerLane; ++u) {
        const int t = lane + 32 * u, r = t / kEntries, e = t % kEntries;
        const int32_t r_begin = __shfl_sync(0xffffffffu, begin, r * kLanes);
        const int32_t r_length = __shfl_sync(0xffffffffu, length, r * kLanes);
        cols[u] = 0;
        vals[u] = 0;
        if (e0 + e < r_length) {
          const int64_t p = int64_t(r_begin) + e0 + e;
          cols[u] = col_indices[p];
          vals[u] = to_acc(values[p]);
        }
      }
      if (!prefetched) prefetch_row();
      __syncwarp();  // the previous round's reads are done
#pragma unroll
      for (int u = 0; u < Shape::kPerLane; ++u) {
        const int t = lane + 32 * u, r = t / kEntries, e = t % kEntries;
        staged_cols[r * kStride + e] = cols[u];
        staged_values[r * kStride + e] = vals[u];
      }
      __syncwarp();
      if (!prefetched) {
        prefetch_offsets();
        prefetched = true;
      }
      const int32_t here = min(kEntries, length - e0);
#pragma unroll 4
      for (int32_t e = 0; e < here; ++e) {
        const int64_t j = staged_cols[slot * kStride + e];
        multiply_add<T>(acc, staged_values[slot * kStride + e], slab[j * kLanes + part]);
      }
    }
    if (!prefetched) {
      prefetch_row();
      prefetch_offsets();
    }
    if (row >= 0) {
      if (scratch != nullptr) {  // full lines: the warp's rows are consecutive positions
        const int64_t position = b * kRows + slot;
        store_slice(scratch + (static_cast<int64_t>(blockIdx.x) * m + position) * kLanes * kVec +
                        part * kVec,
                    0, kVec, true, acc);
      } else {
        store_slice(out + row * k, column, k, out_vector_ok, acc);
      }
    }
    row = next_row, begin = next_begin, length = next_length;
  }
}

// out[row_indices[p], :] = scratch[:, p, :] (scratch is tile-major: [tile][position][kWidth]).
// Writing `out` straight from the tiles kernel stored 16-32 bytes per row and tile, scattered over
// rows 2k bytes apart; here every block writes a 2 KB run of one row.
template <typename T, int kLanes>
__global__ void __launch_bounds__(kRowsThreads)
    tiles_gather_kernel(const T* __restrict__ scratch, const int32_t* __restrict__ row_indices,
                        T* __restrict__ out, int64_t m, int64_t k, int64_t chunks,
                        bool out_vector_ok) {
  constexpr int kVec = kVectorElements<T>;
  constexpr int64_t kWidth = kLanes * kVec;
  for (int64_t item = blockIdx.x; item < m * chunks; item += gridDim.x) {
    const int64_t position = item / chunks, chunk = item % chunks;
    const int64_t column = (chunk * kRowsThreads + threadIdx.x) * kVec;
    if (column >= k) continue;
    const int64_t row = row_indices[position];
    const uint4 slice = *reinterpret_cast<const uint4*>(
        scratch + ((column / kWidth) * m + position) * kWidth + column % kWidth);
    T* target = out + row * k + column;
    if (out_vector_ok && column + kVec <= k) {
      *reinterpret_cast<uint4*>(target) = slice;
    } else {
      const T* elements = reinterpret_cast<const T*>(&slice);
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        if (column + e < k) target[e] = elements[e];
      }
    }
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

// TEMPORARY measurement knob: ROSA_SPMM_TILES_DIRECT=1 makes the tiles kernel store `out` directly.
bool tiles_direct() {
  const char* text = std::getenv("ROSA_SPMM_TILES_DIRECT");
  return text != nullptr && text[0] == '1';
}

// Bytes of the tiles kernel's scratch: m rows of k rounded up to a whole 32-byte tile.
size_t tiles_scratch_bytes(int64_t m, int64_t k, int value_bytes) {
  const int64_t width = 32 / value_bytes;
  return round_up16(size_t(m) * size_t((k + width - 1) / width * width) * size_t(value_bytes));
}

// The tiles kernel's shape for n rows of `dense`: 16-byte slices per row (2 or 1; 0 = does not
// fit) and warps per block, so that slab + staging fit the shared-memory opt-in limit.
struct TilePlan {
  int lanes, warps;
  size_t shared_bytes;
};

template <typename T>
TilePlan tile_plan(int64_t n) {
  const int64_t limit = max_shared_memory_per_block() - 1024;
  const auto try_lanes = [&](int lanes, size_t warp_bytes, int min_warps) -> TilePlan {
    const int64_t slab = n * lanes * 16;
    const int64_t warps = std::min<int64_t>(kTilesMaxWarps, (limit - slab) / int64_t(warp_bytes));
    if (slab >= limit || warps < min_warps) return {0, 0, 0};
    return {lanes, static_cast<int>(warps), size_t(slab) + size_t(warps) * warp_bytes};
  };
  TilePlan plan = try_lanes(2, TileShape<T, 2>::kWarpBytes, 8);
  if (plan.lanes == 0) plan = try_lanes(1, TileShape<T, 1>::kWarpBytes, 4);
  return plan;
}

TilePlan tile_plan_for(int64_t n, int value_bytes) {
  switch (value_bytes) {
    case 8: return tile_plan<double>(n);
    case 4: return tile_plan<float>(n);
    default: return tile_plan<__half>(n);
  }
}

template <typename T, int kLanes>
void launch_tiles(const T* values, const int32_t* row_offsets, const int32_t* row_indices,
                  const int32_t* col_indices, const T* dense, int64_t dense_row_stride, T* out,
                  int64_t m, int64_t n, int64_t k, bool dense_vector_ok, bool out_vector_ok,
                  T* scratch, const TilePlan& plan, cudaStream_t stream) {
  auto kernel = spmm_tiles_kernel<T, kLanes>;
  if (plan.shared_bytes > 48 * 1024) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         static_cast<int>(plan.shared_bytes));
  }
  constexpr int64_t kWidth = kLanes * kVectorElements<T>;
  const int64_t tiles = (k + kWidth - 1) / kWidth;
  const int64_t batches = (m + TileShape<T, kLanes>::kRows - 1) / TileShape<T, kLanes>::kRows;
  // At least one block per multiprocessor; each extra row split re-reads the slab.
  const int64_t target = multiprocessor_count();
  const int64_t splits =
      std::max<int64_t>(1, std::min<int64_t>({(target + tiles - 1) / tiles, batches, 65535}));
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(splits));
  kernel<<<grid, 32 * plan.warps, plan.shared_bytes, stream>>>(
      values, row_offsets, row_indices, col_indices, dense, dense_row_stride, out, m, n, k,
      dense_vector_ok, out_vector_ok, scratch);
  if (scratch == nullptr) return;
  const int64_t chunks = (k + kRowsThreads * kVectorElements<T> - 1) / (kRowsThreads * kVectorElements<T>);
  tiles_gather_kernel<T, kLanes><<<items_grid(m * chunks), kRowsThreads, 0, stream>>>(
      scratch, row_indices, out, m, k, chunks, out_vector_ok);
}

}  // namespace

SpmmKernel spmm_select(SpmmKernel requested, int64_t m, int64_t n, int64_t k, int64_t nnz,
                       int value_bytes) {
  if (m == 0 || k == 0) return SpmmKernel::kRows;
  const int64_t shared_limit = max_shared_memory_per_block() - 1024;
  const bool fits32 = n * 32 <= shared_limit, fits16 = n * 16 <= shared_limit;
  const bool fits_tiles = tile_plan_for(n, value_bytes).lanes != 0;
  SpmmKernel kernel = requested;
  if (kernel == SpmmKernel::kAuto) {
    // Measured on H100 (docs/perf-notes.md, "spmm versions"): tiles wins once rows average a
    // few nonzeros; below that the per-tile index passes cost more than the dense reads saved.
    kernel = fits_tiles && nnz >= 8 * m ? SpmmKernel::kTiles : SpmmKernel::kRows;
  }
  if (kernel == SpmmKernel::kTiles && !fits_tiles) kernel = SpmmKernel::kRows;
  if (kernel == SpmmKernel::kSlab32 && !fits32) kernel = SpmmKernel::kSlab16;
  if (kernel == SpmmKernel::kSlab16 && !fits16) kernel = SpmmKernel::kRows;
  return kernel;
}

size_t spmm_workspace_bytes(SpmmKernel selected, int64_t m, int64_t k, int64_t nnz,
                            int value_bytes) {
  if (m == 0 || k == 0) return 0;
  if (selected == SpmmKernel::kTiles) return tiles_scratch_bytes(m, k, value_bytes);
  if (selected == SpmmKernel::kSlab32 || selected == SpmmKernel::kSlab16) {
    return sell_layout(slab_group(selected), m, nnz, value_bytes).total;
  }
  return 0;
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
  if (selected == SpmmKernel::kTiles) {
    const TilePlan plan = tile_plan<T>(n);
    T* scratch = tiles_direct() ? nullptr : static_cast<T*>(workspace);
    if (plan.lanes == 2) {
      launch_tiles<T, 2>(values, row_offsets, row_indices, col_indices, dense, dense_row_stride,
                         out, m, n, k, dense_vector_ok, out_vector_ok, scratch, plan, stream);
      return;
    }
    if (plan.lanes == 1) {
      launch_tiles<T, 1>(values, row_offsets, row_indices, col_indices, dense, dense_row_stride,
                         out, m, n, k, dense_vector_ok, out_vector_ok, scratch, plan, stream);
      return;
    }
  }
  const int64_t per_block = int64_t(kRowsThreads) * kVec;
  const int64_t chunks = (k + per_block - 1) / per_block;
  if (selected == SpmmKernel::kRowsUnsplit) {
    const dim3 grid(static_cast<unsigned>(m),
                    static_cast<unsigned>(std::min<int64_t>(chunks, 65535)));
    spmm_rows_kernel<T, 4, false><<<grid, kRowsThreads, 0, stream>>>(
        values, row_offsets, row_indices, col_indices, dense, dense_row_stride, out, m, k, chunks,
        dense_vector_ok, out_vector_ok);
    return;
  }
  spmm_rows_kernel<T, kRowsDepth, true><<<items_grid(m * chunks), kRowsThreads, 0, stream>>>(
      values, row_offsets, row_indices, col_indices, dense, dense_row_stride, out, m, k, chunks,
      dense_vector_ok, out_vector_ok);
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
