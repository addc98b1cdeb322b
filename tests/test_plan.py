"""MaskPlan: hot columns through dense GEMMs, the remainder through the CSR ops, one result in the
mask's order. Compared with float64 references and with the unplanned ops."""

import math

import numpy as np
import pytest
import torch

import rosa_kernels
from rosa_kernels import CSR, MaskPlan, csr_from_mask
from rosa_kernels.plan import hot_column_choice, planned_seconds
from rosa_kernels.testing import rosa_mask, uniform_mask
from reference import DTYPE_IDS, DTYPES, TOLERANCE, assert_close, f64, randn, random_csr, scipy64

# (m, n, k): 1x1, a single row / column, odd sizes, empty matrices and an empty inner size.
SHAPES = [(1, 1, 1), (1, 9, 5), (9, 1, 4), (13, 17, 9), (31, 7, 33), (64, 96, 70), (0, 5, 3), (5, 0, 3),
          (0, 0, 2), (7, 5, 0)]
# 0: every non-empty column is hot; 1: only full columns; 0.15: a mix; "auto": the cost model.
HOT_FILLS = [0, 0.15, 1, "auto"]


def with_values(structure: CSR, gen, dtype, device) -> CSR:
    values = randn(structure.nnz, gen=gen, dtype=dtype)
    return CSR(values, structure.row_offsets, structure.row_indices, structure.col_indices,
               structure.shape).to(device)


def rows_cols(mask: CSR):
    rows = np.repeat(np.arange(mask.shape[0]), np.diff(mask.row_offsets.cpu().numpy()))
    return rows, mask.col_indices.cpu().numpy().astype(np.int64)


def check_sddmm(plan, mask, a, bt):
    out = plan.sddmm(a, bt)
    rows, cols = rows_cols(mask)
    expected = (f64(a) @ f64(bt).T)[rows, cols]
    bound = (np.abs(f64(a)) @ np.abs(f64(bt)).T)[rows, cols]
    assert out.device == a.device
    assert_close(out, expected, bound, a.dtype)
    # Agrees with the unplanned op: both are within the tolerance of the reference.
    unplanned = rosa_kernels.sddmm(mask.row_offsets, mask.row_indices, mask.col_indices, a, bt)
    assert np.all(np.abs(f64(out) - f64(unplanned)) <= 2 * TOLERANCE[a.dtype] * bound)
    return out


def check_spmm(plan, mask, dense):
    out = plan.spmm(mask.values, dense)
    expected = scipy64(mask) @ f64(dense)
    bound = abs(scipy64(mask)) @ np.abs(f64(dense))
    assert out.device == dense.device
    assert_close(out, expected, bound, dense.dtype)
    unplanned = rosa_kernels.spmm(mask.values, mask.row_offsets, mask.row_indices, mask.col_indices, dense,
                                  mask.shape[0])
    assert np.all(np.abs(f64(out) - f64(unplanned)) <= 2 * TOLERANCE[dense.dtype] * bound)
    return out


def check_structure(plan: MaskPlan, mask: CSR):
    """The plan's parts: the hot columns follow the rule, the remainder is a valid row-sorted CSR of
    the other nonzeros, and target sends each nonzero to its own slot."""
    m, n = mask.shape
    rows, cols = rows_cols(mask)
    counts = np.bincount(cols, minlength=n)
    hot = plan.hot_columns.cpu().numpy()
    assert np.all(np.diff(hot) > 0)
    if isinstance(plan.hot_fill, float) and math.isfinite(plan.hot_fill):
        expected = np.nonzero((counts > 0) & (counts >= plan.hot_fill * m))[0]
        np.testing.assert_array_equal(hot, expected)
    is_hot = np.isin(cols, hot)
    np.testing.assert_array_equal(plan.hot_positions.cpu().numpy(), np.nonzero(is_hot)[0])
    np.testing.assert_array_equal(plan.rest_positions.cpu().numpy(), np.nonzero(~is_hot)[0])
    np.testing.assert_array_equal(plan.hot_rows.cpu().numpy(), rows[is_hot])
    np.testing.assert_array_equal(hot[plan.hot_slots.cpu().numpy()], cols[is_hot])
    rosa_kernels.validate_csr(plan.rest_row_offsets, plan.rest_col_indices, m, n, plan.rest_nnz,
                              plan.rest_row_indices)
    rest_rows = np.repeat(np.arange(m), np.diff(plan.rest_row_offsets.cpu().numpy()))
    np.testing.assert_array_equal(rest_rows, rows[~is_hot])
    np.testing.assert_array_equal(plan.rest_col_indices.cpu().numpy(), cols[~is_hot])
    target = plan.target.cpu().numpy()
    assert len(np.unique(target)) == mask.nnz
    assert plan.hot_nnz + plan.rest_nnz == plan.nnz == mask.nnz


@pytest.mark.parametrize("hot_fill", HOT_FILLS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_plan_matches_reference_on_random_masks(m, n, k, dtype, hot_fill, device, gen):
    mask = random_csr(m, n, 0.3, gen=gen, dtype=dtype, device=device)
    plan = MaskPlan.from_csr(mask, hot_fill=hot_fill)
    check_structure(plan, mask)
    check_sddmm(plan, mask, randn(m, k, gen=gen, dtype=dtype, device=device),
                randn(n, k, gen=gen, dtype=dtype, device=device))
    check_spmm(plan, mask, randn(n, k, gen=gen, dtype=dtype, device=device))


@pytest.mark.parametrize("hot_fill", HOT_FILLS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", ["uniform", "rosa"])
def test_plan_on_protocol_masks_in_rosas_layout(kind, dtype, hot_fill, device, gen):
    # RoSA's layout: dS = mask ∘ (dY^T X) with dY (T, m), X (T, n) row-major; X S^T = (S X^T)^T.
    m, n, tokens = 120, 200, 33
    make = uniform_mask if kind == "uniform" else rosa_mask
    mask = with_values(make(m, n, 0.04, seed=3), gen, dtype, device)
    plan = MaskPlan.from_csr(mask, hot_fill=hot_fill)
    check_structure(plan, mask)
    dy = randn(tokens, m, gen=gen, dtype=dtype, device=device)
    x = randn(tokens, n, gen=gen, dtype=dtype, device=device)
    check_sddmm(plan, mask, dy.t(), x.t())
    check_spmm(plan, mask, x.t())


def test_rosa_masks_have_hot_columns_and_uniform_ones_do_not():
    rosa = MaskPlan.from_csr(rosa_mask(256, 512, 0.01), hot_fill=0.05)
    uniform = MaskPlan.from_csr(uniform_mask(256, 512, 0.01), hot_fill=0.05)
    assert rosa.hot_nnz > 0.5 * rosa.nnz
    assert uniform.hot_nnz == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_plan_on_real_masks(real_masks_sample, dtype, device, gen):
    for name, mask in real_masks_sample.items():
        mask = with_values(mask, gen, dtype, device)
        m, n = mask.shape
        for hot_fill in (0.05, "auto"):
            plan = MaskPlan.from_csr(mask, hot_fill=hot_fill)
            check_structure(plan, mask)
            check_sddmm(plan, mask, randn(40, m, gen=gen, dtype=dtype, device=device).t(),
                        randn(40, n, gen=gen, dtype=dtype, device=device).t())
            check_spmm(plan, mask, randn(n, 24, gen=gen, dtype=dtype, device=device))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_hot_columns_with_empty_rows(dtype, device, gen):
    # Columns 2 and 5 are full except in the empty rows 0, 4 and 9; a sprinkle of other nonzeros.
    m, n, k = 12, 9, 7
    mask_bool = torch.rand(m, n, generator=gen) < 0.15
    mask_bool[:, [2, 5]] = True
    mask_bool[[0, 4, 9]] = False
    mask = with_values(csr_from_mask(mask_bool), gen, dtype, device)
    plan = MaskPlan.from_csr(mask, hot_fill=0.5)
    assert set(plan.hot_columns.tolist()) >= {2, 5}
    assert plan.rest_nnz > 0
    check_structure(plan, mask)
    check_sddmm(plan, mask, randn(m, k, gen=gen, dtype=dtype, device=device),
                randn(n, k, gen=gen, dtype=dtype, device=device))
    check_spmm(plan, mask, randn(n, k, gen=gen, dtype=dtype, device=device))


@pytest.mark.parametrize("hot_fill", HOT_FILLS, ids=str)
def test_degenerate_masks(hot_fill, device, gen):
    # Empty mask, a full mask (every column hot at any threshold), one nonzero, a single full column.
    one_nonzero = torch.zeros(1, 7, dtype=torch.bool)
    one_nonzero[0, 3] = True
    one_column = torch.zeros(4, 6, dtype=torch.bool)
    one_column[:, 2] = True
    for mask_bool in (torch.zeros(6, 4, dtype=torch.bool), torch.ones(5, 3, dtype=torch.bool), one_nonzero,
                      one_column):
        mask = with_values(csr_from_mask(mask_bool), gen, torch.float64, device)
        m, n = mask.shape
        plan = MaskPlan.from_csr(mask, hot_fill=hot_fill)
        check_structure(plan, mask)
        out = check_sddmm(plan, mask, randn(m, 5, gen=gen, dtype=torch.float64, device=device),
                          randn(n, 5, gen=gen, dtype=torch.float64, device=device))
        assert out.shape == (mask.nnz,)
        check_spmm(plan, mask, randn(n, 3, gen=gen, dtype=torch.float64, device=device))
    full = MaskPlan.from_csr(csr_from_mask(torch.ones(5, 3, dtype=torch.bool)).to(device), hot_fill=hot_fill)
    if hot_fill != "auto":
        assert full.rest_nnz == 0 and full.hot_columns.numel() == 3


def test_thresholds_split_as_documented():
    mask = rosa_mask(200, 300, 0.03)
    all_hot = MaskPlan.from_csr(mask, hot_fill=0)
    none_hot = MaskPlan.from_csr(mask, hot_fill=1)
    assert all_hot.rest_nnz == 0 and all_hot.hot_columns.numel() == int((torch.bincount(mask.col_indices.long()) > 0).sum())
    assert none_hot.hot_nnz == 0 and none_hot.rest_nnz == mask.nnz
    assert none_hot.hot_columns.numel() == 0
    # With no hot column the remainder is the mask itself.
    torch.testing.assert_close(none_hot.rest_row_offsets, mask.row_offsets)
    torch.testing.assert_close(none_hot.rest_col_indices, mask.col_indices)


def auto_split(mask: CSR, dtype=torch.bfloat16):
    """(|J|, remainder nnz) that hot_fill="auto" picks on a GPU for this mask."""
    m, n = mask.shape
    counts = torch.bincount(mask.col_indices.long(), minlength=n)
    _, hot_columns, hot_nnz = hot_column_choice(counts, m, "auto", torch.empty((), dtype=dtype).element_size())
    return hot_columns, mask.nnz - hot_nnz


def test_auto_follows_the_cost_model():
    # A large uniform mask at low density: the CSR kernel is cheaper than any GEMM over its columns.
    assert auto_split(uniform_mask(4096, 4096, 0.001)) == (0, 16777)
    # A dense uniform mask: one GEMM over every column (mm + gather).
    assert auto_split(uniform_mask(1024, 1024, 0.2)) == (1024, 0)
    # A RoSA mask: its non-empty columns are few, the GEMM over them is cheap.
    mask = rosa_mask(1024, 1024, 0.01)
    hot_columns, rest_nnz = auto_split(mask)
    assert rest_nnz < 0.1 * mask.nnz and hot_columns < 0.5 * 1024
    # The chosen split is the model's minimum over the thresholds.
    chosen = planned_seconds(1024, hot_columns, rest_nnz, 4096)
    for hot_fill in (0, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 1):
        other = MaskPlan.from_csr(mask, hot_fill=hot_fill)
        assert chosen <= planned_seconds(1024, other.hot_columns.numel(), other.rest_nnz, 4096) * (1 + 1e-12)
    # 32-bit operands: the GEMM has no tensor cores, fewer columns are worth it.
    assert auto_split(mask, torch.float32)[0] <= hot_columns


def test_auto_on_the_device(device):
    # On a GPU auto applies the model; on a CPU (unmeasured) it keeps everything in the remainder.
    mask = rosa_mask(1024, 1024, 0.01, device=device)
    plan = MaskPlan.from_csr(mask)
    if device == "cuda":
        assert (plan.hot_columns.numel(), plan.rest_nnz) == auto_split(mask.to("cpu"))
    else:
        assert plan.hot_nnz == 0 and plan.hot_fill == math.inf


@pytest.mark.parametrize("hot_fill", [0, 0.2, 1], ids=str)
def test_gradcheck(hot_fill, device, gen):
    m, n, k = 9, 11, 4
    mask = random_csr(m, n, 0.35, gen=gen, dtype=torch.float64, device=device, empty_row_fraction=0.2)
    plan = MaskPlan.from_csr(mask, hot_fill=hot_fill)
    a = randn(k, m, gen=gen, dtype=torch.float64, device=device).t().requires_grad_(True)
    bt = randn(n, k, gen=gen, dtype=torch.float64, device=device).requires_grad_(True)
    torch.autograd.gradcheck(plan.sddmm, (a, bt))
    values = mask.values.clone().requires_grad_(True)
    dense = randn(k, n, gen=gen, dtype=torch.float64, device=device).t().requires_grad_(True)
    torch.autograd.gradcheck(plan.spmm, (values, dense))
    # Only one operand needing a gradient.
    torch.autograd.gradcheck(lambda v: plan.spmm(v, dense.detach()), (values,))
    torch.autograd.gradcheck(lambda b: plan.sddmm(a.detach(), b), (bt,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_gradients_agree_with_the_unplanned_ops(dtype, device, gen):
    m, n, k = 40, 70, 16
    mask = with_values(rosa_mask(m, n, 0.08, seed=1), gen, dtype, device)
    plan = MaskPlan.from_csr(mask, hot_fill=0.05)
    assert plan.hot_nnz and plan.rest_nnz
    structure = (mask.row_offsets, mask.row_indices, mask.col_indices)
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-4}
    a = randn(m, k, gen=gen, dtype=dtype, device=device)
    bt = randn(n, k, gen=gen, dtype=dtype, device=device)
    grad = randn(mask.nnz, gen=gen, dtype=dtype, device=device)
    ours = torch.autograd.grad(plan.sddmm(a.requires_grad_(), bt.requires_grad_()), (a, bt), grad)
    theirs = torch.autograd.grad(rosa_kernels.sddmm(*structure, a, bt), (a, bt), grad)
    for x, y in zip(ours, theirs):
        torch.testing.assert_close(x, y, **tolerance)
    values = mask.values.clone().requires_grad_()
    dense = randn(n, k, gen=gen, dtype=dtype, device=device).requires_grad_()
    grad = randn(m, k, gen=gen, dtype=dtype, device=device)
    ours = torch.autograd.grad(plan.spmm(values, dense), (values, dense), grad)
    theirs = torch.autograd.grad(rosa_kernels.spmm(values, *structure, dense, m), (values, dense), grad)
    for x, y in zip(ours, theirs):
        torch.testing.assert_close(x, y, **tolerance)


def test_repeated_calls_reuse_the_buffer_correctly(device, gen):
    # spmm without autograd scatters into one cached buffer: new values must fully replace old ones,
    # and an autograd call in between must not disturb it.
    mask = with_values(rosa_mask(50, 80, 0.06, seed=2), gen, torch.float32, device)
    plan = MaskPlan.from_csr(mask, hot_fill=0.05)
    dense = randn(80, 6, gen=gen, device=device)
    for _ in range(3):
        mask = mask._replace(values=randn(mask.nnz, gen=gen, device=device))
        check_spmm(plan, mask, dense)
        values = mask.values.clone().requires_grad_()
        plan.spmm(values, dense).sum().backward()
        assert values.grad is not None
    with torch.no_grad():
        check_spmm(plan, mask, dense.clone().requires_grad_())


def test_plan_moves_between_devices(gen):
    mask = with_values(rosa_mask(30, 40, 0.1), gen, torch.float64, "cpu")
    plan = MaskPlan.from_csr(mask, hot_fill=0.1).to("cpu")
    check_sddmm(plan, mask, randn(30, 5, gen=gen, dtype=torch.float64), randn(40, 5, gen=gen, dtype=torch.float64))
    if rosa_kernels.cuda_available():
        cuda_plan = plan.to("cuda")
        assert cuda_plan.target.is_cuda and cuda_plan.rest_row_offsets.is_cuda
        check_spmm(cuda_plan, mask.to("cuda"), randn(40, 3, gen=gen, dtype=torch.float64, device="cuda"))


def test_build_errors_name_the_argument(device):
    mask = uniform_mask(6, 5, 0.3, device=device)
    offsets, cols = mask.row_offsets, mask.col_indices
    with pytest.raises(ValueError, match="hot_fill"):
        MaskPlan(offsets, cols, 6, 5, hot_fill=1.5)
    with pytest.raises(ValueError, match="hot_fill"):
        MaskPlan(offsets, cols, 6, 5, hot_fill=float("nan"))
    with pytest.raises(ValueError, match="hot_fill"):
        MaskPlan(offsets, cols, 6, 5, hot_fill="fast")
    with pytest.raises(TypeError, match="hot_fill"):
        MaskPlan(offsets, cols, 6, 5, hot_fill=True)
    with pytest.raises(TypeError, match="dtype"):
        MaskPlan(offsets, cols, 6, 5, dtype=torch.int32)
    with pytest.raises(TypeError, match="validate"):
        MaskPlan(offsets, cols, 6, 5, validate=1)
    with pytest.raises(TypeError, match="m must be an int"):
        MaskPlan(offsets, cols, 6.0, 5)
    with pytest.raises(ValueError, match="row_offsets must have length"):
        MaskPlan(offsets, cols, 7, 5)
    with pytest.raises(ValueError, match="col_indices"):
        MaskPlan(offsets, cols, 6, 2)  # columns out of range
    with pytest.raises(ValueError, match="col_indices"):
        MaskPlan(offsets, torch.full_like(cols, 9), 6, 5)
    with pytest.raises(TypeError, match="col_indices"):
        MaskPlan(offsets, cols.float(), 6, 5)


def test_call_errors_name_the_argument(device, gen):
    mask = with_values(uniform_mask(6, 5, 0.3), gen, torch.float32, device)
    plan = MaskPlan.from_csr(mask, hot_fill=0.3)
    a, bt = randn(6, 4, gen=gen, device=device), randn(5, 4, gen=gen, device=device)
    with pytest.raises(ValueError, match="^a must have m = 6"):
        plan.sddmm(a[:5], bt)
    with pytest.raises(ValueError, match="^bt must have shape"):
        plan.sddmm(a, bt[:, :3])
    with pytest.raises(TypeError, match="^bt must have the dtype of a"):
        plan.sddmm(a, bt.double())
    with pytest.raises(TypeError, match="^a must be a torch.Tensor"):
        plan.sddmm(a.tolist(), bt)
    with pytest.raises(ValueError, match="^a must be 2-D"):
        plan.sddmm(a[0], bt)
    with pytest.raises(ValueError, match="^values must have length nnz"):
        plan.spmm(mask.values[1:], bt)
    with pytest.raises(ValueError, match="^dense must have n = 5 rows"):
        plan.spmm(mask.values, a)
    with pytest.raises(TypeError, match="^dense must have the dtype of values"):
        plan.spmm(mask.values, bt.half())
    with pytest.raises(TypeError, match="^values must have a floating dtype"):
        plan.spmm(mask.values.int(), bt)
    if device == "cuda":
        with pytest.raises(ValueError, match="plan's device"):
            plan.sddmm(a.cpu(), bt.cpu())
        with pytest.raises(ValueError, match="^bt must be on the same device"):
            plan.sddmm(a, bt.cpu())


def test_repr_and_sizes():
    plan = MaskPlan.from_csr(rosa_mask(64, 128, 0.05), hot_fill=0.05)
    text = repr(plan)
    assert "MaskPlan(shape=(64, 128)" in text and f"hot_nnz={plan.hot_nnz}" in text


@pytest.mark.parametrize("hot_columns", [1, 7, 8, 9, 30])
def test_gemm_width_is_padded_to_a_multiple_of_8(hot_columns, device, gen):
    # cuBLAS wants 16-byte leading dimensions: G and A_hot are m x ceil(|J| / 8) * 8, the padding
    # columns are never read (sddmm) and stay zero (spmm), every J but the full one is padded.
    m, n = 20, 40
    mask_bool = torch.rand(m, n, generator=gen) < 0.05
    mask_bool[:, :hot_columns] = True
    mask = with_values(csr_from_mask(mask_bool), gen, torch.float32, device)
    plan = MaskPlan.from_csr(mask, hot_fill=0.9)
    assert plan.hot_columns.tolist() == list(range(hot_columns))
    assert plan._width == -(-hot_columns // 8) * 8
    check_structure(plan, mask)
    check_sddmm(plan, mask, randn(m, 8, gen=gen, device=device), randn(n, 8, gen=gen, device=device))
    for _ in range(2):
        check_spmm(plan, mask, randn(n, 5, gen=gen, device=device))


def test_every_column_hot_uses_the_operands_as_they_are(device, gen):
    mask = with_values(csr_from_mask(torch.rand(12, 13, generator=gen) < 0.6), gen, torch.float32, device)
    plan = MaskPlan.from_csr(mask, hot_fill=0)
    assert plan.hot_columns.numel() == 13 and plan._gather is None and plan._width == 13
    check_sddmm(plan, mask, randn(12, 6, gen=gen, device=device).t().contiguous().t(),
                randn(13, 6, gen=gen, device=device))
    check_spmm(plan, mask, randn(13, 4, gen=gen, device=device))
