// The merged re-scatter after an optimizer step, for many layers in one launch (cuda/merged_scatter.h).
//
// One thread per nonzero: it finds its row by binary search over the layer's row offsets (the
// offsets of one layer stay in L1/L2), then writes weight[row, col] = base + values, summed in the
// accumulator type and rounded once. The layers of a launch travel by value in the kernel's
// parameters (a table of up to kMaxScatterLayers), so the launch reads no host memory and a CUDA
// graph can capture it.
#include "cuda/merged_scatter.h"

#include <algorithm>

#include "cuda/common.cuh"

namespace rosa::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxScatterLayers = 24;

struct ScatterTable {
  ScatterLayer layer[kMaxScatterLayers];
  int64_t first_block[kMaxScatterLayers + 1];  // layer k owns blocks [first_block[k], first_block[k + 1])
  int32_t count;
};

template <typename Acc>
__device__ __forceinline__ Acc load_as(const void* base, int32_t type, int64_t i) {
  switch (type) {
    case kScatterFloat: return static_cast<Acc>(static_cast<const float*>(base)[i]);
    case kScatterDouble: return static_cast<Acc>(static_cast<const double*>(base)[i]);
    case kScatterHalf: return static_cast<Acc>(__half2float(static_cast<const __half*>(base)[i]));
    default: return static_cast<Acc>(__bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]));
  }
}

template <typename Acc>
__device__ __forceinline__ void store_as(void* base, int32_t type, int64_t i, Acc v) {
  switch (type) {
    case kScatterFloat: static_cast<float*>(base)[i] = static_cast<float>(v); break;
    case kScatterDouble: static_cast<double*>(base)[i] = static_cast<double>(v); break;
    case kScatterHalf: static_cast<__half*>(base)[i] = __float2half_rn(static_cast<float>(v)); break;
    default: static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(static_cast<float>(v)); break;
  }
}

__device__ __forceinline__ int64_t load_index(const void* base, int32_t index_64, int64_t i) {
  return index_64 ? static_cast<const int64_t*>(base)[i] : static_cast<int64_t>(static_cast<const int32_t*>(base)[i]);
}

template <typename Acc>
__global__ void __launch_bounds__(kThreads) scatter_kernel(const ScatterTable table) {
  const int64_t block = blockIdx.x;
  int k = 0;
  while (k + 1 < table.count && table.first_block[k + 1] <= block) ++k;
  const ScatterLayer& layer = table.layer[k];
  const int64_t p = (block - table.first_block[k]) * kThreads + threadIdx.x;
  if (p >= layer.nnz || layer.m <= 0) return;
  const int64_t col = load_index(layer.col_indices, layer.index_64, p);
  if (col < 0 || col >= layer.n) return;
  // The last row r in [0, m) with row_offsets[r] <= p.
  int64_t low = 0, high = layer.m;
  while (high - low > 1) {
    const int64_t mid = low + (high - low) / 2;
    if (load_index(layer.row_offsets, layer.index_64, mid) <= p) low = mid; else high = mid;
  }
  const Acc sum = load_as<Acc>(layer.base, layer.base_type, p) + load_as<Acc>(layer.values, layer.values_type, p);
  store_as<Acc>(layer.weight, layer.weight_type, low * layer.row_stride + col * layer.col_stride, sum);
}

}  // namespace

void merged_scatter(const ScatterLayer* layers, int64_t count, bool double_accumulator, cudaStream_t stream) {
  for (int64_t first = 0; first < count;) {
    ScatterTable table{};
    int64_t blocks = 0;
    table.count = 0;
    for (; first < count && table.count < kMaxScatterLayers; ++first) {
      if (layers[first].nnz <= 0) continue;
      table.layer[table.count] = layers[first];
      table.first_block[table.count] = blocks;
      blocks += (layers[first].nnz + kThreads - 1) / kThreads;
      ++table.count;
    }
    table.first_block[table.count] = blocks;
    if (blocks == 0) continue;
    // Grids beyond 2^31 - 1 blocks would need nnz above 2^39: sizes stay below 2^31 - 1 per layer.
    if (double_accumulator) {
      scatter_kernel<double><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(table);
    } else {
      scatter_kernel<float><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(table);
    }
  }
}

}  // namespace rosa::cuda
