"""The paper's recipe and its ablations: parameter groups, the restart with the mask, random masks."""

import functools
import math

import pytest
import torch
from torch import nn

import rosa_kernels
from rosa_kernels import RosaConfig, get_rosa_model, parameter_groups, random_masks, restart_optimizer


def _model(head=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 8))
    if head:
        model.append(nn.LayerNorm(8))
    return model


def _config(**overrides):
    return RosaConfig(**{"rank": 2, "density": 0.1, "dropout": 0.0, "warmup_steps": 3, "collect_steps": 1,
                         "target_modules": ["0", "2"], **overrides})


def test_parameter_groups_hold_every_trainable_parameter_exactly_once():
    model = get_rosa_model(_model(head=True), _config())
    model.base_model[3].weight.requires_grad_(True)  # a head the user unfroze; its bias stays frozen
    groups = model.parameter_groups(lora_lr=7e-4, sparse_lr=2e-4, weight_decay=0.01)
    assert [g["name"] for g in groups] == ["lora", "sparse", "other"]
    assert [g["lr"] for g in groups] == [7e-4, 2e-4, 7e-4]
    assert all(g["weight_decay"] == 0.01 for g in groups)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    layers = model.rosa_layers().values()
    assert {id(p) for p in groups[1]["params"]} == {id(layer.sparse_values) for layer in layers}
    assert groups[2]["params"] == [model.base_model[3].weight]
    assert parameter_groups(model, other_lr=1e-3)[2]["lr"] == 1e-3
    optimizer = torch.optim.AdamW(groups)  # accepted as is
    assert [g["lr"] for g in optimizer.param_groups] == [7e-4, 2e-4, 7e-4]


def test_parameter_groups_without_other_trainable_parameters_have_two_groups_and_defaults():
    groups = parameter_groups(get_rosa_model(_model(), _config()))
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [("lora", 7e-4, 0.0), ("sparse", 2e-4, 0.0)]


@pytest.mark.parametrize("kwargs,error", [
    ({"lora_lr": -1.0}, ValueError), ({"sparse_lr": math.nan}, ValueError), ({"lora_lr": "1e-3"}, TypeError),
    ({"weight_decay": -0.1}, ValueError), ({"other_lr": True}, TypeError),
])
def test_parameter_groups_reject_bad_rates(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        parameter_groups(get_rosa_model(_model(), _config()), **kwargs)


def test_parameter_groups_reject_a_model_without_rosa_layers():
    with pytest.raises(ValueError, match="no RosaLinear"):
        parameter_groups(_model())
    with pytest.raises(TypeError, match="nn.Module"):
        parameter_groups([nn.Parameter(torch.zeros(1))])


def _train(model, optimizer, steps, scheduler=None, lr_scheduler=None):
    x, target = torch.randn(16, 12), torch.randn(16, 8)
    selected = []
    for _ in range(steps):
        nn.functional.mse_loss(model(x), target).backward()
        optimizer.step()
        optimizer.zero_grad()
        if lr_scheduler is not None:
            lr_scheduler.step()
        if scheduler is not None:
            selected.append(scheduler.step())
    return selected


@pytest.mark.parametrize("make", [
    lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4)),
    lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10),
    lambda opt: torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=5),
])
def test_restart_optimizer_returns_to_step_0(make):
    model = get_rosa_model(_model(), _config())
    optimizer = torch.optim.AdamW(model.parameter_groups(lora_lr=1e-2, sparse_lr=1e-3))
    lr_scheduler = make(optimizer)
    start = [g["lr"] for g in optimizer.param_groups]
    _train(model, optimizer, 3, lr_scheduler=lr_scheduler)
    assert optimizer.state and [g["lr"] for g in optimizer.param_groups] != start
    restart_optimizer(optimizer, lr_scheduler)
    assert not optimizer.state
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(start)
    assert lr_scheduler.last_epoch == 0
    # and the schedule goes on as a fresh one would
    fresh_optimizer = torch.optim.AdamW(model.parameter_groups(lora_lr=1e-2, sparse_lr=1e-3))
    fresh = make(fresh_optimizer)
    for _ in range(3):
        optimizer.step(), lr_scheduler.step(), fresh_optimizer.step(), fresh.step()
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([g["lr"] for g in fresh_optimizer.param_groups])


def test_restart_optimizer_rejects_bad_arguments():
    with pytest.raises(TypeError, match="optimizer"):
        restart_optimizer(object())
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(TypeError, match="lr_scheduler"):
        restart_optimizer(optimizer, object())


def test_the_scheduler_restarts_adapters_optimizer_and_schedule_with_the_mask():
    model = get_rosa_model(_model(), _config(reset_adapters_after_mask=True))
    optimizer = torch.optim.AdamW(model.parameter_groups(lora_lr=1e-2, sparse_lr=1e-2))
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / 10)
    scheduler = model.scheduler(optimizer=optimizer, lr_scheduler=lr_scheduler)
    selected = _train(model, optimizer, 4, scheduler, lr_scheduler)
    assert selected == [False, False, False, True] and scheduler.phase == "sparse"
    assert not optimizer.state  # Adam starts over: moments and step counts
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3, 1e-3])
    for layer in model.rosa_layers().values():
        assert not layer.lora_B.any() and not layer.sparse_values.any()
    assert _train(model, optimizer, 2, scheduler, lr_scheduler) == [False, False]
    with pytest.raises(ValueError, match="optimizer"):
        rosa_kernels.RosaScheduler(model, lr_scheduler=lr_scheduler)


def test_without_the_reset_flag_nothing_restarts_but_step_says_when_the_masks_came():
    model = get_rosa_model(_model(), _config())
    optimizer = torch.optim.AdamW(model.parameter_groups(lora_lr=1e-2, sparse_lr=1e-2))
    scheduler = model.scheduler(optimizer=optimizer)
    assert _train(model, optimizer, 4, scheduler) == [False, False, False, True]
    assert optimizer.state
    assert any(layer.lora_B.any() for layer in model.rosa_layers().values())


def test_random_masks_have_each_layers_nnz_and_depend_on_the_seed_only():
    model = get_rosa_model(_model(), _config())
    masks = random_masks(model, seed=3, apply=False)
    layers = model.rosa_layers()
    assert set(masks) == set(layers)
    for name, mask in masks.items():
        assert mask.nnz == layers[name].nnz and tuple(mask.shape) == (layers[name].out_features, layers[name].in_features)
        assert layers[name].phase == "warmup"
    again = model.random_masks(seed=3)
    for name in masks:
        assert torch.equal(masks[name].col_indices, again[name].col_indices)
        assert layers[name].phase == "sparse"
        assert torch.equal(layers[name].mask().col_indices, masks[name].col_indices)
    other = random_masks(model, seed=4, apply=False)
    assert any(not torch.equal(masks[n].col_indices, other[n].col_indices) for n in masks)
    with pytest.raises(TypeError, match="seed"):
        random_masks(model, seed=1.5)


def test_random_masks_are_uniform():
    layer = rosa_kernels.RosaLinear(64, 64, rank=1, density=0.25)
    counts = torch.zeros(64, 64)
    for seed in range(40):
        mask = random_masks(nn.Sequential(layer), seed=seed, apply=False)["0"]
        counts += rosa_kernels.csr_to_dense(torch.ones(mask.nnz), mask.row_offsets, mask.col_indices, mask.shape)
    # each position is in the mask with probability 0.25: 10 of 40 draws on average
    assert abs(counts.mean().item() - 10.0) < 1e-6
    assert counts.sum(0).std() / counts.sum(0).mean() < 0.1 and counts.sum(1).std() / counts.sum(1).mean() < 0.1


def test_the_scheduler_selects_random_masks_in_place_of_the_fisher_ones():
    model = get_rosa_model(_model(), _config(reset_adapters_after_mask=True))
    optimizer = torch.optim.AdamW(model.parameter_groups())
    scheduler = model.scheduler(optimizer=optimizer, select_masks=functools.partial(random_masks, seed=7))
    _train(model, optimizer, 4, scheduler)
    expected = random_masks(model, seed=7, apply=False)
    for name, mask in scheduler.masks.items():
        assert torch.equal(mask.col_indices, expected[name].col_indices)
    with pytest.raises(TypeError, match="select_masks"):
        model.scheduler(select_masks="random")
