"""The public sparse ops, their fake (meta) kernels and their autograd.

The positional signatures match the ``spops`` library that RoSA's reference code imports, so a
project can swap ``import spops`` for ``import rosa_kernels as spops``. Every function:

- checks its arguments and raises ``TypeError`` / ``ValueError`` naming the bad one (the checks
  run in C++, inside the op, so they cost little host time);
- converts int16/int64 index tensors to int32;
- keeps the input's floating dtype (accumulating in float32) unless ``return_type=`` asks for another;
- with ``validate=True`` (the default) also checks the index *contents* (a GPU synchronization).
  Pass ``validate=False`` for a structure you validated before (for example with
  :func:`rosa_kernels.validate_csr`); invalid indices are then undefined behaviour.

The ops themselves are ``torch.ops.rosa_kernels.{spmm, sddmm, csr_transpose, csr_add, csr_add_}``:
``torch.compile`` traces them and ``torch.library.opcheck`` passes on them. Their autograd is
registered in C++ (``csrc/ops.cpp``); this module registers their fake kernels.
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loading the extension registers the ops)
from .csr import INDEX_DTYPES, _validate_csr, check_size, check_tensor

__all__ = ["spmm", "sddmm", "csr_transpose", "csr_add"]

_ops = torch.ops.rosa_kernels


# ----------------------------------------------------------------------------------------------
# Fake kernels: output shapes only, for torch.compile, FakeTensor and opcheck.
# ----------------------------------------------------------------------------------------------


def _check_devices(reference_name, reference, **tensors):
    """Operands on several devices: the fake kernel is what runs when one of them is on "meta"."""
    for name, t in tensors.items():
        if t.device != reference.device:
            raise ValueError(f"{name} must be on the same device as {reference_name} ({reference.device}), got {t.device}")


@torch.library.register_fake("rosa_kernels::spmm")
def _spmm_fake(values, row_offsets, row_indices, col_indices, dense, m):
    _check_devices("values", values, dense=dense, row_offsets=row_offsets, row_indices=row_indices,
                   col_indices=col_indices)
    return dense.new_empty((m, dense.shape[1]))


@torch.library.register_fake("rosa_kernels::sddmm")
def _sddmm_fake(row_offsets, row_indices, col_indices, a, bt):
    _check_devices("a", a, bt=bt, row_offsets=row_offsets, row_indices=row_indices, col_indices=col_indices)
    return a.new_empty((col_indices.shape[0],))


@torch.library.register_fake("rosa_kernels::csr_transpose")
def _csr_transpose_fake(values, row_offsets, col_indices, m, n):
    _check_devices("values", values, row_offsets=row_offsets, col_indices=col_indices)
    nnz = values.shape[0]
    # Index outputs are int32 whatever the input index dtype (the op converts int16/int64).
    return (
        values.new_empty((nnz,)),
        row_offsets.new_empty((n + 1,), dtype=torch.int32),
        col_indices.new_empty((nnz,), dtype=torch.int32),
        col_indices.new_empty((nnz,), dtype=torch.int32),
    )


@torch.library.register_fake("rosa_kernels::csr_add")
def _csr_add_fake(values, row_offsets, row_indices, col_indices, dense):
    _check_devices("values", values, dense=dense, row_offsets=row_offsets, row_indices=row_indices,
                   col_indices=col_indices)
    return torch.empty_like(dense, memory_format=torch.contiguous_format)


@torch.library.register_fake("rosa_kernels::csr_add_")
def _csr_add_inplace_fake(values, row_offsets, row_indices, col_indices, dense):
    _check_devices("values", values, dense=dense, row_offsets=row_offsets, row_indices=row_indices,
                   col_indices=col_indices)
    return None


# ----------------------------------------------------------------------------------------------
# Public functions. The argument checks (types, dtypes, shapes, lengths, devices, sizes) live in
# the C++ ops (csrc/checks.h), which raise ValueError / TypeError naming the argument, and index
# tensors of int16/int64 are converted there too: with validate=False a call costs little more
# host time than the raw op. Python keeps what C++ cannot see: a Python value where a tensor
# belongs (the op's schema rejects it with a RuntimeError, turned into a TypeError here), a size
# that is not a Python int, and, with validate=True, the index contents.
# ----------------------------------------------------------------------------------------------


def _check_flag(value, name):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _check_return_type(return_type):
    if not isinstance(return_type, torch.dtype):
        raise TypeError(f"return_type must be a torch.dtype or None, got {type(return_type).__name__}")
    if not return_type.is_floating_point:
        raise TypeError(f"return_type must be a floating dtype, got {return_type}")


def _name_non_tensors(**arguments):
    """Raises the TypeError for the first argument that is not a tensor (after the op refused it)."""
    for name, value in arguments.items():
        check_tensor(value, name)


def _is_tensor(x, dim):
    return isinstance(x, torch.Tensor) and x.dim() == dim


def _is_index(x, length):
    return (isinstance(x, torch.Tensor) and x.dtype in INDEX_DTYPES and x.dim() == 1
            and (length is None or x.shape[0] == length))


def _validated(row_offsets, col_indices, row_indices, m, n, nnz, n_name):
    """validate=True: checks the index contents (one GPU synchronization) and returns int32 indices.

    Only for a well-formed structure (index tensors of the right lengths on one device); anything
    else is left to the op's own checks, which then refuse the call with a precise message before
    any kernel runs.
    """
    if not (_is_index(row_offsets, m + 1) and _is_index(col_indices, nnz)
            and (row_indices is None or _is_index(row_indices, m))):
        return row_offsets, col_indices, row_indices
    device = row_offsets.device
    if col_indices.device != device or (row_indices is not None and row_indices.device != device):
        return row_offsets, col_indices, row_indices
    return _validate_csr(row_offsets, col_indices, m, n, nnz, row_indices, n_name=n_name)


def spmm(values, row_offsets, row_indices, col_indices, dense, m, *, return_type=None, validate=True):
    """``A @ dense`` for the m x n CSR matrix ``A``; ``dense`` is (n, k), the result (m, k).

    ``n`` is ``dense.shape[0]``. Differentiable w.r.t. ``values`` and ``dense``.
    """
    if return_type is not None:
        _check_return_type(return_type)
    if type(m) is not int:
        m = check_size(m, "m")
    if validate is not False:
        _check_flag(validate, "validate")
        if _is_tensor(values, 1) and _is_tensor(dense, 2) and m >= 0:
            row_offsets, col_indices, row_indices = _validated(
                row_offsets, col_indices, row_indices, m, dense.shape[0], values.shape[0], "n = dense.shape[0]")
    try:
        result = _ops.spmm(values, row_offsets, row_indices, col_indices, dense, m)
    except RuntimeError:
        _name_non_tensors(values=values, row_offsets=row_offsets, row_indices=row_indices, col_indices=col_indices,
                          dense=dense)
        raise
    return result if return_type is None else result.to(return_type)


def sddmm(row_offsets, row_indices, col_indices, a, bt, *, return_type=None, validate=True):
    """``out[p] = <a[i, :], bt[j, :]>`` for each nonzero ``p = (i, j)`` of the CSR mask.

    ``a`` is (m, k), ``bt`` (n, k); the result has one entry per nonzero (nnz,). This is the
    sampled product ``mask ∘ (a @ bt.T)``. Transposed views are read without a copy on the GPU, so
    RoSA's ``dS = mask ∘ (dY^T X)`` is ``sddmm(..., dY.t(), X.t())`` with ``dY`` (T, out) and
    ``X`` (T, in) as they come. Differentiable w.r.t. ``a`` and ``bt``.
    """
    if return_type is not None:
        _check_return_type(return_type)
    if validate is not False:
        _check_flag(validate, "validate")
        if _is_tensor(a, 2) and _is_tensor(bt, 2):
            row_offsets, col_indices, row_indices = _validated(
                row_offsets, col_indices, row_indices, a.shape[0], bt.shape[0], None, "n = bt.shape[0]")
    try:
        result = _ops.sddmm(row_offsets, row_indices, col_indices, a, bt)
    except RuntimeError:
        _name_non_tensors(row_offsets=row_offsets, row_indices=row_indices, col_indices=col_indices, a=a, bt=bt)
        raise
    return result if return_type is None else result.to(return_type)


def csr_transpose(values, row_offsets, col_indices, m, n, *, return_permutation=False, validate=True):
    """The n x m transpose of an m x n CSR matrix: ``(values_t, row_offsets_t, col_indices_t)``.

    Column indices ascend inside each row of the result. With ``return_permutation=True`` a fourth
    tensor ``permutation`` (nnz,) int32 is returned with ``values_t == values[permutation]``, so
    new values of the same structure can be re-gathered without redoing the transpose.
    Differentiable w.r.t. ``values``. Build ``row_indices`` of the result with :func:`row_order`.
    """
    if return_permutation is not False:
        _check_flag(return_permutation, "return_permutation")
    if type(m) is not int:
        m = check_size(m, "m")
    if type(n) is not int:
        n = check_size(n, "n")
    if validate is not False:
        _check_flag(validate, "validate")
        if _is_tensor(values, 1) and m >= 0 and n >= 0:
            row_offsets, col_indices, _ = _validated(row_offsets, col_indices, None, m, n, values.shape[0], "n")
    try:
        values_t, row_offsets_t, col_indices_t, permutation = _ops.csr_transpose(values, row_offsets, col_indices, m, n)
    except RuntimeError:
        _name_non_tensors(values=values, row_offsets=row_offsets, col_indices=col_indices)
        raise
    if return_permutation:
        return values_t, row_offsets_t, col_indices_t, permutation
    return values_t, row_offsets_t, col_indices_t


def csr_add(values, row_offsets, row_indices, col_indices, dense, inplace=False, *, return_type=None, validate=True):
    """``dense + A`` for the CSR matrix ``A`` of ``dense``'s shape (m, n).

    With ``inplace=True`` the sum is written into ``dense`` and ``dense`` is returned; that path is
    not differentiable (it raises if autograd would need it). Differentiable w.r.t. ``values`` and
    ``dense`` otherwise.
    """
    if return_type is not None:
        _check_return_type(return_type)
    if inplace is not False:
        _check_flag(inplace, "inplace")
    if validate is not False:
        _check_flag(validate, "validate")
        if _is_tensor(values, 1) and _is_tensor(dense, 2):
            m, n = dense.shape
            row_offsets, col_indices, row_indices = _validated(
                row_offsets, col_indices, row_indices, m, n, values.shape[0], "n = dense.shape[1]")
    if not inplace:
        try:
            result = _ops.csr_add(values, row_offsets, row_indices, col_indices, dense)
        except RuntimeError:
            _name_non_tensors(values=values, row_offsets=row_offsets, row_indices=row_indices,
                              col_indices=col_indices, dense=dense)
            raise
        return result if return_type is None else result.to(return_type)
    _name_non_tensors(values=values, row_offsets=row_offsets, row_indices=row_indices, col_indices=col_indices,
                      dense=dense)
    if return_type is not None and return_type != dense.dtype:
        raise ValueError(
            f"return_type must be None or dense.dtype ({dense.dtype}) with inplace=True, got {return_type}"
        )
    if torch.is_grad_enabled() and (values.requires_grad or dense.requires_grad):
        raise ValueError(
            "csr_add(..., inplace=True) is not differentiable: use inplace=False when values or dense require grad"
        )
    if dense.dim() == 2 and dense.stride(1) != 1 and dense.shape[1] > 1:
        # The kernel writes rows in place: a dense without contiguous rows gets the sum copied in.
        dense.copy_(_ops.csr_add(values, row_offsets, row_indices, col_indices, dense))
    else:
        _ops.csr_add_(values, row_offsets, row_indices, col_indices, dense)
    return dense
