// RosaLinear's LoRA dropout fused into its two rank-sized products that read or write a T x N
// tensor, on tensor cores (mma.sync m16n8k16, bfloat16 / float16 in, float32 accumulators; sm_80+):
//
//     project:  h (T x R)   = (X ∘ keep) A^T           one read of X, nothing written but h
//     addmm:    dX (T x N) += alpha * keep ∘ (G A)      one read and one write of dX; G = dY B (T x R)
//     grad_A:   dA (R x N)  = alpha * G^T (X ∘ keep)    one read of X (the LoRA-A gradient)
//
// Unfused, each is an elementwise dropout pass plus a cuBLAS GEMM: project writes and re-reads
// X ∘ keep (two passes of T x N more), addmm writes and re-reads G A (two more). keep(t, j) is
// dropout_keep.h's hash, the same mask as the elementwise kernels and the CPU. A first fused
// version on CUDA cores (git history before 39931e2) was latency- and FMA-bound; here the products
// run on tensor cores and the kernels are bound by their one pass over T x N.
//
// Fragments (PTX ISA, mma.m16n8k16 with .bf16/.f16): lane = 4 g + c. A (16 x 16, row-major):
// registers a0..a3 hold the pairs (g, 2c..2c+1), (g + 8, 2c..), (g, 2c + 8..), (g + 8, 2c + 8..).
// B (16 x 8, "col"): b0, b1 hold (k = 2c..2c+1, n = g) and (k = 2c + 8.., n = g). C (16 x 8, f32):
// c0..c3 are (g, 2c), (g, 2c + 1), (g + 8, 2c), (g + 8, 2c + 1).
//
// project: a block of 8 warps owns 16 tokens; warp w takes the 16-feature steps w, w + 8, ... (the
// block reads 128 consecutive features of each row at a time), loading 4 steps ahead; the warps'
// partial 16 x R sums meet in shared memory. A-operand = X's tile with dropped elements zeroed,
// B-operand = A's rows (k = feature, n = rank). addmm: a warp owns 64 columns and 64 tokens; its
// B-operand (A's 64 columns, all ranks) stays in registers; per 16 tokens it loads G's fragment,
// issues every dX load of the tile, then the products and the masked update.
// grad_A reduces over the tokens, X's row index, so X's tiles go through shared memory: a warp owns
// 64 columns and a contiguous chunk of tokens (one "split"); per 16 tokens it loads the 16 x 64 tile
// with 16-byte loads (the next tile's loads in flight while this one is used), zeroes the dropped
// elements, stores it to its own shared buffer and reads B fragments back transposed
// (ldmatrix.trans); G's A fragments (rank x tokens) are read from global memory (T x R, cached).
// Each split writes its float32 R x 64 partial to a workspace; a second kernel adds the splits in
// order and rounds alpha * sum once (deterministic, no atomics).
// Ranks up to 64 (4 steps of 16, zero-padded); callers fall back to the unfused ops otherwise.
#include "cuda/lora_dropout.h"

#include <algorithm>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/common.cuh"

namespace rosa::cuda {
namespace {

constexpr int kMaxRankSteps = 4;  // ranks up to 64

template <typename T>
__device__ __forceinline__ uint32_t pack2(T lo, T hi) {
  uint16_t l, h;
  memcpy(&l, &lo, 2);
  memcpy(&h, &hi, 2);
  return static_cast<uint32_t>(l) | (static_cast<uint32_t>(h) << 16);
}

template <typename T>
__device__ __forceinline__ T zero_value() {
  return from_acc<T>(0.0f);
}

// D += A B for one m16n8k16 tile.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();  // the host launches these kernels on compute capability 8.0 and newer only
#endif
}

template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();
#endif
}

// The pair (row, col), (row, col + 1) of a row-major matrix (row stride ld) as packed 16-bit
// values, zero outside rows x cols; `paired`: both in range can be read as one aligned 4-byte word.
template <typename T>
__device__ __forceinline__ uint32_t load_pair(const T* base, int64_t ld, int64_t row, int64_t col, int64_t rows,
                                              int64_t cols, bool paired) {
  if (row >= rows) return 0u;
  const T* p = base + row * ld + col;
  if (paired && col + 1 < cols) return *reinterpret_cast<const uint32_t*>(p);
  const T lo = col < cols ? p[0] : zero_value<T>();
  const T hi = col + 1 < cols ? p[1] : zero_value<T>();
  return pack2(lo, hi);
}

// The pair (row, col), (row + 1, col): two rows of one column.
template <typename T>
__device__ __forceinline__ uint32_t load_column_pair(const T* base, int64_t ld, int64_t row, int64_t col,
                                                     int64_t rows, int64_t cols) {
  if (col >= cols) return 0u;
  const T lo = row < rows ? base[row * ld + col] : zero_value<T>();
  const T hi = row + 1 < rows ? base[(row + 1) * ld + col] : zero_value<T>();
  return pack2(lo, hi);
}

// Zeroes the halves of a packed pair at (t, j), (t, j + 1) that dropout drops.
__device__ __forceinline__ uint32_t keep_pair(uint32_t pair, uint32_t row_key, int64_t j, uint32_t threshold) {
  const uint32_t lo = dropout_keep(row_key, j, threshold) ? 0x0000FFFFu : 0u;
  const uint32_t hi = dropout_keep(row_key, j + 1, threshold) ? 0xFFFF0000u : 0u;
  return pair & (lo | hi);
}

// ---- project: h = (X ∘ keep) A^T ------------------------------------------------------------------

constexpr int kProjectWarps = 8;
constexpr int kProjectAhead = 4;

template <typename T, int kRankSteps>
__global__ void __launch_bounds__(kProjectWarps * 32)
    project_mma_kernel(const T* __restrict__ x, int64_t ldx, bool x_paired, const T* __restrict__ lora_A,
                       bool a_paired, T* __restrict__ h, int64_t tokens, int64_t n, int64_t rank, DropoutKey key) {
  constexpr int kNTiles = 2 * kRankSteps;  // 8 ranks per n-tile
  __shared__ float partial[kProjectWarps][kNTiles][4][32];
  key = dropout_resolve_key(key);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, c = lane % 4;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * 16;
  const int64_t row0 = t0 + g, row1 = t0 + g + 8;
  const uint32_t key0 = dropout_row_key(key, row0), key1 = dropout_row_key(key, row1);
  float acc[kNTiles][4];
#pragma unroll
  for (int i = 0; i < kNTiles; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[i][e] = 0.0f;

  const int64_t steps = (n + 15) / 16;
  for (int64_t base = warp; base < steps; base += int64_t(kProjectWarps) * kProjectAhead) {
    uint32_t a[kProjectAhead][4];
    uint32_t b[kProjectAhead][kNTiles][2];
#pragma unroll
    for (int u = 0; u < kProjectAhead; ++u) {
      const int64_t step = base + int64_t(u) * kProjectWarps;
      const int64_t k0 = step * 16;
      if (step < steps) {
        const int64_t j0 = k0 + 2 * c, j1 = k0 + 2 * c + 8;
        a[u][0] = load_pair(x, ldx, row0, j0, tokens, n, x_paired);
        a[u][1] = load_pair(x, ldx, row1, j0, tokens, n, x_paired);
        a[u][2] = load_pair(x, ldx, row0, j1, tokens, n, x_paired);
        a[u][3] = load_pair(x, ldx, row1, j1, tokens, n, x_paired);
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
          // B(k = feature, n = rank) = A[rank][feature]: two consecutive features of rank nt * 8 + g.
          b[u][nt][0] = load_pair(lora_A, n, nt * 8 + g, j0, rank, n, a_paired);
          b[u][nt][1] = load_pair(lora_A, n, nt * 8 + g, j1, rank, n, a_paired);
        }
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) a[u][e] = 0u;
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) b[u][nt][0] = b[u][nt][1] = 0u;
      }
    }
#pragma unroll
    for (int u = 0; u < kProjectAhead; ++u) {
      const int64_t k0 = (base + int64_t(u) * kProjectWarps) * 16;
      const int64_t j0 = k0 + 2 * c, j1 = k0 + 2 * c + 8;
      a[u][0] = keep_pair(a[u][0], key0, j0, key.threshold);
      a[u][1] = keep_pair(a[u][1], key1, j0, key.threshold);
      a[u][2] = keep_pair(a[u][2], key0, j1, key.threshold);
      a[u][3] = keep_pair(a[u][3], key1, j1, key.threshold);
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) mma16816<T>(acc[nt], a[u], b[u][nt][0], b[u][nt][1]);
    }
  }
  // The warps' partial sums, added in a fixed order (deterministic).
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) partial[warp][nt][e][lane] = acc[nt][e];
  __syncthreads();
  if (warp != 0) return;
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float sum = 0.0f;
#pragma unroll
      for (int w = 0; w < kProjectWarps; ++w) sum += partial[w][nt][e][lane];
      const int64_t row = e < 2 ? row0 : row1;
      const int64_t r = nt * 8 + 2 * c + (e % 2);
      if (row < tokens && r < rank) h[row * rank + r] = from_acc<T>(sum);
    }
  }
}

// ---- addmm: dX += alpha * keep ∘ (G A) ---------------------------------------------------------------

constexpr int kAddmmWarps = 4;
constexpr int kAddmmColumns = 64;  // per warp: 8 n-tiles
constexpr int kAddmmTokens = 64;   // per warp: 4 m-tiles

template <typename T, int kRankSteps>
__global__ void __launch_bounds__(kAddmmWarps * 32)
    addmm_mma_kernel(T* __restrict__ dx, int64_t lddx, bool dx_paired, const T* __restrict__ g_in, int64_t ldg,
                     const T* __restrict__ lora_A, int64_t tokens, int64_t n, int64_t rank, float alpha,
                     DropoutKey key) {
  constexpr int kNTiles = kAddmmColumns / 8;
  key = dropout_resolve_key(key);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, c = lane % 4;
  const int64_t col0 = (static_cast<int64_t>(blockIdx.x) * kAddmmWarps + warp) * kAddmmColumns;
  if (col0 >= n) return;
  // B(k = rank, n = column) = A[rank][column]: two consecutive ranks of one column.
  uint32_t b[kRankSteps][kNTiles][2];
#pragma unroll
  for (int ks = 0; ks < kRankSteps; ++ks)
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
      const int64_t col = col0 + nt * 8 + g;
      b[ks][nt][0] = load_column_pair(lora_A, n, ks * 16 + 2 * c, col, rank, n);
      b[ks][nt][1] = load_column_pair(lora_A, n, ks * 16 + 2 * c + 8, col, rank, n);
    }
  for (int64_t t_begin = static_cast<int64_t>(blockIdx.y) * kAddmmTokens; t_begin < tokens;
       t_begin += static_cast<int64_t>(gridDim.y) * kAddmmTokens) {
  const int64_t t_end = min(t_begin + kAddmmTokens, tokens);
  for (int64_t t0 = t_begin; t0 < t_end; t0 += 16) {
    const int64_t row0 = t0 + g, row1 = t0 + g + 8;
    // G's 16 x 16 fragments (rows = tokens, k = ranks).
    uint32_t a[kRankSteps][4];
#pragma unroll
    for (int ks = 0; ks < kRankSteps; ++ks) {
      const int64_t k0 = ks * 16 + 2 * c, k1 = k0 + 8;
      a[ks][0] = load_pair(g_in, ldg, row0, k0, tokens, rank, false);
      a[ks][1] = load_pair(g_in, ldg, row1, k0, tokens, rank, false);
      a[ks][2] = load_pair(g_in, ldg, row0, k1, tokens, rank, false);
      a[ks][3] = load_pair(g_in, ldg, row1, k1, tokens, rank, false);
    }
    // Every dX pair of the tile in flight before any is used.
    uint32_t d[kNTiles][2];
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
      const int64_t col = col0 + nt * 8 + 2 * c;
      d[nt][0] = load_pair(dx, lddx, row0, col, tokens, n, dx_paired);
      d[nt][1] = load_pair(dx, lddx, row1, col, tokens, n, dx_paired);
    }
    const uint32_t key0 = dropout_row_key(key, row0), key1 = dropout_row_key(key, row1);
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
      float p[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int ks = 0; ks < kRankSteps; ++ks) mma16816<T>(p, a[ks], b[ks][nt][0], b[ks][nt][1]);
      const int64_t col = col0 + nt * 8 + 2 * c;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t row = half ? row1 : row0;
        if (row >= tokens || col >= n) continue;
        const uint32_t row_key = half ? key1 : key0;
        T pair[2];
        memcpy(pair, &d[nt][half], 4);
        float v0 = to_acc(pair[0]), v1 = to_acc(pair[1]);
        if (dropout_keep(row_key, col, key.threshold)) v0 += alpha * p[2 * half];
        if (dropout_keep(row_key, col + 1, key.threshold)) v1 += alpha * p[2 * half + 1];
        pair[0] = from_acc<T>(v0);
        pair[1] = from_acc<T>(v1);
        T* out = dx + row * lddx + col;
        if (dx_paired && col + 1 < n) {
          uint32_t word;
          memcpy(&word, pair, 4);
          *reinterpret_cast<uint32_t*>(out) = word;
        } else {
          out[0] = pair[0];
          if (col + 1 < n) out[1] = pair[1];
        }
      }
    }
  }
  }
}

// ---- grad_A: dA = alpha * G^T (X ∘ keep) ----------------------------------------------------------

constexpr int kGradAWarps = 4;
constexpr int kGradAColumns = 64;                // per warp: 8 n-tiles
constexpr int kGradAStride = kGradAColumns + 8;  // shared row stride in elements: 144 bytes, conflict-free ldmatrix

// 8 consecutive elements (t, j..j + 7) of a row-major matrix as four packed pairs, zero outside
// tokens x n; `vector`: the row stride and base allow aligned 16-byte loads.
template <typename T>
__device__ __forceinline__ uint4 load_row8(const T* base, int64_t ld, int64_t t, int64_t j, int64_t tokens, int64_t n,
                                           bool vector) {
  if (t >= tokens) return make_uint4(0u, 0u, 0u, 0u);
  const T* p = base + t * ld + j;
  if (vector && j + 8 <= n) return *reinterpret_cast<const uint4*>(p);
  T v[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) v[e] = j + e < n ? p[e] : zero_value<T>();
  return make_uint4(pack2(v[0], v[1]), pack2(v[2], v[3]), pack2(v[4], v[5]), pack2(v[6], v[7]));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_address) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const auto address = static_cast<uint32_t>(__cvta_generic_to_shared(row_address));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
#else
  __trap();
#endif
}

template <typename T, int kRankSteps>
__global__ void __launch_bounds__(kGradAWarps * 32)
    grad_A_mma_kernel(const T* __restrict__ x, int64_t ldx, bool x_vector, const T* __restrict__ g_in, int64_t ldg,
                      float* __restrict__ partial, int64_t splits, int64_t chunk, int64_t tokens, int64_t n,
                      int64_t rank, DropoutKey key) {
  constexpr int kNTiles = kGradAColumns / 8;
  constexpr int kLoads = 16 * kGradAColumns / 8 / 32;  // 16-byte loads per lane per 16-token tile
  __shared__ __align__(16) T tile[kGradAWarps][16][kGradAStride];
  key = dropout_resolve_key(key);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, c = lane % 4;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kGradAColumns;
  const int64_t split = static_cast<int64_t>(blockIdx.y) * kGradAWarps + warp;
  if (split >= splits) return;
  const int64_t t_begin = split * chunk;
  const int64_t t_end = min(t_begin + chunk, tokens);
  float acc[kRankSteps][kNTiles][4];
#pragma unroll
  for (int ms = 0; ms < kRankSteps; ++ms)
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[ms][nt][e] = 0.0f;

  // Lane l loads row l / 8 + 4 i, columns 8 (l % 8) .. + 7 of each tile: a warp reads 4 whole rows
  // of 128 bytes per load.
  const int load_row = lane / 8, load_col = (lane % 8) * 8;
  uint4 current[kLoads];
#pragma unroll
  for (int i = 0; i < kLoads; ++i)
    current[i] = t_begin < t_end ? load_row8(x, ldx, t_begin + load_row + 4 * i, col0 + load_col, t_end, n, x_vector)
                                 : make_uint4(0u, 0u, 0u, 0u);
  // ldmatrix: lane l gives the address of row l % 8 of matrix l / 8; matrices (rows, columns):
  // (0..7, 0..7), (8..15, 0..7), (0..7, 8..15), (8..15, 8..15) of each 16-column pair of n-tiles.
  const int matrix = lane / 8;
  const T* read_base = &tile[warp][(matrix % 2) * 8 + lane % 8][(matrix / 2) * 8];
  for (int64_t t0 = t_begin; t0 < t_end; t0 += 16) {
    uint4 next[kLoads];
    const bool more = t0 + 16 < t_end;
#pragma unroll
    for (int i = 0; i < kLoads; ++i)
      next[i] = more ? load_row8(x, ldx, t0 + 16 + load_row + 4 * i, col0 + load_col, t_end, n, x_vector)
                     : make_uint4(0u, 0u, 0u, 0u);
    // A(m = rank, k = token) = G[token][rank]: two consecutive tokens of one rank.
    uint32_t a[kRankSteps][4];
#pragma unroll
    for (int ms = 0; ms < kRankSteps; ++ms) {
      const int64_t r0 = ms * 16 + g, r1 = r0 + 8;
      a[ms][0] = load_column_pair(g_in, ldg, t0 + 2 * c, r0, t_end, rank);
      a[ms][1] = load_column_pair(g_in, ldg, t0 + 2 * c, r1, t_end, rank);
      a[ms][2] = load_column_pair(g_in, ldg, t0 + 2 * c + 8, r0, t_end, rank);
      a[ms][3] = load_column_pair(g_in, ldg, t0 + 2 * c + 8, r1, t_end, rank);
    }
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const int row = load_row + 4 * i;
      const uint32_t row_key = dropout_row_key(key, t0 + row);
      const int64_t j = col0 + load_col;
      uint4 v = current[i];
      v.x = keep_pair(v.x, row_key, j, key.threshold);
      v.y = keep_pair(v.y, row_key, j + 2, key.threshold);
      v.z = keep_pair(v.z, row_key, j + 4, key.threshold);
      v.w = keep_pair(v.w, row_key, j + 6, key.threshold);
      *reinterpret_cast<uint4*>(&tile[warp][row][load_col]) = v;
    }
    __syncwarp();
#pragma unroll
    for (int pair = 0; pair < kNTiles / 2; ++pair) {
      uint32_t b[4];  // b0, b1 of n-tile 2 pair, then of n-tile 2 pair + 1
      ldmatrix_x4_trans(b, read_base + pair * 16);
#pragma unroll
      for (int ms = 0; ms < kRankSteps; ++ms) {
        mma16816<T>(acc[ms][2 * pair], a[ms], b[0], b[1]);
        mma16816<T>(acc[ms][2 * pair + 1], a[ms], b[2], b[3]);
      }
    }
    __syncwarp();  // the tile is read before the next one overwrites it
#pragma unroll
    for (int i = 0; i < kLoads; ++i) current[i] = next[i];
  }
  // This split's partial sums: partial[split][rank][column], float32.
  float* out = partial + split * rank * n;
#pragma unroll
  for (int ms = 0; ms < kRankSteps; ++ms)
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t r = ms * 16 + g + (e < 2 ? 0 : 8);
        const int64_t j = col0 + nt * 8 + 2 * c + (e % 2);
        if (r < rank && j < n) out[r * n + j] = acc[ms][nt][e];
      }
}

// dA[r][j] = alpha * sum over the splits, in order, rounded once.
template <typename T>
__global__ void grad_A_reduce_kernel(const float* __restrict__ partial, T* __restrict__ out, int64_t splits,
                                     int64_t elements, float alpha) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < elements;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float sum = 0.0f;
    for (int64_t s = 0; s < splits; ++s) sum += partial[s * elements + i];
    out[i] = from_acc<T>(alpha * sum);
  }
}

template <typename T, int kRankSteps>
void launch_grad_A(const T* x, int64_t ldx, const T* g, int64_t ldg, T* out, float* partial, int64_t splits,
                   int64_t tokens, int64_t n, int64_t rank, double alpha, DropoutKey key, cudaStream_t stream) {
  const bool x_vector = ldx % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  const int64_t chunk = ((tokens + splits - 1) / splits + 15) / 16 * 16;
  const dim3 grid(static_cast<unsigned>((n + kGradAColumns - 1) / kGradAColumns),
                  static_cast<unsigned>((splits + kGradAWarps - 1) / kGradAWarps));
  grad_A_mma_kernel<T, kRankSteps><<<grid, kGradAWarps * 32, 0, stream>>>(x, ldx, x_vector, g, ldg, partial, splits,
                                                                            chunk, tokens, n, rank, key);
  const int64_t elements = rank * n;
  const int threads = 256;
  const auto blocks = static_cast<unsigned>(
      std::min<int64_t>((elements + threads - 1) / threads, int64_t(multiprocessor_count()) * 8));
  grad_A_reduce_kernel<T><<<blocks, threads, 0, stream>>>(partial, out, splits, elements, static_cast<float>(alpha));
}

template <typename T, int kRankSteps>
void launch_project(const T* x, int64_t ldx, const T* lora_A, T* h, int64_t tokens, int64_t n, int64_t rank,
                    DropoutKey key, cudaStream_t stream) {
  const bool x_paired = ldx % 2 == 0 && reinterpret_cast<uintptr_t>(x) % 4 == 0;
  const bool a_paired = n % 2 == 0 && reinterpret_cast<uintptr_t>(lora_A) % 4 == 0;
  const dim3 grid(static_cast<unsigned>((tokens + 15) / 16));
  project_mma_kernel<T, kRankSteps><<<grid, kProjectWarps * 32, 0, stream>>>(x, ldx, x_paired, lora_A, a_paired, h,
                                                                               tokens, n, rank, key);
}

template <typename T, int kRankSteps>
void launch_addmm(T* dx, int64_t lddx, const T* g, int64_t ldg, const T* lora_A, int64_t tokens, int64_t n,
                  int64_t rank, double alpha, DropoutKey key, cudaStream_t stream) {
  const bool dx_paired = lddx % 2 == 0 && reinterpret_cast<uintptr_t>(dx) % 4 == 0;
  const int64_t columns_per_block = int64_t(kAddmmWarps) * kAddmmColumns;
  const dim3 grid(static_cast<unsigned>((n + columns_per_block - 1) / columns_per_block),
                  static_cast<unsigned>(std::min<int64_t>((tokens + kAddmmTokens - 1) / kAddmmTokens, 65535)));
  addmm_mma_kernel<T, kRankSteps><<<grid, kAddmmWarps * 32, 0, stream>>>(dx, lddx, dx_paired, g, ldg, lora_A, tokens,
                                                                           n, rank, static_cast<float>(alpha), key);
}

}  // namespace

int64_t lora_dropout_grad_A_splits(int64_t tokens, int64_t n) {
  // About 8 warps per multiprocessor in all, each over at least 128 tokens.
  const int64_t column_tiles = std::max<int64_t>((n + kGradAColumns - 1) / kGradAColumns, 1);
  const int64_t wanted = (int64_t(multiprocessor_count()) * 8 + column_tiles - 1) / column_tiles;
  return std::max<int64_t>(std::min<int64_t>(wanted, (tokens + 127) / 128), 1);
}

bool lora_dropout_mma_supported(int64_t rank) {
  return rank >= 1 && rank <= 16 * kMaxRankSteps && compute_capability_major() >= 8;
}

template <typename T>
void lora_dropout_project(const T* x, int64_t ldx, const T* lora_A, T* h, int64_t tokens, int64_t n, int64_t rank,
                          DropoutKey key, cudaStream_t stream) {
  if (tokens == 0 || rank == 0) return;
  switch ((rank + 15) / 16) {
    case 1: launch_project<T, 1>(x, ldx, lora_A, h, tokens, n, rank, key, stream); break;
    case 2: launch_project<T, 2>(x, ldx, lora_A, h, tokens, n, rank, key, stream); break;
    case 3: launch_project<T, 3>(x, ldx, lora_A, h, tokens, n, rank, key, stream); break;
    default: launch_project<T, 4>(x, ldx, lora_A, h, tokens, n, rank, key, stream); break;
  }
}

template <typename T>
void lora_dropout_addmm(T* dx, int64_t lddx, const T* g, int64_t ldg, const T* lora_A, int64_t tokens, int64_t n,
                        int64_t rank, double alpha, DropoutKey key, cudaStream_t stream) {
  if (tokens == 0 || n == 0 || rank == 0) return;
  switch ((rank + 15) / 16) {
    case 1: launch_addmm<T, 1>(dx, lddx, g, ldg, lora_A, tokens, n, rank, alpha, key, stream); break;
    case 2: launch_addmm<T, 2>(dx, lddx, g, ldg, lora_A, tokens, n, rank, alpha, key, stream); break;
    case 3: launch_addmm<T, 3>(dx, lddx, g, ldg, lora_A, tokens, n, rank, alpha, key, stream); break;
    default: launch_addmm<T, 4>(dx, lddx, g, ldg, lora_A, tokens, n, rank, alpha, key, stream); break;
  }
}

template <typename T>
void lora_dropout_grad_A(const T* x, int64_t ldx, const T* g, int64_t ldg, T* out, float* partial, int64_t splits,
                         int64_t tokens, int64_t n, int64_t rank, double alpha, DropoutKey key, cudaStream_t stream) {
  if (n == 0 || rank == 0) return;
  switch ((rank + 15) / 16) {
    case 1: launch_grad_A<T, 1>(x, ldx, g, ldg, out, partial, splits, tokens, n, rank, alpha, key, stream); break;
    case 2: launch_grad_A<T, 2>(x, ldx, g, ldg, out, partial, splits, tokens, n, rank, alpha, key, stream); break;
    case 3: launch_grad_A<T, 3>(x, ldx, g, ldg, out, partial, splits, tokens, n, rank, alpha, key, stream); break;
    default: launch_grad_A<T, 4>(x, ldx, g, ldg, out, partial, splits, tokens, n, rank, alpha, key, stream); break;
  }
}

#define ROSA_INSTANTIATE_LORA_DROPOUT_MMA(T)                                                                \
  template void lora_dropout_project<T>(const T*, int64_t, const T*, T*, int64_t, int64_t, int64_t, DropoutKey, \
                                        cudaStream_t);                                                      \
  template void lora_dropout_addmm<T>(T*, int64_t, const T*, int64_t, const T*, int64_t, int64_t, int64_t, double, \
                                      DropoutKey, cudaStream_t);                                             \
  template void lora_dropout_grad_A<T>(const T*, int64_t, const T*, int64_t, T*, float*, int64_t, int64_t, int64_t, \
                                       int64_t, double, DropoutKey, cudaStream_t);
ROSA_INSTANTIATE_LORA_DROPOUT_MMA(__half)
ROSA_INSTANTIATE_LORA_DROPOUT_MMA(__nv_bfloat16)

}  // namespace rosa::cuda
