"""RosaLinear's LoRA dropout ops against references built from rosa_kernels.dropout.keep_mask, on
CPU and CUDA, and CPU-vs-CUDA agreement of the mask."""

import pytest
import torch

from rosa_kernels.dropout import draw_seed, keep_mask

from conftest import CUDA

ops = torch.ops.rosa_kernels

# (tokens, in_features): empty, single row/column, odd widths, widths that are and are not
# multiples of the 8-element vectors, and more columns than one CUDA block covers (2048).
SHAPES = [(0, 8), (5, 0), (1, 1), (7, 13), (33, 40), (64, 257), (19, 2050), (3, 4104)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def strided(tokens, n, dtype, device, gen, layout):
    """A (tokens x n) tensor: contiguous, or a view with a larger row stride (misaligned rows)."""
    base = torch.randn(tokens, n + 3, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    return base[:, 1:n + 1] if layout == "row_stride" else base[:, :n].contiguous()


@pytest.mark.parametrize("p", [0.0, 0.05, 0.5])
def test_keep_mask_drops_with_probability_p(p):
    keep = keep_mask(draw_seed(), 400, 500, p)
    dropped = 1.0 - keep.double().mean().item()
    assert abs(dropped - p) < 0.01
    assert keep_mask(7, 3, 4, p).shape == (3, 4)


def test_keep_mask_depends_on_the_seed_and_on_both_indices():
    a, b = keep_mask(1, 64, 64, 0.5), keep_mask(2, 64, 64, 0.5)
    assert not torch.equal(a, b)
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[:, 0], a[:, 1])
    torch.manual_seed(3)
    first = draw_seed()
    torch.manual_seed(3)
    assert torch.equal(first, draw_seed())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["contiguous", "row_stride"])
def test_apply_is_x_times_the_keep_mask(device, gen, dtype, shape, layout):
    tokens, n = shape
    x = strided(tokens, n, dtype, device, gen, layout)
    seed = draw_seed()
    out = ops.lora_dropout_apply(x, seed, 0.3)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    expected = torch.where(keep_mask(seed, tokens, n, 0.3), x.cpu(), torch.zeros((), dtype=dtype))
    assert torch.equal(out.cpu(), expected)  # a copy or a zero: exact


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["contiguous", "row_stride"])
def test_add_matches_the_float64_reference(device, gen, dtype, shape, layout):
    tokens, n = shape
    dx = strided(tokens, n, dtype, device, gen, layout)
    g = strided(tokens, n, dtype, device, gen, "contiguous")
    seed, alpha = draw_seed(), 1.75
    expected = dx.double().cpu() + alpha * keep_mask(seed, tokens, n, 0.3).double() * g.double().cpu()
    ops.lora_dropout_add_(dx, g, seed, 0.3, alpha)
    error = (dx.double().cpu() - expected).abs().max().item() if dx.numel() else 0.0
    assert error <= TOLERANCE[dtype] * max(1.0, expected.abs().max().item() if dx.numel() else 1.0)


def test_add_writes_only_its_view(device, gen):
    base = torch.randn(9, 20, generator=gen, dtype=torch.float64).to(device)
    g = torch.randn(9, 13, generator=gen, dtype=torch.float64).to(device)
    seed = draw_seed()
    expected = base.clone().cpu()
    expected[:, 2:15] += 0.5 * keep_mask(seed, 9, 13, 0.2).double() * g.cpu()
    ops.lora_dropout_add_(base[:, 2:15], g, seed, 0.2, 0.5)
    torch.testing.assert_close(base.cpu(), expected, rtol=1e-12, atol=1e-12)


def test_p_zero_keeps_everything(device, gen):
    x = torch.randn(12, 30, generator=gen).to(device)
    assert torch.equal(ops.lora_dropout_apply(x, draw_seed(), 0.0), x)


@pytest.mark.skipif(not CUDA, reason="needs the CUDA kernels and a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_and_cpu_draw_the_same_mask(gen, dtype):
    x = torch.randn(300, 4100, generator=gen).to(dtype)
    seed = draw_seed()
    assert torch.equal(ops.lora_dropout_apply(x.cuda(), seed, 0.4).cpu(), ops.lora_dropout_apply(x, seed, 0.4))


@pytest.mark.skipif(not CUDA, reason="needs the CUDA kernels and a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_seed_on_the_gpu_draws_the_mask_of_the_same_seed_on_the_cpu(gen, dtype):
    x = torch.randn(70, 1030, generator=gen).to(dtype=dtype, device="cuda")
    g = torch.randn(70, 1030, generator=gen).to(dtype=dtype, device="cuda")
    seed = draw_seed()
    assert torch.equal(ops.lora_dropout_apply(x, seed.cuda(), 0.3), ops.lora_dropout_apply(x, seed, 0.3))
    dx_host, dx_device = x.clone(), x.clone()
    ops.lora_dropout_add_(dx_host, g, seed, 0.3, 1.5)
    ops.lora_dropout_add_(dx_device, g, seed.cuda(), 0.3, 1.5)
    assert torch.equal(dx_host, dx_device)
    assert draw_seed("cuda").device.type == "cuda"


@pytest.mark.skipif(not CUDA, reason="needs the CUDA kernels and a GPU")
def test_a_captured_cuda_graph_reads_the_seed_of_each_replay(gen):
    """The kernel reads a device seed when it runs, not when it was captured: each replay of a
    graph that draws its seed on the GPU applies a new mask (a CPU seed would be frozen in it)."""
    x = torch.randn(64, 256, generator=gen).cuda()
    seed = draw_seed("cuda")
    ops.lora_dropout_apply(x, seed, 0.5)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.lora_dropout_apply(x, seed, 0.5)
    masks = []
    for value in (11, 12, 11):
        seed.fill_(value)
        graph.replay()
        torch.testing.assert_close(out, ops.lora_dropout_apply(x, torch.tensor([value]), 0.5), rtol=0, atol=0)
        masks.append(out != 0)
    assert not torch.equal(masks[0], masks[1]) and torch.equal(masks[0], masks[2])


@pytest.mark.parametrize("op", ["apply", "add_"])
def test_opcheck(device, gen, op):
    x = torch.randn(10, 24, generator=gen).to(device)
    seed = draw_seed()
    if op == "apply":
        torch.library.opcheck(ops.lora_dropout_apply.default, (x, seed, 0.1))
    else:
        torch.library.opcheck(ops.lora_dropout_add_.default, (x.clone(), x, seed, 0.1, 2.0))


@pytest.mark.parametrize("bad", ["seed_dtype", "seed_size", "seed_cuda", "p", "shape", "dtype", "column_stride"])
def test_bad_input_raises_naming_the_argument(device, gen, bad):
    x = torch.randn(6, 10, generator=gen).to(device)
    g, seed, p, name = x.clone(), draw_seed(), 0.1, bad.split("_")[0]
    if bad == "seed_dtype":
        seed = torch.tensor([1.0])
    elif bad == "seed_size":
        seed = torch.tensor([1, 2])
    elif bad == "seed_cuda":  # a CUDA seed goes with CUDA inputs only
        if not CUDA or torch.device(device).type == "cuda":
            pytest.skip("needs a GPU and CPU inputs")
        seed = seed.cuda()
    elif bad == "p":
        p = 1.0
    elif bad == "shape":
        g, name = g[:, :9], "g"
    elif bad == "dtype":
        g, name = g.double(), "g"
    elif bad == "column_stride":
        x, name = x.t().contiguous().t(), "dx"
    with pytest.raises((ValueError, TypeError), match=name):
        if bad in ("shape", "dtype", "column_stride"):
            ops.lora_dropout_add_(x, g, seed, p, 1.0)
        else:
            ops.lora_dropout_apply(x, seed, p)


# ----------------------------------------------------------------------------------------------
# The fused ops: project h = (X ∘ keep) A^T and addmm_ dX += alpha * keep ∘ (G A)
# ----------------------------------------------------------------------------------------------
# (tokens, in_features, rank): empty sizes, single rows/columns, odd widths and token counts that
# are not multiples of the GPU tiles (16 tokens, 64 columns), ranks that pad to 16, 32, 48 and 64
# (the tensor-core kernels) and 65 (the unfused fallback).
FUSED_SHAPES = [(0, 8, 4), (5, 0, 4), (4, 6, 0), (1, 1, 1), (7, 13, 3), (33, 40, 16), (17, 130, 5), (70, 257, 16),
                (19, 2050, 17), (40, 96, 33), (21, 75, 48), (18, 200, 64), (9, 70, 65)]


@pytest.fixture(params=["tensor_cores", "unfused"])
def fused_path(request, monkeypatch):
    """Both CUDA paths of the fused ops: the tensor-core kernels (the default where the GPU, dtype
    and rank allow) and the elementwise kernel plus cuBLAS (ROSA_KERNELS_FUSED_DROPOUT=0); the CPU
    has one."""
    if request.param == "tensor_cores":
        monkeypatch.delenv("ROSA_KERNELS_FUSED_DROPOUT", raising=False)
    else:
        monkeypatch.setenv("ROSA_KERNELS_FUSED_DROPOUT", "0")
    return request.param


def fused_tolerance(dtype, reduce):
    """Float64 references: the sums are float32 (float64) inside, then one rounding to dtype."""
    return {torch.float64: 1e-12, torch.float32: 2e-6 * reduce ** 0.5,
            torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]


def assert_matches(actual, expected, dtype, reduce):
    """Within fused_tolerance of a float64 reference, relative to its largest magnitude (at least 1)."""
    if not expected.numel():
        return
    scale = max(1.0, expected.abs().max().item())
    assert (actual.double().cpu() - expected).abs().max().item() <= fused_tolerance(dtype, reduce) * scale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["contiguous", "row_stride"])
def test_project_matches_the_float64_reference(device, gen, dtype, shape, layout, fused_path):
    tokens, n, rank = shape
    x = strided(tokens, n, dtype, device, gen, layout)
    lora_A = torch.randn(rank, n, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    seed = draw_seed()
    h = ops.lora_dropout_project(x, seed, 0.3, lora_A)
    assert h.shape == (tokens, rank) and h.dtype == dtype and h.device == x.device
    kept = keep_mask(seed, tokens, n, 0.3).double() * x.double().cpu()
    assert_matches(h, kept @ lora_A.double().cpu().t(), dtype, n)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["contiguous", "row_stride"])
def test_addmm_matches_the_float64_reference(device, gen, dtype, shape, layout, fused_path):
    tokens, n, rank = shape
    dx = strided(tokens, n, dtype, device, gen, layout)
    g = strided(tokens, rank, dtype, device, gen, layout)
    lora_A = torch.randn(rank, n, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    seed, alpha = draw_seed(), 0.75
    before = dx.double().cpu()
    product = g.double().cpu() @ lora_A.double().cpu()
    keep = keep_mask(seed, tokens, n, 0.3)
    expected = before + alpha * keep.double() * product
    ops.lora_dropout_addmm_(dx, g, lora_A, seed, 0.3, alpha)
    assert_matches(dx, expected, dtype, rank)
    assert torch.equal(dx.double().cpu()[~keep], before[~keep])  # dropped elements untouched, exactly


# grad_A reduces over the tokens in splits of at least 128 (a multiple of 16): long token counts with
# tails, next to the shapes above.
GRAD_A_SHAPES = FUSED_SHAPES + [(2049, 70, 5), (1000, 130, 16), (300, 2050, 64), (515, 9, 33)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GRAD_A_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["contiguous", "row_stride"])
def test_grad_A_matches_the_float64_reference(device, gen, dtype, shape, layout, fused_path):
    tokens, n, rank = shape
    x = strided(tokens, n, dtype, device, gen, layout)
    g = strided(tokens, rank, dtype, device, gen, layout)
    seed, alpha = draw_seed(), 0.75
    d_lora_A = ops.lora_dropout_grad_A(x, seed, 0.3, g, alpha)
    assert d_lora_A.shape == (rank, n) and d_lora_A.dtype == dtype and d_lora_A.device == x.device
    kept = keep_mask(seed, tokens, n, 0.3).double() * x.double().cpu()
    assert_matches(d_lora_A, alpha * g.double().cpu().t() @ kept, dtype, tokens)


def test_grad_A_is_deterministic(device, gen, fused_path):
    """The splits' partial sums are added in a fixed order: the same call gives the same bits."""
    x = torch.randn(3000, 200, generator=gen).to(device=device, dtype=torch.bfloat16)
    g = torch.randn(3000, 16, generator=gen).to(device=device, dtype=torch.bfloat16)
    seed = draw_seed()
    first = ops.lora_dropout_grad_A(x, seed, 0.1, g, 2.0)
    assert all(torch.equal(first, ops.lora_dropout_grad_A(x, seed, 0.1, g, 2.0)) for _ in range(3))


def test_addmm_writes_only_its_view(device, gen, fused_path):
    base = torch.randn(19, 90, generator=gen, dtype=torch.float64).to(device=device, dtype=torch.bfloat16)
    g = torch.randn(19, 16, generator=gen).to(device=device, dtype=torch.bfloat16)
    lora_A = torch.randn(16, 70, generator=gen).to(device=device, dtype=torch.bfloat16)
    seed = draw_seed()
    expected = base.clone()
    ops.lora_dropout_addmm_(expected[:, 3:73].contiguous(), g, lora_A, seed, 0.2, 0.5)  # untouched: a copy
    view = base[:, 3:73]
    ops.lora_dropout_addmm_(view, g, lora_A, seed, 0.2, 0.5)
    assert torch.equal(base[:, :3], expected[:, :3]) and torch.equal(base[:, 73:], expected[:, 73:])
    reference = expected[:, 3:73].clone()
    ops.lora_dropout_addmm_(reference, g, lora_A, seed, 0.2, 0.5)
    assert torch.equal(view, reference)


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_ops_agree_on_cpu_and_cuda(gen, dtype, fused_path):
    """The same seed gives the same mask on both devices; the products agree to one rounding of
    float32 sums taken in a different order."""
    x = torch.randn(300, 520, generator=gen).to(dtype)
    lora_A = torch.randn(16, 520, generator=gen).to(dtype)
    g = torch.randn(300, 16, generator=gen).to(dtype)
    seed = draw_seed()
    h_cpu = ops.lora_dropout_project(x, seed, 0.1, lora_A)
    h_cuda = ops.lora_dropout_project(x.cuda(), seed.cuda(), 0.1, lora_A.cuda())
    dx_cpu, dx_cuda = x.clone(), x.cuda()
    ops.lora_dropout_addmm_(dx_cpu, g, lora_A, seed, 0.1, 1.5)
    ops.lora_dropout_addmm_(dx_cuda, g.cuda(), lora_A.cuda(), seed.cuda(), 0.1, 1.5)
    dA_cpu = ops.lora_dropout_grad_A(x, seed, 0.1, g, 0.5)
    dA_cuda = ops.lora_dropout_grad_A(x.cuda(), seed.cuda(), 0.1, g.cuda(), 0.5)
    rtol = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(h_cuda.cpu(), h_cpu, rtol=rtol, atol=rtol * 30)
    torch.testing.assert_close(dx_cuda.cpu(), dx_cpu, rtol=rtol, atol=rtol * 10)
    torch.testing.assert_close(dA_cuda.cpu(), dA_cpu, rtol=rtol, atol=rtol * 30)


@pytest.mark.parametrize("op", ["project", "addmm_", "grad_A"])
def test_fused_opcheck(device, gen, op, fused_path):
    x = torch.randn(20, 24, generator=gen).to(device)
    lora_A = torch.randn(4, 24, generator=gen).to(device)
    seed = draw_seed()
    if op == "project":
        torch.library.opcheck(ops.lora_dropout_project.default, (x, seed, 0.1, lora_A))
    elif op == "grad_A":
        g = torch.randn(20, 4, generator=gen).to(device)
        torch.library.opcheck(ops.lora_dropout_grad_A.default, (x, seed, 0.1, g, 2.0))
    else:
        g = torch.randn(20, 4, generator=gen).to(device)
        torch.library.opcheck(ops.lora_dropout_addmm_.default, (x.clone(), g, lora_A, seed, 0.1, 2.0))


@pytest.mark.parametrize("bad", ["lora_A_shape", "lora_A_dtype", "g_shape", "g_dtype", "dx_column_stride", "x_dim",
                                 "g_rows", "g_device"])
def test_fused_bad_input_raises_naming_the_argument(device, gen, bad):
    x = torch.randn(6, 10, generator=gen).to(device)
    lora_A = torch.randn(3, 10, generator=gen).to(device)
    g = torch.randn(6, 3, generator=gen).to(device)
    seed = draw_seed()
    name = bad.rsplit("_", 1)[0] if bad != "dx_column_stride" else "dx"
    with pytest.raises((ValueError, TypeError), match=name.split("_")[0] if name == "x" else name):
        if bad == "lora_A_shape":
            ops.lora_dropout_project(x, seed, 0.1, lora_A[:, :9])
        elif bad == "lora_A_dtype":
            ops.lora_dropout_addmm_(x, g, lora_A.double(), seed, 0.1, 1.0)
        elif bad == "g_shape":
            ops.lora_dropout_addmm_(x, g[:5], lora_A, seed, 0.1, 1.0)
        elif bad == "g_dtype":
            ops.lora_dropout_addmm_(x, g.double(), lora_A, seed, 0.1, 1.0)
        elif bad == "dx_column_stride":
            ops.lora_dropout_addmm_(x.t().contiguous().t(), g, lora_A, seed, 0.1, 1.0)
        elif bad == "g_rows":
            ops.lora_dropout_grad_A(x, seed, 0.1, g[:5], 1.0)
        elif bad == "g_device":
            if not CUDA:
                pytest.skip("needs a GPU")
            other = g.cpu() if torch.device(device).type == "cuda" else g.cuda()
            ops.lora_dropout_grad_A(x, seed, 0.1, other, 1.0)
        else:
            ops.lora_dropout_project(x[0], seed, 0.1, lora_A)


@pytest.mark.sanitizer  # small: the compute-sanitizer subset on a GPU (tiles' tails, misaligned rows)
@pytest.mark.parametrize("shape", [(17, 130, 5), (33, 75, 16), (19, 200, 64)], ids=lambda s: "x".join(map(str, s)))
def test_fused_ops_stay_inside_their_operands(device, gen, shape, fused_path):
    tokens, n, rank = shape
    for dtype in (torch.bfloat16, torch.float16):
        x = strided(tokens, n, dtype, device, gen, "row_stride")
        lora_A = torch.randn(rank, n, generator=gen).to(dtype=dtype, device=device)
        g = torch.randn(tokens, rank, generator=gen).to(dtype=dtype, device=device)
        seed = draw_seed(device)
        h = ops.lora_dropout_project(x, seed, 0.2, lora_A)
        d_lora_A = ops.lora_dropout_grad_A(x, seed, 0.2, g, 1.0)
        ops.lora_dropout_addmm_(x, g, lora_A, seed, 0.2, 1.0)
        assert torch.isfinite(h).all() and torch.isfinite(x).all() and torch.isfinite(d_lora_A).all()
        # several splits of the token range, the last one short
        x_long = strided(16 * tokens + 3, n, dtype, device, gen, "row_stride")
        g_long = torch.randn(16 * tokens + 3, rank, generator=gen).to(dtype=dtype, device=device)
        assert torch.isfinite(ops.lora_dropout_grad_A(x_long, seed, 0.2, g_long, 1.0)).all()
