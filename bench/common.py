"""What the benchmark suites and the report share: cases, inputs, implementations, bytes, FLOPs, timing.

A :class:`Case` names one measurement point (op, shape, density, mask kind, dtype, device).
:func:`prepare` turns it into zero-argument callables, one per implementation (ours and every
alternative a user has), that rotate over several freshly drawn random input sets, so that inputs
which would fit in the last-level cache are not served hot from it call after call. It also counts
the case's minimum bytes and FLOPs, from which :func:`floor_seconds` computes the hardware floor.

Alternatives per op (``ALTERNATIVES``; ``ours+plan``, our :class:`rosa_kernels.MaskPlan` with its
default rule, built once per mask outside the timed call, is listed there too but is one of ours, so
the report leaves it out of "the best alternative"):

- ``spmm``  ``A @ D``: ``torch.sparse`` (``torch.sparse.mm`` on a CSR tensor), ``dense``
  (``torch.mm`` with the densified ``A``), ``scipy`` (``csr_matrix @ ndarray``, CPU only).
- ``sddmm`` ``mask ∘ (a @ bt^T)`` with row-major ``a`` (m x K), ``bt`` (n x K), and ``sddmm_t``, the
  training layout ``a = dY.t()``, ``bt = X.t()`` of row-major activations dY (K x m), X (K x n):
  ``torch.sparse`` (``torch.sparse.sampled_addmm``), ``dense`` (``torch.mm`` + ``torch.take`` of
  the mask positions), ``scipy`` (NumPy gather of the rows + row-wise dots in chunks: scipy.sparse
  has no SDDMM; CPU only).
- ``csr_transpose``: ``torch.sparse`` (``to_sparse_csc``), ``argsort`` (a stable sort of the column
  indices in plain PyTorch), ``dense`` (densify, transpose, ``to_sparse_csr``), ``scipy``
  (``tocsc``, CPU only).
- ``csr_add`` ``D + A`` (out of place): ``torch.sparse`` (``D + A_csr``), ``index_add`` (clone + a
  scatter-add of the values in plain PyTorch), ``dense`` (``D + S`` with S kept dense), ``scipy``
  (``csr_matrix + ndarray``, CPU only).

An alternative without a kernel for the case's dtype (``torch.sparse`` has no bfloat16 SpMM or
SDDMM on CPU, for example) is run on float32 copies, which are made outside the timed region, and
carries a note saying so; one that cannot run at all is reported as unavailable with the reason.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import platform
import statistics
import time
import warnings
from typing import Any, Callable

import torch

import rosa_kernels
from rosa_kernels import testing

# torch's CSR tensors warn that they are in beta on first use; that is noise in a benchmark log.
warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta.*")
warnings.filterwarnings("ignore", message=".*[Ss]parse invariant checks.*")

OURS = "rosa_kernels"
# Our own variants, timed beside OURS but never counted as "the best alternative" a user has:
# ours+plan is rosa_kernels.MaskPlan (hot columns through a dense GEMM), built outside the timing.
PLANNED = "ours+plan"
VARIANTS = (PLANNED,)
OPS = ("spmm", "sddmm", "sddmm_t", "csr_transpose", "csr_add")
ALTERNATIVES = {
    "spmm": (PLANNED, "torch.sparse", "dense", "scipy"),
    "sddmm": (PLANNED, "torch.sparse", "dense", "scipy"),
    "sddmm_t": (PLANNED, "torch.sparse", "dense", "scipy"),
    "csr_transpose": ("torch.sparse", "argsort", "dense", "scipy"),
    "csr_add": ("torch.sparse", "index_add", "dense", "scipy"),
}
LAYER_IMPLEMENTATIONS = (OURS, "lora", "full")

# (m, n, tokens): the sparse matrix is m x n (out x in), tokens is SpMM's dense width and SDDMM's
# inner dimension. See API_CONTRACTS.md / DESIGN.md.
CPU_SHAPES = ((1024, 1024, 512), (2752, 1024, 512))
GPU_SHAPES = ((4096, 4096, 4096), (11008, 4096, 4096), (4096, 11008, 4096))
DENSITIES = (0.001, 0.003, 0.01, 0.03)
MASKS = ("uniform", "rosa")
LORA_RANK = 16
INDEX_BYTES = 4  # int32 row offsets and column indices

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class Unavailable(Exception):
    """An implementation that cannot run for a case (no scipy on a GPU, no layer class, ...)."""


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------


class _CaseNames:
    """What a measurement point's dataclass derives from its fields: dtype, shape, group, id."""

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def shape(self) -> str:
        return f"{self.m}x{self.n}x{self.tokens}"

    @property
    def group(self) -> str:
        """pytest-benchmark group: every implementation of one case lands in one table."""
        return f"{self.kind}-{self.shape}-{self.density:g}-{self.mask}-{self.dtype}"

    @property
    def id(self) -> str:
        return self.group


@dataclasses.dataclass(frozen=True)
class Case(_CaseNames):
    """One measurement point. ``tokens`` is unused by csr_transpose and csr_add."""

    op: str
    m: int
    n: int
    tokens: int
    density: float
    mask: str
    dtype: str
    device: str

    @property
    def kind(self) -> str:
        return self.op

    @property
    def shape(self) -> str:
        if self.op in ("csr_transpose", "csr_add"):
            return f"{self.m}x{self.n}"
        return super().shape


@dataclasses.dataclass(frozen=True)
class LayerCase(_CaseNames):
    """One training step of a layer: ``out_features`` = m, ``in_features`` = n."""

    m: int
    n: int
    tokens: int
    density: float
    mask: str
    dtype: str
    device: str

    kind = "layer-step"


def op_cases(ops, shapes, densities, masks, dtypes, device) -> list[Case]:
    """The product of the parameters, without duplicates (tokens do not matter to some ops)."""
    cases, seen = [], set()
    for op, dtype, (m, n, tokens), density, mask in itertools.product(ops, dtypes, shapes, densities, masks):
        case = Case(op, m, n, tokens, float(density), mask, dtype, str(device))
        if case.group not in seen:
            seen.add(case.group)
            cases.append(case)
    return cases


def cpu_cases(ops=OPS, dtypes=("float32",)) -> list[Case]:
    return op_cases(ops, CPU_SHAPES, DENSITIES, MASKS, dtypes, "cpu")


def gpu_cases(ops=OPS, dtypes=("bfloat16", "float32")) -> list[Case]:
    return op_cases(ops, GPU_SHAPES, DENSITIES, MASKS, dtypes, "cuda")


def cpu_layer_cases() -> list[LayerCase]:
    return [LayerCase(m, n, tokens, 0.01, "rosa", "float32", "cpu") for m, n, tokens in CPU_SHAPES]


def gpu_layer_cases(dtypes=("bfloat16",)) -> list[LayerCase]:
    return [
        LayerCase(m, n, tokens, density, "rosa", dtype, "cuda")
        for dtype in dtypes
        for m, n, _ in GPU_SHAPES
        for tokens in (2048, 8192)
        for density in (0.003, 0.01)
    ]


# ----------------------------------------------------------------------------------------------
# Masks, random inputs and how many input sets to rotate over
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def mask_csr(kind: str, m: int, n: int, density: float, device: str) -> rosa_kernels.CSR:
    """The seeded mask of the performance protocol (float32 values; cached: rosa masks take a GEMM)."""
    if kind == "uniform":
        return testing.uniform_mask(m, n, density, seed=0, device=device)
    if kind == "rosa":
        return testing.rosa_mask(m, n, density, seed=0, device=device)
    raise ValueError(f"mask kind must be 'uniform' or 'rosa', got {kind!r}")


@functools.lru_cache(maxsize=64)
def mask_stats(kind: str, m: int, n: int, density: float, device: str) -> tuple[int, int, int]:
    """(nnz, non-empty rows, non-empty columns): what the minimum bytes of SpMM/SDDMM depend on."""
    mask = mask_csr(kind, m, n, density, device)
    rows_used = int((mask.row_offsets[1:] > mask.row_offsets[:-1]).sum())
    cols_used = int(torch.unique(mask.col_indices).numel()) if mask.nnz else 0
    return mask.nnz, rows_used, cols_used


def last_level_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
        return int(text.rstrip("KM")) * scale
    except (OSError, ValueError):
        return 32 << 20


def number_of_sets(set_bytes: int, device: torch.device, limit: int = 8) -> int:
    """Enough input sets that one round over them is twice the last-level cache (1 to ``limit``)."""
    return max(1, min(limit, math.ceil(2 * last_level_cache_bytes(device) / max(set_bytes, 1))))


def _random(shape, dtype, device, generator) -> torch.Tensor:
    # Drawn in float32 on the device, then cast: every dtype gets the same distribution, never zeros.
    return torch.randn(shape, dtype=torch.float32, device=device, generator=generator).to(dtype)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


class _Rotating:
    """A zero-argument callable applying ``fn`` to the next input set on each call."""

    def __init__(self, fn: Callable, argument_sets: list[tuple]):
        self.fn, self.argument_sets = fn, argument_sets
        self.reset()

    def reset(self) -> None:
        self._sets = itertools.cycle(self.argument_sets)

    def __call__(self):
        return self.fn(*next(self._sets))


_rotating = _Rotating


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ----------------------------------------------------------------------------------------------
# Prepared cases: callables per implementation, plus bytes and FLOPs
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Prepared:
    case: Any
    calls: dict[str, Callable[[], Any]]
    unavailable: dict[str, str]
    notes: dict[str, str]
    normalize: dict[str, Callable[[Any], Any]]  # implementation -> result in a comparable form
    min_bytes: int
    flops: int
    nnz: int
    sets: int


def prepare(case: Case) -> Prepared:
    """Inputs and one callable per implementation of ``case`` (see the module docstring)."""
    builders = {
        "spmm": _prepare_spmm,
        "sddmm": _prepare_sddmm,
        "sddmm_t": _prepare_sddmm,
        "csr_transpose": _prepare_csr_transpose,
        "csr_add": _prepare_csr_add,
    }
    return builders[case.op](case)


class _Builder:
    """Collects implementations; each is registered from a factory that may raise."""

    def __init__(self):
        self.calls, self.unavailable, self.notes, self.normalize = {}, {}, {}, {}

    def add(self, name: str, factory: Callable[[], tuple], *, cpu_only: bool = False, device=None):
        if cpu_only and device is not None and device.type != "cpu":
            self.unavailable[name] = "CPU only"
            return
        try:
            call, normalize, note = factory()
            call()  # a first call: fails here rather than inside a timing loop
            if hasattr(call, "reset"):
                call.reset()  # every implementation starts again from input set 0
        except Unavailable as error:
            self.unavailable[name] = str(error)
            return
        except Exception as error:  # noqa: BLE001 - a broken alternative must not stop the sweep
            self.unavailable[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
            return
        self.calls[name] = call
        self.normalize[name] = normalize
        if note:
            self.notes[name] = note


def _first_working(case, make: Callable[[torch.dtype], tuple]) -> tuple:
    """``make(dtype)`` for the case's dtype, else float32 with a note (a missing low-precision kernel)."""
    try:
        call, normalize = make(case.torch_dtype)
        call()
        return call, normalize, None
    except (RuntimeError, NotImplementedError) as error:
        if case.torch_dtype == torch.float32:
            raise
        reason = str(error).splitlines()[0][:100]
        call, normalize = make(torch.float32)
        return call, normalize, f"ran in float32 (no {case.dtype} kernel: {reason})"


def _scipy_dtype_check(case):
    if case.torch_dtype not in (torch.float32, torch.float64):
        raise Unavailable(f"scipy has no {case.dtype}")
    try:
        import scipy.sparse  # noqa: F401
    except ImportError as error:
        raise Unavailable("scipy is not installed") from error


def _scipy_csr(values, row_offsets, col_indices, shape):
    import scipy.sparse as sp

    return sp.csr_matrix((values.cpu().numpy(), col_indices.cpu().numpy(), row_offsets.cpu().numpy()), shape=shape)


def _csr_tensor(row_offsets, col_indices, values, m, n) -> torch.Tensor:
    return torch.sparse_csr_tensor(row_offsets, col_indices, values, size=(m, n), check_invariants=False)


def _dense_of(values, mask, m, n):
    return _csr_tensor(mask.row_offsets, mask.col_indices, values, m, n).to_dense()


def _as_float64(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64)
    import numpy as np

    return torch.from_numpy(np.asarray(x, dtype=np.float64))


def _mask_plan(row_offsets, col_indices, m, n, dtype) -> rosa_kernels.MaskPlan:
    """The plan of ours+plan (default rule for the case's dtype), built before any timing."""
    plan_class = getattr(rosa_kernels, "MaskPlan", None)
    if plan_class is None:
        raise Unavailable("rosa_kernels.MaskPlan is not in this build")
    return plan_class(row_offsets, col_indices, m, n, dtype=dtype, validate=False)


def _prepare_spmm(case: Case) -> Prepared:
    device, dtype = torch.device(case.device), case.torch_dtype
    m, n, tokens = case.m, case.n, case.tokens
    mask = mask_csr(case.mask, m, n, case.density, case.device)
    nnz, _, cols_used = mask_stats(case.mask, m, n, case.density, case.device)
    size = _element_size(dtype)
    # A's values and indices once, only the rows of D that A's non-empty columns select, Y once.
    min_bytes = nnz * (size + INDEX_BYTES) + (m + 1) * INDEX_BYTES + cols_used * tokens * size + m * tokens * size
    flops = 2 * nnz * tokens
    sets = number_of_sets(min_bytes, device)
    gen = _generator(device, 1)
    inputs = [(_random(nnz, dtype, device, gen), _random((n, tokens), dtype, device, gen)) for _ in range(sets)]
    offsets, order, cols = mask.row_offsets, mask.row_indices, mask.col_indices
    dense_result = _as_float64

    b = _Builder()
    b.add(OURS, lambda: (
        _rotating(lambda v, d: rosa_kernels.spmm(v, offsets, order, cols, d, m, validate=False), inputs),
        dense_result, None))
    b.add(PLANNED, lambda: (_rotating(_mask_plan(offsets, cols, m, n, dtype).spmm, inputs), dense_result, None))

    def torch_sparse(dt):
        args = [(_csr_tensor(offsets, cols, v.to(dt), m, n), d.to(dt)) for v, d in inputs]
        return _rotating(torch.sparse.mm, args), dense_result

    b.add("torch.sparse", lambda: _first_working(case, torch_sparse))
    b.add("dense", lambda: (_rotating(torch.mm, [(_dense_of(v, mask, m, n), d) for v, d in inputs]),
                            dense_result, None))

    def scipy_spmm():
        _scipy_dtype_check(case)
        args = [(_scipy_csr(v, offsets, cols, (m, n)), d.numpy()) for v, d in inputs]
        return _rotating(lambda a, d: a @ d, args), dense_result, None

    b.add("scipy", scipy_spmm, cpu_only=True, device=device)
    return Prepared(case, b.calls, b.unavailable, b.notes, b.normalize, min_bytes, flops, nnz, sets)


def _gather_dot(a, bt, rows, cols, chunk_bytes=32 << 20):
    """out[p] = <a[rows[p]], bt[cols[p]]> with NumPy, in chunks that bound the gathered copies."""
    import numpy as np

    out = np.empty(rows.shape[0], dtype=a.dtype)
    step = max(1, chunk_bytes // max(1, 2 * a.shape[1] * a.itemsize))
    for start in range(0, rows.shape[0], step):
        stop = start + step
        np.einsum("ij,ij->i", a[rows[start:stop]], bt[cols[start:stop]], out=out[start:stop])
    return out


def _prepare_sddmm(case: Case) -> Prepared:
    device, dtype = torch.device(case.device), case.torch_dtype
    m, n, inner = case.m, case.n, case.tokens
    mask = mask_csr(case.mask, m, n, case.density, case.device)
    nnz, rows_used, cols_used = mask_stats(case.mask, m, n, case.density, case.device)
    size = _element_size(dtype)
    # Only the rows of a and bt that some nonzero selects, the indices once, the nnz outputs.
    min_bytes = (rows_used + cols_used) * inner * size + nnz * (INDEX_BYTES + size) + (m + 1) * INDEX_BYTES
    flops = 2 * nnz * inner
    sets = number_of_sets(min_bytes, device)
    gen = _generator(device, 2)
    if case.op == "sddmm_t":
        # The training layout: dS = mask ∘ (dY^T X) with dY (T x m), X (T x n) row-major, as they come.
        inputs = [(_random((inner, m), dtype, device, gen).t(), _random((inner, n), dtype, device, gen).t())
                  for _ in range(sets)]
    else:
        inputs = [(_random((m, inner), dtype, device, gen), _random((n, inner), dtype, device, gen))
                  for _ in range(sets)]
    offsets, order, cols = mask.row_offsets, mask.row_indices, mask.col_indices
    rows = torch.repeat_interleave(torch.arange(m, device=device), (offsets[1:] - offsets[:-1]).long())
    flat = rows * n + cols.long()
    values_result = _as_float64

    b = _Builder()
    b.add(OURS, lambda: (
        _rotating(lambda a, bt: rosa_kernels.sddmm(offsets, order, cols, a, bt, validate=False), inputs),
        values_result, None))
    b.add(PLANNED, lambda: (_rotating(_mask_plan(offsets, cols, m, n, dtype).sddmm, inputs), values_result, None))

    def torch_sparse(dt):
        pattern = _csr_tensor(offsets, cols, mask.values.to(dt), m, n)
        args = [(pattern, a.to(dt), bt.to(dt).t()) for a, bt in inputs]
        return (_rotating(lambda s, a, b_: torch.sparse.sampled_addmm(s, a, b_, beta=0.0).values(), args),
                values_result)

    b.add("torch.sparse", lambda: _first_working(case, torch_sparse))
    b.add("dense", lambda: (_rotating(lambda a, bt: torch.take(torch.mm(a, bt.t()), flat), inputs),
                            values_result, None))

    def scipy_sddmm():
        _scipy_dtype_check(case)
        rows_np, cols_np = rows.numpy(), cols.long().numpy()
        args = [(a.numpy(), bt.numpy(), rows_np, cols_np) for a, bt in inputs]
        return _rotating(_gather_dot, args), values_result, "NumPy gather + row dots (scipy.sparse has no SDDMM)"

    b.add("scipy", scipy_sddmm, cpu_only=True, device=device)
    return Prepared(case, b.calls, b.unavailable, b.notes, b.normalize, min_bytes, flops, nnz, sets)


def _transpose_by_sort(values, row_offsets, col_indices, m, n):
    """The transpose in plain PyTorch: a stable sort by column keeps rows ascending in each column."""
    nnz = col_indices.shape[0]
    counts = (row_offsets[1:] - row_offsets[:-1]).long()
    rows = torch.repeat_interleave(torch.arange(m, dtype=torch.int32, device=values.device), counts, output_size=nnz)
    sorted_cols, permutation = torch.sort(col_indices, stable=True)
    per_column = torch.zeros(n + 1, dtype=torch.int64, device=values.device)
    per_column.index_add_(0, sorted_cols.long() + 1, torch.ones_like(permutation))
    return values[permutation], per_column.cumsum(0).to(torch.int32), rows[permutation]


def _prepare_csr_transpose(case: Case) -> Prepared:
    device, dtype = torch.device(case.device), case.torch_dtype
    m, n = case.m, case.n
    mask = mask_csr(case.mask, m, n, case.density, case.device)
    nnz = mask.nnz
    size = _element_size(dtype)
    # Read values, column indices and offsets; write the transposed three (no permutation).
    min_bytes = 2 * nnz * (size + INDEX_BYTES) + (m + 1 + n + 1) * INDEX_BYTES
    sets = number_of_sets(min_bytes, device)
    gen = _generator(device, 3)
    inputs = [_random(nnz, dtype, device, gen) for _ in range(sets)]
    offsets, cols = mask.row_offsets, mask.col_indices

    def structure_result(result):
        values_t, offsets_t, indices_t = result
        return _as_float64(values_t), offsets_t.cpu().long(), indices_t.cpu().long()

    def torch_result(t):
        if t.layout == torch.sparse_csc:
            return structure_result((t.values(), t.ccol_indices(), t.row_indices()))
        return structure_result((t.values(), t.crow_indices(), t.col_indices()))

    def scipy_result(t):
        return structure_result((torch.from_numpy(t.data), torch.from_numpy(t.indptr), torch.from_numpy(t.indices)))

    b = _Builder()
    b.add(OURS, lambda: (
        _rotating(lambda v: rosa_kernels.csr_transpose(v, offsets, cols, m, n, validate=False), [(v,) for v in inputs]),
        structure_result, None))
    csr_tensors = [(_csr_tensor(offsets, cols, v, m, n),) for v in inputs]
    b.add("torch.sparse", lambda: (_rotating(lambda a: a.to_sparse_csc(), csr_tensors), torch_result, None))
    b.add("argsort", lambda: (
        _rotating(lambda v: _transpose_by_sort(v, offsets, cols, m, n), [(v,) for v in inputs]),
        structure_result, None))
    b.add("dense", lambda: (_rotating(lambda a: a.to_dense().t().to_sparse_csr(), csr_tensors), torch_result, None))

    def scipy_transpose():
        _scipy_dtype_check(case)
        args = [(_scipy_csr(v, offsets, cols, (m, n)),) for v in inputs]
        return _rotating(lambda a: a.tocsc(), args), scipy_result, None

    b.add("scipy", scipy_transpose, cpu_only=True, device=device)
    return Prepared(case, b.calls, b.unavailable, b.notes, b.normalize, min_bytes, 0, nnz, sets)


def _prepare_csr_add(case: Case) -> Prepared:
    device, dtype = torch.device(case.device), case.torch_dtype
    m, n = case.m, case.n
    mask = mask_csr(case.mask, m, n, case.density, case.device)
    nnz = mask.nnz
    size = _element_size(dtype)
    # Read D and write D + A once each, plus A's values and indices.
    min_bytes = 2 * m * n * size + nnz * (size + INDEX_BYTES) + (m + 1) * INDEX_BYTES
    sets = number_of_sets(min_bytes, device)
    gen = _generator(device, 4)
    inputs = [(_random(nnz, dtype, device, gen), _random((m, n), dtype, device, gen)) for _ in range(sets)]
    offsets, order, cols = mask.row_offsets, mask.row_indices, mask.col_indices
    rows = torch.repeat_interleave(torch.arange(m, device=device), (offsets[1:] - offsets[:-1]).long())
    flat = rows * n + cols.long()

    def index_add(v, d):
        out = d.clone()
        out.view(-1).index_add_(0, flat, v)
        return out

    b = _Builder()
    b.add(OURS, lambda: (
        _rotating(lambda v, d: rosa_kernels.csr_add(v, offsets, order, cols, d, validate=False), inputs),
        _as_float64, None))
    csr_inputs = [(_csr_tensor(offsets, cols, v, m, n), d) for v, d in inputs]

    def torch_sparse_add():
        try:
            call = _rotating(lambda a, d: d + a, csr_inputs)
            call()
            return call, _as_float64, None
        except (RuntimeError, NotImplementedError) as error:
            # No dense + CSR kernel on this device: what remains to a user is densifying A.
            reason = str(error).splitlines()[0][:100]
            return (_rotating(lambda a, d: a.to_dense().add_(d), csr_inputs), _as_float64,
                    f"A.to_dense() + D (no dense + CSR kernel: {reason})")

    b.add("torch.sparse", torch_sparse_add)
    b.add("index_add", lambda: (_rotating(index_add, inputs), _as_float64, None))
    dense_inputs = [(d, _dense_of(v, mask, m, n)) for v, d in inputs]
    b.add("dense", lambda: (_rotating(torch.add, dense_inputs), _as_float64, None))

    def scipy_add():
        _scipy_dtype_check(case)
        args = [(_scipy_csr(v, offsets, cols, (m, n)), d.numpy()) for v, d in inputs]
        return _rotating(lambda a, d: a + d, args), _as_float64, None

    b.add("scipy", scipy_add, cpu_only=True, device=device)
    return Prepared(case, b.calls, b.unavailable, b.notes, b.normalize, min_bytes, nnz, nnz, sets)


def check_prepared(prepared: Prepared, *, rtol: float = 1e-3, atol: float = 1e-3) -> dict[str, float]:
    """Runs every implementation once on input set 0 and compares it with ours.

    Returns the largest absolute difference per alternative; raises AssertionError on a mismatch,
    so a benchmark never compares against an alternative that computes something else.
    """
    for call in prepared.calls.values():
        if hasattr(call, "reset"):
            call.reset()
    reference = prepared.normalize[OURS](prepared.calls[OURS]())
    reference = reference if isinstance(reference, tuple) else (reference,)
    differences = {}
    for name, call in prepared.calls.items():
        if name == OURS:
            continue
        result = prepared.normalize[name](call())
        result = result if isinstance(result, tuple) else (result,)
        largest = 0.0
        for ours, theirs in zip(reference, result):
            assert ours.shape == theirs.shape, f"{name}: shape {tuple(theirs.shape)} != ours {tuple(ours.shape)}"
            torch.testing.assert_close(theirs.to(ours.dtype), ours, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
            if ours.numel():
                largest = max(largest, float((theirs.to(ours.dtype) - ours).abs().max()))
        differences[name] = largest
    for call in prepared.calls.values():
        if hasattr(call, "reset"):
            call.reset()
    return differences


# ----------------------------------------------------------------------------------------------
# The layer training step: RosaLinear vs a plain PyTorch LoRA layer vs full fine-tuning
# ----------------------------------------------------------------------------------------------


class LoraLinear(torch.nn.Module):
    """A plain PyTorch LoRA layer as PEFT builds it: frozen base, ``y = base(x) + s B(A(drop(x)))``."""

    def __init__(self, in_features, out_features, *, rank=LORA_RANK, alpha=16.0, dropout=0.05,
                 bias=False, device=None, dtype=None):
        super().__init__()
        self.base = torch.nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.base.requires_grad_(False)
        self.lora_A = torch.nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = torch.nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        self.dropout = torch.nn.Dropout(dropout)
        self.scaling = alpha / rank

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


def rosa_linear_class():
    """``rosa_kernels.RosaLinear``, or :class:`Unavailable` when this build has none yet."""
    cls = getattr(rosa_kernels, "RosaLinear", None)
    if cls is None:
        raise Unavailable("rosa_kernels.RosaLinear is not in this build (python/rosa_kernels/linear.py missing)")
    return cls


def make_layer(implementation: str, case: LayerCase) -> torch.nn.Module:
    """A layer in training mode whose trainable parameters are random (never zeros)."""
    device, dtype = torch.device(case.device), case.torch_dtype
    if implementation == OURS:
        layer = rosa_linear_class()(case.n, case.m, bias=False, rank=LORA_RANK, density=case.density,
                                    alpha=16.0, dropout=0.05, device=device, dtype=dtype)
        mask = mask_csr(case.mask, case.m, case.n, case.density, case.device)
        try:
            layer.set_mask(mask)
        except (TypeError, ValueError):
            # The contract also allows a boolean (out x in) mask; some builds may accept only that.
            layer.set_mask(rosa_kernels.csr_to_dense(mask.values, mask.row_offsets, mask.col_indices, mask.shape) != 0)
    elif implementation == "lora":
        layer = LoraLinear(case.n, case.m, rank=LORA_RANK, device=device, dtype=dtype)
    elif implementation == "full":
        layer = torch.nn.Linear(case.n, case.m, bias=False, device=device, dtype=dtype)
    else:
        raise ValueError(f"unknown layer implementation {implementation!r}")
    gen = _generator(device, 5)
    with torch.no_grad():
        # LoRA's B and the sparse values start at zero; a benchmark wants nonzero numbers everywhere.
        for parameter in layer.parameters():
            if parameter.requires_grad and parameter.dtype.is_floating_point:
                parameter.copy_(_random(parameter.shape, parameter.dtype, device, gen) * 0.01)
    return layer.train()


def _layer_step_callable(layers, inputs):
    parameters = [p for layer in layers for p in layer.parameters() if p.requires_grad]
    model = layers[0] if len(layers) == 1 else torch.nn.Sequential(*layers)
    sets = itertools.cycle(inputs)

    def step():
        x, grad_y = next(sets)
        x.grad = None
        for p in parameters:  # optimizer.zero_grad(set_to_none=True), as training loops do
            p.grad = None
        model(x).backward(grad_y)

    return step


def prepare_layer(case: LayerCase) -> Prepared:
    """One forward + backward (dX, and the gradients of every trainable parameter) per call."""
    device, dtype = torch.device(case.device), case.torch_dtype
    size = _element_size(dtype)
    set_bytes = 2 * case.tokens * (case.m + case.n) * size
    sets = number_of_sets(set_bytes, device, limit=4)
    gen = _generator(device, 6)
    inputs = [(_random((case.tokens, case.n), dtype, device, gen).requires_grad_(True),
               _random((case.tokens, case.m), dtype, device, gen)) for _ in range(sets)]
    b = _Builder()
    for implementation in LAYER_IMPLEMENTATIONS:
        b.add(implementation, lambda impl=implementation: (
            _layer_step_callable([make_layer(impl, case)], inputs), lambda r: r, None))
    # The step's work: the base GEMMs of forward, dX and (full only) dW; reported for context.
    flops = 2 * case.tokens * case.m * case.n * 2
    min_bytes = case.m * case.n * size + set_bytes
    return Prepared(case, b.calls, b.unavailable, b.notes, b.normalize, min_bytes, flops, 0, sets)


def stack_peak_memory(implementation: str, case: LayerCase, depth: int = 32) -> dict[str, int]:
    """Peak CUDA memory of one training step of ``depth`` stacked layers (bytes).

    ``peak`` is everything allocated at the peak (weights, optimizer-free gradients, activations);
    ``step`` is the part above what the built model holds before the step.
    """
    if case.m != case.n:
        raise ValueError("a stack needs square layers")
    device = torch.device(case.device)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    layers = [make_layer(implementation, case) for _ in range(depth)]
    gen = _generator(device, 7)
    x = _random((case.tokens, case.n), case.torch_dtype, device, gen)
    grad_y = _random((case.tokens, case.m), case.torch_dtype, device, gen)
    step = _layer_step_callable(layers, [(x, grad_y)])
    step()  # first step: lazily built state (plans, caches) exists from here on, as in training
    for p in (p for layer in layers for p in layer.parameters()):
        p.grad = None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del layers, step
    torch.cuda.empty_cache()
    return {"peak": int(peak), "step": int(peak - before), "model": int(before)}


# ----------------------------------------------------------------------------------------------
# Timing, ceilings, floors, versions
# ----------------------------------------------------------------------------------------------


def synchronize(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synchronized(fn: Callable[[], Any], device) -> Callable[[], None]:
    """``fn`` followed by a device synchronization: what a wall-clock timer (pytest-benchmark) needs."""
    if torch.device(device).type != "cuda":
        return fn

    def call():
        fn()
        torch.cuda.synchronize()

    return call


def measure(fn: Callable[[], Any], device, *, budget: float = 0.1, min_reps: int = 5, max_reps: int = 200,
            warmup: int = 2) -> dict:
    """Median seconds of ``fn`` after ``warmup`` calls; as many repetitions as fit in ``budget``.

    CUDA: one pair of events around each call, all read after a single synchronization at the end,
    so no host round trip sits inside a measured interval (but a launch-bound op still shows its
    idle gaps, because the events are recorded in the stream between launches). CPU: perf_counter.
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    estimate = max(time.perf_counter() - start, 1e-7)
    reps = int(max(min_reps, min(max_reps, budget / estimate)))
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for begin, end in events:
            begin.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [begin.elapsed_time(end) / 1e3 for begin, end in events]
    else:
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return {"median": statistics.median(times), "min": min(times), "reps": reps}


def measure_ceilings(device, *, quick: bool = False, dtypes=("float32", "bfloat16")) -> dict:
    """The machine's measured copy bandwidth (read + write bytes) and dense matmul peaks per dtype."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    copy_bytes = (256 << 20 if quick else 1 << 30) if cuda else (64 << 20 if quick else 256 << 20)
    source = torch.rand(copy_bytes // 4, device=device)
    target = torch.empty_like(source)
    copy_time = measure(lambda: target.copy_(source), device, budget=0.3, min_reps=5)["median"]
    del source, target
    peaks = {}
    for dtype in dict.fromkeys(("float32", *dtypes)):
        size = (4096 if quick else 8192) if cuda else (512 if quick or dtype != "float32" else 1024)
        gen = _generator(device, 8)
        a = _random((size, size), _DTYPES[dtype], device, gen)
        b = _random((size, size), _DTYPES[dtype], device, gen)
        c = torch.empty_like(a)
        seconds = measure(lambda: torch.mm(a, b, out=c), device, budget=0.3, min_reps=3)["median"]
        peaks[dtype] = 2 * size**3 / seconds
        del a, b, c
    return {
        "bandwidth": 2 * copy_bytes / copy_time,
        "copy_bytes": copy_bytes,
        "peak_flops": peaks,
        "allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32) if cuda else None,
    }


def floor_seconds(min_bytes: int, flops: int, dtype: str, ceilings: dict) -> float:
    """max(minimum bytes / copy bandwidth, FLOPs / dense matmul peak of the dtype)."""
    peak = ceilings["peak_flops"].get(dtype, ceilings["peak_flops"]["float32"])
    return max(min_bytes / ceilings["bandwidth"], flops / peak)


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def versions(device) -> dict:
    return dict(_versions(str(torch.device(device))))


@functools.lru_cache(maxsize=4)
def _versions(device: str) -> tuple:
    info = {
        "torch": torch.__version__,
        "rosa_kernels": rosa_kernels.__version__,
        "cuda_built": rosa_kernels.cuda_built(),
        "python": platform.python_version(),
        "device": device_name(device),
        "torch_cuda": torch.version.cuda,
    }
    try:
        import scipy

        info["scipy"] = scipy.__version__
    except ImportError:
        info["scipy"] = None
    info["git"] = os.environ.get("ROSA_BENCH_GIT", _git_revision())
    return tuple(info.items())


def _git_revision() -> str | None:
    """HEAD's short hash, with "+changes" when the tree differs from it (a copied tree, such as the
    GPU machine's, can carry an older .git); ROSA_GIT_REVISION overrides it."""
    import subprocess

    if os.environ.get("ROSA_GIT_REVISION"):
        return os.environ["ROSA_GIT_REVISION"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here,
                              timeout=5).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True, cwd=here, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+changes" if changed else "")) or None
