"""The CUDA backend: every op and dtype against float64 references and the CPU implementation.

Covers empty rows, empty matrices, m/n/nnz/k = 0, 1x1, single rows and columns, odd sizes, heavy
rows (the SpMM's warp-cooperative path), non-contiguous and misaligned operands, every SpMM kernel
variant, both mask kinds at LLaMA shapes, gradcheck/opcheck in float64, bad input, no host
synchronization, non-default streams and device indices. Skips cleanly without a GPU. A small
subset is marked `sanitizer` for `compute-sanitizer --tool memcheck` (scripts/gpu_check.sh).
"""

from __future__ import annotations

import os

import pytest
import torch

import rosa_kernels
from rosa_kernels import csr_add, csr_transpose, sddmm, spmm
from rosa_kernels.csr import CSR, csr_from_mask, row_order
from rosa_kernels.testing import random_csr, rosa_mask, uniform_mask

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not rosa_kernels.cuda_available(), reason="needs a CUDA GPU and the CUDA build"),
]

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (rtol, atol) of a result against the float64 reference: the output's own rounding dominates.
TOLERANCE = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
SPMM_KERNELS = ["auto", "rows", "rows2", "slab32", "slab16", "dense"]

# (m, n, k, density, empty_row_fraction): degenerate, tiny, single row/column, odd sizes.
SHAPES = [
    (0, 0, 0, 0.5, 0.0),
    (0, 7, 5, 0.5, 0.0),
    (6, 0, 5, 0.5, 0.0),
    (6, 7, 0, 0.5, 0.0),
    (5, 9, 4, 0.0, 0.0),  # nnz = 0
    (1, 1, 1, 1.0, 0.0),
    (1, 37, 19, 0.4, 0.0),
    (41, 1, 13, 0.6, 0.0),
    (33, 65, 1, 0.3, 0.3),
    (97, 131, 67, 0.08, 0.4),
    (128, 256, 264, 0.05, 0.2),
    (300, 777, 130, 0.03, 0.1),  # several slab chunks, ragged column tiles
]


def _cuda():
    return torch.device("cuda", torch.cuda.current_device())


def _csr(m, n, density, dtype, seed=0, empty_row_fraction=0.0, device=None) -> CSR:
    return random_csr(m, n, density, seed=seed, dtype=dtype, device=device or _cuda(),
                      empty_row_fraction=empty_row_fraction)


def _heavy_csr(dtype, seed=0) -> CSR:
    """Rows of very different lengths: a few (nearly) full rows of 300, many short or empty rows."""
    gen = torch.Generator().manual_seed(seed)
    m, n = 70, 300
    mask = torch.rand(m, n, generator=gen) < 0.02
    mask[[3, 10, 11, 50]] = torch.rand(4, n, generator=gen) < 0.9
    mask[20] = True
    mask[30:40] = False
    values = torch.randn(m, n, generator=gen).to(dtype)
    csr = csr_from_mask(mask, values)
    return csr.to(_cuda())


def _randn(*shape, dtype, seed=0, device=None):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device or _cuda())


def _dense_of(csr: CSR) -> torch.Tensor:
    return csr.to_dense()


def _assert_close(actual, expected, dtype):
    rtol, atol = TOLERANCE[dtype]
    assert actual.dtype == dtype
    assert not torch.isnan(actual).any()
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol)


def _cpu(csr: CSR) -> CSR:
    return csr.to("cpu")


# ----------------------------------------------------------------------------------------------
# spmm
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kernel", SPMM_KERNELS)
def test_spmm_matches_reference_and_cpu(shape, dtype, kernel, monkeypatch):
    monkeypatch.setenv("ROSA_SPMM_KERNEL", kernel)
    m, n, k, density, empty = shape
    a = _csr(m, n, density, dtype, seed=m + n + k, empty_row_fraction=empty)
    dense = _randn(n, k, dtype=dtype, seed=1)
    out = spmm(a.values, a.row_offsets, a.row_indices, a.col_indices, dense, m)
    assert out.shape == (m, k) and out.device == dense.device
    expected = _dense_of(a).double() @ dense.double()
    _assert_close(out, expected, dtype)
    c = _cpu(a)
    out_cpu = spmm(c.values, c.row_offsets, c.row_indices, c.col_indices, dense.cpu(), m)
    _assert_close(out, out_cpu.double(), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", SPMM_KERNELS)
@pytest.mark.parametrize("k", [1, 7, 16, 200, 600])
def test_spmm_heavy_rows(dtype, kernel, k, monkeypatch):
    monkeypatch.setenv("ROSA_SPMM_KERNEL", kernel)
    a = _heavy_csr(dtype)
    m, n = a.shape
    dense = _randn(n, k, dtype=dtype, seed=2)
    out = spmm(a.values, a.row_offsets, a.row_indices, a.col_indices, dense, m)
    _assert_close(out, _dense_of(a).double() @ dense.double(), dtype)


@pytest.mark.parametrize("kernel", SPMM_KERNELS)
def test_spmm_is_deterministic(kernel, monkeypatch):
    """Every kernel adds a row's nonzeros in a fixed order: equal inputs, equal bits."""
    monkeypatch.setenv("ROSA_SPMM_KERNEL", kernel)
    a = rosa_mask(512, 700, 0.05, seed=7, dtype=torch.bfloat16, device=_cuda())
    dense = _randn(700, 300, dtype=torch.bfloat16, seed=8)
    first = spmm(a.values, a.row_offsets, a.row_indices, a.col_indices, dense, 512)
    second = spmm(a.values, a.row_offsets, a.row_indices, a.col_indices, dense, 512)
    assert torch.equal(first, second)
    _assert_close(first, _dense_of(a).double() @ dense.double(), torch.bfloat16)


@pytest.mark.parametrize("op", ["spmm", "sddmm"])
def test_auto_takes_the_dense_path_only_where_it_is_faster(op, monkeypatch):
    """At 4096 x 4096 x 512 tokens (bf16) auto takes the dense path at high density and the sparse
    kernel at 0.1%. The dense path is recognized by its m x n temporary in the peak memory (the
    results of the two paths may agree bit for bit); the forced paths show the test can tell."""
    variable = "ROSA_SPMM_KERNEL" if op == "spmm" else "ROSA_SDDMM_KERNEL"
    forced = {"dense": "dense", "sparse": "rows" if op == "spmm" else "sparse"}
    m = n = 4096
    k = 512
    temporary_bytes = m * n * 2
    rows_operand = _randn(m, k, dtype=torch.bfloat16, seed=4)  # sddmm's a
    columns_operand = _randn(n, k, dtype=torch.bfloat16, seed=5)  # spmm's dense, sddmm's bt

    def peak_growth(a):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        if op == "spmm":
            out = spmm(a.values, a.row_offsets, a.row_indices, a.col_indices, columns_operand, m)
        else:
            out = sddmm(a.row_offsets, a.row_indices, a.col_indices, rows_operand, columns_operand)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before - out.numel() * out.element_size()

    high = 0.03 if op == "spmm" else 0.01
    for density, expected in ((high, "dense"), (0.001, "sparse")):
        a = uniform_mask(m, n, density, seed=3, dtype=torch.bfloat16, device=_cuda())
        growth = {}
        for path in ("auto", "dense", "sparse"):
            if path == "auto":
                monkeypatch.delenv(variable, raising=False)
            else:
                monkeypatch.setenv(variable, forced[path])
            growth[path] = peak_growth(a)
        assert growth["dense"] >= temporary_bytes > growth["sparse"], growth
        took_dense = growth["auto"] >= temporary_bytes
        assert took_dense == (expected == "dense"), (density, growth)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dense_paths_accumulate_in_float32_and_restore_settings(dtype, monkeypatch):
    """The GEMM paths turn off cuBLAS's reduced-precision split-K sums and fp16 accumulation
    (torch allows the first by default; with it this product is off by 3x the bf16 tolerance),
    and leave torch's settings as they found them."""
    monkeypatch.setenv("ROSA_SPMM_KERNEL", "dense")
    monkeypatch.setenv("ROSA_SDDMM_KERNEL", "dense")
    matmul = torch.backends.cuda.matmul
    names = ["allow_bf16_reduced_precision_reduction", "allow_fp16_reduced_precision_reduction"]
    if hasattr(matmul, "allow_fp16_accumulation"):
        names.append("allow_fp16_accumulation")
    saved = {name: getattr(matmul, name) for name in names}
    try:
        for name in names:
            setattr(matmul, name, True)
        a = rosa_mask(512, 700, 0.05, seed=7, dtype=dtype, device=_cuda())
        dense = _randn(700, 300, dtype=dtype, seed=8)
        out = spmm(a.values, a.row_offsets, a.row_indices, a.col_indices, dense, 512)
        _assert_close(out, _dense_of(a).double() @ dense.double(), dtype)
        a_op, bt_op = _randn(512, 300, dtype=dtype, seed=9), _randn(700, 300, dtype=dtype, seed=10)
        got = sddmm(a.row_offsets, a.row_indices, a.col_indices, a_op, bt_op)
        product = a_op.double() @ bt_op.double().t()
        rows = torch.repeat_interleave(torch.arange(512, device=_cuda()),
                                       (a.row_offsets[1:] - a.row_offsets[:-1]).long())
        _assert_close(got, product[rows, a.col_indices.long()], dtype)
        assert all(getattr(matmul, name) is True for name in names)
    finally:
        for name, value in saved.items():
            setattr(matmul, name, value)


@pytest.mark.parametrize("kernel", SPMM_KERNELS)
def test_spmm_any_row_order_is_correct(kernel, monkeypatch):
    """row_indices only steers speed: an unsorted permutation gives the same result."""
    monkeypatch.setenv("ROSA_SPMM_KERNEL", kernel)
    a = _heavy_csr(torch.float32)
    m, n = a.shape
    order = torch.randperm(m, generator=torch.Generator().manual_seed(3)).to(torch.int32).to(_cuda())
    dense = _randn(n, 40, dtype=torch.float32, seed=4)
    out = spmm(a.values, a.row_offsets, order, a.col_indices, dense, m)
    _assert_close(out, _dense_of(a).double() @ dense.double(), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["transposed", "sliced_columns", "padded_rows", "column"])
@pytest.mark.parametrize("kernel", SPMM_KERNELS)
def test_spmm_non_contiguous_dense(dtype, layout, kernel, monkeypatch):
    monkeypatch.setenv("ROSA_SPMM_KERNEL", kernel)
    m, n, k = 45, 60, 33
    a = _csr(m, n, 0.2, dtype, seed=5, empty_row_fraction=0.2)
    if layout == "transposed":
        dense = _randn(k, n, dtype=dtype, seed=6).t()
    elif layout == "sliced_columns":  # a misaligned start: the 16-byte path must step aside
        dense = _randn(n, k + 3, dtype=dtype, seed=6)[:, 3:]
    elif layout == "padded_rows":
        dense = _randn(n, 64, dtype=dtype, seed=6)[:, :k]
    else:
        dense = _randn(n, 5, dtype=dtype, seed=6)[:, 2:3]
    out = spmm(a.values, a.row_offsets, a.row_indices, a.col_indices, dense, m)
    assert out.is_contiguous()
    _assert_close(out, _dense_of(a).double() @ dense.double(), dtype)


# ----------------------------------------------------------------------------------------------
# sddmm
# ----------------------------------------------------------------------------------------------


def _sddmm_reference(csr: CSR, a, bt):
    full = a.double() @ bt.double().t()
    rows = torch.repeat_interleave(torch.arange(csr.shape[0], device=a.device),
                                   (csr.row_offsets[1:] - csr.row_offsets[:-1]).long())
    return full[rows, csr.col_indices.long()]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_sddmm_matches_reference_and_cpu(shape, dtype):
    m, n, k, density, empty = shape
    mask = _csr(m, n, density, dtype, seed=m * 3 + n + k, empty_row_fraction=empty)
    a = _randn(m, k, dtype=dtype, seed=7)
    bt = _randn(n, k, dtype=dtype, seed=8)
    out = sddmm(mask.row_offsets, mask.row_indices, mask.col_indices, a, bt)
    assert out.shape == (mask.nnz,)
    expected = _sddmm_reference(mask, a, bt)
    _assert_close(out, expected, dtype)
    c = _cpu(mask)
    out_cpu = sddmm(c.row_offsets, c.row_indices, c.col_indices, a.cpu(), bt.cpu())
    _assert_close(out, out_cpu.double(), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["row_major", "transposed_views", "strided"])
def test_sddmm_layouts(dtype, layout):
    m, n, tokens = 50, 70, 96
    mask = _csr(m, n, 0.1, dtype, seed=9, empty_row_fraction=0.3)
    if layout == "row_major":
        a, bt = _randn(m, tokens, dtype=dtype, seed=10), _randn(n, tokens, dtype=dtype, seed=11)
    elif layout == "transposed_views":  # RoSA's dS = mask o (dY^T X): a = dY.t(), bt = X.t()
        a, bt = _randn(tokens, m, dtype=dtype, seed=10).t(), _randn(tokens, n, dtype=dtype, seed=11).t()
    else:  # no unit stride anywhere: the binding copies
        a = _randn(m, 2 * tokens, dtype=dtype, seed=10)[:, ::2]
        bt = _randn(n, 2 * tokens, dtype=dtype, seed=11)[:, ::2]
    out = sddmm(mask.row_offsets, mask.row_indices, mask.col_indices, a, bt)
    _assert_close(out, _sddmm_reference(mask, a, bt), dtype)


# ----------------------------------------------------------------------------------------------
# csr_transpose
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape",
    # n > 12288 takes the radix-sort path instead of count-scan-scatter.
    SHAPES + [(3, 5000, 1, 0.01, 0.0), (2000, 3, 1, 0.5, 0.5), (5, 20000, 1, 0.002, 0.0), (700, 1, 1, 0.9, 0.0)],
)
def test_csr_transpose_matches_cpu_exactly(shape, dtype):
    m, n, _, density, empty = shape
    a = _csr(m, n, density, dtype, seed=m + 5 * n, empty_row_fraction=empty)
    got = csr_transpose(a.values, a.row_offsets, a.col_indices, m, n, return_permutation=True)
    c = _cpu(a)
    want = csr_transpose(c.values, c.row_offsets, c.col_indices, m, n, return_permutation=True)
    for g, w in zip(got, want):
        assert g.device.type == "cuda"
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(g.cpu(), w)
    values_t, offsets_t, cols_t, permutation = got
    assert torch.equal(values_t, a.values[permutation.long()])
    # The transpose of the transpose is the original matrix.
    back = csr_transpose(values_t, offsets_t, cols_t, n, m)
    assert torch.equal(back[0], a.values) and torch.equal(back[1], a.row_offsets)
    assert torch.equal(back[2], a.col_indices)


def test_csr_transpose_is_deterministic():
    a = rosa_mask(512, 768, 0.01, seed=1, dtype=torch.bfloat16, device=_cuda())
    first = csr_transpose(a.values, a.row_offsets, a.col_indices, 512, 768, return_permutation=True)
    for _ in range(3):
        again = csr_transpose(a.values, a.row_offsets, a.col_indices, 512, 768, return_permutation=True)
        assert all(torch.equal(x, y) for x, y in zip(first, again))


# ----------------------------------------------------------------------------------------------
# csr_add
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("inplace", [False, True])
def test_csr_add_matches_reference_and_cpu(shape, dtype, inplace):
    m, n, _, density, empty = shape
    a = _csr(m, n, density, dtype, seed=m + 7 * n, empty_row_fraction=empty)
    dense = _randn(m, n, dtype=dtype, seed=12)
    expected = dense.double() + _dense_of(a).double()
    c = _cpu(a)
    out_cpu = csr_add(c.values, c.row_offsets, c.row_indices, c.col_indices, dense.cpu())
    target = dense.clone()
    out = csr_add(a.values, a.row_offsets, a.row_indices, a.col_indices, target, inplace=inplace)
    if inplace:
        assert out is target
    else:
        assert torch.equal(target, dense)
    _assert_close(out, expected, dtype)
    # Both backends round the float32 sum once: identical results.
    assert torch.equal(out.cpu(), out_cpu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_csr_add_non_contiguous(dtype):
    m, n = 40, 50
    a = _csr(m, n, 0.2, dtype, seed=13)
    base = _randn(m, 2 * n, dtype=dtype, seed=14)
    padded = base[:, :n]
    expected = padded.double() + _dense_of(a).double()
    out = csr_add(a.values, a.row_offsets, a.row_indices, a.col_indices, padded)
    _assert_close(out, expected, dtype)
    csr_add(a.values, a.row_offsets, a.row_indices, a.col_indices, padded, inplace=True)
    _assert_close(padded, expected, dtype)
    transposed = _randn(n, m, dtype=dtype, seed=15).t()
    expected = transposed.double() + _dense_of(a).double()
    csr_add(a.values, a.row_offsets, a.row_indices, a.col_indices, transposed, inplace=True)
    _assert_close(transposed, expected, dtype)


# ----------------------------------------------------------------------------------------------
# LLaMA shapes, both mask kinds
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["uniform", "rosa"])
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008)])
@pytest.mark.parametrize("density", [0.01])
def test_llama_shapes(kind, shape, density):
    m, n = shape
    make = uniform_mask if kind == "uniform" else rosa_mask
    a = make(m, n, density, seed=3, dtype=torch.bfloat16, device=_cuda())
    a_dense = _dense_of(a).double()
    k = 256
    dense = _randn(n, k, dtype=torch.bfloat16, seed=16)
    for kernel in SPMM_KERNELS:
        os.environ["ROSA_SPMM_KERNEL"] = kernel
        try:
            out = spmm(a.values, a.row_offsets, a.row_indices, a.col_indices, dense, m, validate=False)
        finally:
            del os.environ["ROSA_SPMM_KERNEL"]
        _assert_close(out, a_dense @ dense.double(), torch.bfloat16)
    x = _randn(k, n, dtype=torch.bfloat16, seed=17)
    dy = _randn(k, m, dtype=torch.bfloat16, seed=18)
    ds = sddmm(a.row_offsets, a.row_indices, a.col_indices, dy.t(), x.t(), validate=False)
    _assert_close(ds, _sddmm_reference(a, dy.t(), x.t()), torch.bfloat16)
    values_t, offsets_t, cols_t, permutation = csr_transpose(
        a.values, a.row_offsets, a.col_indices, m, n, return_permutation=True, validate=False)
    want = csr_transpose(a.values.cpu(), a.row_offsets.cpu(), a.col_indices.cpu(), m, n, return_permutation=True)
    assert torch.equal(offsets_t.cpu(), want[1]) and torch.equal(cols_t.cpu(), want[2])
    assert torch.equal(permutation.cpu(), want[3]) and torch.equal(values_t.cpu(), want[0])
    w = _randn(m, n, dtype=torch.bfloat16, seed=19)
    merged = csr_add(a.values, a.row_offsets, a.row_indices, a.col_indices, w, validate=False)
    _assert_close(merged, w.double() + a_dense, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# autograd, opcheck
# ----------------------------------------------------------------------------------------------


def test_gradcheck_float64():
    dtype = torch.float64
    a = _csr(9, 11, 0.3, dtype, seed=20, empty_row_fraction=0.2)
    values = a.values.clone().requires_grad_()
    dense = _randn(11, 5, dtype=dtype, seed=21).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v, d: spmm(v, a.row_offsets, a.row_indices, a.col_indices, d, 9), (values, dense))
    x = _randn(9, 6, dtype=dtype, seed=22).requires_grad_()
    y = _randn(11, 6, dtype=dtype, seed=23).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda p, q: sddmm(a.row_offsets, a.row_indices, a.col_indices, p, q), (x, y))
    w = _randn(9, 11, dtype=dtype, seed=24).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v, d: csr_add(v, a.row_offsets, a.row_indices, a.col_indices, d), (values, w))
    assert torch.autograd.gradcheck(
        lambda v: csr_transpose(v, a.row_offsets, a.col_indices, 9, 11)[0], (values,))


def test_opcheck():
    ops = torch.ops.rosa_kernels
    dtype = torch.float64
    a = _csr(12, 10, 0.3, dtype, seed=25, empty_row_fraction=0.2)
    values = a.values.clone().requires_grad_()
    dense = _randn(10, 7, dtype=dtype, seed=26).requires_grad_()
    torch.library.opcheck(ops.spmm.default, (values, a.row_offsets, a.row_indices, a.col_indices, dense, 12))
    x = _randn(12, 5, dtype=dtype, seed=27).requires_grad_()
    y = _randn(10, 5, dtype=dtype, seed=28).requires_grad_()
    torch.library.opcheck(ops.sddmm.default, (a.row_offsets, a.row_indices, a.col_indices, x, y))
    torch.library.opcheck(ops.csr_transpose.default, (values, a.row_offsets, a.col_indices, 12, 10))
    w = _randn(12, 10, dtype=dtype, seed=29).requires_grad_()
    torch.library.opcheck(ops.csr_add.default, (values, a.row_offsets, a.row_indices, a.col_indices, w))
    torch.library.opcheck(ops.csr_add_.default,
                          (a.values, a.row_offsets, a.row_indices, a.col_indices, w.detach().clone()))


# ----------------------------------------------------------------------------------------------
# streams, devices, synchronization
# ----------------------------------------------------------------------------------------------


def _all_ops(a: CSR, dense, dy, x, w):
    m, n = a.shape
    kw = dict(validate=False)
    return [
        spmm(a.values, a.row_offsets, a.row_indices, a.col_indices, dense, m, **kw),
        sddmm(a.row_offsets, a.row_indices, a.col_indices, dy.t(), x.t(), **kw),
        *csr_transpose(a.values, a.row_offsets, a.col_indices, m, n, return_permutation=True, **kw),
        csr_add(a.values, a.row_offsets, a.row_indices, a.col_indices, w, **kw),
    ]


def _inputs(device, dtype=torch.bfloat16):
    a = rosa_mask(256, 384, 0.02, seed=4, dtype=dtype, device=device)
    return (a, _randn(384, 72, dtype=dtype, seed=30, device=device), _randn(72, 256, dtype=dtype, seed=31, device=device),
            _randn(72, 384, dtype=dtype, seed=32, device=device), _randn(256, 384, dtype=dtype, seed=33, device=device))


@pytest.mark.parametrize("path", ["auto", "dense"])
def test_no_host_synchronization(path, monkeypatch):
    """No op synchronizes; "dense" forces the GEMM paths of spmm and sddmm."""
    if path == "dense":
        monkeypatch.setenv("ROSA_SPMM_KERNEL", "dense")
        monkeypatch.setenv("ROSA_SDDMM_KERNEL", "dense")
    inputs = _inputs(_cuda())
    _all_ops(*inputs)  # warm up (first calls may query the device)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _all_ops(*inputs)
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def test_side_stream_matches_default_stream():
    inputs = _inputs(_cuda())
    expected = _all_ops(*inputs)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = _all_ops(*inputs)
    stream.synchronize()
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    expected = [t.cpu() for t in _all_ops(*_inputs(torch.device("cuda", 0)))]
    got = _all_ops(*_inputs(torch.device("cuda", 1)))
    for g, e in zip(got, expected):
        assert g.device == torch.device("cuda", 1)
        assert torch.equal(g.cpu(), e)


# ----------------------------------------------------------------------------------------------
# bad input: the same clear errors as on the CPU
# ----------------------------------------------------------------------------------------------


def _bad_cases(device):
    a = _csr(6, 8, 0.4, torch.float32, seed=34, device=device)
    dense = _randn(8, 3, dtype=torch.float32, seed=35, device=device)
    bad_cols = a.col_indices.clone()
    bad_cols[-1] = 8
    bad_order = a.row_indices.clone()
    bad_order[0] = 6
    return [
        (ValueError, "col_indices must be < n",
         lambda: spmm(a.values, a.row_offsets, a.row_indices, bad_cols, dense, 6)),
        (ValueError, "row_indices",
         lambda: spmm(a.values, a.row_offsets, bad_order, a.col_indices, dense, 6)),
        (TypeError, "dense must have the dtype of values",
         lambda: spmm(a.values, a.row_offsets, a.row_indices, a.col_indices, dense.double(), 6)),
        (ValueError, "row_offsets must have length",
         lambda: spmm(a.values, a.row_offsets[:-1], a.row_indices, a.col_indices, dense, 6)),
        (ValueError, "col_indices must be < n",
         lambda: csr_transpose(a.values, a.row_offsets, bad_cols, 6, 8)),
        (ValueError, "col_indices must be < n",
         lambda: csr_add(a.values, a.row_offsets, a.row_indices, bad_cols, _randn(6, 8, dtype=torch.float32, device=device))),
        (ValueError, "col_indices must be < n",
         lambda: sddmm(a.row_offsets, a.row_indices, bad_cols, _randn(6, 4, dtype=torch.float32, device=device),
                       _randn(8, 4, dtype=torch.float32, device=device))),
    ]


@pytest.mark.parametrize("case", range(7))
def test_bad_input_same_error_as_cpu(case):
    for device in ("cpu", _cuda()):
        error, message, call = _bad_cases(device)[case]
        with pytest.raises(error, match=message):
            call()


def test_mixed_devices_rejected():
    a = _csr(6, 8, 0.4, torch.float32, seed=36)
    dense = _randn(8, 3, dtype=torch.float32, seed=37, device="cpu")
    with pytest.raises(ValueError, match="same device"):
        spmm(a.values, a.row_offsets, a.row_indices, a.col_indices, dense, 6)
    with pytest.raises(ValueError, match="same device"):
        csr_add(a.values, a.row_offsets, a.row_indices, a.col_indices, torch.ones(6, 8))


# ----------------------------------------------------------------------------------------------
# the compute-sanitizer subset: small cases of every op and kernel, odd and empty shapes
# ----------------------------------------------------------------------------------------------


@pytest.mark.sanitizer
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_sanitizer_subset(dtype, monkeypatch):
    cases = [(0, 0, 0, 0.5, 0.0), (1, 1, 1, 1.0, 0.0), (6, 7, 0, 0.5, 0.0), (5, 0, 3, 0.5, 0.0),
             (37, 53, 21, 0.2, 0.3), (300, 600, 130, 0.03, 0.1)]
    for m, n, k, density, empty in cases:
        a = _csr(m, n, density, dtype, seed=40 + m, empty_row_fraction=empty)
        dense = _randn(n, k, dtype=dtype, seed=41)
        expected = _dense_of(a).double() @ dense.double()
        for kernel in SPMM_KERNELS:
            monkeypatch.setenv("ROSA_SPMM_KERNEL", kernel)
            out = spmm(a.values, a.row_offsets, a.row_indices, a.col_indices, dense, m)
            _assert_close(out, expected, dtype)
            misaligned = _randn(n, k + 1, dtype=dtype, seed=42)[:, 1:]
            out = spmm(a.values, a.row_offsets, a.row_indices, a.col_indices, misaligned, m)
            _assert_close(out, _dense_of(a).double() @ misaligned.double(), dtype)
        heavy = _heavy_csr(dtype)
        out = spmm(heavy.values, heavy.row_offsets, heavy.row_indices, heavy.col_indices,
                   _randn(300, 9, dtype=dtype, seed=43), 70)
        a_op = _randn(m, k, dtype=dtype, seed=44)
        bt_op = _randn(n, k, dtype=dtype, seed=45)
        sddmm(a.row_offsets, a.row_indices, a.col_indices, a_op, bt_op)
        sddmm(a.row_offsets, a.row_indices, a.col_indices, _randn(k, m, dtype=dtype).t(), _randn(k, n, dtype=dtype).t())
        csr_transpose(a.values, a.row_offsets, a.col_indices, m, n, return_permutation=True)
        wide = _csr(3, 13000, 0.01, dtype, seed=46)
        csr_transpose(wide.values, wide.row_offsets, wide.col_indices, 3, 13000, return_permutation=True)
        csr_add(a.values, a.row_offsets, a.row_indices, a.col_indices, _randn(m, n, dtype=dtype), inplace=True)
    torch.cuda.synchronize()
