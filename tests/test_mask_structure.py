"""The mask-selection ops (csrc/mask_structure_ops.cpp, csrc/mask_plan_ops.cpp): bit for bit what the
Python construction they replaced built (kept below as the reference), checked against scipy too, on
random masks of many shapes and the degenerate ones; and their argument errors."""

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import rosa_kernels
from rosa_kernels import CSR, MaskPlan, RosaLinear
from rosa_kernels.csr import index_counts, row_order
from rosa_kernels.masks import MaskStructure, csr_flat_indices, mask_from_indices, mask_structure
from rosa_kernels.plan import _COSTS, hot_column_choice, planned_seconds
from rosa_kernels.testing import rosa_mask

_ops = torch.ops.rosa_kernels

# ----------------------------------------------------------------------------------------------
# The Python construction these ops replaced (masks.mask_from_indices, RosaLinear._build_derived,
# MaskPlan.__init__ and plan._auto_threshold_count as of 41c9f69), kept as the reference.
# ----------------------------------------------------------------------------------------------


def reference_structure(flat_indices, m, n):
    chosen = torch.sort(flat_indices.long()).values
    rows = torch.div(chosen, n, rounding_mode="floor") if n else chosen
    counts = index_counts(rows, m)
    row_offsets = torch.zeros(m + 1, dtype=torch.int32, device=rows.device)
    row_offsets[1:] = torch.cumsum(counts, 0).to(torch.int32)
    col_indices = (chosen - rows * n).to(torch.int32)
    nnz = chosen.numel()
    _, offsets_t, cols_t, permutation = rosa_kernels.csr_transpose(
        torch.zeros(nnz, device=rows.device), row_offsets, col_indices, m, n, return_permutation=True, validate=False)
    row_counts = (row_offsets[1:] - row_offsets[:-1]).long()
    flat = torch.repeat_interleave(torch.arange(m, device=rows.device), row_counts, output_size=nnz) * n \
        + col_indices.long()
    return MaskStructure(row_offsets, row_order(row_offsets), col_indices, offsets_t, row_order(offsets_t), cols_t,
                         permutation, flat, index_counts(col_indices.long(), n).to(torch.int32))


def reference_auto_threshold_count(counts, m, nnz, element_size):
    nonempty = counts[counts > 0]
    if nonempty.numel() == 0:
        return nnz + 1
    distinct, multiplicity = torch.unique(nonempty, sorted=True, return_counts=True)
    distinct, multiplicity = distinct.flip(0), multiplicity.flip(0)
    hot_columns = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(multiplicity, 0)])
    rest_nnz = nnz - torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(distinct * multiplicity, 0)])
    seconds = planned_seconds(m, hot_columns, rest_nnz, 1, element_size=element_size)
    best = int(torch.argmin(seconds))
    return nnz + 1 if best == 0 else int(distinct[best - 1])


def reference_hot(host_counts, m, nnz, hot_fill, element_size):
    """(hot column mask, hot_fill attribute) as MaskPlan decided them on a GPU."""
    if hot_fill == "auto":
        threshold = reference_auto_threshold_count(host_counts, m, nnz, element_size)
        return host_counts >= threshold, (min(1.0, threshold / m) if m and threshold <= nnz else math.inf)
    return (host_counts > 0) & (host_counts >= hot_fill * m), hot_fill


def reference_plan(row_offsets, col_indices, m, n, hot):
    """MaskPlan's tensors for the hot columns ``hot`` (a host bool mask), as MaskPlan built them."""
    device, nnz = row_offsets.device, col_indices.shape[0]
    cols = col_indices.long()
    rows = torch.repeat_interleave(torch.arange(m, device=device), (row_offsets[1:] - row_offsets[:-1]).long(),
                                   output_size=nnz)
    counts = index_counts(cols, n).cpu()
    hot_nnz = int(counts[hot].sum())
    hot_columns = hot.nonzero().flatten().to(device)
    h = hot_columns.shape[0]
    if h == n or h == 0:
        width, gather = h, None
    else:
        width = -(-h // 8) * 8
        gather = torch.cat([hot_columns, hot_columns[:1].expand(width - h)])
    slot_of_column = torch.full((n,), -1, dtype=torch.long, device=device)
    slot_of_column[hot_columns] = torch.arange(h, device=device)
    slots = slot_of_column[cols]
    is_hot = slots >= 0
    hot_positions = is_hot.nonzero().flatten()
    hot_rows, hot_slots = rows[hot_positions], slots[hot_positions]
    rest_nnz = nnz - hot_nnz
    rest_positions = (~is_hot).nonzero().flatten()
    rest_offsets = torch.zeros(m + 1, dtype=torch.int32, device=device)
    if rest_nnz:
        rest_offsets[1:] = torch.cumsum(index_counts(rows[rest_positions], m), 0)
    target = torch.empty(nnz, dtype=torch.long, device=device)
    target[hot_positions] = hot_rows * width + hot_slots
    target[rest_positions] = m * width + torch.arange(rest_nnz, device=device)
    return width, {"hot_columns": hot_columns, "_gather": gather, "target": target,
                   "rest_row_offsets": rest_offsets, "rest_row_indices": row_order(rest_offsets),
                   "rest_col_indices": col_indices[rest_positions].contiguous(), "hot_positions": hot_positions,
                   "hot_rows": hot_rows, "hot_slots": hot_slots, "rest_positions": rest_positions}


def assert_identical(actual, expected, name=""):
    if expected is None:
        assert actual is None, name
        return
    assert actual.dtype == expected.dtype and actual.device == expected.device, (name, actual.dtype, expected.dtype)
    assert torch.equal(actual, expected), name


# ----------------------------------------------------------------------------------------------
# mask_structure
# ----------------------------------------------------------------------------------------------

# Single row / column, odd sizes, empty shapes, a tall and a wide one.
SHAPES = [(1, 1), (1, 9), (9, 1), (13, 17), (31, 7), (64, 96), (0, 5), (5, 0), (0, 0), (3, 200), (250, 4)]
FILLS = [0.0, 0.01, 0.3, 1.0]


def random_indices(m, n, fill, gen, *, empty_rows=True):
    """Distinct flat indices of about fill * m * n positions (some rows and columns left empty), shuffled."""
    mask = torch.rand(m, n, generator=gen) < fill
    if empty_rows and m and n and fill < 1.0:
        mask &= torch.rand(m, 1, generator=gen) >= 0.25
        mask &= torch.rand(1, n, generator=gen) >= 0.25
    flat = mask.flatten().nonzero().flatten()
    return flat[torch.randperm(flat.numel(), generator=gen)]


def check_against_scipy(structure: MaskStructure, flat_indices, m, n):
    positions = np.sort(flat_indices.cpu().numpy().astype(np.int64))
    rows, cols = (positions // n, positions % n) if n else (positions, positions)
    matrix = sp.csr_matrix((np.arange(1, len(positions) + 1, dtype=np.float64), (rows, cols)), shape=(m, n))
    np.testing.assert_array_equal(structure.row_offsets.cpu().numpy(), matrix.indptr)
    np.testing.assert_array_equal(structure.col_indices.cpu().numpy(), matrix.indices)
    transposed = matrix.T.tocsr()
    transposed.sort_indices()
    np.testing.assert_array_equal(structure.row_offsets_t.cpu().numpy(), transposed.indptr)
    np.testing.assert_array_equal(structure.col_indices_t.cpu().numpy(), transposed.indices)
    # values_t = values[permutation] (the values number the nonzeros in CSR order, from 1).
    np.testing.assert_array_equal(structure.permutation.cpu().numpy() + 1, transposed.data)
    np.testing.assert_array_equal(structure.flat_indices.cpu().numpy(), positions)
    np.testing.assert_array_equal(structure.column_counts.cpu().numpy(), np.diff(transposed.indptr))
    for order, offsets in ((structure.row_indices, matrix.indptr), (structure.row_indices_t, transposed.indptr)):
        counts = np.diff(offsets)
        np.testing.assert_array_equal(order.cpu().numpy(), np.argsort(-counts, kind="stable"))


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
@pytest.mark.parametrize("fill", FILLS)
@pytest.mark.parametrize("m,n", SHAPES)
def test_mask_structure_is_the_python_construction(m, n, fill, index_dtype, device, gen):
    flat = random_indices(m, n, fill, gen).to(index_dtype).to(device)
    structure = mask_structure(flat, m, n)
    assert isinstance(structure, MaskStructure)
    for name, actual, expected in zip(MaskStructure._fields, structure, reference_structure(flat, m, n)):
        assert_identical(actual, expected, name)
    check_against_scipy(structure, flat, m, n)
    # mask_from_indices is its CSR with zero values of the asked dtype.
    mask = mask_from_indices(flat, m, n, dtype=torch.bfloat16)
    assert mask.values.dtype == torch.bfloat16 and not mask.values.any() and mask.shape == (m, n)
    for name in ("row_offsets", "row_indices", "col_indices"):
        assert_identical(getattr(mask, name), getattr(structure, name), name)


def test_mask_structure_on_many_random_masks(device, gen):
    for _ in range(40):
        m, n = (int(s) for s in torch.randint(1, 60, (2,), generator=gen))
        fill = float(torch.rand((), generator=gen)) ** 3
        flat = random_indices(m, n, fill, gen, empty_rows=bool(torch.rand((), generator=gen) < 0.5)).to(device)
        for name, actual, expected in zip(MaskStructure._fields, mask_structure(flat, m, n),
                                          reference_structure(flat, m, n)):
            assert_identical(actual, expected, name)


def test_mask_structure_with_flat_indices_beyond_int32(device, gen):
    # m * n > 2^31: the positions need int64, the CSR does not.
    m, n = 70_001, 40_009
    flat = torch.unique(torch.randint(0, m * n, (3000,), generator=gen))
    flat = torch.cat([flat, torch.tensor([0, m * n - 1])]).unique()
    flat = flat[torch.randperm(flat.numel(), generator=gen)].to(device)
    structure = mask_structure(flat, m, n)
    for name, actual, expected in zip(MaskStructure._fields, structure, reference_structure(flat, m, n)):
        assert_identical(actual, expected, name)
    assert int(structure.flat_indices[-1]) == m * n - 1 and int(structure.row_offsets[-1]) == flat.numel()


def test_mask_structure_of_a_csr_round_trips(device, gen):
    mask = rosa_mask(40, 70, 0.05, device=device)
    flat = csr_flat_indices(mask.row_offsets, mask.col_indices, 70)
    structure = mask_structure(flat.flip(0), 40, 70)
    assert_identical(structure.flat_indices, flat)
    assert_identical(structure.row_offsets, mask.row_offsets)
    assert_identical(structure.col_indices, mask.col_indices)


def test_mask_structure_errors_name_the_argument(device):
    flat = torch.tensor([0, 5, 7], device=device)
    with pytest.raises(TypeError, match="flat_indices must be a torch.Tensor"):
        mask_structure([0, 5, 7], 3, 3)
    with pytest.raises(TypeError, match="flat_indices must be an int64 or int32 tensor, got torch.float32"):
        mask_structure(flat.float(), 3, 3)
    with pytest.raises(ValueError, match="flat_indices must be 1-D"):
        mask_structure(flat.view(1, 3), 3, 3)
    with pytest.raises(TypeError, match="m must be an int"):
        mask_structure(flat, 3.0, 3)
    with pytest.raises(ValueError, match="n must be >= 0"):
        mask_structure(flat, 3, -1)
    with pytest.raises(ValueError, match="at most m \\* n = 2 distinct positions, got 3"):
        mask_structure(flat, 1, 2)
    with pytest.raises(TypeError, match="validate must be a bool"):
        mask_structure(flat, 3, 3, validate=1)
    # Contents: always on the CPU, with validate=True on a GPU.
    with pytest.raises(ValueError, match="flat_indices must lie in \\[0, m \\* n = 9\\)"):
        mask_structure(torch.tensor([3, 9], device=device), 3, 3)
    with pytest.raises(ValueError, match="flat_indices must lie in \\[0, m \\* n = 9\\)"):
        mask_structure(torch.tensor([-1, 2], device=device), 3, 3)
    with pytest.raises(ValueError, match="flat_indices must be distinct"):
        mask_structure(torch.tensor([4, 2, 4], device=device), 3, 3)
    # The raw op checks the same arguments (in C++).
    with pytest.raises(ValueError, match="^m must be >= 0"):
        _ops.mask_structure(flat, -2, 3)
    with pytest.raises(TypeError, match="flat_indices must be an int64 or int32 tensor, got torch.int16"):
        _ops.mask_structure(flat.short(), 3, 3)
    with pytest.raises(ValueError, match="flat_indices must be distinct"):
        _ops.mask_structure(torch.tensor([1, 1]), 3, 3)


def test_mask_structure_unvalidated_bad_indices_stay_in_bounds(device):
    if device != "cuda":
        pytest.skip("the CPU op always checks the contents")
    # Not validated on a GPU: out-of-range positions are clamped into range (no kernel reads out of bounds).
    structure = mask_structure(torch.tensor([-5, 3, 100], device=device), 3, 3, validate=False)
    assert int(structure.row_offsets[-1]) == 3 and int(structure.col_indices.max()) < 3


def test_mask_structure_opcheck(gen):
    flat = random_indices(9, 13, 0.3, gen)
    torch.library.opcheck(_ops.mask_structure.default, (flat, 9, 13))
    torch.library.opcheck(_ops.mask_structure.default, (flat[:0], 0, 13))


# ----------------------------------------------------------------------------------------------
# plan_hot_columns and mask_plan
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("element_size", [2, 4])
def test_auto_choice_is_the_python_model(element_size, gen):
    # Random count vectors: uniform, power-law (RoSA-like: a few huge columns) and with ties.
    for case in range(120):
        n = int(torch.randint(0, 400, (), generator=gen))
        m = int(torch.randint(1, 5000, (), generator=gen))
        kind = case % 3
        if kind == 0:
            counts = torch.randint(0, m + 1, (n,), generator=gen) * (torch.rand(n, generator=gen) < 0.5)
        elif kind == 1:
            counts = (m * torch.rand(n, generator=gen) ** 8).long()
        else:
            scale = int(torch.randint(1, max(2, m // 4), (), generator=gen))
            counts = torch.randint(0, 4, (n,), generator=gen) * scale
        counts = counts.clamp_(0, m)
        nnz = int(counts.sum())
        threshold = reference_auto_threshold_count(counts, m, nnz, element_size)
        hot = counts >= threshold
        expected = (threshold, int(hot.sum()), int(counts[hot].sum()))
        assert hot_column_choice(counts, m, "auto", element_size) == expected


def test_numeric_choice_compares_as_torch_does(gen):
    # hot_fill * m near an integer, and counts beyond float32's integers (rounded alike).
    cases = [(torch.tensor([0, 3, 2, 4, 3]), 10, 0.3), (torch.tensor([0, 1, 1, 2]), 7, 1 / 7),
             (torch.tensor([16777217, 16777216, 16777215, 5]), 2**25, 0.5 - 1 / 2**27),
             (torch.tensor([5, 0, 7]), 9, 0.0), (torch.tensor([5, 0, 7]), 9, 1.0),
             (torch.tensor([], dtype=torch.long), 4, 0.5)]
    for _ in range(200):
        m = int(torch.randint(1, 300, (), generator=gen))
        counts = torch.randint(0, m + 1, (int(torch.randint(0, 50, (), generator=gen)),), generator=gen)
        cases.append((counts, m, round(float(torch.rand((), generator=gen)), 2)))
    for counts, m, hot_fill in cases:
        hot, _ = reference_hot(counts, m, int(counts.sum()), hot_fill, 2)
        min_count = int(counts[hot].min()) if hot.any() else int(counts.sum()) + 1
        for dtype in (torch.int64, torch.int32):
            assert hot_column_choice(counts.to(dtype), m, hot_fill, 2) == (min_count, int(hot.sum()),
                                                                          int(counts[hot].sum()))


def test_auto_choice_is_the_cost_models_first_minimum(gen):
    # Short and tall layers: plan_hot_columns finds the distinct counts with a histogram over [1, m]
    # when m is at most ~8 n, with a sort otherwise; both must choose as planned_seconds does.
    shapes = [(300, 50), (9, 4), (2048, 64), (9000, 3), (5000, 1), (20000, 200), (7, 0)]
    for m, n in shapes:
        for spread in (3, 40, m + 1):  # few distinct counts (many ties) to all of [0, m]
            counts = torch.randint(0, min(spread, m + 1), (n,), generator=gen)
            if n:
                counts[0] = m  # a full column
            nnz = int(counts.sum())
            for element_size in (2, 4):
                threshold = reference_auto_threshold_count(counts, m, nnz, element_size)
                hot = counts >= threshold
                expected = (threshold, int(hot.sum()), int(counts[hot].sum()))
                assert hot_column_choice(counts, m, "auto", element_size) == expected, (m, n, spread)


def plan_cases(gen):
    """Masks for the plan: random ones (empty rows and columns), RoSA-like ones and degenerate ones."""
    for m, n in SHAPES:
        for fill in (0.0, 0.3, 1.0):
            yield m, n, random_indices(m, n, fill, gen)
    for m, n, density in ((64, 128, 0.05), (120, 200, 0.04), (200, 300, 0.03)):
        mask = rosa_mask(m, n, density)
        yield m, n, csr_flat_indices(mask.row_offsets, mask.col_indices, n)
    one_column = torch.zeros(4, 6, dtype=torch.bool)
    one_column[:, 2] = True
    yield 4, 6, one_column.flatten().nonzero().flatten()


@pytest.mark.parametrize("hot_fill", [0, 0.15, 0.5, 1, "auto"], ids=str)
def test_mask_plan_is_the_python_construction(hot_fill, device, gen):
    for m, n, flat in plan_cases(gen):
        structure = mask_structure(flat.to(device), m, n)
        row_offsets, col_indices = structure.row_offsets, structure.col_indices
        nnz = col_indices.shape[0]
        for element_size, dtype in ((2, torch.bfloat16), (4, torch.float32)):
            host_counts = index_counts(col_indices.long(), n).cpu()
            hot, expected_fill = reference_hot(host_counts, m, nnz, hot_fill, element_size)
            width, expected = reference_plan(row_offsets, col_indices, m, n, hot)
            # The GPU's decision, made here on any device.
            min_count, h, hot_nnz = hot_column_choice(structure.column_counts.cpu(), m, hot_fill, element_size)
            outputs = _ops.mask_plan(row_offsets, col_indices, n, structure.column_counts, min_count, h, hot_nnz,
                                     width)
            for (name, tensor), actual in zip(expected.items(), outputs):
                assert_identical(actual, tensor, name)
            if hot_fill != "auto" or device == "cuda":
                # MaskPlan itself (auto decides so on a GPU only), with and without known column counts.
                for counts in (None, structure.column_counts):
                    plan = MaskPlan(row_offsets, col_indices, m, n, hot_fill=hot_fill, dtype=dtype,
                                    column_counts=counts)
                    assert plan.hot_fill == expected_fill and plan._width == width
                    for name, tensor in expected.items():
                        assert_identical(getattr(plan, name), tensor, name)


def test_mask_plan_on_the_cpu_with_auto_is_the_remainder(gen):
    mask = rosa_mask(64, 128, 0.05)
    plan = MaskPlan(mask.row_offsets, mask.col_indices, 64, 128)
    width, expected = reference_plan(mask.row_offsets, mask.col_indices, 64, 128, torch.zeros(128, dtype=torch.bool))
    assert plan.hot_fill == math.inf and plan._width == width == 0
    for name, tensor in expected.items():
        assert_identical(getattr(plan, name), tensor, name)


def test_plan_ops_errors_name_the_argument(gen):
    structure = mask_structure(random_indices(6, 5, 0.5, gen, empty_rows=False), 6, 5)
    offsets, cols, counts = structure.row_offsets, structure.col_indices, structure.column_counts
    costs = [_COSTS[2][key] for key in ("gemm_fixed", "gemm_per_row", "gemm_per_row_column", "rest_fixed",
                                        "rest_per_nonzero")]
    min_count, h, hot_nnz = _ops.plan_hot_columns(counts, 6, 0.0, costs)
    assert h == int((counts > 0).sum()) and hot_nnz == cols.shape[0]
    with pytest.raises(TypeError, match="column_counts must be an int64 or int32 tensor"):
        _ops.plan_hot_columns(counts.float(), 6, None, costs)
    with pytest.raises(ValueError, match="costs must hold the cost model's 5 constants, got 4"):
        _ops.plan_hot_columns(counts, 6, None, costs[:4])
    with pytest.raises(ValueError, match="column_counts must lie in \\[0, m = 1\\]"):
        _ops.plan_hot_columns(counts, 1, None, costs)
    with pytest.raises(ValueError, match="hot_fill must lie in \\[0, 1\\]"):
        _ops.plan_hot_columns(counts, 6, 1.5, costs)
    width = h if h == 5 else -(-h // 8) * 8
    _ops.mask_plan(offsets, cols, 5, counts, min_count, h, hot_nnz, width)  # valid
    with pytest.raises(ValueError, match="^width must be"):
        _ops.mask_plan(offsets, cols, 5, counts, min_count, h, hot_nnz, h + 1 if h == 5 else h - 1)
    with pytest.raises(ValueError, match="hot_column_count and hot_nnz must count"):
        _ops.mask_plan(offsets, cols, 5, counts, min_count, h, hot_nnz - 1, width)
    with pytest.raises(ValueError, match="hot_nnz must lie in"):
        _ops.mask_plan(offsets, cols, 5, counts, min_count, h, cols.shape[0] + 1, width)
    with pytest.raises(ValueError, match="min_count must be >= 1"):
        _ops.mask_plan(offsets, cols, 5, counts, 0, h, hot_nnz, width)
    with pytest.raises(TypeError, match="column_counts must be a tensor when hot_column_count > 0"):
        _ops.mask_plan(offsets, cols, 5, None, min_count, h, hot_nnz, width)
    with pytest.raises(ValueError, match="column_counts must have length n = 5"):
        _ops.mask_plan(offsets, cols, 5, counts[:4], min_count, h, hot_nnz, width)
    with pytest.raises(ValueError, match="col_indices must lie in \\[0, n = 4\\)"):
        _ops.mask_plan(offsets, cols, 4, None, cols.shape[0] + 1, 0, 0, 0)
    # Sizes that do not match the counts: column 0 holds 3 nonzeros, column 1 one.
    small = mask_structure(torch.tensor([0, 1, 4, 8]), 3, 4)
    assert small.column_counts.tolist() == [3, 1, 0, 0]
    _ops.mask_plan(small.row_offsets, small.col_indices, 4, small.column_counts, 2, 1, 3, 8)  # valid
    for h, hot_nnz in ((2, 3), (1, 2)):
        with pytest.raises(ValueError, match="hot_column_count and hot_nnz must count the columns with >= min_count"):
            _ops.mask_plan(small.row_offsets, small.col_indices, 4, small.column_counts, 2, h, hot_nnz, 8)
    bad = offsets.clone()
    bad[2] = bad[3] + 1
    with pytest.raises(ValueError, match="row_offsets must be nondecreasing"):
        _ops.mask_plan(bad, cols, 5, counts, min_count, h, hot_nnz, width)
    with pytest.raises(TypeError, match="col_indices must be an integer tensor"):
        _ops.mask_plan(offsets, cols.float(), 5, counts, min_count, h, hot_nnz, width)


def test_mask_plan_opcheck(gen):
    structure = mask_structure(random_indices(9, 13, 0.4, gen, empty_rows=False), 9, 13)
    min_count, h, hot_nnz = hot_column_choice(structure.column_counts, 9, 0.3, 2)
    assert 0 < h < 13
    width = -(-h // 8) * 8
    args = (structure.row_offsets, structure.col_indices, 13, structure.column_counts, min_count, h, hot_nnz, width)
    torch.library.opcheck(_ops.mask_plan.default, args)
    torch.library.opcheck(_ops.mask_plan.default, (structure.row_offsets, structure.col_indices, 13, None,
                                                   structure.col_indices.shape[0] + 1, 0, 0, 0))


# ----------------------------------------------------------------------------------------------
# RosaLinear keeps exactly what the Python construction kept
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparse_mode", ["merged", "csr_add", "spmm"])
def test_selected_mask_buffers_are_the_python_construction(sparse_mode, device):
    torch.manual_seed(0)
    layer = RosaLinear(23, 17, rank=2, density=0.2, dropout=0.0, sparse_mode=sparse_mode, device=device)
    layer.start_collection(collect_buffer="auto")
    layer(torch.randn(5, 23, device=device)).square().sum().backward()
    indices = layer._collector.exact_indices().clone()
    weight = layer.weight.detach().clone()
    mask = layer.select_mask()
    expected = reference_structure(indices, 17, 23)
    # The transpose and its permutation are kept in "spmm" mode only (the mode that reads them).
    kept = ("row_offsets", "row_indices", "col_indices", "flat_indices")
    transposed = ("row_offsets_t", "row_indices_t", "col_indices_t", "permutation")
    for name in kept + (transposed if sparse_mode == "spmm" else ()):
        assert_identical(getattr(layer, name), getattr(expected, name), name)
    if sparse_mode != "spmm":
        assert layer.col_indices_t.numel() == 0 and layer.permutation.numel() == 0
    for name in ("row_offsets", "row_indices", "col_indices"):
        assert_identical(getattr(mask, name), getattr(expected, name), name)
    assert isinstance(mask, CSR) and mask.values.dtype == layer.sparse_values.dtype and not mask.values.any()
    if sparse_mode == "merged":
        assert torch.equal(layer.base_values, weight.view(-1)[expected.flat_indices])
    # A layer given the same mask through set_mask (validated, as a user's CSR) keeps the same.
    other = RosaLinear(23, 17, rank=2, density=0.2, dropout=0.0, sparse_mode=sparse_mode, device=device)
    other.set_mask(mask)
    for name in kept + transposed:
        assert_identical(getattr(other, name), getattr(layer, name), name)
    # Switching to "spmm" later builds the same transpose the selection gave.
    if sparse_mode != "spmm":
        other.sparse_mode = "spmm"
        for name in transposed:
            assert_identical(getattr(other, name), getattr(expected, name), name)


@pytest.fixture
def modelled_cpu(monkeypatch):
    """hot_fill="auto" decides on the CPU as on a GPU (the cost model), so its path runs here."""
    monkeypatch.setattr(rosa_kernels.plan, "_MODELLED_DEVICE_TYPES", ("cuda", "cpu"))


def collected_model(shapes, device, dtype=torch.float32):
    torch.manual_seed(3)
    model = torch.nn.ModuleList(RosaLinear(n, m, rank=2, density=density, dropout=0.0, device=device, dtype=dtype)
                                for m, n, density in shapes)
    for layer in model:
        layer.start_collection(collect_buffer="auto")
    # RoSA-like gradients: a few input channels dominate, so the masks have hot columns.
    for layer in model:
        x = torch.randn(6, layer.in_features, device=device, dtype=dtype)
        x = x * torch.exp(2.5 * torch.randn(layer.in_features, device=device, dtype=dtype))
        layer(x).square().sum().backward()
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_selected_plans_are_the_python_construction(modelled_cpu, dtype, device):
    shapes = [(40, 64, 0.05), (17, 23, 0.2), (64, 40, 0.02), (8, 300, 0.1)]
    model = collected_model(shapes, device, dtype)
    indices = [layer._collector.exact_indices().clone() for layer in model]
    masks = rosa_kernels.model.select_masks(model)  # every layer's host decision from one copy of the counts
    assert list(masks) == [str(i) for i in range(len(shapes))]
    planned = 0
    for layer, flat in zip(model, indices):
        m, n = layer.out_features, layer.in_features
        structure = reference_structure(flat, m, n)
        counts = index_counts(structure.col_indices.long(), n).cpu()  # the host's copy, as on a GPU
        hot, _ = reference_hot(counts, m, structure.col_indices.shape[0], "auto", dtype.itemsize)
        width, expected = reference_plan(structure.row_offsets, structure.col_indices, m, n, hot)
        if not width:
            assert layer._grad_plan is None
            continue
        planned += 1
        gather, target, offsets, rows, cols, plan_width, rest_nnz = layer._grad_plan
        assert (plan_width, rest_nnz) == (width, expected["rest_positions"].numel())
        assert_identical(target, expected["target"].int())
        for actual, name in ((gather, "_gather"), (offsets, "rest_row_offsets"), (rows, "rest_row_indices"),
                             (cols, "rest_col_indices")):
            assert_identical(actual, expected[name], name)
        # The same parts as the layer's own selection, which copies its counts to the host itself.
        single = collected_model([(m, n, layer.density)], device, dtype)[0]
        single._collector.top_indices = flat.clone()
        single.select_mask()
        for a, b in zip(single._grad_plan, layer._grad_plan):
            assert (a is None and b is None) or (a == b if isinstance(a, int) else torch.equal(a, b))
    assert planned >= 2


def test_mask_plan_auto_is_the_python_construction_on_a_modelled_device(modelled_cpu, gen):
    for m, n, flat in plan_cases(gen):
        structure = mask_structure(flat, m, n)
        for dtype in (torch.bfloat16, torch.float32):
            counts = index_counts(structure.col_indices.long(), n)
            hot, expected_fill = reference_hot(counts, m, structure.col_indices.shape[0], "auto", dtype.itemsize)
            width, expected = reference_plan(structure.row_offsets, structure.col_indices, m, n, hot)
            plan = MaskPlan(structure.row_offsets, structure.col_indices, m, n, dtype=dtype)
            assert plan.hot_fill == expected_fill and plan._width == width
            for name, tensor in expected.items():
                assert_identical(getattr(plan, name), tensor, name)


def test_host_copies_copy_once_per_device(device):
    from rosa_kernels.plan import host_copies

    tensors = [torch.arange(5, device=device), torch.arange(0, device=device), torch.arange(3, device=device) * 7,
               torch.tensor([4, 2])]
    copies = host_copies(tensors)
    assert all(c.device.type == "cpu" for c in copies)
    for c, t in zip(copies, tensors):
        assert torch.equal(c, t.cpu())
