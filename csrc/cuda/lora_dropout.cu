// CUDA kernels of RosaLinear's fused LoRA dropout. With keep(t, j) the counter-based dropout mask
// of dropout_keep.h (regenerated, never stored):
//
//     project:  h  (T x R)  = (X ∘ keep) A^T              one read of X
//     grad_A:   dA (R x N)  = alpha * G^T (X ∘ keep)      one read of X; G = dY B (T x R)
//     grad_x:   dX (T x N) += alpha * keep ∘ (G A)        one read and one write of dX
//
// Unfused, the same math costs a random draw, a multiply, a bool copy of the mask, a saved mask
// and separate GEMM and add passes: several times the bytes. The rank is small (LoRA), so the
// products over R run on CUDA cores; ranks are processed in tiles of 16.
//
// Work split. project: a warp owns 4 rows (2 for double) and strides over the columns, 8 per
// lane, with the block's 16 x 256 tile of A staged in shared memory; the 16 sums of each row are
// reduced across the warp at the end. grad_A: a block owns 128 columns (4 per lane) of one
// token range; its 4 warps take every 4th token, then sum in shared memory; token ranges
// ("splits", chosen to fill the GPU) write float32 partials that a second kernel adds in a fixed
// order (deterministic, no atomics). grad_x: a thread owns 4 columns of 32 rows and keeps its
// 16 x 4 slice of A in registers; G's row comes by warp shuffles. Vector loads/stores are used
// when the row stride and the pointer allow; scalar code otherwise. Assumes: unit column stride
// of X / dX, contiguous A and G, sizes below 2^31.
#include "cuda/lora_dropout.h"

#include <algorithm>

#include "cuda/common.cuh"

namespace rosa::cuda {
namespace {

constexpr int kRankTile = 16;
constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;

// kE consecutive elements of T, aligned as one (up to 16-byte) access.
template <typename T, int kE>
struct alignas(std::min<int>(16, kE * static_cast<int>(sizeof(T)))) Pack {
  T v[kE];
};

template <typename T, int kE>
bool vector_ok(const T* base, int64_t ld) {
  constexpr int align = std::min<int>(16, kE * static_cast<int>(sizeof(T)));
  return ld % kE == 0 && reinterpret_cast<uintptr_t>(base) % align == 0;
}

// out[e] = row[col + e] for the columns below n, 0 beyond.
template <typename T, int kE>
__device__ __forceinline__ void load_chunk(const T* row, int64_t col, int64_t n, bool vector,
                                           accumulator_t<T> (&out)[kE]) {
  if (vector && col + kE <= n) {
    const Pack<T, kE> pack = *reinterpret_cast<const Pack<T, kE>*>(row + col);
#pragma unroll
    for (int e = 0; e < kE; ++e) out[e] = to_acc(pack.v[e]);
  } else {
#pragma unroll
    for (int e = 0; e < kE; ++e) out[e] = col + e < n ? to_acc(row[col + e]) : accumulator_t<T>(0);
  }
}

template <typename T, int kE>
__device__ __forceinline__ void store_chunk(T* row, int64_t col, int64_t n, bool vector,
                                            const accumulator_t<T> (&in)[kE]) {
  if (vector && col + kE <= n) {
    Pack<T, kE> pack;
#pragma unroll
    for (int e = 0; e < kE; ++e) pack.v[e] = from_acc<T>(in[e]);
    *reinterpret_cast<Pack<T, kE>*>(row + col) = pack;
  } else {
#pragma unroll
    for (int e = 0; e < kE; ++e)
      if (col + e < n) row[col + e] = from_acc<T>(in[e]);
  }
}

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffU, v, offset);
  return v;
}

// ---- project: h = (X ∘ keep) A^T ---------------------------------------------------------------

template <typename T>
constexpr int project_rows_per_warp() { return sizeof(accumulator_t<T>) == 8 ? 2 : 4; }

template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    project_kernel(const T* __restrict__ x, int64_t ldx, bool x_vector, const T* __restrict__ lora_A,
                   bool a_vector, T* __restrict__ h, int64_t tokens, int64_t n, int64_t rank, DropoutKey key) {
  using Acc = accumulator_t<T>;
  constexpr int kE = 8, kRows = project_rows_per_warp<T>(), kChunk = 32 * kE;
  __shared__ Acc a_tile[kRankTile][kChunk];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kRankTile;
  const int64_t t0 = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * kRows;
  uint32_t row_keys[kRows];
#pragma unroll
  for (int i = 0; i < kRows; ++i) row_keys[i] = dropout_row_key(key, t0 + i);
  Acc sums[kRows][kRankTile];
#pragma unroll
  for (int i = 0; i < kRows; ++i)
#pragma unroll
    for (int r = 0; r < kRankTile; ++r) sums[i][r] = Acc(0);

  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    // Stage A's 16 x 256 tile: every load issued before any is used (one memory latency per tile,
    // not one per element), and the previous tile released only then.
    // Raw 8-element units are held until after the barrier, converted only when stored.
    constexpr int kUnitsPerRow = kChunk / kE, kUnits = kRankTile * kUnitsPerRow / kThreads;
    Pack<T, kE> staged[kUnits];
#pragma unroll
    for (int k = 0; k < kUnits; ++k) {
      const int unit = threadIdx.x + k * kThreads, r = unit / kUnitsPerRow;
      const int64_t col = c0 + (unit % kUnitsPerRow) * kE;
      const T* a_row = lora_A + (r0 + r) * n;
      if (r0 + r < rank && a_vector && col + kE <= n) {
        staged[k] = *reinterpret_cast<const Pack<T, kE>*>(a_row + col);
      } else {
#pragma unroll
        for (int e = 0; e < kE; ++e)
          staged[k].v[e] = r0 + r < rank && col + e < n ? a_row[col + e] : from_acc<T>(Acc(0));
      }
    }
    __syncthreads();  // the previous tile is no longer read
#pragma unroll
    for (int k = 0; k < kUnits; ++k) {
      const int unit = threadIdx.x + k * kThreads;
#pragma unroll
      for (int e = 0; e < kE; ++e)
        a_tile[unit / kUnitsPerRow][(unit % kUnitsPerRow) * kE + e] = to_acc(staged[k].v[e]);
    }
    __syncthreads();
    const int64_t col = c0 + lane * kE;
    Acc kept[kRows][kE];
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      if (t0 + i < tokens && col < n) {
        load_chunk<T, kE>(x + (t0 + i) * ldx, col, n, x_vector, kept[i]);
#pragma unroll
        for (int e = 0; e < kE; ++e)
          if (!dropout_keep(row_keys[i], col + e, key.threshold)) kept[i][e] = Acc(0);
      } else {
#pragma unroll
        for (int e = 0; e < kE; ++e) kept[i][e] = Acc(0);
      }
    }
#pragma unroll
    for (int r = 0; r < kRankTile; ++r) {
      Acc a[kE];
#pragma unroll
      for (int e = 0; e < kE; ++e) a[e] = a_tile[r][lane * kE + e];
#pragma unroll
      for (int i = 0; i < kRows; ++i)
#pragma unroll
        for (int e = 0; e < kE; ++e) sums[i][r] += kept[i][e] * a[e];
    }
  }
  // Lane r ends up with h[t0 + i, r0 + r] for every row i.
  Acc mine[kRows];
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    mine[i] = Acc(0);
#pragma unroll
    for (int r = 0; r < kRankTile; ++r) {
      const Acc total = warp_sum(sums[i][r]);
      if (lane == r) mine[i] = total;
    }
  }
  if (lane < kRankTile && r0 + lane < rank) {
#pragma unroll
    for (int i = 0; i < kRows; ++i)
      if (t0 + i < tokens) h[(t0 + i) * rank + r0 + lane] = from_acc<T>(mine[i]);
  }
}

// ---- grad_A: dA = alpha * G^T (X ∘ keep) ------------------------------------------------------

constexpr int kGradAElements = 4;
constexpr int kGradAColumns = 32 * kGradAElements;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    grad_A_kernel(const T* __restrict__ g, const T* __restrict__ x, int64_t ldx, bool x_vector,
                  accumulator_t<T>* __restrict__ partials, T* __restrict__ grad_A, int64_t tokens,
                  int64_t n, int64_t rank, int64_t tokens_per_split, accumulator_t<T> alpha,
                  DropoutKey key) {
  using Acc = accumulator_t<T>;
  constexpr int kE = kGradAElements;
  __shared__ Acc others[kWarps - 1][kRankTile][kGradAColumns];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kGradAColumns + lane * kE;
  const int64_t r0 = static_cast<int64_t>(blockIdx.z) * kRankTile;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * tokens_per_split;
  const int64_t t_end = min(t_begin + tokens_per_split, tokens);
  Acc sums[kRankTile][kE];
#pragma unroll
  for (int r = 0; r < kRankTile; ++r)
#pragma unroll
    for (int e = 0; e < kE; ++e) sums[r][e] = Acc(0);

  // A warp takes tokens t_begin + warp, + 4, ...; kGroup of them at a time, whose loads are all
  // issued before the first is used.
  constexpr int kGroup = 4;
  for (int64_t t0 = t_begin + warp; t0 < t_end; t0 += int64_t(kWarps) * kGroup) {
    Acc g_mine[kGroup], kept[kGroup][kE];
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      const int64_t t = t0 + int64_t(k) * kWarps;
      const bool live = t < t_end;
      g_mine[k] = live && lane < kRankTile && r0 + lane < rank ? to_acc(g[t * rank + r0 + lane]) : Acc(0);
      if (live && col < n) {
        load_chunk<T, kE>(x + t * ldx, col, n, x_vector, kept[k]);
      } else {
#pragma unroll
        for (int e = 0; e < kE; ++e) kept[k][e] = Acc(0);
      }
    }
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      const uint32_t row_key = dropout_row_key(key, t0 + int64_t(k) * kWarps);
#pragma unroll
      for (int e = 0; e < kE; ++e)
        if (!dropout_keep(row_key, col + e, key.threshold)) kept[k][e] = Acc(0);
#pragma unroll
      for (int r = 0; r < kRankTile; ++r) {
        const Acc gr = __shfl_sync(0xffffffffU, g_mine[k], r);
#pragma unroll
        for (int e = 0; e < kE; ++e) sums[r][e] += gr * kept[k][e];
      }
    }
  }
  if (warp > 0) {
#pragma unroll
    for (int r = 0; r < kRankTile; ++r)
#pragma unroll
      for (int e = 0; e < kE; ++e) others[warp - 1][r][lane * kE + e] = sums[r][e];
  }
  __syncthreads();
  if (warp != 0 || col >= n) return;
#pragma unroll
  for (int r = 0; r < kRankTile; ++r) {
    if (r0 + r >= rank) break;
#pragma unroll
    for (int e = 0; e < kE; ++e) {
      if (col + e >= n) break;
      Acc total = sums[r][e];
#pragma unroll
      for (int w = 0; w < kWarps - 1; ++w) total += others[w][r][lane * kE + e];
      const int64_t at = (r0 + r) * n + col + e;
      if (partials != nullptr) {
        partials[static_cast<int64_t>(blockIdx.y) * rank * n + at] = total;
      } else {
        grad_A[at] = from_acc<T>(alpha * total);
      }
    }
  }
}

template <typename T>
__global__ void grad_A_reduce_kernel(const accumulator_t<T>* __restrict__ partials, T* __restrict__ grad_A,
                                     int64_t count, int splits, accumulator_t<T> alpha) {
  for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < count;
       q += int64_t(gridDim.x) * blockDim.x) {
    accumulator_t<T> total = 0;
    for (int s = 0; s < splits; ++s) total += partials[s * count + q];
    grad_A[q] = from_acc<T>(alpha * total);
  }
}

// Token ranges so that about 8 blocks per multiprocessor run, each range at least 32 tokens.
int64_t grad_A_splits(int64_t tokens, int64_t n, int64_t rank, int64_t* tokens_per_split) {
  const int64_t tiles = ((n + kGradAColumns - 1) / kGradAColumns) * ((rank + kRankTile - 1) / kRankTile);
  const int64_t wanted = std::max<int64_t>(1, int64_t(multiprocessor_count()) * 8 / std::max<int64_t>(tiles, 1));
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>({wanted, (tokens + 31) / 32, 1024}));
  *tokens_per_split = std::max<int64_t>(1, (tokens + splits - 1) / splits);
  return std::max<int64_t>(1, (tokens + *tokens_per_split - 1) / *tokens_per_split);
}

// ---- grad_x: dX += alpha * keep ∘ (G A) --------------------------------------------------------

constexpr int kGradXElements = 4;
constexpr int kGradXRows = 32;

template <typename T, bool kSmallRank>
__global__ void __launch_bounds__(kThreads)
    grad_x_kernel(T* __restrict__ dx, int64_t lddx, bool dx_vector, const T* __restrict__ g,
                  const T* __restrict__ lora_A, int64_t tokens, int64_t n, int64_t rank,
                  accumulator_t<T> alpha, DropoutKey key) {
  using Acc = accumulator_t<T>;
  constexpr int kE = kGradXElements;
  const int lane = threadIdx.x % 32;
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kE;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * kGradXRows;
  const int64_t t_end = min(t_begin + kGradXRows, tokens);
  Acc a[kSmallRank ? kRankTile : 1][kE];
  if constexpr (kSmallRank) {
#pragma unroll
    for (int r = 0; r < kRankTile; ++r)
#pragma unroll
      for (int e = 0; e < kE; ++e)
        a[r][e] = r < rank && col + e < n ? to_acc(lora_A[r * n + col + e]) : Acc(0);
  }
  // Rows in groups of kGroup: the group's loads of G and dX are issued before the first is used.
  constexpr int kGroup = 4;
  int64_t t = t_begin;
  if constexpr (kSmallRank) {
    for (; t + kGroup <= t_end; t += kGroup) {
      Acc g_mine[kGroup], values[kGroup][kE];
#pragma unroll
      for (int k = 0; k < kGroup; ++k) {
        g_mine[k] = lane < rank ? to_acc(g[(t + k) * rank + lane]) : Acc(0);
        if (col < n) load_chunk<T, kE>(dx + (t + k) * lddx, col, n, dx_vector, values[k]);
      }
#pragma unroll
      for (int k = 0; k < kGroup; ++k) {
        Acc product[kE];
#pragma unroll
        for (int e = 0; e < kE; ++e) product[e] = Acc(0);
#pragma unroll
        for (int r = 0; r < kRankTile; ++r) {
          const Acc gr = __shfl_sync(0xffffffffU, g_mine[k], r);
#pragma unroll
          for (int e = 0; e < kE; ++e) product[e] += gr * a[r][e];
        }
        if (col >= n) continue;
        const uint32_t row_key = dropout_row_key(key, t + k);
#pragma unroll
        for (int e = 0; e < kE; ++e)
          if (dropout_keep(row_key, col + e, key.threshold)) values[k][e] += alpha * product[e];
        store_chunk<T, kE>(dx + (t + k) * lddx, col, n, dx_vector, values[k]);
      }
    }
  }
  for (; t < t_end; ++t) {  // the rows left over (all of them for ranks above the tile)
    Acc product[kE];
#pragma unroll
    for (int e = 0; e < kE; ++e) product[e] = Acc(0);
    if constexpr (kSmallRank) {
      const Acc g_mine = lane < rank ? to_acc(g[t * rank + lane]) : Acc(0);
#pragma unroll
      for (int r = 0; r < kRankTile; ++r) {
        const Acc gr = __shfl_sync(0xffffffffU, g_mine, r);
#pragma unroll
        for (int e = 0; e < kE; ++e) product[e] += gr * a[r][e];
      }
    } else {
      for (int64_t r0 = 0; r0 < rank; r0 += 32) {
        const Acc g_mine = r0 + lane < rank ? to_acc(g[t * rank + r0 + lane]) : Acc(0);
        const int64_t here = rank - r0 < 32 ? rank - r0 : 32;
        for (int rr = 0; rr < here; ++rr) {
          const Acc gr = __shfl_sync(0xffffffffU, g_mine, rr);
#pragma unroll
          for (int e = 0; e < kE; ++e)
            if (col + e < n) product[e] += gr * to_acc(lora_A[(r0 + rr) * n + col + e]);
        }
      }
    }
    if (col >= n) continue;
    T* row = dx + t * lddx;
    Acc values[kE];
    load_chunk<T, kE>(row, col, n, dx_vector, values);
    const uint32_t row_key = dropout_row_key(key, t);
#pragma unroll
    for (int e = 0; e < kE; ++e)
      if (dropout_keep(row_key, col + e, key.threshold)) values[e] += alpha * product[e];
    store_chunk<T, kE>(row, col, n, dx_vector, values);
  }
}

}  // namespace

template <typename T>
void lora_dropout_project(const T* x, int64_t ldx, const T* lora_A, T* h, int64_t tokens, int64_t n,
                          int64_t rank, DropoutKey key, cudaStream_t stream) {
  if (tokens == 0 || rank == 0) return;
  if (n == 0) {
    cudaMemsetAsync(h, 0, static_cast<size_t>(tokens * rank) * sizeof(T), stream);
    return;
  }
  const int64_t rows_per_block = int64_t(kWarps) * project_rows_per_warp<T>();
  const dim3 grid(static_cast<unsigned>((tokens + rows_per_block - 1) / rows_per_block),
                  static_cast<unsigned>((rank + kRankTile - 1) / kRankTile));
  project_kernel<T><<<grid, kThreads, 0, stream>>>(x, ldx, vector_ok<T, 8>(x, ldx), lora_A,
                                                   vector_ok<T, 8>(lora_A, n), h, tokens, n, rank, key);
}

template <typename T>
size_t lora_dropout_grad_A_workspace_bytes(int64_t tokens, int64_t n, int64_t rank) {
  if (tokens == 0 || n == 0 || rank == 0) return 0;
  int64_t tokens_per_split = 0;
  const int64_t splits = grad_A_splits(tokens, n, rank, &tokens_per_split);
  return splits > 1 ? static_cast<size_t>(splits * rank * n) * sizeof(accumulator_t<T>) : 0;
}

template <typename T>
void lora_dropout_grad_A(const T* g, const T* x, int64_t ldx, T* grad_A, int64_t tokens, int64_t n,
                         int64_t rank, double alpha, DropoutKey key, void* workspace,
                         size_t workspace_bytes, cudaStream_t stream) {
  using Acc = accumulator_t<T>;
  if (n == 0 || rank == 0) return;
  if (tokens == 0) {
    cudaMemsetAsync(grad_A, 0, static_cast<size_t>(rank * n) * sizeof(T), stream);
    return;
  }
  int64_t tokens_per_split = 0;
  int64_t splits = grad_A_splits(tokens, n, rank, &tokens_per_split);
  Acc* partials = nullptr;
  if (splits > 1 && workspace != nullptr &&
      workspace_bytes >= static_cast<size_t>(splits * rank * n) * sizeof(Acc)) {
    partials = static_cast<Acc*>(workspace);
  } else {
    splits = 1;
    tokens_per_split = tokens;
  }
  const dim3 grid(static_cast<unsigned>((n + kGradAColumns - 1) / kGradAColumns), static_cast<unsigned>(splits),
                  static_cast<unsigned>((rank + kRankTile - 1) / kRankTile));
  grad_A_kernel<T><<<grid, kThreads, 0, stream>>>(g, x, ldx, vector_ok<T, kGradAElements>(x, ldx), partials,
                                                  grad_A, tokens, n, rank, tokens_per_split,
                                                  static_cast<Acc>(alpha), key);
  if (partials != nullptr) {
    const int64_t count = rank * n;
    const int64_t blocks = std::min<int64_t>((count + 255) / 256, int64_t(multiprocessor_count()) * 8);
    grad_A_reduce_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
        partials, grad_A, count, static_cast<int>(splits), static_cast<Acc>(alpha));
  }
}

template <typename T>
void lora_dropout_grad_x(T* dx, int64_t lddx, const T* g, const T* lora_A, int64_t tokens, int64_t n,
                         int64_t rank, double alpha, DropoutKey key, cudaStream_t stream) {
  using Acc = accumulator_t<T>;
  if (tokens == 0 || n == 0 || rank == 0) return;
  const int64_t columns_per_block = int64_t(kThreads) * kGradXElements;
  const dim3 grid(static_cast<unsigned>((n + columns_per_block - 1) / columns_per_block),
                  static_cast<unsigned>((tokens + kGradXRows - 1) / kGradXRows));
  const bool vector = vector_ok<T, kGradXElements>(dx, lddx);
  if (rank <= kRankTile) {
    grad_x_kernel<T, true><<<grid, kThreads, 0, stream>>>(dx, lddx, vector, g, lora_A, tokens, n, rank,
                                                          static_cast<Acc>(alpha), key);
  } else {
    grad_x_kernel<T, false><<<grid, kThreads, 0, stream>>>(dx, lddx, vector, g, lora_A, tokens, n, rank,
                                                           static_cast<Acc>(alpha), key);
  }
}

#define ROSA_INSTANTIATE_LORA_DROPOUT(T)                                                           \
  template void lora_dropout_project<T>(const T*, int64_t, const T*, T*, int64_t, int64_t, int64_t,  \
                                        DropoutKey, cudaStream_t);                                 \
  template size_t lora_dropout_grad_A_workspace_bytes<T>(int64_t, int64_t, int64_t);               \
  template void lora_dropout_grad_A<T>(const T*, const T*, int64_t, T*, int64_t, int64_t, int64_t,   \
                                       double, DropoutKey, void*, size_t, cudaStream_t);           \
  template void lora_dropout_grad_x<T>(T*, int64_t, const T*, const T*, int64_t, int64_t, int64_t,   \
                                       double, DropoutKey, cudaStream_t);
ROSA_INSTANTIATE_LORA_DROPOUT(float)
ROSA_INSTANTIATE_LORA_DROPOUT(double)
ROSA_INSTANTIATE_LORA_DROPOUT(__half)
ROSA_INSTANTIATE_LORA_DROPOUT(__nv_bfloat16)

}  // namespace rosa::cuda
