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

// An attribute of the current device, cached per device and attribute for the attributes listed
// here, queried each time for any other (host queries only, no synchronization; the cache races
// are benign: every writer stores the same value).
inline int device_attribute(cudaDeviceAttr attribute, int fallback) {
  constexpr int kCachedDevices = 64;
  static int cached[3][kCachedDevices] = {};
  const int which = attribute == cudaDevAttrMultiProcessorCount             ? 0
                    : attribute == cudaDevAttrMaxSharedMemoryPerBlockOptin ? 1
                    : attribute == cudaDevAttrComputeCapabilityMajor       ? 2
                                                                           : -1;
  int device = 0;
  cudaGetDevice(&device);
  const bool cacheable = which >= 0 && device >= 0 && device < kCachedDevices;
  if (cacheable && cached[which][device] != 0) return cached[which][device];
  int value = 0;
  cudaDeviceGetAttribute(&value, attribute, device);
  if (value <= 0) value = fallback;
  if (cacheable) cached[which][device] = value;
  return value;
}

// The number of multiprocessors of the current device.
inline int multiprocessor_count() { return device_attribute(cudaDevAttrMultiProcessorCount, 1); }

// The most dynamic shared memory one block of the current device may opt in to.
inline int max_shared_memory_per_block() {
  return device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, 48 * 1024);
}

// The major compute capability of the current device (8 for A100, 9 for H100).
inline int compute_capability_major() { return device_attribute(cudaDevAttrComputeCapabilityMajor, 0); }

}  // namespace rosa::cuda
