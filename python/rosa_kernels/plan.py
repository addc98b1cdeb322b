"""Per-mask plans: a mask's hot columns through dense (tensor-core) GEMMs, the rest through the CSR ops.

RoSA masks are structured: the nonzeros crowd into a few input columns (at density 1% on 4096 x 4096
about 250 columns hold 95% of them and 75-95% of the columns are empty). A :class:`MaskPlan`, built
once per mask, splits the nonzeros into

- the **hot part**: every nonzero in a chosen set ``J`` of columns. ``mask ∘ (a @ bt^T)`` restricted
  to those columns is read off one skinny dense product ``G = a @ bt[J]^T`` (m x |J|), which cuBLAS
  runs on tensor cores; ``A @ dense`` restricted to them is one GEMM ``A_hot @ dense[J]`` with
  ``A_hot`` the m x |J| dense block of those columns;
- the **remainder**: the other nonzeros, as their own row-sorted CSR (with ``row_indices``), through
  ``torch.ops.rosa_kernels.sddmm`` / ``spmm`` (the CUDA-core kernels).

Both parts land in one buffer ``[G (m x width) | remainder (nnz_rest)]`` (width: |J| rounded up to
a multiple of 8, so cuBLAS's tensor-core paths apply) and one index ``target``
(nnz,) maps each original nonzero position ``p`` to its slot there: SDDMM's result is the gather
``buffer[target]``; SpMM builds ``[A_hot | remainder values]`` with the scatter
``buffer[target] = values``. A plan costs one host synchronization when it is built (a copy of the
column counts, from which the host decides ``J``; none on a CPU with ``"auto"``) and none per call.
Building it is two ops (``csrc/mask_plan_ops.cpp``): ``plan_hot_columns`` decides ``J`` on the host,
``mask_plan`` builds the index tensors on the structure's device.

How ``J`` is chosen (``hot_fill``):

- a number ``f`` in [0, 1]: ``J`` = the non-empty columns with fill (nonzeros / m) >= ``f``. ``0``
  sends every non-empty column through the GEMM (no remainder), ``1`` only full columns.
- ``"auto"`` (default): the fill threshold that minimizes the cost model :func:`planned_seconds`
  (its constants were fitted to an H200 run, docs/benchmarks.md). Per token of the inner
  dimension the GEMM costs a read of ``a`` (m rows) plus ``m * |J|`` tensor-core multiply-adds, and
  the remainder kernel a fixed setup plus a cost per nonzero. The best ``J`` for such a model is
  always "the columns with the most nonzeros", so the choice is a scan over the fill thresholds.
  A uniform mask at low density keeps everything in the remainder (the CSR kernel wins), a dense
  uniform one sends everything to the GEMM (the "dense GEMM + gather" alternative), and a RoSA mask
  sends its hot (often: all non-empty) columns through the GEMM. On a CPU (not measured: the
  2-core CI machine is too noisy) ``"auto"`` keeps every nonzero in the remainder, so the plan
  computes exactly what the raw ops do.

Rounding: each part accumulates in float32 and rounds once to the output dtype, as the raw ops do,
but cuBLAS may split the reduction and, for float16/bfloat16, add the partial sums in the low
precision (``torch.backends.cuda.matmul.allow_{fp16,bf16}_reduced_precision_reduction``), and a
float32 GEMM uses TF32 if ``torch.backends.cuda.matmul.allow_tf32`` is set. ``spmm`` adds the hot
product to the remainder's already rounded result (``addmm``), so a 16-bit output can carry two
roundings (at most 2 units in the last place instead of 1).

Not thread- or stream-safe: ``spmm`` without autograd reuses one cached m x width buffer per dtype,
so calls sharing a plan must run on one CUDA stream (as a training step does).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from . import _C  # noqa: F401  (loading the extension registers the ops)
from .csr import (
    CSR,
    index_counts,
    check_same_device,
    check_same_dtype,
    check_size,
    check_tensor,
    check_values_tensor,
    validate_csr,
)

__all__ = ["MaskPlan", "planned_sddmm", "planned_seconds", "DEFAULT_HOT_FILL"]

_ops = torch.ops.rosa_kernels
_WIDTH_MULTIPLE = 8  # elements: 16 bytes of bfloat16 / float16, 32 of float32

DEFAULT_HOT_FILL = "auto"

# The cost model of "auto", in seconds per token of the inner dimension k (every term of both
# kernels grows with k, so the choice does not depend on it). Fitted to the H200 run of
# the plan timing script of c550a82 (bf16, k = 4096; docs/benchmarks.md, "Per-mask plan"). Keys: operand width in bytes,
# 2 (float16/bfloat16) or 4 (float32/float64; not measured with the plan: the raw kernel's fp32
# times of the SDDMM sweep and a ~50 TFLOP/s non-tensor-core GEMM).
#   gemm_fixed:          the hot path's launches and gathers (bt[J], the merge)
#   gemm_per_row:        reading a row of a (an element per token) once
#   gemm_per_row_column: a multiply-add per row x column of J (tensor cores for 16-bit)
#   rest_fixed:          the remainder kernel's setup (staging, token splits, launches)
#   rest_per_nonzero:    a multiply-add per remainder nonzero
_COST_KEYS = ("gemm_fixed", "gemm_per_row", "gemm_per_row_column", "rest_fixed", "rest_per_nonzero")
_COSTS = {
    2: {"gemm_fixed": 5e-9, "gemm_per_row": 0.6e-12, "gemm_per_row_column": 2.3e-15,
        "rest_fixed": 24e-9, "rest_per_nonzero": 0.37e-12},
    4: {"gemm_fixed": 5e-9, "gemm_per_row": 1.2e-12, "gemm_per_row_column": 2 / 50e12,
        "rest_fixed": 45e-9, "rest_per_nonzero": 0.7e-12},
}


def planned_seconds(m: int, hot_columns, rest_nnz, tokens: int, *, element_size: int = 2):
    """The cost model behind ``hot_fill="auto"``: predicted seconds of one planned SDDMM.

    ``m`` rows, ``hot_columns`` = |J|, ``rest_nnz`` nonzeros left to the CSR kernel, ``tokens`` the
    inner dimension k, ``element_size`` 2 (float16/bfloat16) or 4 (float32, float64). The counts
    may be tensors (the model is evaluated for many candidate J at once).
    """
    costs = _COSTS[2 if element_size <= 2 else 4]
    hot_columns = torch.as_tensor(hot_columns, dtype=torch.float64)
    rest_nnz = torch.as_tensor(rest_nnz, dtype=torch.float64)
    gemm = (hot_columns > 0) * (costs["gemm_fixed"]
                                + m * (costs["gemm_per_row"] + costs["gemm_per_row_column"] * hot_columns))
    rest = (rest_nnz > 0) * (costs["rest_fixed"] + costs["rest_per_nonzero"] * rest_nnz)
    seconds = (gemm + rest) * tokens
    return float(seconds) if seconds.dim() == 0 else seconds


def hot_column_choice(host_counts: torch.Tensor, m: int, hot_fill, element_size: int) -> tuple[int, int, int]:
    """``(min_count, |J|, J's nonzero count)``: J = the columns with >= ``min_count`` nonzeros, for the
    column counts ``host_counts`` (n,) on the host (``min_count`` = nnz + 1 when J is empty).

    ``hot_fill`` a number: the non-empty columns with fill >= ``hot_fill``. ``"auto"``: the
    threshold that minimizes :func:`planned_seconds` (for ``element_size``-byte operands) among "no
    hot column" and, for each distinct count c, all columns with >= c nonzeros (ties go together);
    the first minimum, i.e. the fewest hot columns among equals. One op (``plan_hot_columns``).
    """
    costs = _COSTS[2 if element_size <= 2 else 4]
    return _ops.plan_hot_columns(host_counts, m, None if hot_fill == "auto" else hot_fill,
                                 [costs[key] for key in _COST_KEYS])


# "auto" applies the cost model on these device types (it was fitted to GPU measurements); elsewhere
# it keeps every nonzero in the remainder and needs no column counts. (Tests add "cpu", to run a
# GPU's decisions on the CPU.)
_MODELLED_DEVICE_TYPES = ("cuda",)


def needs_column_counts(device: torch.device, hot_fill=DEFAULT_HOT_FILL) -> bool:
    """Whether a plan on ``device`` decides its hot columns from the column counts (a host copy)."""
    return hot_fill != "auto" or device.type in _MODELLED_DEVICE_TYPES


class _Decision(NamedTuple):
    hot_fill: float  # the threshold used (for "auto": the chosen one, inf for none)
    column_counts: torch.Tensor | None  # (n,) on the structure's device; None when not needed
    min_count: int  # J = the columns with >= min_count nonzeros
    hot_column_count: int  # |J|
    hot_nnz: int
    width: int  # the GEMM's width: |J| padded to a multiple of 8 (|J| when J is empty or every column)


def _decide(col_indices, m: int, n: int, hot_fill, dtype: torch.dtype, column_counts=None,
            host_counts=None) -> _Decision:
    """The plan's hot columns J, decided on the host from the column counts (``host_counts``, their
    host copy, when the caller has it; else one synchronization copies them)."""
    nnz = col_indices.shape[0]
    counts = None
    if not needs_column_counts(col_indices.device, hot_fill):
        min_count, h, hot_nnz = nnz + 1, 0, 0
    else:
        if column_counts is None:
            # A scatter-add count (bincount would synchronize to size its output).
            counts = index_counts(col_indices.long(), n)
        else:
            counts = check_tensor(column_counts, "column_counts")  # the ops check the rest
        if host_counts is None:
            # The one synchronization: the counts go to the host, where J, |J| and J's nonzero
            # count are decided, so that building the plan's tensors needs none (a plan is built
            # per layer when the masks are selected: every synchronization there was a measured
            # cost, docs/benchmarks.md).
            host_counts = counts.cpu()
        min_count, h, hot_nnz = hot_column_choice(host_counts, m, hot_fill, dtype.itemsize)
    if hot_fill == "auto":
        hot_fill = min(1.0, min_count / m) if m and min_count <= nnz else math.inf
    # cuBLAS takes its tensor-core paths only when leading dimensions are multiples of 16 bytes:
    # with an odd |J| the GEMM ran 2.5-3.6x slower on the H200 (docs/benchmarks.md). So G and
    # A_hot get width = |J| rounded up to a multiple of 8, the extra columns gathering copies of
    # J's first column: their products are never read, and A_hot's extra columns stay zero.
    # When J is every column, the operands are used as they are (no gather at all).
    width = h if h in (0, n) else -(-h // _WIDTH_MULTIPLE) * _WIDTH_MULTIPLE
    return _Decision(hot_fill, counts, min_count, h, hot_nnz, width)


def sddmm_parts_of(row_offsets, col_indices, m: int, n: int, *, dtype: torch.dtype, column_counts=None,
                   host_counts=None):
    """``MaskPlan(row_offsets, col_indices, m, n, dtype=dtype, validate=False,
    column_counts=column_counts).sddmm_parts()`` without building the rest of the plan, or None when
    the plan has no hot column (then it is the raw SDDMM). For a validated int32 structure;
    ``host_counts``: the column counts' host copy, when the caller made it (RosaLinear copies every
    layer's at once)."""
    decision = _decide(col_indices, m, n, DEFAULT_HOT_FILL, dtype, column_counts, host_counts)
    if not decision.width:
        return None
    _, gather, target, rest_row_offsets, rest_row_indices, rest_col_indices, *_ = \
        _ops.mask_plan(row_offsets, col_indices, n, *decision[1:])
    return (gather, target, rest_row_offsets, rest_row_indices, rest_col_indices, decision.width,
            col_indices.shape[0] - decision.hot_nnz)


def host_copies(tensors: list) -> list:
    """The host copies of 1-D ``tensors`` of one dtype: one copy (one synchronization) per device for
    all of them, instead of one each."""
    copies = list(tensors)
    by_device = {}
    for i, t in enumerate(tensors):
        if t.device.type != "cpu":
            by_device.setdefault(t.device, []).append(i)
    for positions in by_device.values():
        parts = [tensors[i] for i in positions]
        host = (torch.cat(parts) if len(parts) > 1 else parts[0]).cpu()
        for i, copy in zip(positions, host.split([t.shape[0] for t in parts])):
            copies[i] = copy
    return copies


@torch.library.register_fake("rosa_kernels::mask_plan")
def _mask_plan_fake(row_offsets, col_indices, n, column_counts, min_count, hot_column_count, hot_nnz, width):
    m, nnz, h, device = row_offsets.shape[0] - 1, col_indices.shape[0], hot_column_count, row_offsets.device
    rest_nnz = nnz - hot_nnz

    def index(size, dtype=torch.int64):
        return torch.empty(size, dtype=dtype, device=device)

    return (index(h), index(width) if 0 < h < n else None, index(nnz), index(m + 1, torch.int32),
            index(m, torch.int32), index(rest_nnz, torch.int32), index(hot_nnz), index(hot_nnz), index(hot_nnz),
            index(rest_nnz))


def _check_hot_fill(hot_fill):
    if isinstance(hot_fill, str):
        if hot_fill != "auto":
            raise ValueError(f"hot_fill must be 'auto' or a number in [0, 1], got {hot_fill!r}")
        return hot_fill
    if isinstance(hot_fill, bool) or not isinstance(hot_fill, numbers.Real):
        raise TypeError(f"hot_fill must be 'auto' or a number in [0, 1], got {type(hot_fill).__name__}")
    hot_fill = float(hot_fill)
    if not 0.0 <= hot_fill <= 1.0:  # also refuses NaN
        raise ValueError(f"hot_fill must be 'auto' or a number in [0, 1], got {hot_fill}")
    return hot_fill


def _select_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` (len(index) x k), gathering along the dimension that is contiguous in memory.

    For a transposed view of a row-major tensor (RoSA's ``bt = X.t()``) the gather runs over the
    columns of ``X`` (each output row reads inside one row of X) and the result is again a
    transposed view, which cuBLAS reads as such: no full transpose is ever made.
    """
    if x.dim() == 2 and x.stride(0) == 1 and x.stride(1) != 1 and x.shape[1] > 1:
        return x.t().index_select(1, index).t()
    return x.index_select(0, index)


def planned_sddmm(a, bt, gather, target, rest_row_offsets, rest_row_indices, rest_col_indices, width: int,
                  rest_nnz: int) -> torch.Tensor:
    """:meth:`MaskPlan.sddmm` without checks or autograd, from :meth:`MaskPlan.sddmm_parts`
    (``width > 0``): G = a @ bt[J]^T written straight into the merged buffer (no copy of G), the
    remainder after it, one gather into the mask's order."""
    m = a.shape[0]
    bt_hot = bt if gather is None else _select_rows(bt, gather)
    merged = torch.empty(m * width + rest_nnz, dtype=a.dtype, device=a.device)
    torch.mm(a, bt_hot.t(), out=merged[: m * width].view(m, width))
    if rest_nnz:
        merged[m * width:].copy_(_ops.sddmm(rest_row_offsets, rest_row_indices, rest_col_indices, a, bt))
    return merged.index_select(0, target)


class MaskPlan:
    """A plan for one mask (row-sorted CSR structure of an m x n matrix); see the module docstring.

    ``MaskPlan(row_offsets, col_indices, m, n, *, hot_fill="auto", dtype=torch.bfloat16,
    validate=True, column_counts=None)``: ``dtype`` only steers ``"auto"`` (the cost model differs
    for 16-bit and 32-bit operands); ``validate`` checks the index contents (one synchronization on
    a GPU; pass ``False`` for a structure validated before); ``column_counts`` (n,), the nonzeros per
    column when already known (e.g. ``rosa_kernels.masks.mask_structure``'s), saves counting them
    (trusted: not checked against the structure). The plan lives on the structure's device.

    Attributes: ``shape``, ``nnz``, ``hot_fill`` (the threshold used; for ``"auto"`` the chosen
    one), ``hot_columns`` (J, int64), ``hot_positions`` / ``hot_rows`` / ``hot_slots`` (int64: the
    positions of the hot nonzeros in the original order and their row and position in J),
    ``rest_row_offsets`` / ``rest_row_indices`` / ``rest_col_indices`` (the remainder's row-sorted
    CSR structure, int32) with ``rest_positions`` (int64: where its nonzeros sit in the original
    order), and ``target`` (nnz,) int64.
    """

    def __init__(self, row_offsets, col_indices, m, n, *, hot_fill=DEFAULT_HOT_FILL, dtype=torch.bfloat16,
                 validate=True, column_counts=None):
        m = check_size(m, "m")
        n = check_size(n, "n")
        hot_fill = _check_hot_fill(hot_fill)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        if not isinstance(validate, bool):
            raise TypeError(f"validate must be a bool, got {type(validate).__name__}")
        row_offsets, col_indices, _ = validate_csr(row_offsets, col_indices, m, n, check_contents=validate)
        device = row_offsets.device
        nnz = col_indices.shape[0]
        self.shape = (m, n)
        self.nnz = nnz
        self.device = device

        decision = _decide(col_indices, m, n, hot_fill, dtype, column_counts)
        self.hot_fill, self._width = decision.hot_fill, decision.width
        # Positions ascend, so the remainder stays row-sorted with ascending columns in each row;
        # target[p] is where nonzero p lives in [G or A_hot (m x width, row-major) | remainder].
        (self.hot_columns, self._gather, self.target, self.rest_row_offsets, self.rest_row_indices,
         self.rest_col_indices, self.hot_positions, self.hot_rows, self.hot_slots, self.rest_positions) = \
            _ops.mask_plan(row_offsets, col_indices, n, *decision[1:])
        self._buffers = {}  # dtype -> zeroed [A_hot | rest values] buffer of spmm without autograd

    @classmethod
    def from_csr(cls, csr: CSR, **kwargs) -> "MaskPlan":
        """The plan of a :class:`CSR`'s structure (its values are not used)."""
        m, n = csr.shape
        return cls(csr.row_offsets, csr.col_indices, m, n, **kwargs)

    @property
    def hot_nnz(self) -> int:
        return self.hot_positions.shape[0]

    @property
    def rest_nnz(self) -> int:
        return self.rest_positions.shape[0]

    def __repr__(self) -> str:
        m, n = self.shape
        return (f"MaskPlan(shape=({m}, {n}), nnz={self.nnz}, hot_columns={self.hot_columns.shape[0]}, "
                f"hot_nnz={self.hot_nnz}, rest_nnz={self.rest_nnz}, hot_fill={self.hot_fill:g}, "
                f"device={self.device})")

    # ------------------------------------------------------------------------------------------
    # Per-call checks: only shapes, dtypes and devices (no index contents, no synchronization).
    # ------------------------------------------------------------------------------------------

    def _check_operands(self, first: torch.Tensor, first_name: str, first_dim: int, second: torch.Tensor,
                        second_name: str) -> None:
        """Both are value tensors (``first`` of ``first_dim`` dimensions, ``second`` 2-D) of one dtype,
        on the plan's device."""
        check_values_tensor(first, first_name, first_dim)
        check_values_tensor(second, second_name, 2)
        check_same_dtype(first, first_name, **{second_name: second})
        if first.device != self.device:
            raise ValueError(f"{first_name} must be on the plan's device ({self.device}), got {first.device}")
        check_same_device(first, first_name, **{second_name: second})

    def _uses_autograd(self, *tensors) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)

    # ------------------------------------------------------------------------------------------
    # The ops
    # ------------------------------------------------------------------------------------------

    def _hot_rows_of(self, x):
        """x[J] padded to the plan's width (x itself when J is every row of x)."""
        return x if self._gather is None else _select_rows(x, self._gather)

    def _rest_sddmm(self, a, bt):
        return _ops.sddmm(self.rest_row_offsets, self.rest_row_indices, self.rest_col_indices, a, bt)

    def _rest_spmm(self, values, dense):
        return _ops.spmm(values, self.rest_row_offsets, self.rest_row_indices, self.rest_col_indices, dense,
                         self.shape[0])

    def sddmm(self, a: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
        """``out[p] = <a[i, :], bt[j, :]>`` for each nonzero ``p = (i, j)``, in the mask's order.

        The same result as ``rosa_kernels.sddmm(row_offsets, row_indices, col_indices, a, bt)``
        (to rounding); ``a`` (m, k) and ``bt`` (n, k) may be transposed views (RoSA's
        ``dS = plan.sddmm(dY.t(), X.t())``). Differentiable w.r.t. ``a`` and ``bt``.
        """
        self._check_operands(a, "a", 2, bt, "bt")
        m, n = self.shape
        if a.shape[0] != m:
            raise ValueError(f"a must have m = {m} rows, got shape {tuple(a.shape)}")
        if bt.shape != (n, a.shape[1]):
            raise ValueError(f"bt must have shape (n, a.shape[1]) = ({n}, {a.shape[1]}), got {tuple(bt.shape)}")
        h = self._width
        if h == 0:  # everything is remainder, in the original order
            return self._rest_sddmm(a, bt)
        if not self._uses_autograd(a, bt):
            return planned_sddmm(a, bt, *self.sddmm_parts())
        bt_hot = self._hot_rows_of(bt)
        g = torch.mm(a, bt_hot.t()).view(-1)
        merged = g if not self.rest_nnz else torch.cat([g, self._rest_sddmm(a, bt)])
        return merged.index_select(0, self.target)

    def sddmm_parts(self) -> tuple:
        """``(gather, target, rest_row_offsets, rest_row_indices, rest_col_indices, width, rest_nnz)``:
        what :func:`planned_sddmm` needs besides the operands (RosaLinear hands these to its autograd
        function, which takes tensors and numbers only). ``gather`` is None when no column is
        gathered (J is every column); only meaningful for a plan with hot columns (``width > 0``)."""
        return (self._gather, self.target, self.rest_row_offsets, self.rest_row_indices, self.rest_col_indices,
                self._width, self.rest_nnz)

    def spmm(self, values: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """``A @ dense`` (m, k) for the plan's mask with ``values`` (nnz,); ``dense`` is (n, k).

        The same result as ``rosa_kernels.spmm(values, row_offsets, row_indices, col_indices, dense, m)``
        (to rounding; see the module docstring). ``dense`` may be a transposed view (RoSA's
        ``X S^T = plan.spmm(values, X.t()).t()``). Differentiable w.r.t. ``values`` and ``dense``.
        """
        self._check_operands(values, "values", 1, dense, "dense")
        m, n = self.shape
        if values.shape[0] != self.nnz:
            raise ValueError(f"values must have length nnz = {self.nnz}, got {values.shape[0]}")
        if dense.shape[0] != n:
            raise ValueError(f"dense must have n = {n} rows, got shape {tuple(dense.shape)}")
        h = self._width
        if h == 0:  # everything is remainder, in the original order
            return self._rest_spmm(values, dense)
        size = m * h + self.rest_nnz
        autograd = self._uses_autograd(values, dense)
        if autograd:
            # Out of place, so the graph owns its copy of A_hot (a shared buffer would be overwritten).
            merged = values.new_zeros(size).index_copy(0, self.target, values)
        else:
            # Positions outside the mask are never written: the buffer stays zero there across calls.
            merged = self._buffers.get(values.dtype)
            if merged is None:
                merged = self._buffers[values.dtype] = values.new_zeros(size)
            merged.index_copy_(0, self.target, values)
        a_hot = merged[: m * h].view(m, h)
        dense_hot = self._hot_rows_of(dense)
        if not self.rest_nnz:
            return torch.mm(a_hot, dense_hot)
        out = self._rest_spmm(merged[m * h:], dense)
        return torch.addmm(out, a_hot, dense_hot) if autograd else out.addmm_(a_hot, dense_hot)

    def to(self, device) -> "MaskPlan":
        """The same plan on another device (no re-planning, no synchronization)."""
        plan = object.__new__(MaskPlan)
        plan.__dict__.update(self.__dict__)
        for name, value in self.__dict__.items():
            if isinstance(value, torch.Tensor):
                setattr(plan, name, value.to(device))
        plan.device = plan.target.device
        plan._buffers = {}
        return plan
