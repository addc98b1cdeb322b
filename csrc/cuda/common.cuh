// Device helpers shared by the CUDA kernels (torch-free): the accumulator type of each value type,
// conversions to and from it, and 16-byte vector access. float, __half and __nv_bfloat16
// accumulate in float32, double in float64.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace rosa::cuda {

template <typename T>
struct Accumulator { using type = float; };
template <>
struct Accumulator<double> { using type = double; };
template <typename T>
using accumulator_t = typename Accumulator<T>::type;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(accumulator_t<T> x) { return static_cast<T>(x); }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Elements of T in one 16-byte access.
template <typename T>
constexpr int kVectorElements = 16 / static_cast<int>(sizeof(T));

inline bool is_aligned16(const void* pointer) {
  return reinterpret_cast<uintptr_t>(pointer) % 16 == 0;
}

// The number of multiprocessors of the current device (cached per device; a host query, no sync).
inline int multiprocessor_count() {
  static int cached[64] = {};
  int device = 0;
  cudaGetDevice(&device);
  if (device < 0 || device >= 64) device = 0;
  if (cached[device] == 0) {
    int count = 0;
    cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
    cached[device] = count > 0 ? count : 1;
  }
  return cached[device];
}

// The most dynamic shared memory one block of the current device may opt in to.
inline int max_shared_memory_per_block() {
  static int cached[64] = {};
  int device = 0;
  cudaGetDevice(&device);
  if (device < 0 || device >= 64) device = 0;
  if (cached[device] == 0) {
    int bytes = 0;
    cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    cached[device] = bytes > 0 ? bytes : 48 * 1024;
  }
  return cached[device];
}

}  // namespace rosa::cuda
