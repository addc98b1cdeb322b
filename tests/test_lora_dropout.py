"""The fused LoRA dropout ops (RosaLinear's regenerated dropout) against float64 references built
from rosa_kernels.dropout.keep_mask, on CPU and CUDA, and CPU-vs-CUDA agreement of the mask."""

import pytest
import torch

from rosa_kernels.dropout import draw_seed, keep_mask

from conftest import CUDA

ops = torch.ops.rosa_kernels

# (tokens, in_features, rank): empty, single row/column, odd sizes, ranks below, at and above the
# CUDA kernels' rank tile of 16, widths that are and are not multiples of the vector widths.
SHAPES = [(0, 8, 4), (5, 0, 3), (1, 1, 1), (7, 13, 3), (33, 40, 16), (64, 257, 17), (130, 96, 40), (19, 1030, 8)]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def close(actual, expected, dtype):
    expected = expected.double().cpu()
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    error = (actual.double().cpu() - expected).abs().max().item() if expected.numel() else 0.0
    assert error <= TOLERANCE[dtype] * scale, f"max error {error} (scale {scale})"


def operands(tokens, n, rank, dtype, device, gen, x_layout="contiguous"):
    x = torch.randn(tokens, n + 3, generator=gen, dtype=torch.float64)
    x = x[:, 1:n + 1] if x_layout == "row_stride" else x[:, :n].contiguous()
    lora_A = torch.randn(rank, n, generator=gen, dtype=torch.float64)
    g = torch.randn(tokens, rank, generator=gen, dtype=torch.float64)
    cast = dict(dtype=dtype, device=device)
    # The references use the rounded operands, so only the kernels' arithmetic is compared.
    return x.to(**cast), lora_A.to(**cast), g.to(**cast)


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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("x_layout", ["contiguous", "row_stride"])
def test_ops_match_the_float64_reference(device, gen, dtype, shape, x_layout):
    tokens, n, rank = shape
    p, alpha = 0.3, 1.75
    x, lora_A, g = operands(tokens, n, rank, dtype, device, gen, x_layout)
    seed = draw_seed()
    keep = keep_mask(seed, tokens, n, p).double()
    x64, a64, g64 = x.double().cpu(), lora_A.double().cpu(), g.double().cpu()

    close(ops.lora_dropout_project(x, lora_A, seed, p), (x64 * keep) @ a64.t(), dtype)
    close(ops.lora_dropout_grad_A(g, x, seed, p, alpha), alpha * g64.t() @ (x64 * keep), dtype)
    dx = torch.randn(tokens, n, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    expected = dx.double().cpu() + alpha * keep * (g64 @ a64)
    ops.lora_dropout_grad_x_(dx, g, lora_A, seed, p, alpha)
    close(dx, expected, dtype)


def test_grad_x_updates_a_row_strided_view_in_place(device, gen):
    base = torch.randn(9, 20, generator=gen, dtype=torch.float64).to(device)
    dx = base[:, 2:15]
    _, lora_A, g = operands(9, 13, 4, torch.float64, device, gen)
    seed = draw_seed()
    keep = keep_mask(seed, 9, 13, 0.2).double()
    expected = base.clone().cpu()
    expected[:, 2:15] += 0.5 * keep * (g.cpu() @ lora_A.cpu())
    ops.lora_dropout_grad_x_(dx, g, lora_A, seed, 0.2, 0.5)
    close(base, expected, torch.float64)


def test_p_zero_keeps_everything(device, gen):
    x, lora_A, g = operands(12, 30, 5, torch.float64, device, gen)
    close(ops.lora_dropout_project(x, lora_A, draw_seed(), 0.0), x.cpu() @ lora_A.cpu().t(), torch.float64)


@pytest.mark.skipif(not CUDA, reason="needs the CUDA kernels and a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_and_cpu_draw_the_same_mask(gen, dtype):
    tokens, n, rank = 300, 515, 16
    x, lora_A, g = operands(tokens, n, rank, dtype, "cpu", gen)
    seed = draw_seed()
    close(ops.lora_dropout_project(x.cuda(), lora_A.cuda(), seed, 0.4),
          ops.lora_dropout_project(x, lora_A, seed, 0.4), dtype)
    # Rows of A that pick single columns: h then shows X ∘ keep itself, so equal masks give equal zeros.
    selector = torch.zeros(4, n, dtype=dtype)
    selector[torch.arange(4), torch.tensor([0, 7, 300, 514])] = 1
    h_cpu = ops.lora_dropout_project(x, selector, seed, 0.4)
    h_cuda = ops.lora_dropout_project(x.cuda(), selector.cuda(), seed, 0.4)
    assert torch.equal(h_cpu != 0, h_cuda.cpu() != 0)


@pytest.mark.parametrize("op", ["project", "grad_A", "grad_x_"])
def test_opcheck(device, gen, op):
    x, lora_A, g = operands(10, 24, 3, torch.float32, device, gen)
    seed = draw_seed()
    if op == "project":
        torch.library.opcheck(ops.lora_dropout_project.default, (x, lora_A, seed, 0.1))
    elif op == "grad_A":
        torch.library.opcheck(ops.lora_dropout_grad_A.default, (g, x, seed, 0.1, 2.0))
    else:
        torch.library.opcheck(ops.lora_dropout_grad_x_.default, (x.clone(), g, lora_A, seed, 0.1, 2.0))


@pytest.mark.parametrize("bad", ["seed_dtype", "seed_cuda", "p", "rank", "width", "dtype"])
def test_bad_input_raises(device, gen, bad):
    x, lora_A, g = operands(6, 10, 3, torch.float32, device, gen)
    seed, p = draw_seed(), 0.1
    if bad == "seed_dtype":
        seed = torch.tensor([1.0])
    elif bad == "seed_cuda":
        if not CUDA:
            pytest.skip("needs a GPU")
        seed = seed.cuda()
    elif bad == "p":
        p = 1.0
    elif bad == "rank":
        g = g[:, :2]
    elif bad == "width":
        lora_A = lora_A[:, :9]
    elif bad == "dtype":
        lora_A = lora_A.double()
    with pytest.raises((ValueError, TypeError)):
        ops.lora_dropout_project(x, lora_A, seed, p)
        ops.lora_dropout_grad_x_(x.clone(), g, lora_A, seed, p, 1.0)
