// Shared helpers of the CPU kernels: the accumulator type of each value type, OpenMP plumbing and
// the runtime choice between a generic build of a kernel and an AVX2+FMA build of it.
// Nothing here knows torch: value types only need conversions to and from float/double.
#pragma once

// The vector helpers are always inlined, so the ABI of passing AVX vectors never applies.
#pragma GCC diagnostic ignored "-Wpsabi"

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#ifdef ROSA_WITH_OPENMP
#include <omp.h>
#endif

// The package is built for the generic x86-64 baseline (SSE2), so that one wheel runs anywhere.
// The inner loops are also compiled a second time for AVX2 + FMA (twice the vector width, fused
// multiply-add) and the faster build is chosen once at run time when the CPU has it.
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define ROSA_CPU_MULTIVERSION 1
#define ROSA_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define ROSA_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define ROSA_CPU_MULTIVERSION 0
#define ROSA_TARGET_AVX2
#define ROSA_ALWAYS_INLINE inline
#endif

namespace rosa::cpu {

// float32 accumulation for float and the 16-bit types, float64 for double.
template <typename T>
using accumulator_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// 32 bytes of accumulators as one GCC/Clang vector (8 floats or 4 doubles): one AVX2 register,
// two SSE2 ones. Written with vector types rather than left to the auto-vectorizer, which at -O3
// prefers to unroll-and-jam the nonzero loop into scalar code (measured 8x slower).
template <typename Acc>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32)));
  static constexpr int64_t lanes = 8;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32)));
  static constexpr int64_t lanes = 4;
};

template <typename Acc>
ROSA_ALWAYS_INLINE typename Vec<Acc>::type load_vec(const Acc* source) {
  typename Vec<Acc>::type x;
  __builtin_memcpy(&x, source, sizeof(x));
  return x;
}

template <typename T>
ROSA_ALWAYS_INLINE accumulator_t<T> to_acc(T x) {
  return static_cast<accumulator_t<T>>(x);
}

// True when the AVX2 + FMA builds of the inner loops may run on this CPU.
inline bool cpu_has_avx2_fma() {
#if ROSA_CPU_MULTIVERSION
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

// Threads worth using for `fma_count` multiply-adds: starting a parallel region costs ~10 us
// on a quiet machine and up to a scheduler time slice (~4 ms) on a busy one, so products below
// ~1 M multiply-adds (~0.1 ms on one core) stay on the calling thread.
inline int threads_for(int64_t fma_count, int num_threads) {
  return fma_count < (int64_t(1) << 20) ? 1 : num_threads;
}

// Runs body(i) for i in [0, count), split over num_threads OpenMP threads with dynamic
// scheduling: rows of a sparse matrix differ widely in cost.
template <typename Body>
inline void parallel_for(int64_t count, int num_threads, int64_t chunk, const Body& body) {
#ifdef ROSA_WITH_OPENMP
  if (num_threads > 1 && count > chunk) {
#pragma omp parallel for schedule(dynamic, chunk) num_threads(num_threads)
    for (int64_t i = 0; i < count; ++i) body(i);
    return;
  }
#endif
  for (int64_t i = 0; i < count; ++i) body(i);
}

}  // namespace rosa::cpu

namespace rosa::cpu {

// Scratch memory for converted operands. Requests up to kKeptBytes reuse a per-thread buffer
// that only grows: fresh multi-megabyte allocations come from mmap, whose first-touch page
// faults cost as much as a whole low-density product. Larger requests get memory of their own,
// freed with the Workspace, so no thread keeps hundreds of megabytes alive. Slot tells apart
// buffers in use at the same time.
template <typename Element, int Slot>
class Workspace {
 public:
  explicit Workspace(size_t count) {
    constexpr size_t kKeptBytes = size_t(64) << 20;
    if (count * sizeof(Element) <= kKeptBytes) {
      thread_local std::vector<Element> kept;
      if (kept.size() < count) kept.resize(count);
      data_ = kept.data();
    } else {
      owned_.resize(count);
      data_ = owned_.data();
    }
  }
  Element* data() const { return data_; }

 private:
  std::vector<Element> owned_;
  Element* data_ = nullptr;
};

// The rows of a dense operand that the nonzeros use, in ascending order, and each nonzero's
// column renumbered to its position in that list: rows nobody reads are never packed.
struct UsedRows {
  std::vector<int32_t> rows;
  std::vector<int32_t> renumbered;
};

inline UsedRows used_rows(const int32_t* col_indices, int64_t nnz, int64_t n) {
  UsedRows used;
  std::vector<int32_t> position(static_cast<size_t>(n), -1);
  for (int64_t q = 0; q < nnz; ++q) position[col_indices[q]] = 0;
  for (int64_t j = 0; j < n; ++j) {
    if (position[j] == 0) {
      position[j] = static_cast<int32_t>(used.rows.size());
      used.rows.push_back(static_cast<int32_t>(j));
    }
  }
  used.renumbered.resize(static_cast<size_t>(nnz));
  for (int64_t q = 0; q < nnz; ++q) used.renumbered[q] = position[col_indices[q]];
  return used;
}

}  // namespace rosa::cpu
