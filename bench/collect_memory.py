"""Peak memory and time of RoSA's mask collection for each ``collect_buffer``, against a LoRA step.

    python bench/collect_memory.py                     # on a GPU: LLaMA-7B slice (4096/11008, 8 layers)
    python bench/collect_memory.py --model stack       # RosaLinear layers only (no transformers needed)
    python bench/collect_memory.py --tiny --device cpu # a smoke run

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

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
    args = parser.parse_args(argv)
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
            rows.append((f"collection {buffer!r}, {k} micro ({sum(held) / adapted:.2f} B/weight held)",
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
