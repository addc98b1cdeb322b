// Launcher of the merged re-scatter kernel (torch-free; see cuda/merged_scatter.cu):
//
//     weight[i][r, col[p]] = base[p] + values[p]   for every nonzero p of row r of layer i's CSR
//
// summed in the accumulator type (float32, float64 for float64 weights) and rounded once to the
// weight's dtype. Layers of any dtypes share a launch; the value and index types are runtime codes.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace rosa::cuda {

enum ScatterValueType : int32_t { kScatterFloat = 0, kScatterDouble = 1, kScatterHalf = 2, kScatterBFloat16 = 3 };

struct ScatterLayer {
  void* weight;            // m x n, element (r, c) at weight[r * row_stride + c * col_stride]
  const void* base;        // (nnz,) the weight's values at the mask
  const void* values;      // (nnz,) S
  const void* row_offsets; // (m + 1,) int32 or int64
  const void* col_indices; // (nnz,) of the index type
  int64_t m, n, nnz, row_stride, col_stride;
  int32_t weight_type, base_type, values_type;
  int32_t index_64;        // 1: the index tensors are int64, 0: int32
};

// Runs every layer's scatter on `stream`: one launch per kMaxScatterLayers layers. Nonzeros whose
// column lies outside [0, n) are skipped, and the row of a nonzero is found by binary search over
// the offsets, clamped to [0, m): no input makes the kernel write outside a weight.
void merged_scatter(const ScatterLayer* layers, int64_t count, bool double_accumulator, cudaStream_t stream);

}  // namespace rosa::cuda
