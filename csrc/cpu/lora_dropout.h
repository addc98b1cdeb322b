// CPU kernels of RosaLinear's fused LoRA dropout (see dropout_keep.h for the keep mask):
//
//     project:  h  (T x R)  = (X ∘ keep) A^T              the LoRA down-projection of drop(X)
//     grad_A:   dA (R x N)  = alpha * G^T (X ∘ keep)      G = dY B (T x R)
//     grad_x:   dX (T x N) += alpha * keep ∘ (G A)        in place
//
// X, dX: T x N with unit column stride and row stride ld*; A: R x N contiguous; G: T x R
// contiguous. No 1 / (1 - p) factor anywhere: the caller folds it into alpha. Rows are split over
// the OpenMP threads (grad_A: column blocks, each summed over all t in order), so the results do not
// depend on the thread count. Accumulation in float32 (float64 for double).
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/common.h"
#include "dropout_keep.h"

namespace rosa::cpu {

// body(begin, end) over `threads` contiguous ranges of [0, count): each range gets its scratch once.
template <typename Body>
void for_each_range(int64_t count, int threads, const Body& body) {
  const int64_t ranges = std::max<int64_t>(1, std::min<int64_t>(threads, count));
  const auto run = [&](int64_t range) {
    body(count * range / ranges, count * (range + 1) / ranges);
  };
#ifdef ROSA_WITH_OPENMP
  if (ranges > 1) {
#pragma omp parallel for schedule(static, 1) num_threads(static_cast<int>(ranges))
    for (int64_t range = 0; range < ranges; ++range) run(range);
    return;
  }
#endif
  for (int64_t range = 0; range < ranges; ++range) run(range);
}

template <typename T>
void lora_dropout_project(const T* x, int64_t ldx, const T* lora_A, T* h, int64_t tokens, int64_t n,
                          int64_t rank, DropoutKey key, int threads) {
  using Acc = accumulator_t<T>;
  if (tokens == 0 || rank == 0) return;
  std::vector<Acc> a_acc(static_cast<size_t>(rank * n));
  for (int64_t i = 0; i < rank * n; ++i) a_acc[i] = static_cast<Acc>(lora_A[i]);
  for_each_range(tokens, threads, [&](int64_t begin, int64_t end) {
    std::vector<Acc> kept(static_cast<size_t>(n));
    for (int64_t t = begin; t < end; ++t) {
      const uint32_t row_key = dropout_row_key(key, t);
      const T* x_row = x + t * ldx;
      for (int64_t j = 0; j < n; ++j)
        kept[j] = dropout_keep(row_key, j, key.threshold) ? static_cast<Acc>(x_row[j]) : Acc(0);
      for (int64_t r = 0; r < rank; ++r) {
        const Acc* a_row = a_acc.data() + r * n;
        Acc sum = 0;
        for (int64_t j = 0; j < n; ++j) sum += kept[j] * a_row[j];
        h[t * rank + r] = static_cast<T>(sum);
      }
    }
  });
}

template <typename T>
void lora_dropout_grad_A(const T* g, const T* x, int64_t ldx, T* grad_A, int64_t tokens, int64_t n,
                         int64_t rank, double alpha, DropoutKey key, int threads) {
  using Acc = accumulator_t<T>;
  if (rank == 0 || n == 0) return;
  constexpr int64_t kBlock = 256;  // columns per task
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  for_each_range(blocks, threads, [&](int64_t first, int64_t last) {
    std::vector<Acc> sums(static_cast<size_t>(rank * kBlock));
    std::vector<Acc> kept(kBlock);
    for (int64_t b = first; b < last; ++b) {
      const int64_t j0 = b * kBlock, width = std::min(kBlock, n - j0);
      std::fill(sums.begin(), sums.end(), Acc(0));
      for (int64_t t = 0; t < tokens; ++t) {
        const uint32_t row_key = dropout_row_key(key, t);
        const T* x_row = x + t * ldx + j0;
        for (int64_t c = 0; c < width; ++c)
          kept[c] = dropout_keep(row_key, j0 + c, key.threshold) ? static_cast<Acc>(x_row[c]) : Acc(0);
        for (int64_t r = 0; r < rank; ++r) {
          const Acc gr = static_cast<Acc>(g[t * rank + r]);
          Acc* row_sums = sums.data() + r * kBlock;
          for (int64_t c = 0; c < width; ++c) row_sums[c] += gr * kept[c];
        }
      }
      for (int64_t r = 0; r < rank; ++r)
        for (int64_t c = 0; c < width; ++c)
          grad_A[r * n + j0 + c] = static_cast<T>(static_cast<Acc>(alpha) * sums[r * kBlock + c]);
    }
  });
}

template <typename T>
void lora_dropout_grad_x(T* dx, int64_t lddx, const T* g, const T* lora_A, int64_t tokens, int64_t n,
                         int64_t rank, double alpha, DropoutKey key, int threads) {
  using Acc = accumulator_t<T>;
  if (tokens == 0 || n == 0) return;
  std::vector<Acc> a_acc(static_cast<size_t>(rank * n));
  for (int64_t i = 0; i < rank * n; ++i) a_acc[i] = static_cast<Acc>(lora_A[i]);
  for_each_range(tokens, threads, [&](int64_t begin, int64_t end) {
    std::vector<Acc> product(static_cast<size_t>(n));
    for (int64_t t = begin; t < end; ++t) {
      std::fill(product.begin(), product.end(), Acc(0));
      for (int64_t r = 0; r < rank; ++r) {  // (G A)[t, :]
        const Acc gr = static_cast<Acc>(g[t * rank + r]);
        const Acc* a_row = a_acc.data() + r * n;
        for (int64_t j = 0; j < n; ++j) product[j] += gr * a_row[j];
      }
      const uint32_t row_key = dropout_row_key(key, t);
      T* dx_row = dx + t * lddx;
      for (int64_t j = 0; j < n; ++j)
        if (dropout_keep(row_key, j, key.threshold))
          dx_row[j] = static_cast<T>(static_cast<Acc>(dx_row[j]) + static_cast<Acc>(alpha) * product[j]);
    }
  });
}

}  // namespace rosa::cpu
