// CUDA SDDMM: out[p] = <a[i, :], bt[j, :]> for each nonzero p = (i, j) of an m x n CSR mask,
// a (m x k) and bt (n x k) with any element strides. In RoSA, dS = mask ∘ (dY^T X), so a = dY.t()
// and bt = X.t() are transposed views of row-major activations and k is the number of tokens.
//
// Work split. The nonzeros are cut into blocks of kNonzerosPerBlock consecutive CSR entries
// (so empty rows cost nothing and heavy rows are split evenly), and the inner dimension into
// `splits` token ranges: grid = (nonzero blocks, splits). A thread owns kPerThread nonzeros and
// keeps their partial sums in registers for the whole token range. The token range is walked in
// chunks of kSlotTokens (8 for 16-bit types); per chunk the block stages into shared memory one
// 16-byte slot per row of the window of `a` rows its nonzeros touch, and one per column of `bt`
// that they touch (sddmm_staging.cuh; coalesced for both row-major and transposed operands).
// Each nonzero then costs two 16-byte shared loads and kSlotTokens FMAs per chunk. Loaded `a`
// rows and `bt` columns are reused by every nonzero of the block that shares them, so the hot
// columns of RoSA masks cost one slot per chunk however many nonzeros they hold.
//
// Reduction. With one split the block writes out[] directly. Otherwise each split writes float32
// partial sums (float64 for double) into a stream-ordered workspace and a second kernel adds the
// splits in a fixed order: deterministic, no atomics.
//
// Windows. A block whose rows span more than its row window (about twice the average span of a
// block, at least kRowWindow), or a mask wider than the column slots shared memory holds, walks windows of rows and columns; nonzeros outside the current window point at
// a zero slot. Typical masks need one window of each.
//
// Assumes a validated CSR (offsets nondecreasing, col_indices in [0, n)). Launches on `stream`,
// never synchronizes; addresses are computed in int64.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "cuda/common.cuh"
#include "cuda/sddmm.h"
#include "cuda/sddmm_staging.cuh"

namespace rosa::cuda {
namespace {

using detail::kRowVector;
using detail::kScalar;
using detail::kSlotTokens;
using detail::kTokenVector;
using detail::SlotValues;
using detail::swizzle;

template <typename T>
struct Acc { using type = float; };
template <>
struct Acc<double> { using type = double; };

// Each thread owns kPerThread nonzeros; a block has 256 or 512 threads (the launcher picks).
constexpr int kPerThread = 32;
// The smallest row window (rows of `a` staged at once); the launcher widens it where blocks span
// more rows, up to half the shared memory.
constexpr int kRowWindow = 256;

template <typename T>
struct SddmmParams {
  const int32_t* row_offsets;
  const int32_t* col_indices;
  const T* a;
  const T* bt;
  T* out;
  typename Acc<T>::type* partials;  // splits x nnz, or nullptr when splits == 1
  int64_t a_row_stride, a_col_stride, bt_row_stride, bt_col_stride;
  int64_t m, n, k, nnz;
  int64_t tokens_per_split;
  int a_mode, bt_mode;
  int row_window, column_window;  // slots per window (multiples of 8)
  int column_region;               // 16-byte units before the row slots
};

__device__ __forceinline__ int64_t min64(int64_t x, int64_t y) { return x < y ? x : y; }

// <x, y> over one slot, float32 (float64 for double) accumulation.
__device__ __forceinline__ float slot_dot(uint4 x, uint4 y, float acc, __nv_bfloat16) {
  const uint32_t xs[4] = {x.x, x.y, x.z, x.w}, ys[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    // A bf16 is the top half of a float32: widening is a shift or a mask.
    acc = fmaf(__uint_as_float(xs[w] << 16), __uint_as_float(ys[w] << 16), acc);
    acc = fmaf(__uint_as_float(xs[w] & 0xffff0000u), __uint_as_float(ys[w] & 0xffff0000u), acc);
  }
  return acc;
}
__device__ __forceinline__ float slot_dot(uint4 x, uint4 y, float acc, __half) {
  const uint32_t xs[4] = {x.x, x.y, x.z, x.w}, ys[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    const float2 xf = __half22float2(*reinterpret_cast<const __half2*>(&xs[w]));
    const float2 yf = __half22float2(*reinterpret_cast<const __half2*>(&ys[w]));
    acc = fmaf(xf.x, yf.x, acc);
    acc = fmaf(xf.y, yf.y, acc);
  }
  return acc;
}
__device__ __forceinline__ float slot_dot(uint4 x, uint4 y, float acc, float) {
  acc = fmaf(__uint_as_float(x.x), __uint_as_float(y.x), acc);
  acc = fmaf(__uint_as_float(x.y), __uint_as_float(y.y), acc);
  acc = fmaf(__uint_as_float(x.z), __uint_as_float(y.z), acc);
  return fmaf(__uint_as_float(x.w), __uint_as_float(y.w), acc);
}
__device__ __forceinline__ double slot_dot(uint4 x, uint4 y, double acc, double) {
  acc = fma(__hiloint2double(x.y, x.x), __hiloint2double(y.y, y.x), acc);
  return fma(__hiloint2double(x.w, x.z), __hiloint2double(y.w, y.z), acc);
}

// The last row in [lo, hi] whose offset is <= p: the row holding nonzero p.
__device__ __forceinline__ int row_of(const int32_t* __restrict__ row_offsets, int lo, int hi,
                                      int64_t p) {
  while (lo < hi) {
    const int mid = lo + (hi - lo + 1) / 2;
    if (__ldg(row_offsets + mid) <= p) lo = mid; else hi = mid - 1;
  }
  return lo;
}

template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads, 512 / kThreads)
    sddmm_staged_kernel(const SddmmParams<T> params) {
  using AccT = typename Acc<T>::type;
  constexpr int kTokens = kSlotTokens<T>;
  constexpr int kNonzerosPerBlock = kThreads * kPerThread;
  extern __shared__ uint4 shared_slots[];
  // Layout: column slots [0, column_window + 8) (the +8 holds a zero slot; the region also holds
  // the slot table of the block's nonzeros while a window is set up), row slots
  // [.., + row_window + 8), then one bit per 8 column slots saying whether any nonzero of this
  // block reads them.
  uint4* column_slots = shared_slots;
  uint32_t* slot_table = reinterpret_cast<uint32_t*>(shared_slots);
  uint4* row_slots = shared_slots + params.column_region;
  uint32_t* needed_columns = reinterpret_cast<uint32_t*>(row_slots + params.row_window + 8);
  const int needed_words = params.column_window / 256 + 1;
  const int column_zero = swizzle(params.column_window), row_zero = swizzle(params.row_window);

  const int64_t block_begin = static_cast<int64_t>(blockIdx.x) * kNonzerosPerBlock;
  const int64_t block_end = min(block_begin + kNonzerosPerBlock, params.nnz);
  const int first_row = row_of(params.row_offsets, 0, static_cast<int>(params.m) - 1, block_begin);
  const int last_row = row_of(params.row_offsets, 0, static_cast<int>(params.m) - 1, block_end - 1);

  AccT acc[kPerThread];
#pragma unroll
  for (int s = 0; s < kPerThread; ++s) acc[s] = AccT(0);

  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * params.tokens_per_split;
  const int64_t t_end = min(t_begin + params.tokens_per_split, params.k);
  const T* a = params.a;
  const T* bt = params.bt;

  // Row windows start at a multiple of kTokens so the transposing staging stays 16-byte aligned.
  for (int64_t row_base = first_row / kTokens * kTokens; row_base <= last_row;
       row_base += params.row_window) {
    // Only the rows up to the block's last row are staged, however wide the window.
    const int rows_here = static_cast<int>(min64(params.row_window, last_row + 1 - row_base));
    for (int64_t column_base = 0; column_base < params.n; column_base += params.column_window) {
      const int columns_here =
          static_cast<int>(min64(params.column_window, params.n - column_base));
      __syncthreads();  // the previous window's slots and bits are no longer read
      for (int w = threadIdx.x; w < needed_words; w += kThreads) needed_columns[w] = 0;
      __syncthreads();
      // Packed slot indices (column slot | row slot << 16) of each nonzero of the block in this
      // window, built in a shared table (a loop that keeps few registers live) and then loaded
      // into registers for the token loop. Lane l of step s owns nonzero
      // block_begin + s * kThreads + l: coalesced index loads, and lanes of one row read the same
      // `a` slot (a shared-memory broadcast).
      // The row of a nonzero is a binary search over the row starts of the block, cached in the
      // row-slot space (unused until staging) when they fit; each thread runs kInterleave
      // searches in lockstep so their load latencies overlap.
      int32_t* starts = reinterpret_cast<int32_t*>(row_slots);
      const int span = last_row - first_row + 1;
      const bool cached = span <= 4 * (params.row_window + 8);
      if (cached) {
        for (int i = threadIdx.x; i < span; i += kThreads) {
          starts[i] = __ldg(params.row_offsets + first_row + i);
        }
      }
      __syncthreads();
      int steps = 0;
      while ((1 << steps) < span) ++steps;
      bool any = false;
      constexpr int kInterleave = 4;
      for (int e0 = threadIdx.x; e0 < kNonzerosPerBlock; e0 += kInterleave * kThreads) {
        int low[kInterleave], high[kInterleave];
#pragma unroll
        for (int j = 0; j < kInterleave; ++j) low[j] = 0, high[j] = span - 1;
        for (int step = 0; step < steps; ++step) {
#pragma unroll
          for (int j = 0; j < kInterleave; ++j) {
            const int64_t q = block_begin + e0 + j * kThreads;
            if (low[j] < high[j]) {
              const int mid = low[j] + (high[j] - low[j] + 1) / 2;
              const int64_t start =
                  cached ? starts[mid] : __ldg(params.row_offsets + first_row + mid);
              if (start <= q) low[j] = mid; else high[j] = mid - 1;
            }
          }
        }
#pragma unroll
        for (int j = 0; j < kInterleave; ++j) {
          const int e = e0 + j * kThreads;
          const int64_t q = block_begin + e;
          uint32_t packed =
              static_cast<uint32_t>(column_zero) | (static_cast<uint32_t>(row_zero) << 16);
          if (q < block_end) {
            const int64_t r = first_row + low[j] - row_base;
            const int64_t c = __ldg(params.col_indices + q) - column_base;
            if (r >= 0 && r < rows_here && c >= 0 && c < columns_here) {
              packed = static_cast<uint32_t>(swizzle(static_cast<int>(c))) |
                       (static_cast<uint32_t>(swizzle(static_cast<int>(r))) << 16);
              atomicOr(needed_columns + (c >> 8), 1u << ((c >> 3) & 31));
              any = true;
            }
          }
          slot_table[e] = packed;
        }
      }
      if (!__syncthreads_or(any)) continue;
      uint32_t slot[kPerThread];
#pragma unroll
      for (int s = 0; s < kPerThread; ++s) slot[s] = slot_table[s * kThreads + threadIdx.x];
      __syncthreads();  // the table is read: its space now holds column slots
      if (threadIdx.x == 0) {
        column_slots[column_zero] = make_uint4(0, 0, 0, 0);
        row_slots[row_zero] = make_uint4(0, 0, 0, 0);
      }

      for (int64_t t0 = t_begin; t0 < t_end; t0 += kTokens) {
        const int token_count = static_cast<int>(min64(kTokens, t_end - t0));
        detail::stage_slots<T, kThreads>(row_slots, a, params.a_row_stride, params.a_col_stride,
                                         params.a_mode, row_base, rows_here, t0, token_count,
                                         nullptr);
        detail::stage_slots<T, kThreads>(column_slots, bt, params.bt_row_stride,
                                         params.bt_col_stride, params.bt_mode, column_base,
                                         columns_here, t0, token_count, needed_columns);
        __syncthreads();
#pragma unroll
        for (int s = 0; s < kPerThread; ++s) {
          const uint4 x = column_slots[slot[s] & 0xffffu];
          const uint4 y = row_slots[slot[s] >> 16];
          acc[s] = slot_dot(x, y, acc[s], T());
        }
        __syncthreads();
      }
    }
  }

#pragma unroll
  for (int s = 0; s < kPerThread; ++s) {
    const int64_t q = block_begin + s * kThreads + threadIdx.x;
    if (q >= block_end) continue;
    if (params.partials == nullptr) {
      params.out[q] = static_cast<T>(acc[s]);
    } else {
      params.partials[blockIdx.y * params.nnz + q] = acc[s];
    }
  }
}

// out[p] = sum over splits of partials[split][p], in split order (deterministic).
template <typename T>
__global__ void sddmm_reduce_splits_kernel(const typename Acc<T>::type* __restrict__ partials,
                                           T* __restrict__ out, int64_t nnz, int splits) {
  using AccT = typename Acc<T>::type;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < nnz;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    AccT sum = 0;
    for (int s = 0; s < splits; ++s) sum += partials[s * nnz + q];
    out[q] = static_cast<T>(sum);
  }
}

struct DeviceInfo {
  int multiprocessors = 0;
  int shared_per_block = 0;   // opt-in maximum of dynamic shared memory per block
  int shared_per_sm = 0;
};

DeviceInfo& device_info(int device) {
  static DeviceInfo infos[64];
  DeviceInfo& info = infos[device & 63];
  if (info.multiprocessors == 0) {
    cudaDeviceGetAttribute(&info.multiprocessors, cudaDevAttrMultiProcessorCount, device);
    cudaDeviceGetAttribute(&info.shared_per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    cudaDeviceGetAttribute(&info.shared_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
    if (info.multiprocessors <= 0) info.multiprocessors = 1;
    if (info.shared_per_block < 48 * 1024) info.shared_per_block = 48 * 1024;
  }
  return info;
}

// How an operand's slots are filled: vector paths need unit stride along the direction of the
// 16-byte load, 16-byte alignment of the base and of every row (or token) start.
template <typename T>
int stage_mode(const T* data, int64_t row_stride, int64_t col_stride, int64_t rows, int64_t k) {
  constexpr int kTokens = kSlotTokens<T>;
  const bool aligned = reinterpret_cast<uintptr_t>(data) % 16 == 0;
  if (aligned && (col_stride == 1 || k == 1) && (row_stride % kTokens == 0 || rows == 1)) {
    return kRowVector;
  }
  if (aligned && (row_stride == 1 || rows == 1) && (col_stride % kTokens == 0 || k == 1)) {
    return kTokenVector;
  }
  return kScalar;
}

int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

// Threads per block: 256 (two blocks per multiprocessor, so one block's staging overlaps the
// other's arithmetic) unless two blocks' shared memory does not fit; then 512 (twice the nonzeros
// per block halves how often the columns are staged). ROSA_SDDMM_THREADS=256|512 overrides.
int threads_override() {
  static const int value = [] {
    const char* env = std::getenv("ROSA_SDDMM_THREADS");
    const int v = env ? std::atoi(env) : 0;
    return v == 256 || v == 512 ? v : 0;
  }();
  return value;
}

struct Plan {
  int row_window, column_window, column_region;
  size_t shared_bytes;
  int blocks_per_sm;
};

template <typename T>
Plan plan_for(int threads, const DeviceInfo& info, int64_t m, int64_t n, int64_t nnz) {
  constexpr int kTokens = kSlotTokens<T>;
  const int64_t per_block = static_cast<int64_t>(threads) * kPerThread;
  auto round8 = [](int64_t x) { return (x + 7) / 8 * 8; };
  Plan plan{};
  // The row window holds about twice the rows an average block spans (at least kRowWindow), so
  // that one window covers a block unless its rows are unusually sparse.
  const int64_t average_span = ceil_div(per_block * m, nnz);
  const int64_t budget = info.shared_per_block - 1024;
  const int64_t row_capacity = budget / 2 / 16 / 8 * 8;
  plan.row_window = static_cast<int>(std::min<int64_t>(
      {round8(m + kTokens), std::max<int64_t>(kRowWindow, round8(2 * average_span + 64)), row_capacity}));
  // 16 bytes per column slot plus its share of the needed bits (< 1 byte per 64 slots).
  const int64_t column_capacity =
      (budget - 16 * (plan.row_window + 16)) * 64 / (16 * 64 + 1) / 8 * 8;
  plan.column_window = static_cast<int>(std::min<int64_t>(round8(n), column_capacity));
  plan.column_region = static_cast<int>(
      std::max<int64_t>(plan.column_window + 8, ceil_div(4 * per_block, 16)));
  plan.shared_bytes = 16 * static_cast<size_t>(plan.column_region + plan.row_window + 8) +
                      4 * static_cast<size_t>(plan.column_window / 256 + 1);
  plan.blocks_per_sm = std::max<int>(
      1, std::min<int>(512 / threads, info.shared_per_sm / static_cast<int>(plan.shared_bytes + 1024)));
  return plan;
}

// Splits the tokens so that the grid fills one wave of resident blocks (a second, partial wave
// would cost as much as the first), keeping at least 4 chunks of tokens per split. Returns the
// number of splits and sets the tokens of each.
template <typename T>
int64_t token_splits(const Plan& plan, const DeviceInfo& info, int64_t nnz, int64_t k,
                     int64_t nonzeros_per_block, int64_t* tokens_per_split) {
  constexpr int kTokens = kSlotTokens<T>;
  const int64_t blocks = ceil_div(nnz, nonzeros_per_block);
  const int64_t resident = static_cast<int64_t>(info.multiprocessors) * plan.blocks_per_sm;
  const int64_t chunks = ceil_div(k, kTokens);
  int64_t splits = blocks >= resident ? 1 : resident / blocks;
  splits = std::max<int64_t>(1, std::min<int64_t>({splits, chunks / 4, 64}));
  *tokens_per_split = std::max<int64_t>(1, ceil_div(chunks, splits)) * kTokens;
  return std::max<int64_t>(1, ceil_div(k, *tokens_per_split));
}

template <typename T>
int threads_for(const Plan& plan256) {
  return threads_override() ? threads_override() : plan256.blocks_per_sm >= 2 ? 256 : 512;
}

template <typename T, int kThreads>
void launch(SddmmParams<T> params, const Plan& plan, const DeviceInfo& info, int device,
            void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  using AccT = typename Acc<T>::type;
  constexpr int64_t kNonzerosPerBlock = static_cast<int64_t>(kThreads) * kPerThread;
  params.row_window = plan.row_window;
  params.column_window = plan.column_window;
  params.column_region = plan.column_region;
  const int64_t nnz = params.nnz, k = params.k;
  const int64_t blocks = ceil_div(nnz, kNonzerosPerBlock);
  int64_t splits = token_splits<T>(plan, info, nnz, k, kNonzerosPerBlock, &params.tokens_per_split);

  // Split partial sums live in the caller's workspace (sddmm_workspace_bytes); with too little
  // workspace the tokens are not split.
  AccT* partials = nullptr;
  if (splits > 1 && workspace != nullptr &&
      workspace_bytes >= static_cast<size_t>(splits) * nnz * sizeof(AccT)) {
    partials = static_cast<AccT*>(workspace);
  } else if (splits > 1) {
    splits = 1;
    params.tokens_per_split = std::max<int64_t>(k, 1);
  }
  params.partials = partials;

  static bool attribute_set[64] = {};
  if (!attribute_set[device & 63]) {
    cudaFuncSetAttribute(sddmm_staged_kernel<T, kThreads>,
                         cudaFuncAttributeMaxDynamicSharedMemorySize, info.shared_per_block);
    attribute_set[device & 63] = true;
  }
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(splits));
  sddmm_staged_kernel<T, kThreads><<<grid, kThreads, plan.shared_bytes, stream>>>(params);
  if (partials != nullptr) {
    const int64_t reduce_blocks = std::min<int64_t>(ceil_div(nnz, 256), 65535);
    sddmm_reduce_splits_kernel<T><<<static_cast<unsigned>(reduce_blocks), 256, 0, stream>>>(
        partials, params.out, nnz, static_cast<int>(splits));
  }
}

}  // namespace

template <typename T>
void sddmm(const int32_t* row_offsets, const int32_t* /*row_indices*/, const int32_t* col_indices,
           const T* a, int64_t a_row_stride, int64_t a_col_stride, const T* bt,
           int64_t bt_row_stride, int64_t bt_col_stride, T* out, int64_t m, int64_t n, int64_t k,
           int64_t nnz, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (m == 0 || n == 0 || nnz == 0) return;
  int device = 0;
  cudaGetDevice(&device);
  const DeviceInfo& info = device_info(device);

  SddmmParams<T> params{};
  params.row_offsets = row_offsets;
  params.col_indices = col_indices;
  params.a = a;
  params.bt = bt;
  params.out = out;
  params.a_row_stride = a_row_stride;
  params.a_col_stride = a_col_stride;
  params.bt_row_stride = bt_row_stride;
  params.bt_col_stride = bt_col_stride;
  params.m = m;
  params.n = n;
  params.k = k;
  params.nnz = nnz;
  params.a_mode = stage_mode(a, a_row_stride, a_col_stride, m, k);
  params.bt_mode = stage_mode(bt, bt_row_stride, bt_col_stride, n, k);

  const Plan plan256 = plan_for<T>(256, info, m, n, nnz);
  if (threads_for<T>(plan256) == 256) {
    launch<T, 256>(params, plan256, info, device, workspace, workspace_bytes, stream);
  } else {
    launch<T, 512>(params, plan_for<T>(512, info, m, n, nnz), info, device, workspace,
                   workspace_bytes, stream);
  }
}

template <typename T>
size_t sddmm_workspace_bytes(int64_t m, int64_t n, int64_t k, int64_t nnz) {
  using AccT = typename Acc<T>::type;
  if (m == 0 || n == 0 || nnz == 0) return 0;
  int device = 0;
  cudaGetDevice(&device);
  const DeviceInfo& info = device_info(device);
  const Plan plan256 = plan_for<T>(256, info, m, n, nnz);
  const int threads = threads_for<T>(plan256);
  const Plan plan = threads == 256 ? plan256 : plan_for<T>(threads, info, m, n, nnz);
  int64_t tokens_per_split = 0;
  const int64_t splits = token_splits<T>(plan, info, nnz, k,
                                         static_cast<int64_t>(threads) * kPerThread,
                                         &tokens_per_split);
  return splits > 1 ? static_cast<size_t>(splits) * nnz * sizeof(AccT) : 0;
}

namespace {

constexpr int kGatherThreads = 256;
constexpr int kGatherWarps = kGatherThreads / 32;

// One warp per row (grid-stride), lanes striding over the row's nonzeros: coalesced reads of
// col_indices and writes of out, scattered 2-8 byte reads of `product`.
template <typename T>
__global__ void __launch_bounds__(kGatherThreads)
    sddmm_gather_kernel(const T* __restrict__ product, int64_t product_row_stride,
                        const int32_t* __restrict__ row_offsets,
                        const int32_t* __restrict__ col_indices, T* __restrict__ out, int64_t m) {
  const int lane = threadIdx.x % 32;
  for (int64_t row = blockIdx.x * int64_t(kGatherWarps) + threadIdx.x / 32; row < m;
       row += int64_t(gridDim.x) * kGatherWarps) {
    const int64_t begin = row_offsets[row], end = row_offsets[row + 1];
    const T* product_row = product + row * product_row_stride;
    for (int64_t p = begin + lane; p < end; p += 32) out[p] = product_row[col_indices[p]];
  }
}

}  // namespace

template <typename T>
void sddmm_gather(const T* product, int64_t product_row_stride, const int32_t* row_offsets,
                  const int32_t* col_indices, T* out, int64_t m, cudaStream_t stream) {
  if (m == 0) return;
  const int64_t blocks = std::min<int64_t>((m + kGatherWarps - 1) / kGatherWarps,
                                           int64_t(multiprocessor_count()) * 16);
  sddmm_gather_kernel<T><<<static_cast<unsigned>(blocks), kGatherThreads, 0, stream>>>(
      product, product_row_stride, row_offsets, col_indices, out, m);
}

bool sddmm_dense_is_faster(int64_t m, int64_t n, int64_t k, int64_t nnz, int value_bytes) {
  // Measured on H100 and H200 (docs/benchmarks.md; history in git at c550a82): at k = 4096 the sparse kernel costs
  // ~25 us per 0.1% of density above 0.3% at 4096 x 4096 and crosses `mm + gather` at 0.45-0.5%
  // on every LLaMA shape. Below ~2^32 multiply-adds cuBLAS runs far from its peak.
  if (value_bytes != 2 || m <= 0 || n <= 0) return false;
  const double work = double(m) * double(n) * double(k);
  return work >= 4294967296.0 && double(nnz) >= kSddmmDenseDensity * double(m) * double(n);
}

#define ROSA_INSTANTIATE_SDDMM(T)                                                              \
  template void sddmm<T>(const int32_t*, const int32_t*, const int32_t*, const T*, int64_t,    \
                         int64_t, const T*, int64_t, int64_t, T*, int64_t, int64_t, int64_t,   \
                         int64_t, void*, size_t, cudaStream_t);                               \
  template size_t sddmm_workspace_bytes<T>(int64_t, int64_t, int64_t, int64_t);          \
  template void sddmm_gather<T>(const T*, int64_t, const int32_t*, const int32_t*, T*, int64_t, \
                                cudaStream_t);
ROSA_INSTANTIATE_SDDMM(float)
ROSA_INSTANTIATE_SDDMM(double)
ROSA_INSTANTIATE_SDDMM(__half)
ROSA_INSTANTIATE_SDDMM(__nv_bfloat16)

}  // namespace rosa::cuda
