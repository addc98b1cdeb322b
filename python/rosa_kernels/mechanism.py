"""RoSA's mechanism on a planted update: does the method find and learn "low rank + sparse"?

The paper's explanation of why RoSA beats LoRA at equal trainable parameters is that fine-tuning
updates look like a Robust-PCA matrix: ``ΔW = L + S`` with ``L`` of low rank and ``S`` a few large
entries. :func:`planted_update_experiment` plants such an update in a model and checks the method
on it directly:

- the **teacher** is the pretrained model with ``W + L* + S*`` in every linear layer (``L*`` of rank
  ``planted_rank``, RMS entry ``lowrank_rms``; ``S*`` ``planted_entries`` entries per layer at uniformly
  random positions, random signs, magnitudes ``sparse_magnitude * U(0.5, 1.5)``, larger than L*'s);
- the **student** (the pretrained model) learns to reproduce the teacher's outputs (MSE distillation)
  on the same inputs;
- arms at **equal trainable parameters**: ``"lora"`` (rank r), ``"rosa"`` (rank r/2 + a Fisher mask
  holding the other half), ``"spa"`` (rank 0 + a Fisher mask holding the whole budget) and
  ``"rosa_random"`` (RoSA with a uniformly random mask). The mask arms follow RoSA's recipe:
  ``warmup_steps`` LoRA-only steps, one Fisher collection step, then a restart from step 0 with the
  mask (adapters re-initialized, optimizer and lr schedule restarted) for ``steps`` steps. LoRA
  trains for the same total number of optimizer steps (``warmup_steps + 1 + steps``).

It returns each arm's final distillation loss on held-out inputs (relative to the untrained
student's) and, for the mask arms, the mask's recall of S*'s support (the share of S*'s entries
inside the mask) next to its density (a random mask's expected recall).

The default model is small enough for CI on a CPU (seconds): a residual MLP block stack with
``d_model`` channels (``blocks`` blocks of Linear(d, hidden) -> GELU -> Linear(hidden, d)) fed
LLM-like inputs: Gaussian tokens whose channels have scales ``exp(channel_sigma * N(0, 1))`` (a few
outlier channels). Pass ``base_model`` and ``inputs`` to run it on a real model (every ``nn.Linear``
gets a planted update; the model's output must be a tensor).
"""

from __future__ import annotations

import copy
import functools
import statistics

import torch
import torch.nn.functional as F
from torch import nn

from .model import RosaConfig, get_rosa_model
from .recipe import random_masks

__all__ = ["ARMS", "planted_update_experiment", "residual_mlp", "llm_like_inputs", "summarize"]

ARMS = ("lora", "rosa", "spa", "rosa_random")

# Adam learning rates per arm, chosen once on a seed outside the test's (LoRA rank 4, 128 channels).
DEFAULT_LRS = {"lora": (8e-3, 0.0), "rosa": (8e-3, 2e-3), "spa": (0.0, 2e-3), "rosa_random": (8e-3, 2e-3)}


class _Block(nn.Module):
    def __init__(self, d_model, hidden):
        super().__init__()
        self.up, self.down = nn.Linear(d_model, hidden), nn.Linear(hidden, d_model)

    def forward(self, h):
        return h + self.down(F.gelu(self.up(h)))


def residual_mlp(d_model: int = 128, hidden: int = 256, blocks: int = 1, seed: int = 0) -> nn.Module:
    """A "pretrained" stack of residual MLP blocks (nn.Linear's default init, seeded)."""
    torch.manual_seed(seed)
    return nn.Sequential(*[_Block(d_model, hidden) for _ in range(blocks)])


def llm_like_inputs(tokens: int, d_model: int, channel_sigma: float, generator: torch.Generator,
                    channel_scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian tokens with per-channel scales ``exp(channel_sigma * N(0, 1))`` (drawn unless given)."""
    if channel_scales is None:
        channel_scales = torch.exp(channel_sigma * torch.randn(d_model, generator=generator))
    return torch.randn(tokens, d_model, generator=generator) * channel_scales, channel_scales


def _plant(teacher: nn.Module, planted_rank, lowrank_rms, planted_entries, sparse_magnitude, generator):
    """Adds L* + S* to every nn.Linear of ``teacher``; returns ``{name: S* support (bool)}``."""
    supports = {}
    for name, linear in teacher.named_modules():
        if not isinstance(linear, nn.Linear):
            continue
        m, n = linear.weight.shape
        U = torch.randn(m, planted_rank, generator=generator)  # drawn on the CPU: the same update on any device
        V = torch.randn(planted_rank, n, generator=generator)
        L = U @ V
        L *= lowrank_rms / L.pow(2).mean().sqrt()
        support = torch.zeros(m * n, dtype=torch.bool)
        support[torch.randperm(m * n, generator=generator)[:planted_entries]] = True
        signs = torch.randint(0, 2, (planted_entries,), generator=generator) * 2 - 1
        magnitudes = sparse_magnitude * (0.5 + torch.rand(planted_entries, generator=generator))
        S = torch.zeros(m * n)
        S[support] = signs * magnitudes
        with torch.no_grad():
            linear.weight += (L + S.view(m, n)).to(linear.weight)
        supports[name] = support.view(m, n)
    return supports


def _recall(model, supports) -> tuple[float, float]:
    """(share of S*'s entries inside the masks, density of the masks), over all layers."""
    found = total = nnz = size = 0
    for name, layer in model.rosa_layers().items():
        mask = torch.zeros(layer.out_features * layer.in_features, dtype=torch.bool)
        mask[layer.flat_indices.cpu()] = True
        found += int((mask.view(layer.out_features, layer.in_features) & supports[name]).sum())
        total += int(supports[name].sum())
        nnz, size = nnz + layer.nnz, size + layer.out_features * layer.in_features
    return found / total, nnz / size


def _train_arm(arm, base, teacher, supports, train_x, test_x, *, lora_rank, steps, warmup_steps, batch, lrs,
               seed) -> dict:
    linears = [m for m in base.modules() if isinstance(m, nn.Linear)]
    budget = sum(lora_rank * (m.in_features + m.out_features) for m in linears)
    size = sum(m.in_features * m.out_features for m in linears)
    if arm == "lora":
        rank, density = lora_rank, 1e-12  # no mask is ever selected: LoRA alone
    elif arm == "spa":
        rank, density = 0, budget / size
    else:
        rank = lora_rank // 2
        density = (budget - sum(rank * (m.in_features + m.out_features) for m in linears)) / size
    total_steps = warmup_steps + 1 + steps
    config = RosaConfig(rank=rank, alpha=float(max(rank, 1)), dropout=0.0, density=density, target_modules="all-linear",
                        warmup_steps=total_steps + 1 if arm == "lora" else warmup_steps, collect_steps=1,
                        reset_adapters_after_mask=True)
    torch.manual_seed(seed)
    student = get_rosa_model(copy.deepcopy(base), config)
    lora_lr, sparse_lr = lrs[arm]
    optimizer = torch.optim.Adam(student.parameter_groups(lora_lr=lora_lr, sparse_lr=sparse_lr))
    selector = functools.partial(random_masks, seed=seed) if arm == "rosa_random" else None
    scheduler = student.scheduler(optimizer=optimizer, select_masks=selector, show_progress=False)
    with torch.no_grad():
        train_y, test_y = teacher(train_x), teacher(test_x)
        untrained = F.mse_loss(student(test_x), test_y).item()
    generator = torch.Generator().manual_seed(seed + 1)
    for _ in range(total_steps):
        index = torch.randint(0, train_x.shape[0], (batch,), generator=generator).to(train_x.device)
        loss = F.mse_loss(student(train_x[index]), train_y[index])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    with torch.no_grad():
        final = F.mse_loss(student(test_x), test_y).item()
    trainable = sum(layer.rank * (layer.in_features + layer.out_features) + (layer.nnz if arm != "lora" else 0)
                    for layer in student.rosa_layers().values())
    result = {"loss": final / untrained, "trainable": trainable}
    if arm != "lora":
        result["recall"], result["density"] = _recall(student, supports)
    return result


def planted_update_experiment(*, seeds=(0, 1, 2), arms=ARMS, base_model: nn.Module | None = None,
                              inputs: torch.Tensor | None = None, d_model: int = 128, hidden: int = 256,
                              blocks: int = 1, channel_sigma: float = 0.75, tokens: int = 2048, lora_rank: int = 4,
                              planted_rank: int = 2, lowrank_rms: float = 0.01, planted_entries: int = 200,
                              sparse_magnitude: float = 0.1, steps: int = 200, warmup_steps: int = 32,
                              batch: int = 256, lrs: dict | None = None, device=None) -> dict:
    """Runs every arm on every seed; returns ``{arm: {"loss": [...], "recall": [...], "density": [...],
    "trainable": int}}`` (one entry per seed; ``recall``/``density`` for the mask arms only).

    ``loss`` is the held-out distillation MSE relative to the untrained student's. Each seed draws
    its own base model (unless ``base_model``), inputs (unless ``inputs``: then split in halves for
    training and evaluation) and planted update. ``lrs[arm] = (lora_lr, sparse_lr)`` for Adam.
    Everything runs on ``device`` (default: the CPU, or ``base_model``'s device).
    """
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise ValueError(f"arms must be among {ARMS}, got {unknown}")
    if lora_rank < 2 or lora_rank % 2:
        raise ValueError(f"lora_rank must be even and >= 2 (RoSA takes half of it), got {lora_rank}")
    lrs = {**DEFAULT_LRS, **(lrs or {})}
    results = {arm: {"loss": [], "recall": [], "density": []} for arm in arms}
    for seed in seeds:
        generator = torch.Generator().manual_seed(1000 + seed)
        base = base_model if base_model is not None else residual_mlp(d_model, hidden, blocks, seed)
        base = base.to(device) if device is not None else base
        if inputs is not None:
            half = inputs.shape[0] // 2
            train_x, test_x = inputs[:half], inputs[half:]
        else:
            train_x, scales = llm_like_inputs(tokens, d_model, channel_sigma, generator)
            test_x, _ = llm_like_inputs(tokens // 2, d_model, channel_sigma, generator, scales)
        target_device = next(base.parameters()).device
        train_x, test_x = train_x.to(target_device), test_x.to(target_device)
        teacher = copy.deepcopy(base)
        supports = _plant(teacher, planted_rank, lowrank_rms, planted_entries, sparse_magnitude, generator)
        for arm in arms:
            r = _train_arm(arm, base, teacher, supports, train_x, test_x, lora_rank=lora_rank, steps=steps,
                           warmup_steps=warmup_steps, batch=batch, lrs=lrs, seed=seed)
            results[arm]["trainable"] = r["trainable"]
            results[arm]["loss"].append(r["loss"])
            if "recall" in r:
                results[arm]["recall"].append(r["recall"])
                results[arm]["density"].append(r["density"])
    return results


def summarize(results: dict) -> str:
    """A Markdown table: loss and recall as mean ± sd over the seeds, density, trainable parameters."""
    def fmt(values):
        if not values:
            return "-"
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.4f} ± {sd:.4f}"

    lines = ["| arm | trainable | distillation loss (rel.) | S* recall | density |", "|---|---|---|---|---|"]
    for arm, r in results.items():
        lines.append(f"| {arm} | {r['trainable']} | {fmt(r['loss'])} | {fmt(r['recall'])} | {fmt(r['density'])} |")
    return "\n".join(lines)
