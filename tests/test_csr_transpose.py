"""csr_transpose: the n x m transpose of an m x n CSR matrix, and its value permutation."""

import numpy as np
import pytest
import torch

import rosa_kernels
from reference import DTYPE_IDS, DTYPES, randn, random_csr, scipy64, strided
from rosa_kernels import CSR, csr_from_mask

SHAPES = [(1, 1), (1, 9), (9, 1), (13, 17), (31, 7), (64, 96), (0, 5), (5, 0), (0, 0)]
DENSITIES = [0.0, 0.2, 0.7]


def run_transpose(A, **kwargs):
    m, n = A.shape
    return rosa_kernels.csr_transpose(A.values, A.row_offsets, A.col_indices, m, n, **kwargs)


def check_transpose(A, result):
    """The exact scipy transpose (sorted columns): values only move, so they compare exactly."""
    values_t, row_offsets_t, col_indices_t = result[:3]
    expected = scipy64(A).T.tocsr()
    expected.sort_indices()
    for t in (row_offsets_t, col_indices_t):
        assert t.dtype == torch.int32 and t.device == A.values.device
    assert values_t.dtype == A.values.dtype
    np.testing.assert_array_equal(row_offsets_t.cpu().numpy(), expected.indptr)
    np.testing.assert_array_equal(col_indices_t.cpu().numpy(), expected.indices)
    np.testing.assert_array_equal(values_t.cpu().double().numpy(), expected.data)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("m,n", SHAPES)
def test_csr_transpose_matches_scipy(m, n, density, dtype, device, gen):
    A = random_csr(m, n, density, gen=gen, dtype=dtype, device=device)
    result = run_transpose(A)
    assert len(result) == 3
    check_transpose(A, result)



# The CUDA kernel works on tiles of 4096 consecutive nonzeros and falls back to a device-wide sort
# for n > 65536. These cross many tiles: rows split between tiles, runs of empty rows inside and at
# the edges of tiles, a full row longer than a tile, a column present in every row, few columns
# with long output rows, many rows per tile, and (last) the fallback.
@pytest.mark.parametrize("m,n,density", [(300, 500, 0.1), (97, 4099, 0.05), (5000, 7, 0.6),
                                         (20_000, 3, 0.1), (800, 1000, 0.5), (40, 70_000, 0.003)])
def test_csr_transpose_many_tiles(m, n, density, device, gen):
    mask = torch.rand(m, n, generator=gen) < density
    mask &= torch.rand(m, 1, generator=gen) >= 0.3
    mask[:, n // 3] = True
    mask[m // 2, :] = True
    structure = csr_from_mask(mask)
    A = CSR(randn(structure.nnz, gen=gen), structure.row_offsets, structure.row_indices,
            structure.col_indices, (m, n)).to(device)
    result = run_transpose(A, return_permutation=True)
    check_transpose(A, result)
    assert torch.equal(result[0], A.values[result[3].long()])

@pytest.mark.parametrize("m,n", [(1, 1), (13, 17), (64, 96), (0, 4), (6, 0)])
def test_csr_transpose_permutation(m, n, device, gen):
    A = random_csr(m, n, 0.3, gen=gen, device=device)
    values_t, row_offsets_t, col_indices_t, permutation = run_transpose(A, return_permutation=True)
    assert permutation.dtype == torch.int32 and permutation.device == A.values.device
    # A bijection of the value positions with values_t == values[permutation] ...
    assert torch.equal(torch.sort(permutation.long()).values, torch.arange(A.nnz, device=device))
    assert torch.equal(values_t, A.values[permutation.long()])
    # ... that re-gathers new values of the same structure into their transposed order.
    new_values = randn(A.nnz, gen=gen, device=device)
    check_transpose(A._replace(values=new_values), (new_values[permutation.long()], row_offsets_t, col_indices_t))


def test_csr_transpose_twice_is_identity(device, gen):
    A = random_csr(37, 23, 0.2, gen=gen, device=device)
    values_t, row_offsets_t, col_indices_t = run_transpose(A)
    back = rosa_kernels.csr_transpose(values_t, row_offsets_t, col_indices_t, 23, 37)
    for got, want in zip(back, (A.values, A.row_offsets, A.col_indices)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("layout", ["strided_values", "int16", "int64"])
def test_csr_transpose_input_variants(layout, device, gen):
    A = random_csr(19, 28, 0.3, gen=gen, device=device)
    values, offsets, cols = A.values, A.row_offsets, A.col_indices
    if layout == "strided_values":
        values = strided(values)
    else:
        index_dtype = torch.int16 if layout == "int16" else torch.int64
        offsets, cols = offsets.to(index_dtype), cols.to(index_dtype)
    check_transpose(A, rosa_kernels.csr_transpose(values, offsets, cols, 19, 28))


def test_csr_transpose_gradcheck(device, gen):
    A = random_csr(7, 9, 0.4, gen=gen, dtype=torch.float64, device=device)
    values = A.values.clone().requires_grad_()

    def f(values):
        return rosa_kernels.csr_transpose(values, A.row_offsets, A.col_indices, 7, 9)[0]

    assert torch.autograd.gradcheck(f, (values,))
    assert torch.autograd.gradgradcheck(f, (values,))  # the C++ backward is differentiable


def test_csr_transpose_opcheck(device, gen):
    A = random_csr(11, 9, 0.3, gen=gen, device=device)
    values = A.values.clone().requires_grad_()
    torch.library.opcheck(torch.ops.rosa_kernels.csr_transpose.default,
                          (values, A.row_offsets, A.col_indices, 11, 9))


@pytest.mark.sanitizer  # small and realistic: the compute-sanitizer subset on a GPU
def test_csr_transpose_real_masks(device, real_masks_sample):
    for mask in real_masks_sample.values():
        A = mask.to(device)
        check_transpose(A, run_transpose(A))


def test_csr_transpose_never_goes_through_a_dense_matrix(device):
    # A 2M x 1M matrix with 5 nonzeros: a dense detour would need 8 TB; O(nnz + m + n) is instant.
    m, n = 2_000_000, 1_000_000
    rows = torch.tensor([3, 3, 70_000, 1_999_999, 1_999_999])
    cols = torch.tensor([0, 999_999, 5, 17, 500_000], dtype=torch.int32)
    row_offsets = torch.zeros(m + 1, dtype=torch.int32)
    row_offsets[1:] = torch.cumsum(torch.bincount(rows, minlength=m), 0).to(torch.int32)
    values = torch.arange(1.0, 6.0)
    values_t, row_offsets_t, col_indices_t, permutation = rosa_kernels.csr_transpose(
        values.to(device), row_offsets.to(device), cols.to(device), m, n, return_permutation=True
    )
    assert row_offsets_t.shape == (n + 1,)
    # Column-major order of the nonzeros: (0: row 3), (5: row 70000), (17: row 1999999), ...
    assert col_indices_t.tolist() == [3, 70_000, 1_999_999, 1_999_999, 3]
    assert values_t.tolist() == [1.0, 3.0, 4.0, 5.0, 2.0]
    assert permutation.tolist() == [0, 2, 3, 4, 1]
