// The two halves of building a MaskPlan (python/rosa_kernels/plan.py), around the one host copy of
// the mask's column counts that the plan needs:
//
//     plan_hot_columns(column_counts, m, hot_fill, costs) -> (min_count, hot_column_count, hot_nnz)
//
// on the host: which columns J go through the dense GEMM. J is always "the columns with at least
// min_count nonzeros" (min_count >= 1; nnz + 1 when J is empty). `hot_fill` a number f: the
// non-empty columns with count >= f * m, compared as torch compares an int64 tensor with a Python
// float (both rounded to float32). `hot_fill` None ("auto"): the threshold that minimizes the cost
// model plan.planned_seconds, whose five constants are `costs` = (gemm_fixed, gemm_per_row,
// gemm_per_row_column, rest_fixed, rest_per_nonzero): candidates are "no hot column" and, for each
// distinct count c, the columns with >= c nonzeros; the first minimum wins (the fewest hot columns
// among equals). The model is evaluated with the same float64 operations in the same order as
// planned_seconds evaluates it on tensors, so both choose alike (this file is compiled without
// floating-point contraction, CMakeLists.txt). `column_counts` is a CPU tensor (n,).
//
//     mask_plan(row_offsets, col_indices, n, column_counts, min_count, hot_column_count, hot_nnz, width)
//       -> (hot_columns, gather, target, rest_row_offsets, rest_row_indices, rest_col_indices,
//           hot_positions, hot_rows, hot_slots, rest_positions)
//
// on the structure's device, with the host's decision (hot_column_count = |J|, hot_nnz, width =
// the GEMM's padded width): the plan's index tensors, MaskPlan's attributes of the same names.
// `gather` (width,) is J padded with copies of its first column, None when J is empty or every
// column. Every output size follows from those numbers, so nothing synchronizes with the host.
// `column_counts` (n,) lives on the structure's device (None is allowed when J is empty). On the
// CPU the structure and the decision's sizes are checked (ValueError); on a GPU they are the
// caller's promise (MaskPlan builds them from one validated structure).
#include <algorithm>
#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/structure.h"

namespace rosa {
namespace {

// ---- the host decision ------------------------------------------------------------------------

// plan.planned_seconds for one candidate (tokens = 1), as its tensor expression computes it:
//   (hot > 0) * (gemm_fixed + m * (gemm_per_row + gemm_per_row_column * hot))
//   + (rest > 0) * (rest_fixed + rest_per_nonzero * rest)
double planned_seconds(const std::vector<double>& costs, double m, double hot, double rest) {
  const double gemm = (hot > 0 ? 1.0 : 0.0) * (costs[0] + m * (costs[1] + costs[2] * hot));
  const double remainder = (rest > 0 ? 1.0 : 0.0) * (costs[3] + costs[4] * rest);
  return gemm + remainder;
}

// The "auto" threshold: the smallest count c with J = {count >= c} of least modelled time.
// Candidates: no hot column, then each distinct count c, largest first, J = every column with
// >= c nonzeros. The distinct counts come from a histogram over [1, m] where m is not much larger
// than n (every count is <= m; one pass instead of a sort, which was most of this op's time), else
// from a sorted copy; both visit the same candidates in the same order.
int64_t auto_min_count(const int64_t* counts, int64_t n, int64_t m, int64_t nnz, const std::vector<double>& costs) {
  int64_t best_count = nnz + 1, hot = 0, hot_nnz = 0;
  double best = planned_seconds(costs, static_cast<double>(m), 0.0, static_cast<double>(nnz));
  const auto consider = [&](int64_t count, int64_t columns) {  // the columns with exactly `count` join J
    hot += columns, hot_nnz += count * columns;
    const double seconds = planned_seconds(costs, static_cast<double>(m), static_cast<double>(hot),
                                           static_cast<double>(nnz - hot_nnz));
    if (seconds < best) best = seconds, best_count = count;
  };
  if (m <= 8 * n + 4096) {  // a histogram of at most ~8 n + 4096 entries
    std::vector<int64_t> columns_with(m + 1, 0);
    for (int64_t j = 0; j < n; ++j) ++columns_with[counts[j]];
    for (int64_t count = m; count >= 1; --count) {
      if (columns_with[count] > 0) consider(count, columns_with[count]);
    }
    return best_count;
  }
  std::vector<int64_t> nonempty;
  for (int64_t j = 0; j < n; ++j) {
    if (counts[j] > 0) nonempty.push_back(counts[j]);
  }
  std::sort(nonempty.begin(), nonempty.end(), std::greater<int64_t>());
  for (size_t q = 0; q < nonempty.size();) {
    const size_t first = q;
    while (q < nonempty.size() && nonempty[q] == nonempty[first]) ++q;
    consider(nonempty[first], static_cast<int64_t>(q - first));
  }
  return best_count;
}

std::tuple<int64_t, int64_t, int64_t> plan_hot_columns(const at::Tensor& column_counts, int64_t m,
                                                       std::optional<double> hot_fill, at::ArrayRef<double> costs) {
  check_defined(column_counts, "column_counts");
  const auto dtype = column_counts.scalar_type();
  ROSA_CHECK_TYPE(dtype == at::kLong || dtype == at::kInt, "column_counts must be an int64 or int32 tensor, got ",
                  dtype_name(dtype));
  ROSA_CHECK_VALUE(column_counts.dim() == 1, "column_counts must be 1-D, got shape ", shape_of(column_counts));
  ROSA_CHECK_VALUE(column_counts.is_cpu(), "column_counts must be a CPU tensor (the host copy), got ",
                   column_counts.device());
  check_size(m, "m");
  ROSA_CHECK_VALUE(costs.size() == 5, "costs must hold the cost model's 5 constants, got ", costs.size());
  if (hot_fill.has_value()) {
    ROSA_CHECK_VALUE(*hot_fill >= 0.0 && *hot_fill <= 1.0, "hot_fill must lie in [0, 1], got a value outside");
  }
  const auto counts_tensor = column_counts.to(at::kLong).contiguous();
  const int64_t* counts = counts_tensor.const_data_ptr<int64_t>();
  const int64_t n = counts_tensor.size(0);
  int64_t nnz = 0;
  for (int64_t j = 0; j < n; ++j) {
    ROSA_CHECK_VALUE(counts[j] >= 0 && counts[j] <= m, "column_counts must lie in [0, m = ", m, "], got column_counts[",
                     j, "] = ", counts[j]);
    nnz += counts[j];
  }
  int64_t min_count = nnz + 1;
  if (!hot_fill.has_value()) {
    min_count = auto_min_count(counts, n, m, nnz, std::vector<double>(costs.begin(), costs.end()));
  } else {
    // torch: int64 counts >= a Python float compare in float32 (the default dtype).
    const float threshold = static_cast<float>(*hot_fill * static_cast<double>(m));
    for (int64_t j = 0; j < n; ++j) {
      if (counts[j] > 0 && static_cast<float>(counts[j]) >= threshold && counts[j] < min_count) {
        min_count = counts[j];
      }
    }
  }
  int64_t hot_columns = 0, hot_nnz = 0;
  for (int64_t j = 0; j < n; ++j) {
    if (counts[j] >= min_count) ++hot_columns, hot_nnz += counts[j];
  }
  return {min_count, hot_columns, hot_nnz};
}

// ---- the device part --------------------------------------------------------------------------

using Plan = std::tuple<at::Tensor, std::optional<at::Tensor>, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                        at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The ascending positions where `condition` holds; `count` of them, known on the host. torch
// versions without nonzero_static on the device take nonzero (one synchronization).
at::Tensor positions(const at::Tensor& condition, int64_t count) {
  static bool has_nonzero_static = true;
  if (has_nonzero_static) {
    try {
      return at::nonzero_static(condition, count).flatten();
    } catch (const c10::NotImplementedError&) {
      has_nonzero_static = false;
    }
  }
  return at::nonzero(condition).flatten();
}

// rosa_kernels.row_order, as int32.
at::Tensor row_order_of(const at::Tensor& row_offsets) {
  const int64_t rows = row_offsets.size(0) - 1;
  const auto counts = row_offsets.narrow(0, 1, rows) - row_offsets.narrow(0, 0, rows);
  return at::argsort(counts, /*stable=*/true, /*dim=*/0, /*descending=*/true).to(at::kInt);
}

Plan mask_plan(const at::Tensor& row_offsets_in, const at::Tensor& col_indices_in, int64_t n,
               const std::optional<at::Tensor>& column_counts_in, int64_t min_count, int64_t hot_column_count,
               int64_t hot_nnz, int64_t width) {
  check_defined(row_offsets_in, "row_offsets");
  check_size(n, "n");
  ROSA_CHECK_VALUE(row_offsets_in.dim() == 1 && row_offsets_in.size(0) >= 1,
                   "row_offsets must be 1-D of length m + 1 >= 1, got shape ", shape_of(row_offsets_in));
  const int64_t m = row_offsets_in.size(0) - 1;
  check_size(m, "m (row_offsets.shape[0] - 1)");
  const auto row_offsets = index_tensor(row_offsets_in, "row_offsets", -1, "", row_offsets_in, "row_offsets");
  const auto col_indices = index_tensor(col_indices_in, "col_indices", -1, "", row_offsets_in, "row_offsets");
  const int64_t nnz = col_indices.size(0);
  ROSA_CHECK_VALUE(min_count >= 1, "min_count must be >= 1, got ", min_count);
  ROSA_CHECK_VALUE(hot_column_count >= 0 && hot_column_count <= n, "hot_column_count must lie in [0, n = ", n,
                   "], got ", hot_column_count);
  ROSA_CHECK_VALUE(hot_nnz >= 0 && hot_nnz <= nnz, "hot_nnz must lie in [0, nnz = ", nnz, "], got ", hot_nnz);
  const int64_t h = hot_column_count;
  const bool gathered = h > 0 && h < n;
  ROSA_CHECK_VALUE(gathered ? width >= h && width < kInt32Max : width == h, "width must be ",
                   gathered ? "at least hot_column_count = " : "hot_column_count = ", h,
                   gathered ? " (J padded)" : " (no column gathered)", ", got ", width);
  ROSA_CHECK_VALUE((h == 0) == (hot_nnz == 0), "hot_nnz must be 0 exactly when hot_column_count is, got ", hot_nnz,
                   " and ", h);
  at::Tensor column_counts;
  if (h > 0) {
    ROSA_CHECK_TYPE(column_counts_in.has_value() && column_counts_in->defined(),
                    "column_counts must be a tensor when hot_column_count > 0, got None");
    column_counts = index_tensor(*column_counts_in, "column_counts", n, "n", row_offsets_in, "row_offsets");
  }
  if (row_offsets.is_cpu()) {
    const std::string problem = cpu::unsafe_structure(row_offsets.const_data_ptr<int32_t>(), nullptr,
                                                      col_indices.const_data_ptr<int32_t>(), m, n, nnz);
    ROSA_CHECK_VALUE(problem.empty(), problem);
  }

  const auto long_options = row_offsets.options().dtype(at::kLong);
  const int64_t rest_nnz = nnz - hot_nnz;
  const auto long_offsets = row_offsets.to(at::kLong);
  // J, its position slot_of_column[j] in J (or -1), and the nonzeros in J's columns.
  at::Tensor hot_columns, rest_positions, hot_positions, hot_rows, hot_slots;
  if (h == 0) {
    hot_columns = at::empty({0}, long_options);
    hot_positions = at::empty({0}, long_options);
    hot_rows = at::empty({0}, long_options);
    hot_slots = at::empty({0}, long_options);
    rest_positions = at::arange(nnz, long_options);
  } else {
    const auto hot = column_counts.ge(min_count);
    // On the CPU the host's sizes are checked against the tensors: J and its nonzeros, counted.
    const bool check = row_offsets.is_cpu();
    const auto check_counts = [&](const at::Tensor& is_hot) {
      const int64_t counted_columns = hot.sum().item<int64_t>();
      const int64_t counted_nnz = is_hot.defined() ? is_hot.sum().item<int64_t>() : hot_nnz;
      ROSA_CHECK_VALUE(counted_columns == h && counted_nnz == hot_nnz, "hot_column_count and hot_nnz must count ",
                       "the columns with >= min_count = ", min_count, " nonzeros (", counted_columns,
                       ") and their nonzeros (", counted_nnz, "), got ", h, " and ", hot_nnz);
    };
    if (check) check_counts(at::Tensor());
    hot_columns = positions(hot, h);
    auto slot_of_column = at::full({n}, -1, long_options);
    slot_of_column.index_copy_(0, hot_columns, at::arange(h, long_options));
    const auto slots = slot_of_column.index_select(0, col_indices);
    if (rest_nnz == 0) {
      // Every nonzero is hot (the common case: the plan's cost model puts all of RoSA's masks, and
      // uniform ones from ~0.6% density, into the GEMM): the same tensors in ~15 fewer ATen calls.
      if (check) check_counts(slots.ge(0));
      hot_positions = at::arange(nnz, long_options);
      hot_slots = slots;
      rest_positions = at::empty({0}, long_options);
    } else {
      const auto is_hot = slots.ge(0);
      if (check) check_counts(is_hot);
      hot_positions = positions(is_hot, hot_nnz);
      hot_slots = slots.index_select(0, hot_positions);
      rest_positions = positions(is_hot.logical_not(), rest_nnz);
    }
    // The row of position p: the last row starting at or before p (rows may be empty).
    hot_rows = at::searchsorted(long_offsets, hot_positions, /*out_int32=*/false, /*right=*/true).sub_(1);
  }
  // target[p]: where nonzero p lives in [G or A_hot (m x width, row-major) | remainder (rest_nnz)].
  at::Tensor target, rest_row_offsets, rest_row_indices, rest_col_indices;
  if (rest_nnz == 0) {  // no remainder: an empty CSR, every row of it empty (row order = 0 .. m - 1)
    target = nnz == 0 ? at::empty({0}, long_options) : at::add(hot_slots, hot_rows, width);
    rest_row_offsets = at::zeros({m + 1}, row_offsets.options());
    rest_row_indices = at::arange(m, row_offsets.options());
    rest_col_indices = at::empty({0}, col_indices.options());
  } else {
    target = at::empty({nnz}, long_options);
    if (h > 0) target.index_copy_(0, hot_positions, at::add(hot_slots, hot_rows, width));
    target.index_copy_(0, rest_positions, at::arange(m * width, m * width + rest_nnz, long_options));
    // Positions ascend, so the remainder stays row-sorted with ascending columns in each row: its
    // offsets count the remainder's positions before each row's first position.
    rest_row_offsets = at::searchsorted(rest_positions, long_offsets, /*out_int32=*/true);
    rest_row_indices = row_order_of(rest_row_offsets);
    rest_col_indices = col_indices.index_select(0, rest_positions);
  }

  std::optional<at::Tensor> gather;
  if (gathered) gather = at::cat({hot_columns, hot_columns.narrow(0, 0, 1).expand({width - h})});
  return {hot_columns,   gather,   target,    rest_row_offsets, rest_row_indices, rest_col_indices,
          hot_positions, hot_rows, hot_slots, rest_positions};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rosa_kernels, m) {
  m.def("plan_hot_columns(Tensor column_counts, int m, float? hot_fill, float[] costs) -> (int, int, int)");
  m.def("mask_plan(Tensor row_offsets, Tensor col_indices, int n, Tensor? column_counts, int min_count, "
        "int hot_column_count, int hot_nnz, int width) -> (Tensor hot_columns, Tensor? gather, Tensor target, "
        "Tensor rest_row_offsets, Tensor rest_row_indices, Tensor rest_col_indices, Tensor hot_positions, "
        "Tensor hot_rows, Tensor hot_slots, Tensor rest_positions)");
}

TORCH_LIBRARY_IMPL(rosa_kernels, CompositeExplicitAutograd, m) {
  m.impl("plan_hot_columns", &plan_hot_columns);
  m.impl("mask_plan", &mask_plan);
}

}  // namespace rosa
