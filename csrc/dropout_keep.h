// The keep mask of RosaLinear's LoRA dropout, shared by the CPU and CUDA kernels.
//
// Whether element (t, j) of the T x N input survives dropout is a pure function of a 64-bit seed and
// (t, j): a counter-based hash, so backward regenerates the mask instead of saving a T x N one, and
// the CPU and the GPU draw the same mask from the same seed. The hash is Wellons' "lowbias32"
// integer mixer: a per-row key mixes the token index with the seed once per row; each element then
// costs one mix of (row key + j * golden ratio):
//
//     row_key(t)  = mix(uint32(t) ^ seed_lo) ^ seed_hi
//     keep(t, j)  = mix(row_key(t) + uint32(j) * 0x9E3779B9) >= threshold
//
// with threshold = round(p * 2^32): an element is dropped with probability p (to 2^-32).
// python/rosa_kernels/dropout.py holds the same function written with torch integer ops (the
// reference of the tests).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define ROSA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define ROSA_HOST_DEVICE inline
#endif

namespace rosa {

ROSA_HOST_DEVICE uint32_t dropout_mix(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// The seed's two halves and the drop threshold. A CUDA launch may instead point at the seed in
// device memory (seed_device): the kernel reads it there, so a captured CUDA graph draws a fresh
// mask on every replay and nothing waits for the host.
struct DropoutKey {
  uint32_t seed_lo, seed_hi, threshold;
  const int64_t* seed_device = nullptr;
};

// The key with the seed's halves filled in: from seed_device where set (device code only), else as is.
ROSA_HOST_DEVICE DropoutKey dropout_resolve_key(DropoutKey key) {
#if defined(__CUDA_ARCH__)
  if (key.seed_device != nullptr) {
    const uint64_t bits = static_cast<uint64_t>(*key.seed_device);
    key.seed_lo = static_cast<uint32_t>(bits);
    key.seed_hi = static_cast<uint32_t>(bits >> 32);
  }
#endif
  return key;
}

ROSA_HOST_DEVICE uint32_t dropout_row_key(const DropoutKey& key, int64_t t) {
  return dropout_mix(static_cast<uint32_t>(t) ^ key.seed_lo) ^ key.seed_hi;
}

ROSA_HOST_DEVICE bool dropout_keep(uint32_t row_key, int64_t j, uint32_t threshold) {
  return dropout_mix(row_key + static_cast<uint32_t>(j) * 0x9E3779B9U) >= threshold;
}

// round(p * 2^32), for a drop probability p in [0, 1).
inline uint32_t dropout_threshold(double p) {
  const double scaled = std::nearbyint(p * 4294967296.0);
  return scaled <= 0.0 ? 0U : scaled >= 4294967295.0 ? 0xFFFFFFFFU : static_cast<uint32_t>(scaled);
}

inline DropoutKey dropout_key(int64_t seed, double p) {
  const uint64_t bits = static_cast<uint64_t>(seed);
  return DropoutKey{static_cast<uint32_t>(bits), static_cast<uint32_t>(bits >> 32), dropout_threshold(p)};
}

// A key whose seed a CUDA kernel reads from device memory.
inline DropoutKey dropout_device_key(const int64_t* seed_device, double p) {
  return DropoutKey{0U, 0U, dropout_threshold(p), seed_device};
}

}  // namespace rosa
