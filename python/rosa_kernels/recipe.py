"""The pieces of RoSA's published recipe and of its ablations that are not the layer itself.

- :func:`parameter_groups`: the optimizer's parameter groups with separate learning rates for LoRA
  and the sparse adapter (RoSA's LLaMA-2 scripts: 7e-4 and 2e-4).
- :func:`restart_optimizer`: "restart from step 0 with the mask": clears the optimizer's state (Adam's
  moments and step counts) and puts an lr schedule back at its step 0.
- :func:`random_masks`: the random-mask ablation, a uniformly random mask with each layer's exact
  number of nonzeros, usable wherever the Fisher masks are selected.

Sparse-only adaptation (SpA) needs nothing here: it is ``RosaConfig(rank=0, ...)``.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from .csr import CSR, csr_from_mask
from .linear import RosaLinear

__all__ = ["parameter_groups", "restart_optimizer", "random_masks"]


def _layers(model) -> dict[str, RosaLinear]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    rosa_layers = getattr(type(model), "rosa_layers", None)  # a RosaModel names layers inside its base model
    layers = (rosa_layers(model) if callable(rosa_layers) else
              {name: m for name, m in model.named_modules() if isinstance(m, RosaLinear)})
    if not layers:
        raise ValueError("model contains no RosaLinear module: apply_rosa / get_rosa_model first")
    return layers


def _check_lr(value, name) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


def parameter_groups(model: nn.Module, *, lora_lr: float = 7e-4, sparse_lr: float = 2e-4,
                     weight_decay: float = 0.0, other_lr: float | None = None) -> list[dict]:
    """Parameter groups for a ``torch.optim`` optimizer: LoRA and sparse adapter at their own rates.

    Returns up to three groups, each a dict with ``params``, ``lr``, ``weight_decay`` and ``name``:
    ``"lora"`` (every ``lora_A`` and ``lora_B``, at ``lora_lr``), ``"sparse"`` (every
    ``sparse_values``, at ``sparse_lr``) and ``"other"`` (any other trainable parameter of the model,
    e.g. a classification head you unfroze, at ``other_lr``, which defaults to ``lora_lr``; the group
    is left out when there is none). Every trainable parameter appears exactly once (shared ones
    too); frozen ones never. Defaults: RoSA's LLaMA-2 scripts. ::

        optimizer = torch.optim.AdamW(rosa_kernels.parameter_groups(model, lora_lr=7e-4, sparse_lr=2e-4))
    """
    layers = _layers(model)
    lora_lr, sparse_lr = _check_lr(lora_lr, "lora_lr"), _check_lr(sparse_lr, "sparse_lr")
    other_lr = lora_lr if other_lr is None else _check_lr(other_lr, "other_lr")
    weight_decay = _check_lr(weight_decay, "weight_decay")
    seen: set[int] = set()
    lora, sparse, other = [], [], []

    def add(group, p):
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            group.append(p)

    for layer in layers.values():
        add(lora, layer.lora_A)
        add(lora, layer.lora_B)
        add(sparse, layer.sparse_values)
    for p in model.parameters():
        add(other, p)
    groups = [{"params": params, "lr": lr, "weight_decay": weight_decay, "name": name}
              for name, params, lr in (("lora", lora, lora_lr), ("sparse", sparse, sparse_lr), ("other", other, other_lr))
              if params]
    if not groups:
        raise ValueError("model has no trainable parameter")
    return groups


def restart_optimizer(optimizer: torch.optim.Optimizer, lr_scheduler=None) -> None:
    """Restarts training from step 0 in place: the optimizer forgets its state (Adam's moments and
    step counts, as if new) and ``lr_scheduler`` (a ``torch.optim.lr_scheduler`` scheduler) returns to
    its first step, with each group's learning rate back at the schedule's start.

    The same optimizer and scheduler objects keep working (a ``transformers`` Trainer holds them).
    """
    if not isinstance(getattr(optimizer, "param_groups", None), list) or not hasattr(optimizer, "state"):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    optimizer.state.clear()
    if lr_scheduler is None:
        return
    lr_scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's wrapper
    if not isinstance(lr_scheduler, torch.optim.lr_scheduler.LRScheduler):
        raise TypeError(f"lr_scheduler must be a torch.optim.lr_scheduler.LRScheduler, got "
                        f"{type(lr_scheduler).__name__}")
    # Replays what the scheduler's constructor did: learning rates at their initial values, then its
    # initial step (last_epoch -1 -> 0; torch's _initial_step also marks the step as the first, which
    # recursive schedules such as CosineAnnealingLR need to start from the initial values).
    for group, base_lr in zip(lr_scheduler.optimizer.param_groups, lr_scheduler.base_lrs):
        group["lr"] = group.get("initial_lr", base_lr)
    lr_scheduler.last_epoch = -1
    initial_step = getattr(lr_scheduler, "_initial_step", None)
    initial_step() if callable(initial_step) else lr_scheduler.step()


def random_masks(model: nn.Module, seed: int = 0, *, apply: bool = True) -> dict[str, CSR]:
    """The random-mask ablation: ``{name: CSR}``, for every RosaLinear of ``model``, a mask of exactly
    the layer's ``nnz`` positions drawn uniformly at random (a ``torch.Generator`` seeded with
    ``seed``; layers in ``named_modules`` order). With ``apply`` (default) the masks are set on the
    layers as :meth:`RosaModel.select_masks` sets the Fisher ones (``S = 0``, phase ``"sparse"``).

    Use it in place of mask selection, e.g.
    ``model.scheduler(select_masks=functools.partial(rosa_kernels.random_masks, seed=0))``.
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    layers = _layers(model)
    generator = torch.Generator().manual_seed(int(seed))
    masks = {}
    for name, layer in layers.items():
        size = layer.out_features * layer.in_features
        flat = torch.zeros(size, dtype=torch.bool)
        flat[torch.randperm(size, generator=generator)[:layer.nnz]] = True
        mask = csr_from_mask(flat.view(layer.out_features, layer.in_features))
        masks[name] = mask.to(layer.weight.device)
    if apply:
        for name, layer in layers.items():
            layer.set_mask(masks[name])
    return masks
