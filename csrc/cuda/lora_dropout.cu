// CUDA kernels of RosaLinear's LoRA dropout, with keep(t, j) the counter-based mask of
// dropout_keep.h (regenerated from the seed, never stored):
//
//     apply:  out = X ∘ keep            one read of X, one write of out
//     add:    dX += alpha * keep ∘ G     one read of G, one read and one write of dX
//
// The LoRA products around them are cuBLAS GEMMs (python/rosa_kernels/linear.py): an earlier
// version fused the rank-16 products into these passes on CUDA cores and ran 3-5x slower than the
// GEMM + elementwise pair (docs/benchmarks.md; the history in git at c550a82).
//
// Work split: blockIdx.y strides over rows; a thread owns 8 consecutive elements of a row
// (one 16-byte access for 16-bit types when the row stride and the pointer allow, scalar code
// otherwise), blockIdx.x the column range. Memory-bound: the hash costs ~10 integer operations
// per element, below the bytes' time.
#include "cuda/lora_dropout.h"

#include <algorithm>

#include "cuda/common.cuh"

namespace rosa::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kE = 8;  // elements per thread
constexpr int64_t kMaxRowBlocks = 65535;

template <typename T>
struct alignas(std::min<int>(16, kE * static_cast<int>(sizeof(T)))) Pack {
  T v[kE];
};

template <typename T>
bool vector_ok(const T* base, int64_t ld) {
  constexpr int align = std::min<int>(16, kE * static_cast<int>(sizeof(T)));
  return ld % kE == 0 && reinterpret_cast<uintptr_t>(base) % align == 0;
}

template <typename T>
__device__ __forceinline__ void load_chunk(const T* row, int64_t col, int64_t n, bool vector,
                                           accumulator_t<T> (&out)[kE]) {
  if (vector && col + kE <= n) {
    const Pack<T> pack = *reinterpret_cast<const Pack<T>*>(row + col);
#pragma unroll
    for (int e = 0; e < kE; ++e) out[e] = to_acc(pack.v[e]);
  } else {
#pragma unroll
    for (int e = 0; e < kE; ++e) out[e] = col + e < n ? to_acc(row[col + e]) : accumulator_t<T>(0);
  }
}

template <typename T>
__device__ __forceinline__ void store_chunk(T* row, int64_t col, int64_t n, bool vector,
                                            const accumulator_t<T> (&in)[kE]) {
  if (vector && col + kE <= n) {
    Pack<T> pack;
#pragma unroll
    for (int e = 0; e < kE; ++e) pack.v[e] = from_acc<T>(in[e]);
    *reinterpret_cast<Pack<T>*>(row + col) = pack;
  } else {
#pragma unroll
    for (int e = 0; e < kE; ++e)
      if (col + e < n) row[col + e] = from_acc<T>(in[e]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    apply_kernel(const T* __restrict__ x, int64_t ldx, bool x_vector, T* __restrict__ out, int64_t ldo,
                 bool out_vector, int64_t tokens, int64_t n, DropoutKey key) {
  key = dropout_resolve_key(key);
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kE;
  if (col >= n) return;
  for (int64_t t = blockIdx.y; t < tokens; t += gridDim.y) {
    accumulator_t<T> v[kE];
    load_chunk<T>(x + t * ldx, col, n, x_vector, v);
    const uint32_t row_key = dropout_row_key(key, t);
#pragma unroll
    for (int e = 0; e < kE; ++e)
      if (!dropout_keep(row_key, col + e, key.threshold)) v[e] = accumulator_t<T>(0);
    store_chunk<T>(out + t * ldo, col, n, out_vector, v);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    add_kernel(T* __restrict__ dx, int64_t lddx, bool dx_vector, const T* __restrict__ g, int64_t ldg,
               bool g_vector, int64_t tokens, int64_t n, accumulator_t<T> alpha, DropoutKey key) {
  key = dropout_resolve_key(key);
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kE;
  if (col >= n) return;
  for (int64_t t = blockIdx.y; t < tokens; t += gridDim.y) {
    accumulator_t<T> d[kE], v[kE];
    load_chunk<T>(g + t * ldg, col, n, g_vector, v);
    load_chunk<T>(dx + t * lddx, col, n, dx_vector, d);
    const uint32_t row_key = dropout_row_key(key, t);
#pragma unroll
    for (int e = 0; e < kE; ++e)
      if (dropout_keep(row_key, col + e, key.threshold)) d[e] += alpha * v[e];
    store_chunk<T>(dx + t * lddx, col, n, dx_vector, d);
  }
}

dim3 grid_for(int64_t tokens, int64_t n) {
  const int64_t columns_per_block = int64_t(kThreads) * kE;
  return dim3(static_cast<unsigned>((n + columns_per_block - 1) / columns_per_block),
              static_cast<unsigned>(std::min<int64_t>(tokens, kMaxRowBlocks)));
}

}  // namespace

template <typename T>
void lora_dropout_apply(const T* x, int64_t ldx, T* out, int64_t ldo, int64_t tokens, int64_t n, DropoutKey key,
                        cudaStream_t stream) {
  if (tokens == 0 || n == 0) return;
  apply_kernel<T><<<grid_for(tokens, n), kThreads, 0, stream>>>(x, ldx, vector_ok(x, ldx), out, ldo,
                                                                 vector_ok(out, ldo), tokens, n, key);
}

template <typename T>
void lora_dropout_add(T* dx, int64_t lddx, const T* g, int64_t ldg, int64_t tokens, int64_t n, double alpha,
                      DropoutKey key, cudaStream_t stream) {
  if (tokens == 0 || n == 0) return;
  add_kernel<T><<<grid_for(tokens, n), kThreads, 0, stream>>>(dx, lddx, vector_ok(dx, lddx), g, ldg,
                                                               vector_ok(g, ldg), tokens, n,
                                                               static_cast<accumulator_t<T>>(alpha), key);
}

#define ROSA_INSTANTIATE_LORA_DROPOUT(T)                                                              \
  template void lora_dropout_apply<T>(const T*, int64_t, T*, int64_t, int64_t, int64_t, DropoutKey,     \
                                      cudaStream_t);                                                  \
  template void lora_dropout_add<T>(T*, int64_t, const T*, int64_t, int64_t, int64_t, double, DropoutKey, \
                                    cudaStream_t);
ROSA_INSTANTIATE_LORA_DROPOUT(float)
ROSA_INSTANTIATE_LORA_DROPOUT(double)
ROSA_INSTANTIATE_LORA_DROPOUT(__half)
ROSA_INSTANTIATE_LORA_DROPOUT(__nv_bfloat16)

}  // namespace rosa::cuda
