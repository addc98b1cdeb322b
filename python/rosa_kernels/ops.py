"""The public sparse ops, their fake (meta) kernels and their autograd.

The positional signatures match the ``spops`` library that RoSA's reference code imports, so a
project can swap ``import spops`` for ``import rosa_kernels as spops``. Every function:

- checks its arguments and raises ``TypeError`` / ``ValueError`` naming the bad one;
- converts int16/int64 index tensors to int32;
- keeps the input's floating dtype (accumulating in float32) unless ``return_type=`` asks for another;
- with ``validate=True`` (the default) also checks the index *contents* (a GPU synchronization).
  Pass ``validate=False`` for a structure you validated before (for example with
  :func:`rosa_kernels.validate_csr`); invalid indices are then undefined behaviour.

The ops themselves are ``torch.ops.rosa_kernels.{spmm, sddmm, csr_transpose, csr_add, csr_add_}``:
``torch.compile`` traces them and ``torch.library.opcheck`` passes on them.
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loading the extension registers the ops)
from .csr import (
    check_same_device,
    check_same_dtype,
    check_size,
    check_tensor,
    check_values_tensor,
    _validate_csr,
    row_order,
)

__all__ = ["spmm", "sddmm", "csr_transpose", "csr_add"]

_ops = torch.ops.rosa_kernels


# ----------------------------------------------------------------------------------------------
# Fake kernels: output shapes only, for torch.compile, FakeTensor and opcheck.
# ----------------------------------------------------------------------------------------------


@torch.library.register_fake("rosa_kernels::spmm")
def _spmm_fake(values, row_offsets, row_indices, col_indices, dense, m):
    return dense.new_empty((m, dense.shape[1]))


@torch.library.register_fake("rosa_kernels::sddmm")
def _sddmm_fake(row_offsets, row_indices, col_indices, a, bt):
    return a.new_empty((col_indices.shape[0],))


@torch.library.register_fake("rosa_kernels::csr_transpose")
def _csr_transpose_fake(values, row_offsets, col_indices, m, n):
    nnz = values.shape[0]
    return (
        values.new_empty((nnz,)),
        row_offsets.new_empty((n + 1,)),
        col_indices.new_empty((nnz,)),
        col_indices.new_empty((nnz,)),
    )


@torch.library.register_fake("rosa_kernels::csr_add")
def _csr_add_fake(values, row_offsets, row_indices, col_indices, dense):
    return torch.empty_like(dense, memory_format=torch.contiguous_format)


@torch.library.register_fake("rosa_kernels::csr_add_")
def _csr_add_inplace_fake(values, row_offsets, row_indices, col_indices, dense):
    return None


# ----------------------------------------------------------------------------------------------
# Autograd. Gradients flow to the floating operands; index tensors and sizes get none.
# ----------------------------------------------------------------------------------------------


def _transposed_structure(values, row_offsets, col_indices, m, n):
    """(values_t, row_offsets_t, row_indices_t, col_indices_t, permutation) of an m x n CSR."""
    values_t, row_offsets_t, col_indices_t, permutation = _ops.csr_transpose(values, row_offsets, col_indices, m, n)
    return values_t, row_offsets_t, row_order(row_offsets_t), col_indices_t, permutation


def _spmm_setup(ctx, inputs, output):
    values, row_offsets, row_indices, col_indices, dense, m = inputs
    ctx.m = m
    ctx.save_for_backward(values, row_offsets, row_indices, col_indices, dense)


def _spmm_backward(ctx, grad):
    values, row_offsets, row_indices, col_indices, dense = ctx.saved_tensors
    grad = grad.contiguous()
    grad_values = grad_dense = None
    if ctx.needs_input_grad[0]:
        # d values[p] = <grad[i, :], dense[j, :]>: an SDDMM at the nonzeros.
        grad_values = _ops.sddmm(row_offsets, row_indices, col_indices, grad, dense)
    if ctx.needs_input_grad[4]:
        # d dense = A^T @ grad.
        values_t, offsets_t, order_t, cols_t, _ = _transposed_structure(
            values, row_offsets, col_indices, ctx.m, dense.shape[0]
        )
        grad_dense = _ops.spmm(values_t, offsets_t, order_t, cols_t, grad, dense.shape[0])
    return grad_values, None, None, None, grad_dense, None


def _sddmm_setup(ctx, inputs, output):
    row_offsets, row_indices, col_indices, a, bt = inputs
    ctx.save_for_backward(row_offsets, row_indices, col_indices, a, bt)


def _sddmm_backward(ctx, grad):
    row_offsets, row_indices, col_indices, a, bt = ctx.saved_tensors
    grad = grad.contiguous()
    grad_a = grad_bt = None
    m, n = a.shape[0], bt.shape[0]
    if ctx.needs_input_grad[3]:
        # d a = G @ bt with G the CSR matrix of the incoming gradient.
        grad_a = _ops.spmm(grad, row_offsets, row_indices, col_indices, bt, m)
    if ctx.needs_input_grad[4]:
        # d bt = G^T @ a.
        grad_t, offsets_t, order_t, cols_t, _ = _transposed_structure(grad, row_offsets, col_indices, m, n)
        grad_bt = _ops.spmm(grad_t, offsets_t, order_t, cols_t, a, n)
    return None, None, None, grad_a, grad_bt


def _csr_transpose_setup(ctx, inputs, output):
    ctx.save_for_backward(output[3])


def _csr_transpose_backward(ctx, grad_values_t, grad_offsets, grad_cols, grad_permutation):
    (permutation,) = ctx.saved_tensors
    if grad_values_t is None or not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    # values_t = values[permutation], and permutation is a bijection: scatter the gradient back.
    grad_values = torch.empty_like(grad_values_t).index_copy_(0, permutation.long(), grad_values_t)
    return grad_values, None, None, None, None


def _csr_add_setup(ctx, inputs, output):
    values, row_offsets, row_indices, col_indices, dense = inputs
    ctx.nnz = values.shape[0]
    ctx.save_for_backward(row_offsets, col_indices)


def _csr_add_backward(ctx, grad):
    row_offsets, col_indices = ctx.saved_tensors
    grad_values = None
    if ctx.needs_input_grad[0]:
        m = row_offsets.shape[0] - 1
        counts = (row_offsets[1:] - row_offsets[:-1]).long()
        rows = torch.repeat_interleave(torch.arange(m, device=grad.device), counts, output_size=ctx.nnz)
        grad_values = grad[rows, col_indices.long()]
    grad_dense = grad if ctx.needs_input_grad[4] else None
    return grad_values, None, None, None, grad_dense


torch.library.register_autograd("rosa_kernels::spmm", _spmm_backward, setup_context=_spmm_setup)
torch.library.register_autograd("rosa_kernels::sddmm", _sddmm_backward, setup_context=_sddmm_setup)
torch.library.register_autograd(
    "rosa_kernels::csr_transpose", _csr_transpose_backward, setup_context=_csr_transpose_setup
)
torch.library.register_autograd("rosa_kernels::csr_add", _csr_add_backward, setup_context=_csr_add_setup)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def _check_options(return_type, validate):
    if return_type is not None:
        if not isinstance(return_type, torch.dtype):
            raise TypeError(f"return_type must be a torch.dtype or None, got {type(return_type).__name__}")
        if not return_type.is_floating_point:
            raise TypeError(f"return_type must be a floating dtype, got {return_type}")
    if not isinstance(validate, bool):
        raise TypeError(f"validate must be a bool, got {type(validate).__name__}")


def _cast(result, return_type):
    return result if return_type is None else result.to(return_type)


def spmm(values, row_offsets, row_indices, col_indices, dense, m, *, return_type=None, validate=True):
    """``A @ dense`` for the m x n CSR matrix ``A``; ``dense`` is (n, k), the result (m, k).

    ``n`` is ``dense.shape[0]``. Differentiable w.r.t. ``values`` and ``dense``.
    """
    _check_options(return_type, validate)
    check_values_tensor(values, "values", 1)
    check_values_tensor(dense, "dense", 2)
    m = check_size(m, "m")
    check_same_dtype(values, "values", dense=dense)
    check_same_device(values, "values", dense=dense, row_offsets=check_tensor(row_offsets, "row_offsets"),
                      row_indices=check_tensor(row_indices, "row_indices"),
                      col_indices=check_tensor(col_indices, "col_indices"))
    row_offsets, col_indices, row_indices = _validate_csr(
        row_offsets, col_indices, m, dense.shape[0], values.shape[0], row_indices, check_contents=validate,
        n_name="n = dense.shape[0]", nnz_name="values.shape[0]",
    )
    return _cast(_ops.spmm(values, row_offsets, row_indices, col_indices, dense, m), return_type)


def sddmm(row_offsets, row_indices, col_indices, a, bt, *, return_type=None, validate=True):
    """``out[p] = <a[i, :], bt[j, :]>`` for each nonzero ``p = (i, j)`` of the CSR mask.

    ``a`` is (m, k), ``bt`` (n, k); the result has one entry per nonzero (nnz,). This is the
    sampled product ``mask ∘ (a @ bt.T)``. Transposed views are read without a copy on the GPU, so
    RoSA's ``dS = mask ∘ (dY^T X)`` is ``sddmm(..., dY.t(), X.t())`` with ``dY`` (T, out) and
    ``X`` (T, in) as they come. Differentiable w.r.t. ``a`` and ``bt``.
    """
    _check_options(return_type, validate)
    check_values_tensor(a, "a", 2)
    check_values_tensor(bt, "bt", 2)
    check_same_dtype(a, "a", bt=bt)
    check_same_device(a, "a", bt=bt, row_offsets=check_tensor(row_offsets, "row_offsets"),
                      row_indices=check_tensor(row_indices, "row_indices"),
                      col_indices=check_tensor(col_indices, "col_indices"))
    if bt.shape[1] != a.shape[1]:
        raise ValueError(f"bt must have a.shape[1] = {a.shape[1]} columns, got shape {tuple(bt.shape)}")
    row_offsets, col_indices, row_indices = _validate_csr(
        row_offsets, col_indices, a.shape[0], bt.shape[0], None, row_indices, check_contents=validate,
        m_name="a.shape[0]", n_name="n = bt.shape[0]",
    )
    return _cast(_ops.sddmm(row_offsets, row_indices, col_indices, a, bt), return_type)


def csr_transpose(values, row_offsets, col_indices, m, n, *, return_permutation=False, validate=True):
    """The n x m transpose of an m x n CSR matrix: ``(values_t, row_offsets_t, col_indices_t)``.

    Column indices ascend inside each row of the result. With ``return_permutation=True`` a fourth
    tensor ``permutation`` (nnz,) int32 is returned with ``values_t == values[permutation]``, so
    new values of the same structure can be re-gathered without redoing the transpose.
    Differentiable w.r.t. ``values``. Build ``row_indices`` of the result with :func:`row_order`.
    """
    _check_options(None, validate)
    if not isinstance(return_permutation, bool):
        raise TypeError(f"return_permutation must be a bool, got {type(return_permutation).__name__}")
    check_values_tensor(values, "values", 1)
    m = check_size(m, "m")
    n = check_size(n, "n")
    check_same_device(values, "values", row_offsets=check_tensor(row_offsets, "row_offsets"),
                      col_indices=check_tensor(col_indices, "col_indices"))
    row_offsets, col_indices, _ = _validate_csr(
        row_offsets, col_indices, m, n, values.shape[0], check_contents=validate, nnz_name="values.shape[0]"
    )
    values_t, row_offsets_t, col_indices_t, permutation = _ops.csr_transpose(values, row_offsets, col_indices, m, n)
    if return_permutation:
        return values_t, row_offsets_t, col_indices_t, permutation
    return values_t, row_offsets_t, col_indices_t


def csr_add(values, row_offsets, row_indices, col_indices, dense, inplace=False, *, return_type=None, validate=True):
    """``dense + A`` for the CSR matrix ``A`` of ``dense``'s shape (m, n).

    With ``inplace=True`` the sum is written into ``dense`` and ``dense`` is returned; that path is
    not differentiable (it raises if autograd would need it). Differentiable w.r.t. ``values`` and
    ``dense`` otherwise.
    """
    _check_options(return_type, validate)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    check_values_tensor(values, "values", 1)
    check_values_tensor(dense, "dense", 2)
    check_same_dtype(values, "values", dense=dense)
    check_same_device(values, "values", dense=dense, row_offsets=check_tensor(row_offsets, "row_offsets"),
                      row_indices=check_tensor(row_indices, "row_indices"),
                      col_indices=check_tensor(col_indices, "col_indices"))
    m, n = dense.shape
    row_offsets, col_indices, row_indices = _validate_csr(
        row_offsets, col_indices, m, n, values.shape[0], row_indices, check_contents=validate,
        m_name="dense.shape[0]", n_name="n = dense.shape[1]", nnz_name="values.shape[0]",
    )
    if not inplace:
        return _cast(_ops.csr_add(values, row_offsets, row_indices, col_indices, dense), return_type)
    if return_type is not None and return_type != dense.dtype:
        raise ValueError(
            f"return_type must be None or dense.dtype ({dense.dtype}) with inplace=True, got {return_type}"
        )
    if torch.is_grad_enabled() and (values.requires_grad or dense.requires_grad):
        raise ValueError(
            "csr_add(..., inplace=True) is not differentiable: use inplace=False when values or dense require grad"
        )
    if dense.stride(-1) == 1 or dense.shape[1] <= 1:
        _ops.csr_add_(values, row_offsets, row_indices, col_indices, dense)
    else:
        dense.copy_(_ops.csr_add(values, row_offsets, row_indices, col_indices, dense))
    return dense
