"""CSR helpers: builders, converters, row_order and validate_csr on valid input."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import rosa_kernels
from rosa_kernels import CSR, testing
from reference import DTYPE_IDS, DTYPES, randn, random_csr

# torch warns that its sparse CSR layout is beta; the converters use it on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Sparse:UserWarning")


def assert_row_sorted_csr(csr: CSR, m, n):
    """The layout contract of DESIGN.md: int32 indices, offsets, sorted columns, row order."""
    assert csr.shape == (m, n)
    for t in (csr.row_offsets, csr.row_indices, csr.col_indices):
        assert t.dtype == torch.int32
    rosa_kernels.validate_csr(csr.row_offsets, csr.col_indices, m, n, csr.values.shape[0], csr.row_indices)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("m,n", [(1, 1), (7, 1), (1, 7), (13, 17), (0, 4), (4, 0)])
def test_csr_from_dense_round_trip(m, n, dtype, device, gen):
    dense = randn(m, n, gen=gen, dtype=dtype, device=device)
    dense[torch.rand(m, n, generator=gen).to(device) < 0.6] = 0
    csr = rosa_kernels.csr_from_dense(dense)
    assert_row_sorted_csr(csr, m, n)
    assert csr.values.dtype == dtype and csr.values.device.type == device
    assert csr.nnz == int((dense != 0).sum())
    assert torch.equal(csr.to_dense(), dense)


def test_csr_from_mask(device, gen):
    mask = (torch.rand(9, 12, generator=gen) < 0.3).to(device)
    values = randn(9, 12, gen=gen, device=device)
    csr = rosa_kernels.csr_from_mask(mask, values)
    assert_row_sorted_csr(csr, 9, 12)
    assert torch.equal(csr.to_dense(), torch.where(mask, values, torch.zeros_like(values)))
    zeros = rosa_kernels.csr_from_mask(mask, dtype=torch.bfloat16)
    assert zeros.values.dtype == torch.bfloat16 and not zeros.values.any()
    assert torch.equal(zeros.col_indices, csr.col_indices)


def test_csr_from_scipy_sums_duplicates_and_sorts_columns():
    rows = np.array([2, 0, 2, 2, 1, 0])
    cols = np.array([3, 1, 0, 3, 2, 0])
    data = np.array([1.5, 2.0, -1.0, 0.5, 4.0, 3.0])
    matrix = sp.coo_matrix((data, (rows, cols)), shape=(4, 5))
    csr = rosa_kernels.csr_from_scipy(matrix)
    assert_row_sorted_csr(csr, 4, 5)
    assert csr.values.dtype == torch.float64
    np.testing.assert_array_equal(csr.to_dense().numpy(), matrix.toarray())
    assert csr.nnz == 5  # the two (2, 3) entries became one
    assert rosa_kernels.csr_from_scipy(matrix, dtype=torch.float16).values.dtype == torch.float16
    integer = rosa_kernels.csr_from_scipy(sp.csr_matrix(np.eye(3, dtype=np.int64)))
    assert integer.values.dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_csr_to_scipy(dtype, gen):
    A = random_csr(11, 8, 0.3, gen=gen, dtype=dtype)
    matrix = A.to_scipy()
    assert sp.issparse(matrix) and matrix.shape == (11, 8)
    np.testing.assert_array_equal(matrix.toarray(), A.to_dense().double().numpy())
    back = rosa_kernels.csr_from_scipy(matrix, dtype=dtype)
    for got, want in zip(back[:4], A[:4]):
        assert torch.equal(got, want)


@pytest.mark.parametrize("layout", ["csr", "coo"])
def test_torch_sparse_round_trip(layout, device, gen):
    A = random_csr(10, 14, 0.3, gen=gen, device=device)
    tensor = A.to_torch_sparse()
    assert tensor.layout == torch.sparse_csr and tensor.shape == (10, 14)
    torch.testing.assert_close(tensor.to_dense(), A.to_dense())
    if layout == "coo":
        tensor = tensor.to_sparse_coo()
    back = rosa_kernels.csr_from_torch_sparse(tensor)
    assert_row_sorted_csr(back, 10, 14)
    assert torch.equal(back.to_dense(), A.to_dense())


def test_csr_from_torch_sparse_sorts_unsorted_columns():
    crow = torch.tensor([0, 2, 3])
    col = torch.tensor([2, 0, 1])
    values = torch.tensor([1.0, 2.0, 3.0])
    tensor = torch.sparse_csr_tensor(crow, col, values, size=(2, 3))
    csr = rosa_kernels.csr_from_torch_sparse(tensor)
    assert csr.col_indices.tolist() == [0, 2, 1]
    assert csr.values.tolist() == [2.0, 1.0, 3.0]


def test_csr_to_moves_and_casts(gen):
    A = random_csr(6, 5, 0.5, gen=gen)
    B = A.to(torch.float64)
    assert B.values.dtype == torch.float64 and B.col_indices.dtype == torch.int32
    assert B.nnz == A.nnz == A.col_indices.shape[0]


def test_row_order_sorts_rows_by_nonincreasing_count_stably(device, gen):
    counts = torch.randint(0, 5, (40,), generator=gen)
    row_offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)]).to(device)
    order = rosa_kernels.row_order(row_offsets)
    assert order.dtype == torch.int32 and order.device.type == device
    order = order.cpu().long()
    assert torch.equal(torch.sort(order).values, torch.arange(40))
    ordered = counts[order]
    assert (ordered[1:] <= ordered[:-1]).all()
    # Ties keep ascending row order.
    same = ordered[1:] == ordered[:-1]
    assert (order[1:][same] > order[:-1][same]).all()
    assert rosa_kernels.row_order(torch.zeros(1, dtype=torch.int32)).shape == (0,)


def test_row_order_of_int16_offsets():
    order = rosa_kernels.row_order(torch.tensor([0, 1, 4, 4, 6], dtype=torch.int16))
    assert order.tolist() == [1, 3, 0, 2]  # counts 1, 3, 0, 2


@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32, torch.int64])
def test_validate_csr_returns_int32(index_dtype, gen):
    A = random_csr(8, 9, 0.4, gen=gen)
    offsets, cols, order = rosa_kernels.validate_csr(
        A.row_offsets.to(index_dtype), A.col_indices.to(index_dtype), 8, 9, A.nnz, A.row_indices.to(index_dtype)
    )
    assert offsets.dtype == cols.dtype == order.dtype == torch.int32
    assert torch.equal(offsets, A.row_offsets) and torch.equal(cols, A.col_indices)
    _, _, none = rosa_kernels.validate_csr(A.row_offsets, A.col_indices, 8, 9)
    assert none is None


def test_validate_csr_accepts_empty_structures():
    for m, n in [(0, 0), (0, 5), (5, 0), (3, 3)]:
        rosa_kernels.validate_csr(torch.zeros(m + 1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), m, n,
                                  0, torch.arange(m, dtype=torch.int32))


@pytest.mark.parametrize("kind", ["uniform", "rosa"])
def test_mask_generators_have_exact_counts(kind):
    make = testing.uniform_mask if kind == "uniform" else testing.rosa_mask
    mask = make(64, 80, 0.05, seed=3)
    assert mask.nnz == testing.mask_count(64, 80, 0.05)
    assert_row_sorted_csr(mask, 64, 80)
    assert (mask.values != 0).all()


def test_real_masks_are_valid_csr(real_masks_sample):
    for mask in real_masks_sample.values():
        assert_row_sorted_csr(mask, *mask.shape)
