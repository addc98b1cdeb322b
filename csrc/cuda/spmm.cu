// CUDA SpMM: out (m x k) = A (m x n, CSR) @ dense (n x k), float32 accumulation.
//
// Bytes decide the design. At LLaMA shapes with k = 4096 every nonzero needs a 2k-byte row of
// `dense`; read straight from L2 that is nnz * 8 KB (1.4 GB at 4096 x 4096, d = 1%), more than L2
// can deliver in the time a dense GEMM takes. So the main kernel, `slab`, splits k into tiles of
// 32 (or 16) bytes per dense row: one block copies the n x tile slab of `dense` into shared memory
// once (n * 32 B = 128 KB for n = 4096) and then serves every nonzero of its rows from shared
// memory. Global traffic becomes one read of `dense` per row split, one write of `out`, plus the
// CSR indices re-read once per tile (from L1/L2).
//
// Work inside a block: warps take chunks of consecutive positions of `row_indices` (heaviest rows
// first) from a shared counter. A chunk holds 32 / kGroup rows, kGroup lanes per row, each lane one
// 16-byte slice of the tile with its accumulators in registers. Rows of the chunk longer than
// kHeavy are done first by the whole warp together (lanes split the nonzeros, then a shuffle
// reduction), so one long row never leaves a warp waiting on a serial chain; the rest go one row
// per lane group. Sorting by length keeps a chunk's rows similar, so lanes stay busy.
//
// The `rows` kernel is the fallback where a slab does not fit in shared memory (very large n, or
// float64): one block per (row, column chunk), each thread a 16-byte slice, dense rows read from
// global memory with 16-byte loads.
//
// Assumes a validated CSR; all address arithmetic is 64-bit; any of m, n, k, nnz may be 0.
#include "cuda/spmm.h"

#include <algorithm>

#include "cuda/common.cuh"

namespace rosa::cuda {
namespace {

constexpr int kSlabThreads = 1024;
constexpr int kRowsThreads = 128;

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

// One block per (column tile, row split). See the file comment.
template <typename T, int kGroup>
__global__ void __launch_bounds__(kSlabThreads)
    spmm_slab_kernel(const T* __restrict__ values, const int32_t* __restrict__ row_offsets,
                     const int32_t* __restrict__ row_indices,
                     const int32_t* __restrict__ col_indices, const T* __restrict__ dense,
                     int64_t dense_row_stride, T* __restrict__ out, int64_t m, int64_t n,
                     int64_t k, bool dense_vector_ok, bool out_vector_ok) {
  using Acc = accumulator_t<T>;
  constexpr int kVec = kVectorElements<T>;
  constexpr int kRowsPerChunk = 32 / kGroup;
  constexpr int kHeavy = 8 * kRowsPerChunk;
  extern __shared__ uint4 slab[];  // n rows of kGroup 16-byte slices
  __shared__ unsigned long long next_chunk;

  const int64_t tile_begin = static_cast<int64_t>(blockIdx.x) * kGroup * kVec;
  if (threadIdx.x == 0) next_chunk = 0;
  for (int64_t s = threadIdx.x; s < n * kGroup; s += blockDim.x) {
    const int64_t j = s / kGroup;
    const int64_t column = tile_begin + (s % kGroup) * kVec;
    slab[s] = load_slice(dense + j * dense_row_stride, column, k, dense_vector_ok);
  }
  __syncthreads();

  const int lane = threadIdx.x % 32;
  const int member = lane % kGroup;  // this lane's 16-byte slice of the tile
  const int slot = lane / kGroup;    // this lane's row inside a chunk
  const int64_t column = tile_begin + member * kVec;
  const int64_t chunks = (m + kRowsPerChunk - 1) / kRowsPerChunk;
  const int64_t splits = gridDim.y;

  for (;;) {
    unsigned long long taken = 0;
    if (lane == 0) taken = atomicAdd(&next_chunk, 1ull);
    taken = __shfl_sync(0xffffffffu, taken, 0);
    // Chunks interleave over the row splits so every split gets heavy and light rows alike.
    const int64_t chunk = static_cast<int64_t>(taken) * splits + blockIdx.y;
    if (chunk >= chunks) break;
    const int64_t position = chunk * kRowsPerChunk + slot;
    int64_t row = -1, begin = 0, end = 0;
    if (position < m) {
      row = row_indices[position];
      begin = row_offsets[row];
      end = row_offsets[row + 1];
    }
    const bool heavy = end - begin >= kHeavy;

    // Heavy rows: the whole warp, lanes of one slot-column stride over the nonzeros.
    unsigned heavy_lanes = __ballot_sync(0xffffffffu, heavy && member == 0);
    while (heavy_lanes != 0) {
      const int source = __ffs(heavy_lanes) - 1;
      heavy_lanes &= heavy_lanes - 1;
      const int64_t h_row = __shfl_sync(0xffffffffu, row, source);
      const int64_t h_begin = __shfl_sync(0xffffffffu, begin, source);
      const int64_t h_end = __shfl_sync(0xffffffffu, end, source);
      Acc acc[kVec] = {};
#pragma unroll 4
      for (int64_t p = h_begin + slot; p < h_end; p += kRowsPerChunk) {
        const int64_t j = col_indices[p];
        multiply_add<T>(acc, to_acc(values[p]), slab[j * kGroup + member]);
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

    if (row >= 0 && !heavy) {
      Acc acc[kVec] = {};
#pragma unroll 4
      for (int64_t p = begin; p < end; ++p) {
        const int64_t j = col_indices[p];
        multiply_add<T>(acc, to_acc(values[p]), slab[j * kGroup + member]);
      }
      store_slice(out + row * k, column, k, out_vector_ok, acc);
    }
  }
}

// One block per (position in row_indices, column chunk of kRowsThreads slices).
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

template <typename T, int kGroup>
void launch_slab(const T* values, const int32_t* row_offsets, const int32_t* row_indices,
                 const int32_t* col_indices, const T* dense, int64_t dense_row_stride, T* out,
                 int64_t m, int64_t n, int64_t k, bool dense_vector_ok, bool out_vector_ok,
                 size_t shared_bytes, cudaStream_t stream) {
  constexpr int64_t kWidth = kGroup * kVectorElements<T>;
  constexpr int64_t kRowsPerChunk = 32 / kGroup;
  auto kernel = spmm_slab_kernel<T, kGroup>;
  if (shared_bytes > 48 * 1024) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         static_cast<int>(shared_bytes));
  }
  const int64_t tiles = (k + kWidth - 1) / kWidth;
  const int64_t chunks = (m + kRowsPerChunk - 1) / kRowsPerChunk;
  // Enough blocks for about two per multiprocessor; each extra row split re-reads the slab.
  const int64_t target = 2 * static_cast<int64_t>(multiprocessor_count());
  const int64_t splits =
      std::max<int64_t>(1, std::min<int64_t>({(target + tiles - 1) / tiles, chunks, 65535}));
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(splits));
  kernel<<<grid, kSlabThreads, shared_bytes, stream>>>(values, row_offsets, row_indices,
                                                        col_indices, dense, dense_row_stride, out,
                                                        m, n, k, dense_vector_ok, out_vector_ok);
}

}  // namespace

template <typename T>
void spmm(const T* values, const int32_t* row_offsets, const int32_t* row_indices,
          const int32_t* col_indices, const T* dense, int64_t dense_row_stride, T* out, int64_t m,
          int64_t n, int64_t k, int64_t nnz, SpmmKernel kernel, cudaStream_t stream) {
  if (m == 0 || k == 0) return;
  constexpr int kVec = kVectorElements<T>;
  const bool dense_vector_ok = is_aligned16(dense) && dense_row_stride % kVec == 0;
  const bool out_vector_ok = is_aligned16(out) && k % kVec == 0;
  const int64_t shared_limit = max_shared_memory_per_block() - 1024;
  const int64_t slab32_bytes = n * 32, slab16_bytes = n * 16;
  if (kernel == SpmmKernel::kAuto) {
    // The slab pays off once an average dense row serves a few nonzeros (docs/cuda.md).
    const bool reused = nnz >= 2 * n;
    if (reused && slab32_bytes <= shared_limit) {
      kernel = SpmmKernel::kSlab32;
    } else if (reused && slab16_bytes <= shared_limit) {
      kernel = SpmmKernel::kSlab16;
    } else {
      kernel = SpmmKernel::kRows;
    }
  }
  if (kernel == SpmmKernel::kSlab32 && slab32_bytes > shared_limit) kernel = SpmmKernel::kSlab16;
  if (kernel == SpmmKernel::kSlab16 && slab16_bytes > shared_limit) kernel = SpmmKernel::kRows;

  if (kernel == SpmmKernel::kSlab32) {
    launch_slab<T, 2>(values, row_offsets, row_indices, col_indices, dense, dense_row_stride, out,
                      m, n, k, dense_vector_ok, out_vector_ok, slab32_bytes, stream);
  } else if (kernel == SpmmKernel::kSlab16) {
    launch_slab<T, 1>(values, row_offsets, row_indices, col_indices, dense, dense_row_stride, out,
                      m, n, k, dense_vector_ok, out_vector_ok, slab16_bytes, stream);
  } else {
    const int64_t chunks = (k + int64_t(kRowsThreads) * kVec - 1) / (int64_t(kRowsThreads) * kVec);
    const dim3 grid(static_cast<unsigned>(m), static_cast<unsigned>(std::min<int64_t>(chunks, 65535)));
    spmm_rows_kernel<T><<<grid, kRowsThreads, 0, stream>>>(values, row_offsets, row_indices,
                                                          col_indices, dense, dense_row_stride,
                                                          out, k, dense_vector_ok, out_vector_ok);
  }
}

#define ROSA_INSTANTIATE_SPMM(T)                                                               \
  template void spmm<T>(const T*, const int32_t*, const int32_t*, const int32_t*, const T*,    \
                        int64_t, T*, int64_t, int64_t, int64_t, int64_t, SpmmKernel,            \
                        cudaStream_t);
ROSA_INSTANTIATE_SPMM(float)
ROSA_INSTANTIATE_SPMM(double)
ROSA_INSTANTIATE_SPMM(__half)
ROSA_INSTANTIATE_SPMM(__nv_bfloat16)

}  // namespace rosa::cuda
