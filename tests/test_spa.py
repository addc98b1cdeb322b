"""Sparse-only adaptation (SpA) as LoRA rank 0, as RoSA's own scripts express it."""

import warnings

import pytest
import torch
from torch import nn

from rosa_kernels import RosaConfig, RosaLinear, RosaModel, get_rosa_model
from test_rosa_linear import MODES, assert_close, make_layer, reference


def test_rank_0_has_empty_lora_factors_and_a_zero_scale():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "initializing zero-element tensors" warning
        layer = RosaLinear(6, 5, rank=0, density=0.4, alpha=16.0, use_rslora=True)
    assert layer.lora_A.shape == (0, 6) and layer.lora_B.shape == (5, 0)
    assert layer.scale == 0.0
    assert RosaLinear(6, 5, rank=0, density=0.4).scale == 0.0
    with pytest.raises(ValueError, match="rank"):
        RosaLinear(6, 5, rank=-1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("with_mask", [False, True])
def test_rank_0_forward_backward_match_the_float64_reference(mode, dropout, with_mask):
    layer = make_layer(9, 7, mode=mode, rank=0, dropout=dropout, with_mask=with_mask, seed=3)
    x = torch.randn(2, 4, 9, requires_grad=True)
    dy = torch.randn(2, 4, 7)
    layer(x).backward(dy)
    y, dx, dA, dB, dS = reference(layer, x, dy)  # the LoRA term is zero whatever the dropout mask
    assert_close(layer(x), y, torch.float32, "y")
    assert_close(x.grad, dx, torch.float32, "dx")
    assert layer.lora_A.grad.shape == (0, 9) and layer.lora_B.grad.shape == (7, 0)
    if with_mask:
        assert_close(layer.sparse_values.grad, dS, torch.float32, "dS")


@pytest.mark.parametrize("mode", MODES)
def test_rank_0_gradcheck_float64(mode):
    layer = make_layer(6, 5, mode=mode, rank=0, dtype=torch.float64, density=0.4)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)

    def f(x, values):
        with torch.no_grad():
            layer.sparse_values.copy_(values)
        # the sparse values enter through the layer (merged mode re-scatters them on the next forward)
        return layer(x)

    assert torch.autograd.gradcheck(lambda x: layer(x), (x,))
    # dS through the layer, against finite differences
    out = (layer(x.detach()) * torch.cos(torch.arange(5.0, dtype=torch.float64))).sum()
    out.backward()
    grad = layer.sparse_values.grad.clone()
    eps = 1e-6
    for i in range(layer.nnz):
        values = layer.sparse_values.detach().clone()
        values[i] += eps
        up = (f(x.detach(), values) * torch.cos(torch.arange(5.0, dtype=torch.float64))).sum().item()
        values[i] -= 2 * eps
        down = (f(x.detach(), values) * torch.cos(torch.arange(5.0, dtype=torch.float64))).sum().item()
        values[i] += eps
        f(x.detach(), values)
        assert abs((up - down) / (2 * eps) - grad[i].item()) < 1e-6


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 8))


def test_spa_life_cycle_merge_save_and_load(tmp_path):
    config = RosaConfig(rank=0, density=0.1, dropout=0.0, warmup_steps=2, collect_steps=1,
                        reset_adapters_after_mask=True)
    model = get_rosa_model(_model(), config)
    optimizer = torch.optim.AdamW(model.parameter_groups(lora_lr=1e-2, sparse_lr=1e-2))
    scheduler = model.scheduler()
    x, target = torch.randn(32, 12), torch.randn(32, 8)
    for _ in range(6):
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    assert scheduler.phase == "sparse"
    assert all(layer.sparse_values.abs().sum() > 0 for layer in model.rosa_layers().values())
    expected = model(x).detach()
    model.save_pretrained(tmp_path)
    loaded = RosaModel.from_pretrained(_model(), tmp_path)
    assert loaded.config.rank == 0
    torch.testing.assert_close(loaded(x), expected)
    merged = loaded.merge_and_unload()
    assert all(type(m) is nn.Linear for m in merged if isinstance(m, nn.Linear))
    torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-6)
