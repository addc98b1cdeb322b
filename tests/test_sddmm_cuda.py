"""CUDA SDDMM against a float64 reference: every dtype, row-major and transposed operands (RoSA's
``sddmm(mask, dY.t(), X.t())``), mixed layouts, arbitrary strided views, empty rows and matrices,
odd sizes, windows wider than shared memory, LLaMA shapes with both mask kinds, and the real masks.

The op allocates its output, so each call is preceded by freeing a NaN-filled buffer of the same
size: the caching allocator hands that block back to the op, and a NaN left in the result is an
entry the kernel never wrote.
"""

import math

import pytest
import torch

import rosa_kernels
from rosa_kernels.testing import random_csr, real_masks, rosa_mask, uniform_mask, find_real_masks

pytestmark = pytest.mark.skipif(not rosa_kernels.cuda_available(), reason="needs CUDA kernels and a GPU")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Bound on |out - ref| relative to sum_t |a[i, t] bt[j, t]| (covers output rounding and
# float32 accumulation over a few thousand terms).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _random(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    # Never zeros; a spread of magnitudes so that unwritten or misplaced entries show.
    return (torch.randn(shape, generator=gen, dtype=torch.float64) + 0.1).to(dtype)


def _operands(m, n, k, dtype, layout, seed):
    """a (m x k) and bt (n x k) on the GPU in the given layout: "rows" (row-major), "tokens"
    (transposed views of row-major T x m / T x n activations), "mixed" (a transposed, bt not)."""
    a = _random((m, k), dtype, seed)
    bt = _random((n, k), dtype, seed + 1)
    a_cuda, bt_cuda = a.cuda(), bt.cuda()
    if layout in ("tokens", "mixed"):
        a_cuda = a.t().contiguous().cuda().t()
    if layout == "tokens":
        bt_cuda = bt.t().contiguous().cuda().t()
    if layout == "mixed_other":
        bt_cuda = bt.t().contiguous().cuda().t()
    return a_cuda, bt_cuda


def _reference(csr, a, bt):
    """(float64 dot products, float64 dot products of absolute values) at the mask's nonzeros."""
    offsets = csr.row_offsets.cpu().long()
    rows = torch.repeat_interleave(torch.arange(len(offsets) - 1), offsets[1:] - offsets[:-1])
    cols = csr.col_indices.cpu().long()
    a64, bt64 = a.double(), bt.double()
    if a64.shape[0] * bt64.shape[0] <= 4096 * 4096:
        dense = a64 @ bt64.T
        dense_abs = a64.abs() @ bt64.abs().T
        rows_d, cols_d = rows.to(a.device), cols.to(a.device)
        return dense[rows_d, cols_d].cpu(), dense_abs[rows_d, cols_d].cpu()
    ref = torch.empty(len(cols), dtype=torch.float64)
    ref_abs = torch.empty(len(cols), dtype=torch.float64)
    step = 1 << 14
    for s in range(0, len(cols), step):
        r, c = rows[s:s + step].to(a.device), cols[s:s + step].to(a.device)
        ref[s:s + step] = (a64[r] * bt64[c]).sum(1).cpu()
        ref_abs[s:s + step] = (a64[r].abs() * bt64[c].abs()).sum(1).cpu()
    return ref, ref_abs


def _call(csr, a, bt):
    nnz = csr.col_indices.shape[0]
    torch.full((max(nnz, 1),), float("nan"), dtype=a.dtype, device=a.device)  # freed at once
    return torch.ops.rosa_kernels.sddmm(csr.row_offsets, csr.row_indices, csr.col_indices, a, bt)


def _check(csr, a, bt, out=None):
    out = _call(csr, a, bt) if out is None else out
    assert out.dtype == a.dtype and out.shape == (csr.col_indices.shape[0],)
    assert out.device == a.device
    ref, ref_abs = _reference(csr, a, bt)
    got = out.double().cpu()
    assert not torch.isnan(got).any(), "an output entry was never written"
    error = (got - ref).abs()
    bound = TOLERANCE[a.dtype] * ref_abs + 1e-300
    worst = (error / bound).max().item() if len(ref) else 0.0
    assert worst <= 1.0, f"max error / bound = {worst:.3g}"
    return out


def _mask(m, n, density, seed, empty_row_fraction=0.0):
    return random_csr(m, n, density, seed=seed, empty_row_fraction=empty_row_fraction).to("cuda")


@pytest.fixture(params=["sparse", "dense"])
def path(request, monkeypatch):
    """Both SDDMM paths: the sparse kernel, and one GEMM + gather (forced even where auto would
    not pick it)."""
    monkeypatch.setenv("ROSA_SDDMM_KERNEL", request.param)
    return request.param


@pytest.mark.sanitizer
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["rows", "tokens", "mixed", "mixed_other"])
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (7, 5, 3), (33, 65, 17), (130, 70, 100), (64, 300, 1000)])
def test_small_shapes(dtype, layout, m, n, k, path):
    csr = _mask(m, n, 0.3, seed=m * 7 + n + k, empty_row_fraction=0.3)
    a, bt = _operands(m, n, k, dtype, layout, seed=k)
    _check(csr, a, bt)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["rows", "tokens", "mixed"])
def test_many_blocks_and_token_splits(dtype, layout, path):
    # More than one block of nonzeros and a token range long enough to be split, with a tail
    # chunk (k not a multiple of the slot width) and empty rows.
    m, n, k = 700, 500, 1203
    csr = _mask(m, n, 0.08, seed=3, empty_row_fraction=0.2)
    assert csr.col_indices.shape[0] > 2 * 8192
    a, bt = _operands(m, n, k, dtype, layout, seed=5)
    out = _check(csr, a, bt)
    # Deterministic: the split sums are added in a fixed order (and cuBLAS is deterministic).
    assert torch.equal(out, _call(csr, a, bt))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_strided_views(dtype, path):
    m, n, k = 45, 38, 77
    csr = _mask(m, n, 0.4, seed=11)
    base_a = _random((3 * m + 1, 2 * k + 3), dtype, 1).cuda()
    base_bt = _random((2 * n + 5, 3 * k + 2), dtype, 2).cuda()
    views = {
        # neither stride is 1 (the binding copies), a misaligned row-major view, a misaligned
        # transposed view, a transposed view whose leading dimension is odd
        "no_unit_stride": (base_a[::3, ::2][:m, :k], base_bt[::2, ::3][:n, :k]),
        "misaligned_rows": (base_a[1:m + 1, 1:k + 1], base_bt[3:n + 3, 2:k + 2]),
        "misaligned_tokens": (_random((k, m + 1), dtype, 3).cuda()[:, 1:].t(),
                              _random((k + 2, n + 3), dtype, 4).cuda()[2:, 3:].t()),
        "odd_leading_dim": (_random((k, m), dtype, 5).cuda().t(), _random((k, n), dtype, 6).cuda().t()),
    }
    for name, (a, bt) in views.items():
        assert a.shape == (m, k) and bt.shape == (n, k), name
        _check(csr, a, bt)


@pytest.mark.parametrize("dtype", DTYPES)
def test_degenerate_sizes(dtype, path):
    # m = 0
    empty = _mask(0, 4, 0.5, seed=0)
    out = _call(empty, _random((0, 6), dtype, 1).cuda(), _random((4, 6), dtype, 2).cuda())
    assert out.shape == (0,) and out.dtype == dtype
    # n = 0 and nnz = 0 with rows
    csr = _mask(5, 0, 0.5, seed=1)
    assert csr.col_indices.shape[0] == 0
    out = _call(csr, _random((5, 6), dtype, 1).cuda(), _random((0, 6), dtype, 2).cuda())
    assert out.shape == (0,)
    # k = 0: every dot product is empty, so every entry is 0
    csr = _mask(9, 7, 0.5, seed=2)
    out = _call(csr, _random((9, 0), dtype, 1).cuda(), _random((7, 0), dtype, 2).cuda())
    assert out.shape == csr.col_indices.shape and torch.equal(out.cpu(), torch.zeros_like(out.cpu()))
    # all rows empty
    csr = _mask(6, 6, 0.0, seed=3)
    assert _call(csr, _random((6, 3), dtype, 1).cuda(), _random((6, 3), dtype, 2).cuda()).shape == (0,)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_row_windows(dtype):
    # Few nonzeros over many rows: one block of nonzeros spans more rows than one staged window.
    m, n, k = 9000, 40, 24
    csr = _mask(m, n, 0.01, seed=4, empty_row_fraction=0.5)
    for layout in ("rows", "tokens"):
        _check(csr, *_operands(m, n, k, dtype, layout, seed=6))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_column_windows(dtype):
    # A mask wider than the columns one block can stage in shared memory.
    m, n, k = 12, 40000, 20
    csr = _mask(m, n, 0.05, seed=5)
    for layout in ("rows", "tokens", "mixed"):
        _check(csr, *_operands(m, n, k, dtype, layout, seed=7))


def test_side_stream_and_public_op():
    m, n, k = 200, 300, 256
    csr = _mask(m, n, 0.05, seed=6)
    a, bt = _operands(m, n, k, torch.bfloat16, "tokens", seed=8)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = rosa_kernels.sddmm(csr.row_offsets, csr.row_indices, csr.col_indices, a, bt)
    stream.synchronize()
    _check(csr, a, bt, out=out)


@pytest.mark.parametrize("kind", ["uniform", "rosa"])
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008)])
@pytest.mark.parametrize("layout", ["tokens", "rows"])
def test_llama_shapes(kind, shape, layout):
    # At these sizes auto takes the dense path at d >= 0.5% (rosa, 1%) and the sparse kernel below.
    m, n = shape
    density = 0.003 if kind == "uniform" else 0.01
    maker = uniform_mask if kind == "uniform" else rosa_mask
    csr = maker(m, n, density, seed=1, device="cuda")
    a, bt = _operands(m, n, 512, torch.bfloat16, layout, seed=9)
    _check(csr, a, bt)


@pytest.mark.skipif(find_real_masks() is None, reason="real masks not found")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_real_masks(dtype):
    for i, (name, csr) in enumerate(real_masks(device="cuda").items()):
        m, n = csr.shape
        a, bt = _operands(m, n, 384, dtype, "tokens" if i % 2 else "rows", seed=i)
        _check(csr, a, bt)
