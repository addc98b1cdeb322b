// CUDA CSR transpose: sort each tile, prefix over tiles, scatter -- deterministic, three launches,
// no host synchronization.
//
// The nonzeros, numbered p = 0..nnz-1 in row-major order, are cut into tiles of kTile = 4096
// consecutive nonzeros. Entry p of column j goes to
//     q = row_offsets_t[j] + (column-j entries in earlier tiles) + (column-j entries before p in its tile),
// which lists every new row by ascending old row (= ascending p): the output is deterministic.
//   1. `tile_sort` (one 512-thread block per tile): finds the old row of each nonzero (a
//      block-wide search for the tile's first and last rows, then the row starts inside the tile
//      marked in shared memory and spread by a max-scan), stable-sorts the tile by column with a
//      block radix sort (keys only: column in the high bits, tile position in the low bits), and
//      writes in sorted order (column, rank in its column in the tile), p and the old row, plus the
//      tile's row of the tiles x n count table.
//   2. `tile_prefix` (32 columns x 16 warps per block): per column, an exclusive scan of the counts
//      over tiles, in place, and the column's total; then, per group of 32 columns, the exclusive
//      scan of the totals inside the group (a warp scan) and the group's total. No block waits on
//      another.
//   3. `scatter` (1024 nonzeros per block): each block first scans the <= 2048 group totals in
//      shared memory, so row_offsets_t[j] = (groups before j's) + (columns before j in its group);
//      then q = row_offsets_t[j] + prefix + rank; writes values_t, col_indices_t, permutation and
//      row_offsets_t.
// Every step is a fixed number of memory round trips: no loop waits on one load per iteration,
// and no single block reads a whole array.
// The count table holds tiles x n integers, so this path serves n <= kMaxTiledColumns when the
// table is not much larger than the nonzeros; otherwise a stable cub radix sort of (column, p)
// pairs yields the same permutation. Every output size (nnz, n + 1) is known on the host.
//
// Assumes a validated CSR (row_offsets non-decreasing, 0 <= column < n). nnz, m, n may be 0.
#include "cuda/csr_transpose.h"

#include <algorithm>
#include <climits>

#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>

#include "cuda/common.cuh"

namespace rosa::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kTileThreads = 512;
constexpr int kTileItems = 8;  // nonzeros per thread of a tile, blocked (thread t: t*8 .. t*8+7)
constexpr int kTileBits = 12;
constexpr int kTile = 1 << kTileBits;
static_assert(kTile == kTileThreads * kTileItems, "a tile is one block's items");
constexpr int kRadixBits = 4;  // cub's default: the sort's shared memory fits the static 48 KB
constexpr int64_t kMaxTiledColumns = 65536;  // <= 2048 groups of 32 columns; column << 12 fits 32 bits
constexpr int kPrefixWarps = 16;
constexpr int kMaxGroups = static_cast<int>(kMaxTiledColumns / 32);
constexpr int kScatterThreads = 256;
constexpr int kScatterItems = 4;
constexpr int kGroupItems = kMaxGroups / kScatterThreads;

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

struct MaxOp {
  __device__ __forceinline__ int32_t operator()(int32_t a, int32_t b) const { return a > b ? a : b; }
};

__device__ __forceinline__ void store8(int32_t* destination, const int32_t (&items)[8]) {
  reinterpret_cast<int4*>(destination)[0] = make_int4(items[0], items[1], items[2], items[3]);
  reinterpret_cast<int4*>(destination)[1] = make_int4(items[4], items[5], items[6], items[7]);
}

// ---- tiled path ------------------------------------------------------------------------------

__global__ void __launch_bounds__(kTileThreads)
    tile_sort_kernel(const int32_t* __restrict__ row_offsets, int64_t m,
                     const int32_t* __restrict__ col_indices, int64_t nnz, int64_t n,
                     int column_bits, int32_t* __restrict__ tile_counts,
                     int32_t* __restrict__ sorted_entries, int32_t* __restrict__ sorted_nonzeros,
                     int32_t* __restrict__ sorted_rows) {
  using TileSort = cub::BlockRadixSort<uint32_t, kTileThreads, kTileItems, cub::NullType, kRadixBits>;
  using TileScan = cub::BlockScan<int32_t, kTileThreads>;
  __shared__ union {
    typename TileSort::TempStorage sort;
    typename TileScan::TempStorage scan;
  } temp;
  __shared__ int32_t tile_row[kTile];  // old row of each tile position
  __shared__ uint32_t first_column[kTileThreads], last_column[kTileThreads];

  const int t = threadIdx.x;
  const int64_t p0 = int64_t(blockIdx.x) * kTile;
  const int count = static_cast<int>(std::min<int64_t>(kTile, nnz - p0));

  // Issued first so that their latency overlaps the row search. A thread's 8 columns are 32
  // bytes: two 16-byte loads when aligned, so a warp's load touches each sector once.
  int32_t columns_in[kTileItems];
  const int32_t* tile_columns = col_indices + p0 + t * kTileItems;
  if ((t + 1) * kTileItems <= count && reinterpret_cast<uintptr_t>(col_indices) % 16 == 0) {
    const int4 low = reinterpret_cast<const int4*>(tile_columns)[0];
    const int4 high = reinterpret_cast<const int4*>(tile_columns)[1];
    columns_in[0] = low.x, columns_in[1] = low.y, columns_in[2] = low.z, columns_in[3] = low.w;
    columns_in[4] = high.x, columns_in[5] = high.y, columns_in[6] = high.z, columns_in[7] = high.w;
  } else {
#pragma unroll
    for (int k = 0; k < kTileItems; ++k) {
      columns_in[k] = t * kTileItems + k < count ? tile_columns[k] : 0;
    }
  }
  uint32_t keys[kTileItems];
#pragma unroll
  for (int k = 0; k < kTileItems; ++k) {
    const int position = t * kTileItems + k;
    keys[k] = position < count ? (static_cast<uint32_t>(columns_in[k]) << kTileBits) | position
                               : 0xffffffffu;  // sorts after every real key (and is last already)
  }
  int32_t* counts = tile_counts + int64_t(blockIdx.x) * n;
  for (int64_t j = t; j < n; j += kTileThreads) counts[j] = 0;

  // The rows of the tile's first and last nonzeros: the last i with row_offsets[i] <= target.
  // Each round probes kTileThreads evenly spaced offsets and keeps the gap holding the answer, so
  // m <= 512^2 rows take two dependent loads instead of a binary search's log2(m).
  const int64_t first_target = p0, last_target = p0 + count - 1;
  int64_t first_low = 0, first_high = m - 1, last_low = 0, last_high = m - 1;
  while (first_high > first_low || last_high > last_low) {  // uniform over the block
    const int64_t first_stride = (first_high - first_low + kTileThreads) / kTileThreads;
    const int64_t last_stride = (last_high - last_low + kTileThreads) / kTileThreads;
    const int64_t first_probe = first_low + t * first_stride;
    const int64_t last_probe = last_low + t * last_stride;
    const bool first_ok = first_probe <= first_high && row_offsets[first_probe] <= first_target;
    const bool last_ok = last_probe <= last_high && row_offsets[last_probe] <= last_target;
    // row_offsets is non-decreasing, so the passing probes are a prefix and their count says
    // which is the last.
    const int first_passed = __syncthreads_count(first_ok);
    const int last_passed = __syncthreads_count(last_ok);
    first_low += (first_passed - 1) * first_stride;
    first_high = std::min(first_high, first_low + first_stride - 1);
    last_low += (last_passed - 1) * last_stride;
    last_high = std::min(last_high, last_low + last_stride - 1);
  }
  const int32_t first_row = static_cast<int32_t>(first_low), last_row = static_cast<int32_t>(last_low);

  // Mark where each later row starts inside the tile (empty rows share a start with the next
  // non-empty row, which is larger and wins the max), then spread the marks by a max-scan.
  for (int k = t; k < kTile; k += kTileThreads) tile_row[k] = first_row;
  __syncthreads();
  for (int64_t i = int64_t(first_row) + 1 + t; i <= last_row; i += kTileThreads) {
    atomicMax(&tile_row[row_offsets[i] - p0], static_cast<int32_t>(i));
  }
  __syncthreads();
  int32_t rows[kTileItems];
  int32_t thread_max = first_row;
#pragma unroll
  for (int k = 0; k < kTileItems; ++k) {
    rows[k] = tile_row[t * kTileItems + k];
    thread_max = max(thread_max, rows[k]);
  }
  int32_t running_row;
  TileScan(temp.scan).ExclusiveScan(thread_max, running_row, first_row, MaxOp());
#pragma unroll
  for (int k = 0; k < kTileItems; ++k) {
    running_row = max(running_row, rows[k]);
    tile_row[t * kTileItems + k] = running_row;
  }
  __syncthreads();

  TileSort(temp.sort).Sort(keys, kTileBits, kTileBits + column_bits);

  // Sorted position s = t*8 + k. A column's run starts where the column differs from the one
  // before; rank = s - start of its run; the run's last entry writes the tile's count.
  uint32_t columns[kTileItems];
#pragma unroll
  for (int k = 0; k < kTileItems; ++k) columns[k] = keys[k] >> kTileBits;
  first_column[t] = columns[0];
  last_column[t] = columns[kTileItems - 1];
  __syncthreads();
  int32_t thread_start = 0;
#pragma unroll
  for (int k = 0; k < kTileItems; ++k) {
    const int position = t * kTileItems + k;
    const uint32_t before = k > 0 ? columns[k - 1] : (t > 0 ? last_column[t - 1] : 0xffffffffu);
    if (position < count && columns[k] != before) thread_start = position;
  }
  int32_t run_start;
  TileScan(temp.scan).ExclusiveScan(thread_start, run_start, 0, MaxOp());
  int32_t entries[kTileItems], nonzeros[kTileItems], old_rows[kTileItems];
#pragma unroll
  for (int k = 0; k < kTileItems; ++k) {
    const int position = t * kTileItems + k;
    const uint32_t before = k > 0 ? columns[k - 1] : (t > 0 ? last_column[t - 1] : 0xffffffffu);
    const uint32_t after = k + 1 < kTileItems ? columns[k + 1]
                           : (t + 1 < kTileThreads ? first_column[t + 1] : 0xffffffffu);
    if (columns[k] != before) run_start = position;
    const int32_t rank = position - run_start;
    const int index = static_cast<int>(keys[k] & (kTile - 1));
    entries[k] = static_cast<int32_t>((columns[k] << kTileBits) | static_cast<uint32_t>(rank));
    nonzeros[k] = static_cast<int32_t>(p0 + index);
    old_rows[k] = position < count ? tile_row[index] : 0;
    if (position < count && (position == count - 1 || columns[k] != after)) {
      counts[columns[k]] = rank + 1;
    }
  }
  // Positions p0 + t*8 .. +7 of the workspace arrays (32-byte aligned): two 16-byte stores each.
  const int64_t out = p0 + int64_t(t) * kTileItems;
  if ((t + 1) * kTileItems <= count) {
    store8(sorted_entries + out, entries);
    store8(sorted_nonzeros + out, nonzeros);
    store8(sorted_rows + out, old_rows);
  } else {
    for (int k = 0; k < kTileItems && t * kTileItems + k < count; ++k) {
      sorted_entries[out + k] = entries[k];
      sorted_nonzeros[out + k] = nonzeros[k];
      sorted_rows[out + k] = old_rows[k];
    }
  }
}

// tile_counts[b][j] becomes the number of column-j entries in tiles before b. Block: one group of
// 32 consecutive columns (one per lane, coalesced) x 16 warps, each warp a contiguous range of
// tiles. The group's column totals are scanned by one warp: column_in_group[j] = entries of the
// group's columns before j, group_totals[group] = entries of the whole group.
__global__ void __launch_bounds__(kPrefixWarps * 32)
    tile_prefix_kernel(int32_t* __restrict__ tile_counts, int64_t tiles, int64_t n,
                       int32_t* __restrict__ column_in_group, int32_t* __restrict__ group_totals) {
  __shared__ int32_t warp_sums[kPrefixWarps][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t j = int64_t(blockIdx.x) * 32 + lane;
  const int64_t chunk = (tiles + kPrefixWarps - 1) / kPrefixWarps;
  const int64_t begin = std::min(tiles, warp * chunk), end = std::min(tiles, begin + chunk);
  // Loads go out kBatch at a time before their sums need them: a thread waits on memory once per
  // batch, not once per tile.
  constexpr int kBatch = 8;
  int32_t sum = 0;
  if (j < n) {
    for (int64_t b0 = begin; b0 < end; b0 += kBatch) {
      int32_t c[kBatch];
#pragma unroll
      for (int i = 0; i < kBatch; ++i) c[i] = b0 + i < end ? tile_counts[(b0 + i) * n + j] : 0;
#pragma unroll
      for (int i = 0; i < kBatch; ++i) sum += c[i];
    }
  }
  warp_sums[warp][lane] = sum;
  __syncthreads();
  int32_t running = 0;
  for (int w = 0; w < warp; ++w) running += warp_sums[w][lane];
  if (j < n) {
    for (int64_t b0 = begin; b0 < end; b0 += kBatch) {
      int32_t c[kBatch];
#pragma unroll
      for (int i = 0; i < kBatch; ++i) c[i] = b0 + i < end ? tile_counts[(b0 + i) * n + j] : 0;
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        if (b0 + i < end) tile_counts[(b0 + i) * n + j] = running;
        running += c[i];
      }
    }
  }
  if (warp == kPrefixWarps - 1) {  // running is now column j's total (0 past n)
    int32_t inclusive = running;
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
      const int32_t other = __shfl_up_sync(0xffffffffu, inclusive, d);
      if (lane >= d) inclusive += other;
    }
    if (j < n) column_in_group[j] = inclusive - running;
    if (lane == 31) group_totals[blockIdx.x] = inclusive;
  }
}

template <typename T>
__global__ void __launch_bounds__(kScatterThreads)
    scatter_kernel(const T* __restrict__ values, const int32_t* __restrict__ sorted_entries,
                   const int32_t* __restrict__ sorted_nonzeros, const int32_t* __restrict__ sorted_rows,
                   const int32_t* __restrict__ tile_prefix, const int32_t* __restrict__ column_in_group,
                   const int32_t* __restrict__ group_totals, int64_t n, int64_t nnz, int tile_bits,
                   int32_t* __restrict__ row_offsets_t, T* __restrict__ values_t,
                   int32_t* __restrict__ col_indices_t, int32_t* __restrict__ permutation) {
  using GroupScan = cub::BlockScan<int32_t, kScatterThreads>;
  __shared__ typename GroupScan::TempStorage scan_storage;
  __shared__ int32_t group_offsets[kMaxGroups];
  const int t = threadIdx.x;
  const int64_t base = int64_t(blockIdx.x) * (kScatterThreads * kScatterItems);
  // This block's sorted items first (coalesced, striped), so their loads overlap the group scan.
  int32_t entries[kScatterItems], nonzeros[kScatterItems], rows[kScatterItems];
#pragma unroll
  for (int k = 0; k < kScatterItems; ++k) {
    const int64_t g = base + k * kScatterThreads + t;
    entries[k] = g < nnz ? sorted_entries[g] : 0;
    nonzeros[k] = g < nnz ? sorted_nonzeros[g] : 0;
    rows[k] = g < nnz ? sorted_rows[g] : 0;
  }
  const int64_t groups = (n + 31) / 32;
  int32_t totals[kGroupItems];
  int32_t thread_sum = 0;
#pragma unroll
  for (int k = 0; k < kGroupItems; ++k) {
    const int64_t group = int64_t(t) * kGroupItems + k;
    totals[k] = group < groups ? group_totals[group] : 0;
    thread_sum += totals[k];
  }
  int32_t offset;
  GroupScan(scan_storage).ExclusiveSum(thread_sum, offset);
#pragma unroll
  for (int k = 0; k < kGroupItems; ++k) {
    group_offsets[t * kGroupItems + k] = offset;
    offset += totals[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < kScatterItems; ++k) {
    const int64_t g = base + k * kScatterThreads + t;
    if (g < nnz) {
      const uint32_t entry = static_cast<uint32_t>(entries[k]);
      const int64_t j = entry >> tile_bits;
      const int64_t tile = g >> tile_bits;
      const int64_t q = int64_t(group_offsets[j / 32]) + column_in_group[j] + tile_prefix[tile * n + j] +
                        (entry & ((1u << tile_bits) - 1));
      permutation[q] = nonzeros[k];
      col_indices_t[q] = rows[k];
      values_t[q] = values[nonzeros[k]];
    }
    if (g <= n) row_offsets_t[g] = g < n ? group_offsets[g / 32] + column_in_group[g] : static_cast<int32_t>(nnz);
  }
}

struct TiledLayout {  // byte offsets inside the workspace of the tiled path
  int tile_bits;
  int64_t tiles;
  size_t counts, in_group, group_totals, entries, nonzeros, rows, total;
};

// The count table must stay small next to the nonzeros (or small outright).
int64_t count_table_budget(int64_t nnz) { return 4 * nnz + (int64_t(1) << 22); }

int64_t tiles_of(int64_t nnz, int tile_bits) {
  return (nnz + (int64_t(1) << tile_bits) - 1) >> tile_bits;
}

TiledLayout tiled_layout(int64_t nnz, int64_t n) {
  TiledLayout layout{};
  layout.tile_bits = kTileBits;
  layout.tiles = tiles_of(nnz, kTileBits);
  const size_t index_bytes = round_up16(static_cast<size_t>(nnz) * sizeof(int32_t));
  layout.counts = 0;
  layout.in_group = round_up16(static_cast<size_t>(layout.tiles * n) * sizeof(int32_t));
  layout.group_totals = layout.in_group + round_up16(static_cast<size_t>(n) * sizeof(int32_t));
  layout.entries = layout.group_totals + round_up16(static_cast<size_t>((n + 31) / 32) * sizeof(int32_t));
  layout.nonzeros = layout.entries + index_bytes;
  layout.rows = layout.nonzeros + index_bytes;
  layout.total = layout.rows + index_bytes;
  return layout;
}

bool use_tiles(int64_t nnz, int64_t n) {
  return n <= kMaxTiledColumns && tiles_of(nnz, kTileBits) * n <= count_table_budget(nnz);
}

// ---- sort path (n too large for the count table) ---------------------------------------------
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
  if (use_tiles(nnz, n)) return tiled_layout(nnz, n).total;
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
  char* base = static_cast<char*>(workspace);
  if (use_tiles(nnz, n)) {
    const TiledLayout layout = tiled_layout(nnz, n);
    auto* tile_counts = reinterpret_cast<int32_t*>(base + layout.counts);
    auto* column_in_group = reinterpret_cast<int32_t*>(base + layout.in_group);
    auto* group_totals = reinterpret_cast<int32_t*>(base + layout.group_totals);
    auto* sorted_entries = reinterpret_cast<int32_t*>(base + layout.entries);
    auto* sorted_nonzeros = reinterpret_cast<int32_t*>(base + layout.nonzeros);
    auto* sorted_rows = reinterpret_cast<int32_t*>(base + layout.rows);
    const auto tiles = static_cast<unsigned>(layout.tiles);
    tile_sort_kernel<<<tiles, kTileThreads, 0, stream>>>(row_offsets, m, col_indices, nnz, n,
                                                         key_bits(n), tile_counts, sorted_entries,
                                                         sorted_nonzeros, sorted_rows);
    tile_prefix_kernel<<<static_cast<unsigned>((n + 31) / 32), kPrefixWarps * 32, 0, stream>>>(
        tile_counts, layout.tiles, n, column_in_group, group_totals);
    const int64_t scatter_items = std::max(nnz, n + 1);
    const int64_t per_block = kScatterThreads * kScatterItems;
    scatter_kernel<T><<<static_cast<unsigned>((scatter_items + per_block - 1) / per_block),
                        kScatterThreads, 0, stream>>>(
        values, sorted_entries, sorted_nonzeros, sorted_rows, tile_counts, column_in_group,
        group_totals, n, nnz, layout.tile_bits, row_offsets_t, values_t, col_indices_t, permutation);
    return;
  }
  const size_t index_bytes = round_up16(static_cast<size_t>(nnz) * sizeof(int32_t));
  int32_t* sorted_columns = reinterpret_cast<int32_t*>(base);
  int32_t* items = reinterpret_cast<int32_t*>(base + index_bytes);
  void* sort_storage = base + 2 * index_bytes;
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
