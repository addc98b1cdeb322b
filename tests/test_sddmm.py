"""sddmm: out[p] = <a[i, :], bt[j, :]> at every nonzero p = (i, j) of a CSR mask."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rosa_kernels
from rosa_kernels.testing import rosa_mask, uniform_mask
from reference import DTYPE_IDS, DTYPES, assert_close, f64, randn, random_csr

# (m, n, k): 1x1, a single row, a single column, odd sizes, few reads per dense row (the CPU
# kernels then skip packing), empty matrices, an empty inner size.
SHAPES = [
    (1, 1, 1), (1, 9, 5), (9, 1, 4), (13, 17, 9), (31, 7, 33), (64, 96, 70),
    (6, 80, 32), (0, 5, 3), (5, 0, 3), (0, 0, 2), (7, 5, 0),
]
DENSITIES = [0.0, 0.2, 0.7]


def run_sddmm(mask, a, bt, **kwargs):
    return rosa_kernels.sddmm(mask.row_offsets, mask.row_indices, mask.col_indices, a, bt, **kwargs)


def check_sddmm(mask, a, bt, out):
    rows = np.repeat(np.arange(mask.shape[0]), np.diff(mask.row_offsets.cpu().numpy()))
    cols = mask.col_indices.cpu().numpy().astype(np.int64)
    expected = (f64(a) @ f64(bt).T)[rows, cols]
    bound = (np.abs(f64(a)) @ np.abs(f64(bt)).T)[rows, cols]
    assert out.device == a.device
    assert_close(out, expected, bound, a.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_sddmm_matches_dense_reference(m, n, k, density, dtype, device, gen):
    mask = random_csr(m, n, density, gen=gen, dtype=dtype, device=device)
    a = randn(m, k, gen=gen, dtype=dtype, device=device)
    bt = randn(n, k, gen=gen, dtype=dtype, device=device)
    check_sddmm(mask, a, bt, run_sddmm(mask, a, bt))


@pytest.mark.parametrize("layout", ["transposed_activations", "sliced", "a_transposed_only"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sddmm_non_contiguous_inputs(layout, dtype, device, gen):
    # RoSA's dS = mask ∘ (dY^T X): a = dY.t(), bt = X.t() with dY (T, m) and X (T, n) row-major.
    m, n, tokens = 21, 18, 13
    mask = random_csr(m, n, 0.3, gen=gen, dtype=dtype, device=device)
    if layout == "transposed_activations":
        a = randn(tokens, m, gen=gen, dtype=dtype, device=device).t()
        bt = randn(tokens, n, gen=gen, dtype=dtype, device=device).t()
    elif layout == "sliced":
        a = randn(m, 2 * tokens, gen=gen, dtype=dtype, device=device)[:, 1::2]
        bt = randn(n, 3 * tokens, gen=gen, dtype=dtype, device=device)[:, ::3]
    else:
        a = randn(tokens, m, gen=gen, dtype=dtype, device=device).t()
        bt = randn(n, tokens, gen=gen, dtype=dtype, device=device)
    assert not a.is_contiguous()
    check_sddmm(mask, a, bt, run_sddmm(mask, a, bt))


@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int64])
def test_sddmm_accepts_int16_and_int64_indices(index_dtype, device, gen):
    mask = random_csr(20, 30, 0.3, gen=gen, device=device)
    a, bt = randn(20, 6, gen=gen, device=device), randn(30, 6, gen=gen, device=device)
    out = rosa_kernels.sddmm(mask.row_offsets.to(index_dtype), mask.row_indices.to(index_dtype),
                             mask.col_indices.to(index_dtype), a, bt)
    check_sddmm(mask, a, bt, out)


@pytest.mark.parametrize("return_type", [torch.float32, torch.float64])
def test_sddmm_return_type(return_type, device, gen):
    mask = random_csr(9, 8, 0.4, gen=gen, device=device)
    a = randn(9, 5, gen=gen, dtype=torch.bfloat16, device=device)
    bt = randn(8, 5, gen=gen, dtype=torch.bfloat16, device=device)
    out = run_sddmm(mask, a, bt, return_type=return_type)
    assert out.dtype == return_type
    torch.testing.assert_close(out, run_sddmm(mask, a, bt).to(return_type))


@pytest.mark.parametrize("requires", ["a", "bt", "both"])
def test_sddmm_gradcheck(requires, device, gen):
    mask = random_csr(7, 6, 0.4, gen=gen, dtype=torch.float64, device=device)
    a = randn(7, 5, gen=gen, dtype=torch.float64, device=device).requires_grad_(requires in ("a", "both"))
    bt = randn(6, 5, gen=gen, dtype=torch.float64, device=device).requires_grad_(requires in ("bt", "both"))

    def f(a, bt):
        return rosa_kernels.sddmm(mask.row_offsets, mask.row_indices, mask.col_indices, a, bt)

    assert torch.autograd.gradcheck(f, (a, bt))
    assert torch.autograd.gradgradcheck(f, (a, bt))  # the C++ backward is differentiable


def test_sddmm_gradcheck_transposed_views(device, gen):
    mask = random_csr(6, 5, 0.5, gen=gen, dtype=torch.float64, device=device)
    dY = randn(4, 6, gen=gen, dtype=torch.float64, device=device).requires_grad_()
    X = randn(4, 5, gen=gen, dtype=torch.float64, device=device).requires_grad_()

    def f(dY, X):
        return rosa_kernels.sddmm(mask.row_offsets, mask.row_indices, mask.col_indices, dY.t(), X.t())

    assert torch.autograd.gradcheck(f, (dY, X))


def test_sddmm_opcheck(device, gen):
    mask = random_csr(11, 9, 0.3, gen=gen, device=device)
    a = randn(11, 4, gen=gen, device=device).requires_grad_()
    bt = randn(9, 4, gen=gen, device=device).requires_grad_()
    torch.library.opcheck(torch.ops.rosa_kernels.sddmm.default,
                          (mask.row_offsets, mask.row_indices, mask.col_indices, a, bt))


@pytest.mark.sanitizer  # small and realistic: the compute-sanitizer subset on a GPU
def test_sddmm_real_masks(device, real_masks_sample):
    gen = torch.Generator().manual_seed(2)
    for mask in real_masks_sample.values():
        mask = mask.to(device)
        m, n = mask.shape
        dY = randn(32, m, gen=gen, device=device)
        X = randn(32, n, gen=gen, device=device)
        check_sddmm(mask, dY.t(), X.t(), run_sddmm(mask, dY.t(), X.t()))


@settings(max_examples=30, deadline=None)
@given(m=st.integers(0, 24), n=st.integers(0, 24), k=st.integers(0, 20),
       density=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_sddmm_property_random_shapes(m, n, k, density, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = random_csr(m, n, density, gen=gen)
    a, bt = randn(m, k, gen=gen), randn(n, k, gen=gen)
    check_sddmm(mask, a, bt, run_sddmm(mask, a, bt))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sddmm_many_used_rows_and_padded_steps(dtype, threads, device, gen):
    # ~2100 used rows of bt and k = 300, not a whole number of vector steps: the CPU kernel
    # converts and zero-pads the used rows; both the serial and the OpenMP paths.
    mask = random_csr(30, 2100, 0.5, gen=gen, dtype=dtype, device=device, empty_row_fraction=0.1)
    a = randn(30, 300, gen=gen, dtype=dtype, device=device)
    bt = randn(2100, 300, gen=gen, dtype=dtype, device=device)
    check_sddmm(mask, a, bt, run_sddmm(mask, a, bt))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", ["rosa", "uniform"])
def test_sddmm_training_layout_with_mostly_unused_rows_and_columns(kind, dtype, threads, device, gen):
    # RoSA's dS = mask ∘ (dY^T X) on the views dY.t(), X.t(): on the CPU the op copies only the
    # rows of a and bt the mask uses when they are fewer than half (the rest stays unwritten), so
    # masks with empty rows and mostly empty columns must still give every nonzero right.
    m, n, tokens = 70, 90, 45
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    make = rosa_mask if kind == "rosa" else uniform_mask
    mask = make(m, n, 0.005, seed=seed, dtype=dtype, device=device)
    dY = randn(tokens, m, gen=gen, dtype=dtype, device=device)
    X = randn(tokens, n, gen=gen, dtype=dtype, device=device)
    used_columns = torch.unique(mask.col_indices).numel()
    assert used_columns * 2 < n  # the partial copy is exercised
    check_sddmm(mask, dY.t(), X.t(), run_sddmm(mask, dY.t(), X.t()))
