// CPU kernels of RosaLinear's LoRA dropout, with keep(t, j) the counter-based mask of
// dropout_keep.h (regenerated from the seed, never stored):
//
//     apply:  out = X ∘ keep               (T x N)   the dropped input, without the 1 / (1 - p)
//     add:    dX += alpha * keep ∘ G        (T x N)   in place
//     project: h = (X ∘ keep) A^T           (T x R)   the LoRA down-projection of the dropped input
//     addmm:  dX += alpha * keep ∘ (G A)    (T x N)   in place, G = dY B (T x R)
//
// Rows have unit column stride and their own row strides. Rows are split over the OpenMP
// threads; every element is computed the same way whatever the thread count.
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/common.h"
#include "dropout_keep.h"

namespace rosa::cpu {

template <typename T>
void lora_dropout_apply(const T* x, int64_t ldx, T* out, int64_t ldo, int64_t tokens, int64_t n, DropoutKey key,
                        int threads) {
  parallel_for(tokens, threads, 16, [&](int64_t t) {
    const uint32_t row_key = dropout_row_key(key, t);
    const T* x_row = x + t * ldx;
    T* out_row = out + t * ldo;
    for (int64_t j = 0; j < n; ++j) out_row[j] = dropout_keep(row_key, j, key.threshold) ? x_row[j] : T(0);
  });
}

template <typename T>
void lora_dropout_add(T* dx, int64_t lddx, const T* g, int64_t ldg, int64_t tokens, int64_t n, double alpha,
                      DropoutKey key, int threads) {
  using Acc = accumulator_t<T>;
  const Acc scale = static_cast<Acc>(alpha);
  parallel_for(tokens, threads, 16, [&](int64_t t) {
    const uint32_t row_key = dropout_row_key(key, t);
    T* dx_row = dx + t * lddx;
    const T* g_row = g + t * ldg;
    for (int64_t j = 0; j < n; ++j)
      if (dropout_keep(row_key, j, key.threshold))
        dx_row[j] = static_cast<T>(static_cast<Acc>(dx_row[j]) + scale * static_cast<Acc>(g_row[j]));
  });
}

// h (tokens x rank, row stride ldh) = (X ∘ keep) A^T, A (rank x n) contiguous: each sum in the
// accumulator type, rounded once.
template <typename T>
void lora_dropout_project(const T* x, int64_t ldx, const T* lora_A, T* h, int64_t ldh, int64_t tokens, int64_t n,
                          int64_t rank, DropoutKey key, int threads) {
  using Acc = accumulator_t<T>;
  parallel_for(tokens, threads, 16, [&](int64_t t) {
    const uint32_t row_key = dropout_row_key(key, t);
    const T* x_row = x + t * ldx;
    std::vector<Acc> kept(static_cast<size_t>(n));
    for (int64_t j = 0; j < n; ++j)
      kept[j] = dropout_keep(row_key, j, key.threshold) ? static_cast<Acc>(x_row[j]) : Acc(0);
    for (int64_t r = 0; r < rank; ++r) {
      const T* a_row = lora_A + r * n;
      Acc sum = 0;
      for (int64_t j = 0; j < n; ++j) sum += kept[j] * static_cast<Acc>(a_row[j]);
      h[t * ldh + r] = static_cast<T>(sum);
    }
  });
}

// dX += alpha * keep ∘ (G A), G (tokens x rank, row stride ldg), A (rank x n) contiguous: each
// element of G A summed in the accumulator type and added unrounded, one rounding per element.
template <typename T>
void lora_dropout_addmm(T* dx, int64_t lddx, const T* g, int64_t ldg, const T* lora_A, int64_t tokens, int64_t n,
                        int64_t rank, double alpha, DropoutKey key, int threads) {
  using Acc = accumulator_t<T>;
  const Acc scale = static_cast<Acc>(alpha);
  parallel_for(tokens, threads, 16, [&](int64_t t) {
    const uint32_t row_key = dropout_row_key(key, t);
    const T* g_row = g + t * ldg;
    std::vector<Acc> product(static_cast<size_t>(n), Acc(0));
    for (int64_t r = 0; r < rank; ++r) {
      const Acc gr = static_cast<Acc>(g_row[r]);
      const T* a_row = lora_A + r * n;
      for (int64_t j = 0; j < n; ++j) product[j] += gr * static_cast<Acc>(a_row[j]);
    }
    T* dx_row = dx + t * lddx;
    for (int64_t j = 0; j < n; ++j)
      if (dropout_keep(row_key, j, key.threshold))
        dx_row[j] = static_cast<T>(static_cast<Acc>(dx_row[j]) + scale * product[j]);
  });
}

}  // namespace rosa::cpu
