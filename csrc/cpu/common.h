// Shared helpers of the CPU kernels: the accumulator type of each value type and OpenMP plumbing.
// Nothing here knows torch: value types only need conversions to and from float/double.
#pragma once

#include <cstdint>
#include <type_traits>

#ifdef ROSA_WITH_OPENMP
#include <omp.h>
#endif

namespace rosa::cpu {

// float32 accumulation for float and the 16-bit types, float64 for double.
template <typename T>
using accumulator_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
inline accumulator_t<T> to_acc(T x) {
  return static_cast<accumulator_t<T>>(x);
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
