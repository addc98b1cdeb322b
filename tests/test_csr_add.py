"""csr_add: dense + A for a CSR matrix A of dense's shape, out of place and in place."""

import numpy as np
import pytest
import torch

import rosa_kernels
from reference import DTYPE_IDS, DTYPES, assert_close, f64, randn, random_csr, scipy64, strided

SHAPES = [(1, 1), (1, 9), (9, 1), (13, 17), (31, 7), (64, 96), (0, 5), (5, 0), (0, 0)]
DENSITIES = [0.0, 0.2, 0.7]


def run_add(A, dense, *args, **kwargs):
    return rosa_kernels.csr_add(A.values, A.row_offsets, A.row_indices, A.col_indices, dense, *args, **kwargs)


def check_add(A, dense_before, out):
    reference = scipy64(A)
    expected = f64(dense_before) + reference.toarray()
    bound = np.abs(f64(dense_before)) + abs(reference).toarray()
    assert out.device == A.values.device
    assert_close(out, expected, bound, dense_before.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("m,n", SHAPES)
def test_csr_add_matches_scipy(m, n, density, dtype, device, gen):
    A = random_csr(m, n, density, gen=gen, dtype=dtype, device=device)
    dense = randn(m, n, gen=gen, dtype=dtype, device=device)
    before = dense.clone()
    out = run_add(A, dense)
    check_add(A, before, out)
    assert torch.equal(dense, before), "the out-of-place csr_add changed its input"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("m,n", [(1, 1), (13, 17), (0, 5), (6, 0), (40, 33)])
def test_csr_add_inplace(m, n, dtype, device, gen):
    A = random_csr(m, n, 0.3, gen=gen, dtype=dtype, device=device)
    dense = randn(m, n, gen=gen, dtype=dtype, device=device)
    before = dense.clone()
    out = run_add(A, dense, True)
    assert out is dense
    check_add(A, before, dense)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("layout", ["transposed", "sliced", "strided_values", "int16", "int64"])
def test_csr_add_input_variants(layout, inplace, device, gen):
    m, n = 17, 23
    A = random_csr(m, n, 0.3, gen=gen, device=device)
    dense = randn(m, n, gen=gen, device=device)
    offsets, order, cols, values = A.row_offsets, A.row_indices, A.col_indices, A.values
    if layout == "transposed":
        dense = dense.t().contiguous().t()
    elif layout == "sliced":
        wide = randn(m, 2 * n, gen=gen, device=device)
        wide[:, 1::2] = dense
        dense = wide[:, 1::2]
    elif layout == "strided_values":
        values = strided(values)
    else:
        index_dtype = torch.int16 if layout == "int16" else torch.int64
        offsets, order, cols = offsets.to(index_dtype), order.to(index_dtype), cols.to(index_dtype)
    before = dense.clone()
    out = rosa_kernels.csr_add(values, offsets, order, cols, dense, inplace)
    check_add(A, before, out)
    if inplace:
        assert out is dense
        check_add(A, before, dense)
    else:
        assert torch.equal(dense, before)


def test_csr_add_return_type(device, gen):
    A = random_csr(9, 8, 0.4, gen=gen, dtype=torch.bfloat16, device=device)
    dense = randn(9, 8, gen=gen, dtype=torch.bfloat16, device=device)
    out = run_add(A, dense, return_type=torch.float32)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, run_add(A, dense).float())
    assert run_add(A, dense.clone(), True, return_type=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="return_type"):
        run_add(A, dense.clone(), True, return_type=torch.float32)


@pytest.mark.parametrize("requires", ["values", "dense", "both"])
def test_csr_add_gradcheck(requires, device, gen):
    A = random_csr(7, 6, 0.4, gen=gen, dtype=torch.float64, device=device)
    values = A.values.clone().requires_grad_(requires in ("values", "both"))
    dense = randn(7, 6, gen=gen, dtype=torch.float64, device=device).requires_grad_(requires in ("dense", "both"))

    def f(values, dense):
        return rosa_kernels.csr_add(values, A.row_offsets, A.row_indices, A.col_indices, dense)

    assert torch.autograd.gradcheck(f, (values, dense))
    assert torch.autograd.gradgradcheck(f, (values, dense))  # the C++ backward is differentiable


@pytest.mark.parametrize("requires", ["values", "dense"])
def test_csr_add_inplace_refuses_autograd(requires, device, gen):
    A = random_csr(5, 4, 0.5, gen=gen, dtype=torch.float64, device=device)
    values = A.values.clone().requires_grad_(requires == "values")
    dense = randn(5, 4, gen=gen, dtype=torch.float64, device=device).requires_grad_(requires == "dense")
    with pytest.raises(ValueError, match="inplace"):
        rosa_kernels.csr_add(values, A.row_offsets, A.row_indices, A.col_indices, dense, inplace=True)
    # Without autograd recording, the in-place update is allowed.
    with torch.no_grad():
        expected = dense + torch.as_tensor(scipy64(A._replace(values=values)).toarray(), device=device)
        rosa_kernels.csr_add(values, A.row_offsets, A.row_indices, A.col_indices, dense, inplace=True)
    torch.testing.assert_close(dense.detach(), expected)


def test_csr_add_opcheck(device, gen):
    A = random_csr(11, 9, 0.3, gen=gen, device=device)
    values = A.values.clone().requires_grad_()
    dense = randn(11, 9, gen=gen, device=device).requires_grad_()
    torch.library.opcheck(torch.ops.rosa_kernels.csr_add.default,
                          (values, A.row_offsets, A.row_indices, A.col_indices, dense))


def test_csr_add_inplace_opcheck(device, gen):
    A = random_csr(11, 9, 0.3, gen=gen, device=device)
    dense = randn(11, 9, gen=gen, device=device)
    torch.library.opcheck(torch.ops.rosa_kernels.csr_add_.default,
                          (A.values, A.row_offsets, A.row_indices, A.col_indices, dense))


@pytest.mark.sanitizer  # small and realistic: the compute-sanitizer subset on a GPU
def test_csr_add_real_masks(device, real_masks_sample):
    gen = torch.Generator().manual_seed(3)
    for mask in real_masks_sample.values():
        A = mask.to(device)
        dense = randn(*A.shape, gen=gen, device=device)
        check_add(A, dense.clone(), run_add(A, dense))
