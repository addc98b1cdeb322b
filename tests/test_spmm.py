"""spmm: out = A @ dense for an m x n CSR matrix A and a dense (n, k) operand."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rosa_kernels
from reference import DTYPE_IDS, DTYPES, assert_close, f64, randn, random_csr, scipy64, strided

# (m, n, k): 1x1, a single row, a single column, odd sizes, few reads per dense row (the CPU
# kernels then skip packing), empty matrices, an empty inner size.
SHAPES = [
    (1, 1, 1), (1, 9, 5), (9, 1, 4), (13, 17, 9), (31, 7, 33), (64, 96, 70),
    (6, 80, 32), (0, 5, 3), (5, 0, 3), (0, 0, 2), (7, 5, 0),
]
DENSITIES = [0.0, 0.2, 0.7]


def run_spmm(A, dense, **kwargs):
    return rosa_kernels.spmm(A.values, A.row_offsets, A.row_indices, A.col_indices, dense, A.shape[0], **kwargs)


def check_spmm(A, dense, out):
    reference = scipy64(A)
    expected = np.asarray(reference @ f64(dense))
    bound = np.asarray(abs(reference) @ np.abs(f64(dense)))
    assert out.device == dense.device
    assert_close(out, expected, bound, dense.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_spmm_matches_scipy(m, n, k, density, dtype, device, gen):
    A = random_csr(m, n, density, gen=gen, dtype=dtype, device=device)
    dense = randn(n, k, gen=gen, dtype=dtype, device=device)
    check_spmm(A, dense, run_spmm(A, dense))


@pytest.mark.parametrize("layout", ["transposed", "sliced", "strided_values"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_spmm_non_contiguous_inputs(layout, dtype, device, gen):
    m, n, k = 23, 19, 11
    A = random_csr(m, n, 0.3, gen=gen, dtype=dtype, device=device)
    dense = randn(n, k, gen=gen, dtype=dtype, device=device)
    if layout == "transposed":
        dense = dense.t().contiguous().t()
    elif layout == "sliced":
        wide = randn(n, 2 * k, gen=gen, dtype=dtype, device=device)
        wide[:, ::2] = dense
        dense = wide[:, ::2]
    else:
        A = A._replace(values=strided(A.values))
    assert not dense.is_contiguous() or not A.values.is_contiguous()
    check_spmm(A, dense, run_spmm(A, dense))


@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int64])
def test_spmm_accepts_int16_and_int64_indices(index_dtype, device, gen):
    A = random_csr(20, 30, 0.3, gen=gen, device=device)
    dense = randn(30, 6, gen=gen, device=device)
    out = rosa_kernels.spmm(A.values, A.row_offsets.to(index_dtype), A.row_indices.to(index_dtype),
                            A.col_indices.to(index_dtype), dense, 20)
    check_spmm(A, dense, out)


def test_spmm_result_does_not_depend_on_row_indices_order(device, gen):
    # row_indices only schedules the rows; any permutation gives the same product.
    A = random_csr(40, 30, 0.3, gen=gen, device=device)
    dense = randn(30, 8, gen=gen, device=device)
    shuffled = torch.randperm(40, generator=gen).to(torch.int32).to(device)
    out = rosa_kernels.spmm(A.values, A.row_offsets, shuffled, A.col_indices, dense, 40)
    check_spmm(A, dense, out)


@pytest.mark.parametrize("return_type", [torch.float32, torch.float64, torch.bfloat16])
def test_spmm_return_type(return_type, device, gen):
    A = random_csr(9, 8, 0.4, gen=gen, dtype=torch.float16, device=device)
    dense = randn(8, 5, gen=gen, dtype=torch.float16, device=device)
    out = run_spmm(A, dense, return_type=return_type)
    assert out.dtype == return_type
    torch.testing.assert_close(out, run_spmm(A, dense).to(return_type))


@pytest.mark.parametrize("requires", ["values", "dense", "both"])
def test_spmm_gradcheck(requires, device, gen):
    A = random_csr(7, 6, 0.4, gen=gen, dtype=torch.float64, device=device)
    values = A.values.clone().requires_grad_(requires in ("values", "both"))
    dense = randn(6, 4, gen=gen, dtype=torch.float64, device=device).requires_grad_(requires in ("dense", "both"))

    def f(values, dense):
        return rosa_kernels.spmm(values, A.row_offsets, A.row_indices, A.col_indices, dense, 7)

    assert torch.autograd.gradcheck(f, (values, dense))
    assert torch.autograd.gradgradcheck(f, (values, dense))  # the C++ backward is differentiable


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_spmm_backward_keeps_dtypes(dtype, device, gen):
    A = random_csr(12, 10, 0.3, gen=gen, dtype=dtype, device=device)
    values = A.values.clone().requires_grad_()
    dense = randn(10, 3, gen=gen, dtype=dtype, device=device).requires_grad_()
    out = rosa_kernels.spmm(values, A.row_offsets, A.row_indices, A.col_indices, dense, 12)
    grad = randn(*out.shape, gen=gen, dtype=dtype, device=device)
    out.backward(grad)
    assert values.grad.dtype == dtype and dense.grad.dtype == dtype
    # d dense = A^T grad and d values[p] = <grad[i], dense[j]>, against float64.
    reference = scipy64(A)
    assert_close(dense.grad, np.asarray(reference.T @ f64(grad)),
                 np.asarray(abs(reference).T @ np.abs(f64(grad))), dtype)
    rows = np.repeat(np.arange(12), np.diff(A.row_offsets.cpu().numpy()))
    cols = A.col_indices.cpu().numpy()
    assert_close(values.grad, (f64(grad) @ f64(dense).T)[rows, cols],
                 (np.abs(f64(grad)) @ np.abs(f64(dense)).T)[rows, cols], dtype)


def test_spmm_opcheck(device, gen):
    A = random_csr(11, 9, 0.3, gen=gen, device=device)
    values = A.values.clone().requires_grad_()
    dense = randn(9, 4, gen=gen, device=device).requires_grad_()
    torch.library.opcheck(torch.ops.rosa_kernels.spmm.default,
                          (values, A.row_offsets, A.row_indices, A.col_indices, dense, 11))


@pytest.mark.sanitizer  # small and realistic: the compute-sanitizer subset on a GPU
def test_spmm_real_masks(device, real_masks_sample):
    gen = torch.Generator().manual_seed(1)
    for name, mask in real_masks_sample.items():
        A = mask.to(device)
        dense = randn(A.shape[1], 16, gen=gen, device=device)
        check_spmm(A, dense, run_spmm(A, dense))


@settings(max_examples=30, deadline=None)
@given(m=st.integers(0, 24), n=st.integers(0, 24), k=st.integers(0, 20),
       density=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_spmm_property_random_shapes(m, n, k, density, seed):
    gen = torch.Generator().manual_seed(seed)
    A = random_csr(m, n, density, gen=gen)
    dense = randn(n, k, gen=gen)
    check_spmm(A, dense, run_spmm(A, dense))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_spmm_many_used_rows_and_a_ragged_tile(dtype, threads, device, gen):
    # ~1100 used rows of dense (converted once for 16-bit types) and k = 200, which is three full
    # register tiles and a ragged one; both the serial and the OpenMP paths.
    A = random_csr(40, 1100, 0.5, gen=gen, dtype=dtype, device=device, empty_row_fraction=0.1)
    dense = randn(1100, 200, gen=gen, dtype=dtype, device=device)
    check_spmm(A, dense, run_spmm(A, dense))
