// Shared-memory staging of dense operand tiles for the CUDA SDDMM (torch-free).
//
// A "slot" is 16 bytes holding the values of one matrix row (a row of `a` or of `bt`) at
// kSlotTokens<T> consecutive inner positions (tokens): 8 for bf16/fp16, 4 for fp32, 2 for fp64.
// The SDDMM kernel stages, per chunk of tokens, one slot per row of a window of rows, then every
// nonzero reads one slot of each operand with a single 16-byte shared-memory load.
//
// Three ways to fill slots, picked per operand on the host:
//  - kRowVector: the operand is row-major (column stride 1) and 16-byte aligned: a slot is one
//    16-byte global load.
//  - kTokenVector: the operand is a transposed view of a row-major matrix (row stride 1), e.g.
//    a = dY.t() with dY (tokens x m): one 16-byte global load holds kSlotTokens rows at one token,
//    so a thread loads a kSlotTokens x kSlotTokens square (coalesced along the rows) and
//    transposes it in registers into kSlotTokens slots.
//  - kScalar: anything else (any strides, misaligned views): element loads.
// Positions past the end of the token range are filled with zeros, so a partial chunk adds 0.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace rosa::cuda::detail {

template <typename T>
constexpr int kSlotTokens = 16 / static_cast<int>(sizeof(T));

enum StageMode : int { kScalar = 0, kRowVector = 1, kTokenVector = 2 };

// Slots are permuted inside each group of 8 so that 8 consecutive lanes writing slot r, r + 8,
// r + 16, ... (the transposing path) or r, r + 1, ... (the row path) hit 8 different 16-byte bank
// groups. Maps [8q, 8q + 8) onto itself.
__device__ __forceinline__ int swizzle(int slot) { return slot ^ ((slot >> 3) & 7); }

template <typename T>
union SlotValues {
  uint4 bits;
  T values[kSlotTokens<T>];
};

// Fills slots [0, row_count) of `slots` with rows [row_begin, row_begin + row_count) of `src`
// (element (r, t) at src[r * row_stride + t * col_stride]) at tokens [t0, t0 + kSlotTokens),
// of which the first `token_count` are inside the operand. Rows past row_count are not written.
// Slots whose group of 8 has its bit clear in `needed` (one bit per 8 slots) are skipped; pass
// nullptr to stage all.
template <typename T, int kThreads>
__device__ __forceinline__ void stage_slots(uint4* __restrict__ slots, const T* __restrict__ src,
                                            int64_t row_stride, int64_t col_stride, int mode,
                                            int64_t row_begin, int row_count, int64_t t0,
                                            int token_count,
                                            const uint32_t* __restrict__ needed) {
  constexpr int kTokens = kSlotTokens<T>;
  auto is_needed = [&](int slot) {
    return needed == nullptr || ((needed[slot >> 8] >> ((slot >> 3) & 31)) & 1u);
  };
  auto stage_scalar = [&](int r) {
    SlotValues<T> slot;
    const T* row = src + (row_begin + r) * row_stride + t0 * col_stride;
#pragma unroll
    for (int t = 0; t < kTokens; ++t) {
      slot.values[t] = t < token_count ? row[t * col_stride] : T(0.0f);
    }
    slots[swizzle(r)] = slot.bits;
  };

  if (mode == kTokenVector) {
    // Groups of kTokens rows; one aligned 16-byte load per token covers the group.
    const int groups = row_count / kTokens;
    for (int g = threadIdx.x; g < groups; g += kThreads) {
      const int r = g * kTokens;
      if (!is_needed(r)) continue;
      const T* base = src + (row_begin + r) + t0 * col_stride;
      SlotValues<T> loaded[kTokens];
#pragma unroll
      for (int t = 0; t < kTokens; ++t) {
        loaded[t].bits = t < token_count
                             ? __ldg(reinterpret_cast<const uint4*>(base + t * col_stride))
                             : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int c = 0; c < kTokens; ++c) {
        SlotValues<T> slot;
#pragma unroll
        for (int t = 0; t < kTokens; ++t) slot.values[t] = loaded[t].values[c];
        slots[swizzle(r + c)] = slot.bits;
      }
    }
    for (int r = groups * kTokens + threadIdx.x; r < row_count; r += kThreads) {
      if (is_needed(r)) stage_scalar(r);
    }
  } else if (mode == kRowVector && token_count == kTokens) {
    for (int r = threadIdx.x; r < row_count; r += kThreads) {
      if (!is_needed(r)) continue;
      slots[swizzle(r)] = __ldg(reinterpret_cast<const uint4*>(src + (row_begin + r) * row_stride + t0));
    }
  } else {
    for (int r = threadIdx.x; r < row_count; r += kThreads) {
      if (is_needed(r)) stage_scalar(r);
    }
  }
}

}  // namespace rosa::cuda::detail
