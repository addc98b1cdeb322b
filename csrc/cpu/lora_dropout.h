// CPU kernels of RosaLinear's LoRA dropout, with keep(t, j) the counter-based mask of
// dropout_keep.h (regenerated from the seed, never stored):
//
//     apply:  out = X ∘ keep               (T x N)   the dropped input, without the 1 / (1 - p)
//     add:    dX += alpha * keep ∘ G        (T x N)   in place
//
// Rows have unit column stride and their own row strides. Rows are split over the OpenMP
// threads; every element is computed the same way whatever the thread count.
#pragma once

#include <cstdint>

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

}  // namespace rosa::cpu
