"""Row-sorted CSR structures: checking, building and converting them.

A CSR matrix here is plain dense tensors (never a torch sparse layout), so it can be a parameter,
a buffer, a safetensors entry or a DDP/FSDP shard:

- ``values`` (nnz,) float32 / float16 / bfloat16 / float64
- ``row_offsets`` (m + 1,) int32, nondecreasing, ``row_offsets[0] == 0``, ``row_offsets[m] == nnz``
- ``col_indices`` (nnz,) int32 in ``[0, n)``, strictly increasing inside each row
- ``row_indices`` (m,) int32, the rows ordered by nonincreasing nonzero count (:func:`row_order`)
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

__all__ = [
    "CSR",
    "row_order",
    "validate_csr",
    "csr_from_dense",
    "csr_from_mask",
    "csr_from_scipy",
    "csr_from_torch_sparse",
    "csr_to_dense",
    "csr_to_scipy",
    "csr_to_torch_sparse",
]

VALUE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int16, torch.int32, torch.int64)
INT32_MAX = 2**31 - 1


# ----------------------------------------------------------------------------------------------
# Argument checks shared by the public functions. Type problems raise TypeError, everything else
# (shapes, lengths, ranges, devices) ValueError; every message names the argument.
# ----------------------------------------------------------------------------------------------


def check_tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_values_tensor(x, name: str, dim: int) -> torch.Tensor:
    check_tensor(x, name)
    if x.dtype not in VALUE_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype (float32, float64, float16 or bfloat16), got {x.dtype}"
        )
    if x.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(x.shape)}")
    return x


def check_size(x, name: str) -> int:
    """A nonnegative Python/NumPy integer (bool is not a size)."""
    if isinstance(x, torch.SymInt):
        return x
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    x = int(x)
    if x < 0:
        raise ValueError(f"{name} must be >= 0, got {x}")
    if x >= INT32_MAX:
        raise ValueError(f"{name} must be below 2^31 - 1, got {x}")
    return x


def as_index(x, name: str, length: int | None = None, *, length_name: str | None = None,
             check_range: bool = True) -> torch.Tensor:
    """Checks an index tensor and returns it as int32 (int16 and int64 are converted).

    ``length_name`` says where an expected ``length`` comes from in error messages (``"m + 1"``).
    ``check_range`` reads int64 contents to refuse values that do not fit in int32 (a GPU
    synchronization); without it such values are undefined behaviour, like other bad contents.
    """
    check_tensor(x, name)
    if x.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be an integer tensor (int32; int16/int64 are converted), got {x.dtype}")
    if x.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(x.shape)}")
    if length is not None and x.shape[0] != length:
        expected = f"{length_name} = {length}" if length_name else f"{length}"
        raise ValueError(f"{name} must have length {expected}, got {x.shape[0]}")
    if check_range and x.dtype == torch.int64 and x.numel() > 0 and not _is_symbolic(x):
        lo, hi = (int(v) for v in torch.aminmax(x))
        if lo < -INT32_MAX - 1 or hi > INT32_MAX:
            raise ValueError(f"{name} must fit in int32, got values in [{lo}, {hi}]")
    return x.to(torch.int32)


def check_same_device(reference: torch.Tensor, reference_name: str, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != reference.device:
            raise ValueError(
                f"{name} must be on the same device as {reference_name} ({reference.device}), got {t.device}"
            )


def check_same_dtype(reference: torch.Tensor, reference_name: str, **tensors) -> None:
    for name, t in tensors.items():
        if t.dtype != reference.dtype:
            raise TypeError(f"{name} must have the dtype of {reference_name} ({reference.dtype}), got {t.dtype}")


def _is_symbolic(t: torch.Tensor) -> bool:
    """True under torch.compile tracing or fake tensors, where contents cannot be read."""
    if torch.compiler.is_compiling():
        return True
    try:
        from torch._subclasses.fake_tensor import is_fake

        return is_fake(t)
    except ImportError:  # pragma: no cover - very old torch
        return False


def validate_csr(row_offsets, col_indices, m, n, nnz=None, row_indices=None, *, check_contents=True):
    """Checks a CSR structure of an ``m x n`` matrix and returns its index tensors as int32.

    Returns ``(row_offsets, col_indices, row_indices)`` (``row_indices`` is ``None`` when not given).
    ``nnz``, when given, is the expected length of ``col_indices`` (the length of ``values``).
    With ``check_contents`` the index *contents* are checked too: offsets start at 0, never decrease
    and end at nnz; columns lie in ``[0, n)`` and strictly increase inside each row;
    ``row_indices`` is a permutation of ``0..m-1``. On a GPU that costs one synchronization, which
    is why hot paths validate a structure once and then pass ``validate=False`` to the ops.
    Raises ``TypeError`` (wrong types/dtypes) or ``ValueError`` (lengths, contents, devices).
    """
    return _validate_csr(row_offsets, col_indices, m, n, nnz, row_indices, check_contents=check_contents)


def _validate_csr(row_offsets, col_indices, m, n, nnz=None, row_indices=None, *, check_contents=True,
                  m_name="m", n_name="n", nnz_name="nnz"):
    """:func:`validate_csr` with the names the caller's sizes come from, for error messages
    (``spmm`` says ``n = dense.shape[0]``, ``csr_add`` says ``m = dense.shape[0]``)."""
    m = check_size(m, "m")
    n = check_size(n, "n")
    if nnz is not None:
        nnz = check_size(nnz, "nnz")
    known_m = isinstance(m, int)
    row_offsets = as_index(row_offsets, "row_offsets", m + 1 if known_m else None,
                           length_name=f"{m_name} + 1", check_range=check_contents)
    col_indices = as_index(col_indices, "col_indices", nnz, length_name=nnz_name, check_range=check_contents)
    check_same_device(row_offsets, "row_offsets", col_indices=col_indices)
    if row_indices is not None:
        row_indices = as_index(row_indices, "row_indices", m if known_m else None, length_name=m_name,
                               check_range=check_contents)
        check_same_device(row_offsets, "row_offsets", row_indices=row_indices)
    if check_contents and not _is_symbolic(row_offsets):
        _check_contents(row_offsets, col_indices, row_indices, n, n_name)
    return row_offsets, col_indices, row_indices


def _first(violations: torch.Tensor) -> int:
    """The first position where a boolean vector is True."""
    return int(violations.nonzero()[0, 0])


def _check_contents(row_offsets, col_indices, row_indices, n, n_name):
    """Raises ValueError on the first broken rule of a row-sorted CSR structure.

    Every rule is reduced to one boolean on the tensors' device and all of them are copied to the
    host together: one synchronization on a GPU. Only a failing rule pays for a detailed message.
    """
    m = row_offsets.shape[0] - 1
    nnz = col_indices.shape[0]
    offsets = row_offsets.long()
    cols = col_indices.long()
    decreasing = offsets[1:] < offsets[:-1]
    below_zero = cols < 0
    too_large = cols >= n
    # Inside a row columns strictly increase: a step that does not increase is allowed only where
    # a new row starts. Positions where a row starts are marked from the offsets (clamped, so
    # broken offsets cannot index out of range: they are reported by the rules above anyway).
    row_start = torch.zeros(nnz, dtype=torch.bool, device=cols.device)
    if nnz > 0:
        row_start[offsets[1:-1].clamp(0, nnz - 1)] = True
    unsorted = (cols[1:] <= cols[:-1]) & ~row_start[1:]

    rules = [
        (offsets[0] != 0, lambda: f"row_offsets[0] must be 0, got {int(offsets[0])}"),
        (decreasing, lambda: _decreasing_message(offsets, _first(decreasing))),
        (offsets[-1] != nnz, lambda: (
            f"row_offsets[-1] must equal nnz = {nnz} (the length of col_indices), got {int(offsets[-1])}")),
        (below_zero, lambda: _column_message(cols, _first(below_zero), "must be >= 0")),
        (too_large, lambda: _column_message(cols, _first(too_large), f"must be < {n_name} = {n}")),
        (unsorted, lambda: _unsorted_message(cols, _first(unsorted) + 1)),
    ]
    if row_indices is not None and m > 0:
        rows = row_indices.long()
        out_of_range = (rows < 0) | (rows >= m)
        counts = torch.bincount(rows.clamp(0, m - 1), minlength=m)
        rules += [
            (out_of_range, lambda: (
                f"row_indices must lie in [0, m = {m}), got row_indices[{_first(out_of_range)}] = "
                f"{int(rows[_first(out_of_range)])}")),
            (counts != 1, lambda: (
                f"row_indices must be a permutation of 0..m-1 (each row once), but row "
                f"{_first(counts != 1)} appears {int(counts[_first(counts != 1)])} times")),
        ]
    # Each condition is True where the rule is broken.
    broken = torch.stack([condition.any() for condition, _ in rules]).tolist()
    for is_broken, (_, message) in zip(broken, rules):
        if is_broken:
            raise ValueError(message())


def _decreasing_message(offsets, i):
    return (f"row_offsets must be nondecreasing, got row_offsets[{i + 1}] = {int(offsets[i + 1])} < "
            f"row_offsets[{i}] = {int(offsets[i])}")


def _column_message(cols, p, expected):
    return f"col_indices {expected}, got col_indices[{p}] = {int(cols[p])}"


def _unsorted_message(cols, p):
    return (f"col_indices must strictly increase inside each row (sorted, no duplicates), got "
            f"col_indices[{p - 1}] = {int(cols[p - 1])} followed by col_indices[{p}] = {int(cols[p])} in the same row")


def row_order(row_offsets: torch.Tensor) -> torch.Tensor:
    """Rows ordered by nonincreasing nonzero count (ties keep ascending row order), as int32."""
    row_offsets = as_index(row_offsets, "row_offsets")
    if row_offsets.shape[0] < 1:
        raise ValueError("row_offsets must have length m + 1 >= 1, got length 0")
    counts = row_offsets[1:].long() - row_offsets[:-1].long()
    return torch.argsort(counts, descending=True, stable=True).to(torch.int32)


# ----------------------------------------------------------------------------------------------
# Building and converting
# ----------------------------------------------------------------------------------------------


class CSR(NamedTuple):
    """A row-sorted CSR matrix as plain tensors. ``shape`` is ``(m, n)``."""

    values: torch.Tensor
    row_offsets: torch.Tensor
    row_indices: torch.Tensor
    col_indices: torch.Tensor
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        return self.col_indices.shape[0]

    def to_dense(self) -> torch.Tensor:
        return csr_to_dense(self.values, self.row_offsets, self.col_indices, self.shape)

    def to_scipy(self):
        return csr_to_scipy(self.values, self.row_offsets, self.col_indices, self.shape)

    def to_torch_sparse(self) -> torch.Tensor:
        return csr_to_torch_sparse(self.values, self.row_offsets, self.col_indices, self.shape)

    def to(self, *args, **kwargs) -> "CSR":
        """Moves the structure (and casts the values, for a dtype argument)."""
        values = self.values.to(*args, **kwargs)
        device = values.device
        return CSR(values, self.row_offsets.to(device), self.row_indices.to(device), self.col_indices.to(device), self.shape)


def index_counts(indices: torch.Tensor, size: int) -> torch.Tensor:
    """``bincount(indices, minlength=size)`` (int64) without a host synchronization (bincount reads
    the largest index to size its output); ``indices`` are int64 in [0, size)."""
    return torch.zeros(size, dtype=torch.long, device=indices.device).index_add_(0, indices, torch.ones_like(indices))


def _from_rows_cols(rows, cols, values, shape) -> CSR:
    """CSR from row-major-sorted coordinate lists (int64 ``rows``), built on their device."""
    m, n = shape
    counts = index_counts(rows, m)
    row_offsets = torch.zeros(m + 1, dtype=torch.int32, device=rows.device)
    row_offsets[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return CSR(values, row_offsets, row_order(row_offsets), cols.to(torch.int32), (m, n))


def csr_from_dense(dense: torch.Tensor) -> CSR:
    """The CSR of a 2-D tensor's nonzero entries (values keep the tensor's dtype)."""
    check_values_tensor(dense, "dense", 2)
    rows, cols = torch.nonzero(dense, as_tuple=True)
    return _from_rows_cols(rows, cols, dense[rows, cols], tuple(dense.shape))


def csr_from_mask(mask: torch.Tensor, values: torch.Tensor | None = None, *, dtype=torch.float32) -> CSR:
    """The CSR structure of a 2-D boolean mask.

    ``values`` may be a dense tensor of the mask's shape (its entries at the mask are taken) or
    ``None`` (zeros of ``dtype``).
    """
    check_tensor(mask, "mask")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    if mask.dim() != 2:
        raise ValueError(f"mask must be 2-D, got shape {tuple(mask.shape)}")
    rows, cols = torch.nonzero(mask, as_tuple=True)
    if values is None:
        vals = torch.zeros(rows.shape[0], dtype=dtype, device=mask.device)
    else:
        check_values_tensor(values, "values", 2)
        if values.shape != mask.shape:
            raise ValueError(f"values must have the mask's shape {tuple(mask.shape)}, got {tuple(values.shape)}")
        vals = values[rows, cols]
    return _from_rows_cols(rows, cols, vals, tuple(mask.shape))


def csr_from_scipy(matrix, *, dtype=None, device=None) -> CSR:
    """A CSR from any ``scipy.sparse`` matrix or array (duplicates summed, columns sorted)."""
    import numpy as np
    import scipy.sparse as sp

    if not sp.issparse(matrix):
        raise TypeError(f"matrix must be a scipy.sparse matrix, got {type(matrix).__name__}")
    csr = sp.csr_matrix(matrix, copy=True)
    csr.sum_duplicates()
    csr.sort_indices()
    m, n = csr.shape
    values = torch.from_numpy(np.ascontiguousarray(csr.data))
    if dtype is not None:
        values = values.to(dtype)
    elif values.dtype not in VALUE_DTYPES:
        values = values.to(torch.float32)
    row_offsets = torch.from_numpy(csr.indptr.astype(np.int32))
    col_indices = torch.from_numpy(csr.indices.astype(np.int32))
    result = CSR(values, row_offsets, row_order(row_offsets), col_indices, (m, n))
    return result.to(device) if device is not None else result


def csr_from_torch_sparse(tensor: torch.Tensor) -> CSR:
    """A CSR from a ``torch.sparse_csr_tensor`` or a COO tensor."""
    check_tensor(tensor, "tensor")
    if tensor.layout == torch.sparse_coo:
        tensor = tensor.coalesce().to_sparse_csr()
    if tensor.layout != torch.sparse_csr:
        raise ValueError(f"tensor must have layout torch.sparse_csr or torch.sparse_coo, got {tensor.layout}")
    row_offsets = tensor.crow_indices().to(torch.int32)
    col_indices = tensor.col_indices().to(torch.int32)
    values = tensor.values()
    m, n = tensor.shape
    # torch does not promise sorted columns inside a row: sort by (row, column).
    rows = torch.repeat_interleave(torch.arange(m, device=values.device), row_offsets[1:] - row_offsets[:-1])
    order = torch.argsort(rows.long() * max(n, 1) + col_indices.long())
    return CSR(values[order].contiguous(), row_offsets, row_order(row_offsets), col_indices[order].contiguous(), (m, n))


def _rows_of(row_offsets: torch.Tensor, nnz: int) -> torch.Tensor:
    m = row_offsets.shape[0] - 1
    counts = (row_offsets[1:] - row_offsets[:-1]).long()
    return torch.repeat_interleave(torch.arange(m, device=row_offsets.device), counts, output_size=nnz)


def csr_to_dense(values, row_offsets, col_indices, shape) -> torch.Tensor:
    """The dense ``shape`` tensor of a CSR matrix."""
    check_values_tensor(values, "values", 1)
    m, n = (check_size(s, "shape") for s in shape)
    row_offsets, col_indices, _ = validate_csr(row_offsets, col_indices, m, n, values.shape[0])
    dense = torch.zeros((m, n), dtype=values.dtype, device=values.device)
    dense[_rows_of(row_offsets, values.shape[0]), col_indices.long()] = values
    return dense


def csr_to_scipy(values, row_offsets, col_indices, shape):
    """A ``scipy.sparse.csr_matrix``; 16-bit values become float32 (scipy.sparse has no float16
    and NumPy no bfloat16)."""
    import scipy.sparse as sp

    check_values_tensor(values, "values", 1)
    m, n = (check_size(s, "shape") for s in shape)
    row_offsets, col_indices, _ = validate_csr(row_offsets, col_indices, m, n, values.shape[0])
    data = values.detach().cpu()
    if data.dtype in (torch.float16, torch.bfloat16):
        data = data.float()
    return sp.csr_matrix(
        (data.numpy(), col_indices.detach().cpu().numpy(), row_offsets.detach().cpu().numpy()),
        shape=(m, n),
    )


def csr_to_torch_sparse(values, row_offsets, col_indices, shape) -> torch.Tensor:
    """A ``torch.sparse_csr_tensor`` (int64 indices) viewing the same values."""
    check_values_tensor(values, "values", 1)
    return torch.sparse_csr_tensor(row_offsets.long(), col_indices.long(), values, size=tuple(shape))
