// The CUDA implementation of merged_scatter_ (schema, checks and the CPU one: rosa_linear_ops.cpp):
// the layers grouped by device and accumulator type (float64 weights sum in float64, the others in
// float32), each group in one call of cuda::merged_scatter on that device's current stream. Reads
// no tensor contents on the host, never synchronizes.
#include <map>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/merged_scatter.h"
#include "merged_scatter_ops.h"

namespace rosa {
namespace {

int32_t scatter_type(c10::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return cuda::kScatterFloat;
    case at::kDouble: return cuda::kScatterDouble;
    case at::kHalf: return cuda::kScatterHalf;
    case at::kBFloat16: return cuda::kScatterBFloat16;
    default: ROSA_CHECK_TYPE(false, "merged_scatter_ takes float32, float64, float16 or bfloat16 tensors, got ", dtype);
  }
  return 0;
}

void merged_scatter_cuda(at::TensorList weights, at::TensorList row_offsets, at::TensorList col_indices,
                         at::TensorList base_values, at::TensorList values) {
  check_merged_scatter(weights, row_offsets, col_indices, base_values, values);
  // (device index, float64 accumulator) -> layers; contiguous copies (1-D buffers already are) live here.
  std::map<std::pair<int, bool>, std::vector<cuda::ScatterLayer>> groups;
  std::vector<at::Tensor> keep_alive;
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto& w = weights[i];
    ROSA_CHECK_VALUE(w.is_cuda(), "weights[", i, "] must be a CUDA tensor here, got one on ", w.device());
    if (w.numel() == 0 || col_indices[i].numel() == 0) continue;
    const auto offsets = row_offsets[i].contiguous(), cols = col_indices[i].contiguous();
    const auto base = base_values[i].contiguous(), vals = values[i].contiguous();
    keep_alive.insert(keep_alive.end(), {offsets, cols, base, vals});
    cuda::ScatterLayer layer{};
    layer.weight = w.mutable_data_ptr();
    layer.base = base.const_data_ptr();
    layer.values = vals.const_data_ptr();
    layer.row_offsets = offsets.const_data_ptr();
    layer.col_indices = cols.const_data_ptr();
    layer.m = w.size(0);
    layer.n = w.size(1);
    layer.nnz = cols.size(0);
    layer.row_stride = w.stride(0);
    layer.col_stride = w.stride(1);
    layer.weight_type = scatter_type(w.scalar_type());
    layer.base_type = scatter_type(base.scalar_type());
    layer.values_type = scatter_type(vals.scalar_type());
    layer.index_64 = offsets.scalar_type() == at::kLong ? 1 : 0;
    groups[{w.get_device(), w.scalar_type() == at::kDouble}].push_back(layer);
  }
  for (const auto& [key, layers] : groups) {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(key.first));
    cuda::merged_scatter(layers.data(), static_cast<int64_t>(layers.size()), key.second,
                         c10::cuda::getCurrentCUDAStream().stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(rosa_kernels, CUDA, m) { m.impl("merged_scatter_", &merged_scatter_cuda); }

}  // namespace rosa
