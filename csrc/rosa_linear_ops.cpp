// RosaLinear's training step as one op per layer and step, and its post-optimizer-step re-scatter.
//
//     rosa_linear(x, weight, bias, lora_A, lora_B, values, grad_index, seed, scale, dropout,
//                 grad_path, plan_width, plan_rest_nnz)
//       = X W^T + b + scale / (1 - p) * ((X ∘ keep) A^T) B^T
//
// with W the dense weight (in merged mode W + S: the sparse adapter is inside it), keep the LoRA
// dropout's mask regenerated from `seed` (lora_dropout_ops.cpp; no mask is saved; `seed` is
// undefined when p = 0; when p > 0 and no seed is given, the op draws it, see draw_seed; a seed is a
// one-element int64 tensor on the CPU or on x's CUDA device). `values` (S's nonzeros) takes no part in the forward math: it only
// receives dS = (dY^T X)[mask], computed as `grad_path` says from the index tensors in
// `grad_index`:
//
//     "none"   dS = 0 (no mask yet)                      grad_index = []
//     "dense"  (dY^T X).view(-1)[flat_indices]           grad_index = [flat_indices]
//     "sddmm"  sddmm(mask, dY^T, X^T)                    grad_index = [row_offsets, row_indices, col_indices]
//     "plan"   the mask's MaskPlan (plan.py: planned_sddmm): G = dY^T X[:, J] by one GEMM for the
//              hot columns J, the rest by the SDDMM, gathered into the mask's order
//              grad_index = [target, rest_row_offsets, rest_row_indices, rest_col_indices(, gather)]
//
// One implementation for every device (CompositeExplicitAutograd: aten GEMMs and the rosa_kernels
// ops, called through the dispatcher), its autograd in C++ at the Autograd key (forward saves X, the
// small T x rank product h = (X ∘ keep) A^T and the seed; backward calls the ops through the
// dispatcher, so torch.compile traces it), an autocast kernel that casts the floating operands to
// the autocast dtype as nn.Linear would, and a fake kernel in python/rosa_kernels/linear.py. A
// Python-level layer step is then one call: the autograd function's ~26 Python arguments and the
// ops it issued one by one from Python were most of a step's host time.
//
//     merged_scatter_(weights, row_offsets, col_indices, base_values, values)
//       weights[i][r, col_indices[i][p]] = base_values[i][p] + values[i][p]
//           for every nonzero p of row r of layer i's CSR (row_offsets[i], col_indices[i])
//
// computed in (at least) float32 and rounded once to the weight's dtype: recomputed from the saved
// W, never accumulated. It reads the mask's CSR, so a layer keeps no flat positions (8 bytes per
// nonzero) for it; on a GPU every layer's scatter is one kernel launch per 24 layers
// (cuda/merged_scatter.cu), so the Python loop over merged layers after every optimizer step costs
// one op call and a few launches.
#include <algorithm>
#include <limits>
#include <mutex>
#include <optional>
#include <string_view>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "checks.h"
#include "lora_dropout_ops.h"
#include "merged_scatter_ops.h"

namespace rosa {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

enum class GradPath : int64_t { kNone = 0, kDense = 1, kSddmm = 2, kPlan = 3 };

GradPath grad_path_of(std::string_view name, size_t index_count) {
  GradPath path = GradPath::kNone;
  size_t low = 0, high = 0;
  if (name == "none") {
    path = GradPath::kNone, low = high = 0;
  } else if (name == "dense") {
    path = GradPath::kDense, low = high = 1;
  } else if (name == "sddmm") {
    path = GradPath::kSddmm, low = high = 3;
  } else if (name == "plan") {
    path = GradPath::kPlan, low = 4, high = 5;
  } else {
    ROSA_CHECK_VALUE(false, "grad_path must be one of 'none', 'dense', 'sddmm', 'plan', got '",
                     std::string(name), "'");
  }
  ROSA_CHECK_VALUE(index_count >= low && index_count <= high, "grad_path '", std::string(name),
                   "' takes ", low == high ? std::to_string(low) : std::to_string(low) + " or " + std::to_string(high),
                   " index tensors in grad_index, got ", index_count);
  return path;
}

// Everything but the differentiable tensors: passed to the autograd function as one argument,
// so it does not count as an input with a gradient.
struct Config {
  std::optional<at::Tensor> seed;
  std::vector<at::Tensor> grad_index;
  double scale;
  double dropout;
  GradPath path;
  int64_t plan_width;
  int64_t plan_rest_nnz;
};

at::Tensor call_sddmm(const at::Tensor& row_offsets, const at::Tensor& row_indices,
                      const at::Tensor& col_indices, const at::Tensor& a, const at::Tensor& bt) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("rosa_kernels::sddmm", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&)>();
  return op.call(row_offsets, row_indices, col_indices, a, bt);
}

at::Tensor call_dropout_project(const at::Tensor& x, const at::Tensor& seed, double p, const at::Tensor& lora_A) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("rosa_kernels::lora_dropout_project", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double, const at::Tensor&)>();
  return op.call(x, seed, p, lora_A);
}

at::Tensor call_dropout_grad_A(const at::Tensor& x, const at::Tensor& seed, double p, const at::Tensor& g,
                               double alpha) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("rosa_kernels::lora_dropout_grad_A", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double, const at::Tensor&, double)>();
  return op.call(x, seed, p, g, alpha);
}

void call_dropout_addmm_(const at::Tensor& dx, const at::Tensor& g, const at::Tensor& lora_A, const at::Tensor& seed,
                         double p, double alpha) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("rosa_kernels::lora_dropout_addmm_", "")
          .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double)>();
  op.call(dx, g, lora_A, seed, p, alpha);
}

// t as (rows x its last dimension): a view when t's layout allows (sizes may be symbolic).
at::Tensor as_2d(const at::Tensor& t) {
  if (t.dim() == 2) return t;
  return t.reshape_symint({c10::SymInt(-1), t.sym_size(-1)});
}

// The leading dimensions of `like` with `last` as the last one.
c10::SymDimVector sizes_with_last(const at::Tensor& like, const c10::SymInt& last) {
  c10::SymDimVector sizes(like.sym_sizes().begin(), like.sym_sizes().end());
  sizes.back() = last;
  return sizes;
}

int64_t int_size(const at::Tensor& t, int64_t dim) { return t.sym_size(dim).guard_int(__FILE__, __LINE__); }

void check_operands(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& values) {
  ROSA_CHECK_VALUE(x.dim() >= 1, "x must have at least one dimension");
  ROSA_CHECK_VALUE(weight.dim() == 2 && lora_A.dim() == 2 && lora_B.dim() == 2 && values.dim() == 1,
                   "weight, lora_A and lora_B must be 2-D and values 1-D");
  ROSA_CHECK_VALUE(x.sym_size(-1) == weight.sym_size(1), "x must have ", int_size(weight, 1),
                   " features in its last dimension, got shape ", x.sizes());
  ROSA_CHECK_VALUE(lora_A.sym_size(1) == weight.sym_size(1) && lora_B.sym_size(0) == weight.sym_size(0) &&
                       lora_B.sym_size(1) == lora_A.sym_size(0),
                   "lora_A must be (rank x in_features) and lora_B (out_features x rank), got ", lora_A.sizes(),
                   " and ", lora_B.sizes(), " for a weight of shape ", weight.sizes());
  ROSA_CHECK_VALUE(!bias.has_value() || !bias->defined() || (bias->dim() == 1 && bias->sym_size(0) == weight.sym_size(0)),
                   "bias must have out_features = ", int_size(weight, 0), " elements");
}

// Forward: (Y, h) with h = (X ∘ keep) A^T (T x rank), which backward reads for dB.
std::tuple<at::Tensor, at::Tensor> forward_math(const at::Tensor& x, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                                const at::Tensor& lora_B, const Config& config) {
  const auto x2d = as_2d(x);
  auto y = bias.has_value() && bias->defined() ? at::addmm(*bias, x2d, weight.t()) : at::mm(x2d, weight.t());
  const bool drop = config.dropout > 0.0;
  // Under dropout the down-projection reads X once, dropping elements as it goes (no X ∘ keep).
  const auto h = drop ? call_dropout_project(x2d, *config.seed, config.dropout, lora_A) : at::mm(x2d, lora_A.t());
  // The dropout's 1 / (1 - p) rides on the LoRA scale, which every LoRA term carries.
  y.addmm_(h, lora_B.t(), 1.0, config.scale / (1.0 - config.dropout));
  if (x.dim() != 2) y = at::_unsafe_view_symint(y, sizes_with_last(x, weight.sym_size(0)));
  return {y, h};
}

// dS = SDDMM(mask, a, bt) through the mask's plan (python/rosa_kernels/plan.py: planned_sddmm).
at::Tensor planned_sddmm(const at::Tensor& a, const at::Tensor& bt, const std::vector<at::Tensor>& index,
                         int64_t width, int64_t rest_nnz) {
  const auto &target = index[0], &rest_offsets = index[1], &rest_rows = index[2], &rest_cols = index[3];
  at::Tensor bt_hot = bt;
  if (index.size() == 5) {
    // bt[J], gathered along bt's contiguous dimension: for bt = X^T a gather of X's columns, whose
    // result is again a transposed view (plan.py: _select_rows).
    const auto& gather = index[4];
    bt_hot = bt.dim() == 2 && bt.sym_stride(0) == 1 && bt.sym_stride(1) != 1 && bt.sym_size(1) > 1
                 ? bt.t().index_select(1, gather).t()
                 : bt.index_select(0, gather);
  }
  const int64_t m = int_size(a, 0);
  auto merged = at::empty({m * width + rest_nnz}, a.options());
  auto hot = merged.slice(0, 0, m * width).view({m, width});
  at::mm_out(hot, a, bt_hot.t());
  if (rest_nnz) merged.slice(0, m * width).copy_(call_sddmm(rest_offsets, rest_rows, rest_cols, a, bt));
  return merged.index_select(0, target);
}

// The gradients asked for by `needed` (x, lora_A, lora_B, values, weight, bias), undefined otherwise.
std::array<at::Tensor, 6> backward_math(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& h,
                                        const at::Tensor& weight, const at::Tensor& lora_A,
                                        const at::Tensor& lora_B, const at::Tensor& values_like,
                                        const Config& config, const std::array<bool, 6>& needed) {
  const auto dy2d = as_2d(dy);
  const auto x2d = as_2d(x);
  const double kept_scale = config.scale / (1.0 - config.dropout);
  const bool drop = config.dropout > 0.0;
  std::array<at::Tensor, 6> grads;
  at::Tensor g;  // dY B: T x rank, shared by dX and dA
  if (needed[0] || needed[1]) g = at::mm(dy2d, lora_B);
  if (needed[0]) {
    // dX = dY W + scale / (1 - p) * ((dY B) A) ∘ keep
    auto dx = at::mm(dy2d, weight);
    if (drop) {
      call_dropout_addmm_(dx, g, lora_A, *config.seed, config.dropout, kept_scale);  // no T x in (g A)
    } else {
      dx.addmm_(g, lora_A, 1.0, kept_scale);
    }
    grads[0] = x.dim() == 2 ? dx : at::_unsafe_view_symint(dx, x.sym_sizes());
  }
  // dA = scale / (1 - p) * (dY B)^T (X ∘ keep), dB = scale / (1 - p) * dY^T h. With beta = 0 addmm
  // ignores its first operand (only its shape is used, NaNs included): the scale is the alpha.
  if (needed[1]) {
    grads[1] = drop ? call_dropout_grad_A(x2d, *config.seed, config.dropout, g, kept_scale)  // no T x in X ∘ keep
                    : at::addmm(lora_A, g.t(), x2d, 0.0, kept_scale);
  }
  if (needed[2]) grads[2] = at::addmm(lora_B, dy2d.t(), h, 0.0, kept_scale);
  if (needed[3]) {
    const auto& index = config.grad_index;
    switch (config.path) {
      case GradPath::kNone:
        grads[3] = at::zeros_like(values_like);
        break;
      case GradPath::kDense:
        // (dY^T X)[mask] through one dense GEMM; the m x n product is freed at once.
        grads[3] = at::mm(dy2d.t(), x2d).view(-1).index_select(0, index[0]);
        break;
      case GradPath::kSddmm:
        // Transposed views, read without copies by the kernels.
        grads[3] = call_sddmm(index[0], index[1], index[2], dy2d.t(), x2d.t());
        break;
      case GradPath::kPlan:
        grads[3] = planned_sddmm(dy2d.t(), x2d.t(), index, config.plan_width, config.plan_rest_nnz);
        break;
    }
  }
  if (needed[4]) grads[4] = at::mm(dy2d.t(), x2d);  // d(W + S) = dY^T X (RosaLinear freezes W)
  if (needed[5]) grads[5] = dy2d.sum(0);
  return grads;
}

class RosaLinearFunction : public torch::autograd::Function<RosaLinearFunction> {
 public:
  // The differentiable tensors first: their positions are the gradient edges of needs_input_grad.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& lora_A,
                            const at::Tensor& lora_B, const at::Tensor& values, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const Config& config) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, h] = forward_math(x, weight, bias, lora_A, lora_B, config);
    std::vector<at::Tensor> saved{x, h, weight, lora_A, lora_B,
                                  config.path == GradPath::kNone ? values : at::Tensor(),
                                  config.seed.has_value() ? *config.seed : at::Tensor()};
    saved.insert(saved.end(), config.grad_index.begin(), config.grad_index.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["scale"] = config.scale;
    ctx->saved_data["dropout"] = config.dropout;
    ctx->saved_data["path"] = static_cast<int64_t>(config.path);
    ctx->saved_data["plan"] = std::vector<int64_t>{config.plan_width, config.plan_rest_nnz};
    ctx->saved_data["bias"] = bias.has_value() && bias->defined();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &h = saved[1], &weight = saved[2], &lora_A = saved[3], &lora_B = saved[4];
    Config config;
    config.seed = saved[6].defined() ? std::optional<at::Tensor>(saved[6]) : std::nullopt;
    config.grad_index.assign(saved.begin() + 7, saved.end());
    config.scale = ctx->saved_data["scale"].toDouble();
    config.dropout = ctx->saved_data["dropout"].toDouble();
    config.path = static_cast<GradPath>(ctx->saved_data["path"].toInt());
    const auto plan = ctx->saved_data["plan"].toIntVector();
    config.plan_width = plan[0];
    config.plan_rest_nnz = plan[1];
    const bool has_bias = ctx->saved_data["bias"].toBool();
    // Without create_graph nothing here is tracked: straight to the backends (differentiable otherwise).
    std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
    if (!at::GradMode::is_enabled()) below_autograd.emplace();
    const std::array<bool, 6> needed{ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2),
                                     ctx->needs_input_grad(3), ctx->needs_input_grad(4),
                                     has_bias && ctx->needs_input_grad(5)};
    auto out = backward_math(grads[0], x, h, weight, lora_A, lora_B, saved[5], config, needed);
    return {out[0], out[1], out[2], out[3], out[4], out[5], at::Tensor()};
  }
};

// A fresh dropout seed for x. On the CPU it is the very value that rosa_kernels.dropout.draw_seed()
// (torch.randint(-2**63, 2**63 - 1, (1,))) would draw: randint over that range takes one random64()
// of the default generator and returns low + (r mod (high - low)), computed here without a
// dispatcher call. On a GPU, eagerly, it is drawn on the host from the device's default CUDA
// generator (cuda_host_seed: its Philox seed and offset, as torch's own dropout reads them, so
// torch.manual_seed fixes it) into a CPU tensor that the kernels take by value: no randint kernel
// per layer and step. While the device's stream is being captured into a
// CUDA graph it is torch.randint on the device instead (read by the kernels, so each replay draws
// a new seed). Drawing it in the op saves a Python op call per layer and step; a traced graph
// cannot draw at run time, so under torch.compile RosaLinear passes draw_seed(x.device)'s tensor
// instead (refused here and in the fake kernel: the seed of a traced call would be a constant of
// the graph).
at::Tensor draw_seed(const at::Tensor& x) {
  ROSA_CHECK_VALUE(!x.key_set().has_any(c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize})),
                   "rosa_linear with dropout > 0 draws its seed at run time in eager mode only: pass "
                   "seed=rosa_kernels.dropout.draw_seed(x.device) in a traced or compiled graph");
  const auto options = at::TensorOptions().dtype(at::kLong);
  if (!x.device().is_cpu()) {
    const auto draw = cuda_host_seed();
    const auto host = x.device().is_cuda() && draw != nullptr ? draw(x.device().index()) : std::nullopt;
    if (host.has_value()) {
      auto seed = at::empty({1}, options);
      seed.data_ptr<int64_t>()[0] = *host;
      return seed;
    }
    return at::randint(std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max(), {1},
                       options.device(x.device()));
  }
  auto generator = at::detail::getDefaultCPUGenerator();
  uint64_t random;
  {
    std::lock_guard<std::mutex> lock(generator.mutex());
    random = generator.get<at::CPUGeneratorImpl>()->random64();
  }
  const uint64_t range = std::numeric_limits<uint64_t>::max();  // (2^63 - 1) - (-2^63)
  const auto low = static_cast<uint64_t>(std::numeric_limits<int64_t>::min());
  auto seed = at::empty({1}, options);
  seed.data_ptr<int64_t>()[0] = static_cast<int64_t>(random % range + low);
  return seed;
}

Config config_of(const at::Tensor& x, const std::vector<at::Tensor>& grad_index, const std::optional<at::Tensor>& seed, double scale,
                 double dropout, std::string_view grad_path, int64_t plan_width, int64_t plan_rest_nnz) {
  Config config;
  config.path = grad_path_of(grad_path, grad_index.size());
  ROSA_CHECK_VALUE(dropout >= 0.0 && dropout < 1.0, "dropout must lie in [0, 1), got ", std::to_string(dropout));
  if (dropout > 0.0) config.seed = seed.has_value() && seed->defined() ? *seed : draw_seed(x);
  config.grad_index = grad_index;
  config.scale = scale;
  config.dropout = dropout;
  config.plan_width = plan_width;
  config.plan_rest_nnz = plan_rest_nnz;
  ROSA_CHECK_VALUE(config.path != GradPath::kPlan || plan_width > 0, "grad_path 'plan' needs plan_width > 0");
  return config;
}

// CompositeExplicitAutograd: Y alone (no gradient to track, or below autograd).
at::Tensor rosa_linear_impl(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& values,
                            at::TensorList grad_index, const std::optional<at::Tensor>& seed, double scale,
                            double dropout, c10::string_view grad_path, int64_t plan_width, int64_t plan_rest_nnz) {
  const Config config = config_of(x, grad_index.vec(), seed, scale, dropout, grad_path, plan_width, plan_rest_nnz);
  check_operands(x, weight, bias, lora_A, lora_B, values);
  return std::get<0>(forward_math(x, weight, bias, lora_A, lora_B, config));
}

bool requires_grad(const at::Tensor& t) { return t.defined() && t.requires_grad(); }

at::Tensor rosa_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& values,
                                at::TensorList grad_index, const std::optional<at::Tensor>& seed, double scale,
                                double dropout, c10::string_view grad_path, int64_t plan_width,
                                int64_t plan_rest_nnz) {
  const Config config = config_of(x, grad_index.vec(), seed, scale, dropout, grad_path, plan_width, plan_rest_nnz);
  check_operands(x, weight, bias, lora_A, lora_B, values);
  const bool track = at::GradMode::is_enabled() &&
                     (requires_grad(x) || requires_grad(lora_A) || requires_grad(lora_B) || requires_grad(values) ||
                      requires_grad(weight) || (bias.has_value() && requires_grad(*bias)));
  if (track) return RosaLinearFunction::apply(x, lora_A, lora_B, values, weight, bias, config);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return std::get<0>(forward_math(x, weight, bias, lora_A, lora_B, config));
}

// Autocast: the floating operands in the autocast dtype (as nn.Linear's F.linear would run), the
// op below autocast; the casts are differentiable, so parameters get gradients in their own dtype.
template <c10::DeviceType device_type>
at::Tensor rosa_linear_autocast(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& values,
                                at::TensorList grad_index, const std::optional<at::Tensor>& seed, double scale,
                                double dropout, c10::string_view grad_path, int64_t plan_width,
                                int64_t plan_rest_nnz) {
  constexpr auto autocast_key =
      device_type == c10::DeviceType::CPU ? c10::DispatchKey::AutocastCPU : c10::DispatchKey::AutocastCUDA;
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  const auto dtype = at::autocast::get_autocast_dtype(device_type);
  const auto cast = [&](const at::Tensor& t) { return at::autocast::cached_cast(dtype, t, device_type); };
  std::optional<at::Tensor> bias_cast;
  if (bias.has_value() && bias->defined()) bias_cast = cast(*bias);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("rosa_kernels::rosa_linear", "")
                             .typed<decltype(rosa_linear_impl)>();
  return op.call(cast(x), cast(weight), bias_cast, cast(lora_A), cast(lora_B), cast(values), grad_index, seed,
                 scale, dropout, grad_path, plan_width, plan_rest_nnz);
}

// ----------------------------------------------------------------------------------------------
// merged_scatter_
// ----------------------------------------------------------------------------------------------

}  // namespace

void check_merged_scatter(at::TensorList weights, at::TensorList row_offsets, at::TensorList col_indices,
                          at::TensorList base_values, at::TensorList values) {
  const size_t count = weights.size();
  ROSA_CHECK_VALUE(row_offsets.size() == count && col_indices.size() == count && base_values.size() == count &&
                       values.size() == count,
                   "weights, row_offsets, col_indices, base_values and values must have the same length, got ",
                   count, ", ", row_offsets.size(), ", ", col_indices.size(), ", ", base_values.size(), " and ",
                   values.size());
  for (size_t i = 0; i < count; ++i) {
    const auto &w = weights[i], &offsets = row_offsets[i], &cols = col_indices[i];
    ROSA_CHECK_VALUE(w.dim() == 2, "weights[", i, "] must be 2-D, got shape ", w.sizes());
    ROSA_CHECK_TYPE(at::isFloatingType(w.scalar_type()) && at::isFloatingType(base_values[i].scalar_type()) &&
                        at::isFloatingType(values[i].scalar_type()),
                    "layer ", i, ": weights, base_values and values must be floating point, got ",
                    w.scalar_type(), ", ", base_values[i].scalar_type(), " and ", values[i].scalar_type());
    ROSA_CHECK_TYPE((offsets.scalar_type() == at::kInt || offsets.scalar_type() == at::kLong) &&
                        cols.scalar_type() == offsets.scalar_type(),
                    "layer ", i, ": row_offsets and col_indices must be both int32 or both int64, got ",
                    offsets.scalar_type(), " and ", cols.scalar_type());
    ROSA_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) == w.size(0) + 1,
                     "row_offsets[", i, "] must be 1-D with weights[", i, "].shape[0] + 1 = ", w.size(0) + 1,
                     " elements, got shape ", offsets.sizes());
    ROSA_CHECK_VALUE(cols.dim() == 1 && base_values[i].sizes() == cols.sizes() && values[i].sizes() == cols.sizes(),
                     "layer ", i, ": col_indices, base_values and values must be 1-D of one length, got shapes ",
                     cols.sizes(), ", ", base_values[i].sizes(), " and ", values[i].sizes());
    for (const at::Tensor* t : {&offsets, &cols, &base_values[i], &values[i]}) {
      ROSA_CHECK_VALUE(t->device() == w.device(), "layer ", i, ": every tensor must be on weights[", i,
                       "]'s device ", w.device(), ", got one on ", t->device());
    }
  }
}

namespace {

// CPU: the sum in promote(weight dtype, float32), rounded once to the weight's dtype, written at
// (r, col) for each nonzero of row r; offsets are clamped to [0, nnz] and columns outside [0, n)
// skipped, so no input writes outside the weight. `Sum(p)` gives nonzero p's rounded sum.
template <typename index_t, typename scalar_t, typename Sum>
void scatter_rows(at::Tensor& weight, const at::Tensor& offsets, const at::Tensor& cols, const Sum& sum) {
  const int64_t m = weight.size(0), n = weight.size(1), nnz = cols.size(0);
  const index_t* offset = offsets.const_data_ptr<index_t>();
  const index_t* col = cols.const_data_ptr<index_t>();
  const int64_t s0 = weight.stride(0), s1 = weight.stride(1);
  scalar_t* w = weight.mutable_data_ptr<scalar_t>();
  for (int64_t r = 0; r < m; ++r) {
    const int64_t begin = std::clamp<int64_t>(offset[r], 0, nnz);
    const int64_t end = std::clamp<int64_t>(offset[r + 1], begin, nnz);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t c = col[p];
      if (c >= 0 && c < n) w[r * s0 + c * s1] = sum(p);
    }
  }
}

template <typename index_t>
void scatter_layer_cpu(at::Tensor weight, const at::Tensor& offsets_in, const at::Tensor& cols_in,
                       const at::Tensor& base_in, const at::Tensor& values_in) {
  const auto offsets = offsets_in.contiguous(), cols = cols_in.contiguous();
  const auto dtype = weight.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "merged_scatter_", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // float for 16-bit types: promote(dtype, float32)
    if (base_in.scalar_type() == dtype && values_in.scalar_type() == dtype) {
      const auto base = base_in.contiguous(), values = values_in.contiguous();
      const scalar_t* b = base.const_data_ptr<scalar_t>();
      const scalar_t* v = values.const_data_ptr<scalar_t>();
      scatter_rows<index_t, scalar_t>(weight, offsets, cols, [&](int64_t p) {
        return static_cast<scalar_t>(static_cast<acc_t>(b[p]) + static_cast<acc_t>(v[p]));
      });
    } else {  // mixed dtypes: both in the wide type first, as the promoted sum would
      const auto wide = at::promote_types(dtype, at::kFloat);
      const auto merged = (base_in.to(wide) + values_in.to(wide)).to(dtype).contiguous();
      const scalar_t* sum = merged.const_data_ptr<scalar_t>();
      scatter_rows<index_t, scalar_t>(weight, offsets, cols, [&](int64_t p) { return sum[p]; });
    }
  });
}

void merged_scatter_cpu(at::TensorList weights, at::TensorList row_offsets, at::TensorList col_indices,
                        at::TensorList base_values, at::TensorList values) {
  check_merged_scatter(weights, row_offsets, col_indices, base_values, values);
  for (size_t i = 0; i < weights.size(); ++i) {
    if (row_offsets[i].scalar_type() == at::kInt) {
      scatter_layer_cpu<int32_t>(weights[i], row_offsets[i], col_indices[i], base_values[i], values[i]);
    } else {
      scatter_layer_cpu<int64_t>(weights[i], row_offsets[i], col_indices[i], base_values[i], values[i]);
    }
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rosa_kernels, m) {
  m.def("rosa_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor values, "
        "Tensor[] grad_index, Tensor? seed, float scale, float dropout, str grad_path, int plan_width=0, "
        "int plan_rest_nnz=0) -> Tensor");
  m.def("merged_scatter_(Tensor(a!)[] weights, Tensor[] row_offsets, Tensor[] col_indices, Tensor[] base_values, "
        "Tensor[] values) -> ()");
}

TORCH_LIBRARY_IMPL(rosa_kernels, CompositeExplicitAutograd, m) {
  m.impl("rosa_linear", &rosa_linear_impl);
}

TORCH_LIBRARY_IMPL(rosa_kernels, CPU, m) { m.impl("merged_scatter_", &merged_scatter_cpu); }

TORCH_LIBRARY_IMPL(rosa_kernels, Autograd, m) { m.impl("rosa_linear", &rosa_linear_autograd); }

TORCH_LIBRARY_IMPL(rosa_kernels, AutocastCPU, m) {
  m.impl("rosa_linear", &rosa_linear_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(rosa_kernels, AutocastCUDA, m) {
  m.impl("rosa_linear", &rosa_linear_autocast<c10::DeviceType::CUDA>);
}

}  // namespace rosa
