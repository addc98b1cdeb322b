"""Host-side cost of the public ops and of one RosaLinear training step (issue 6).

Usage: python bench/report.py --host-overhead [--device cpu|cuda] [--threads 1] [--json FILE]
   (or python -m bench.host_overhead ...)

On the CPU with tiny inputs (64 x 64, 16 tokens) the kernels take ~1 us, so the median wall time
per call is the host-side cost: Python argument checks, the dispatcher, the autograd kernel, the
op's own checks. On a GPU a call costs at least that much CPU time plus a launch per kernel, so the
number of dispatched ops per step matters as much as their host time.

Prints, per line, the median microseconds per call of
- each public op with validate=False / True, the raw ``torch.ops.rosa_kernels`` call, the raw call
  below the autograd key (no Python autograd kernel), and ``torch.mm`` of the same size;
- one forward + backward step (``bench/common.py``'s step: zero the grads, ``model(x).backward(g)``)
  of RosaLinear in each sparse mode, the plain-PyTorch ``LoraLinear`` of bench/common.py and
  ``nn.Linear`` (full fine-tuning), with the number of ops each step dispatches to a backend
  (counted with a TorchDispatchMode below autograd, views and other metadata-only ops separately)
  and the number of top-level ops torch.profiler records.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import rosa_kernels  # noqa: E402
from bench.common import LoraLinear  # noqa: E402

_ops = torch.ops.rosa_kernels


def median_us(fn, device, *, reps=2000, budget=1.5, warmup=20):
    """Median microseconds per call over batches of calls (batching keeps the timer out of it).

    On the CPU the clock is this thread's CPU time, so other processes sharing the cores do not
    count; on a GPU it is wall time up to a synchronization after each batch.
    """
    clock = time.perf_counter if device.type == "cuda" else time.thread_time
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = clock()
    for _ in range(10):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    per_call = max((clock() - start) / 10, 1e-7)
    # On a GPU one synchronization per 10+ calls, so the host can run ahead as in training.
    batch = max(10 if device.type == "cuda" else 1, int(0.002 / per_call))
    batches = max(5, min(reps // batch, int(budget / (per_call * batch))))
    samples = []
    for _ in range(batches):
        begin = clock()
        for _ in range(batch):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append((clock() - begin) / batch)
    return statistics.median(samples) * 1e6


def random_structure(m, n, density, device, seed=0):
    """A uniformly random CSR with exactly round(density * m * n) nonzeros (RosaLinear's count)."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(m * n, dtype=torch.bool)
    mask[torch.randperm(m * n, generator=gen)[:round(density * m * n)]] = True
    csr = rosa_kernels.csr_from_mask(mask.view(m, n), torch.randn(m, n, generator=gen))
    return csr.to(device)


def op_lines(device, size=64, tokens=16, density=0.05, budget=1.5):
    m = n = size
    csr = random_structure(m, n, density, device)
    values, offsets, order, cols = csr.values, csr.row_offsets, csr.row_indices, csr.col_indices
    gen = torch.Generator().manual_seed(1)
    dense = torch.randn(n, tokens, generator=gen).to(device)
    a = torch.randn(m, tokens, generator=gen).to(device)
    bt = torch.randn(n, tokens, generator=gen).to(device)
    weight = torch.randn(m, n, generator=gen).to(device)
    below = torch._C._AutoDispatchBelowAutograd
    calls = {
        "csr_transpose": (
            lambda v: rosa_kernels.csr_transpose(values, offsets, cols, m, n, validate=v),
            lambda: _ops.csr_transpose(values, offsets, cols, m, n),
        ),
        "sddmm": (
            lambda v: rosa_kernels.sddmm(offsets, order, cols, a, bt, validate=v),
            lambda: _ops.sddmm(offsets, order, cols, a, bt),
        ),
        "spmm": (
            lambda v: rosa_kernels.spmm(values, offsets, order, cols, dense, m, validate=v),
            lambda: _ops.spmm(values, offsets, order, cols, dense, m),
        ),
        "csr_add": (
            lambda v: rosa_kernels.csr_add(values, offsets, order, cols, weight, validate=v),
            lambda: _ops.csr_add(values, offsets, order, cols, weight),
        ),
    }
    results = {}
    for name, (public, raw) in calls.items():
        row = {
            "validate=False": median_us(lambda: public(False), device, budget=budget),
            "validate=True": median_us(lambda: public(True), device, budget=budget),
            "raw op": median_us(raw, device, budget=budget),
        }

        def raw_below_autograd():
            with below():
                raw()

        row["raw, below autograd"] = median_us(raw_below_autograd, device, budget=budget)
        results[name] = row
    results["torch.mm"] = {"raw op": median_us(lambda: torch.mm(a, bt.t()), device, budget=budget)}
    return results


class _CountOps(TorchDispatchMode):
    """Counts the ops that reach a backend (below autograd): compute ops and metadata-only ones."""

    METADATA = {"view", "_unsafe_view", "t", "transpose", "reshape", "expand", "alias", "detach", "as_strided",
                "permute", "squeeze", "unsqueeze", "select", "slice", "lift_fresh", "_reshape_alias"}

    def __init__(self):
        super().__init__()
        self.compute, self.metadata = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        (self.metadata if name in self.METADATA else self.compute).append(f"{func.namespace}::{name}")
        return func(*args, **(kwargs or {}))


def load_linear_module(path):
    """Another version of linear.py (an older commit's), loaded into this build's package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("rosa_kernels._linear_compared", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_layers(size, tokens, density, device, dtype, compare_linear=None):
    torch.manual_seed(0)
    layers = {}
    classes = [("", rosa_kernels.RosaLinear)]
    if compare_linear is not None:
        classes.append((" (compared)", compare_linear.RosaLinear))
    for suffix, cls in classes:
        for mode in ("merged", "csr_add", "spmm"):
            layer = cls(size, size, bias=False, rank=16, density=density, alpha=16.0, dropout=0.05,
                        sparse_mode=mode, device=device, dtype=dtype)
            layer.set_mask(random_structure(size, size, density, device, seed=2))
            with torch.no_grad():
                layer.sparse_values.normal_()
                layer.lora_B.normal_()
            layers[f"RosaLinear {mode}{suffix}"] = layer
    layers["LoraLinear"] = LoraLinear(size, size, rank=16, dropout=0.05, device=device, dtype=dtype)
    layers["nn.Linear (full)"] = torch.nn.Linear(size, size, bias=False, device=device, dtype=dtype)
    for layer in layers.values():
        layer.train()
    return layers


def step_of(layer, x, grad_y):
    parameters = [p for p in layer.parameters() if p.requires_grad]

    def step():
        x.grad = None
        for p in parameters:
            p.grad = None
        layer(x).backward(grad_y)

    return step


def layer_lines(device, size, tokens, density, dtype=torch.float32, compare_linear=None, budget=2.0):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(tokens, size, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    grad_y = torch.randn(tokens, size, generator=gen).to(device=device, dtype=dtype)
    results = {}
    for name, layer in make_layers(size, tokens, density, device, dtype, compare_linear).items():
        step = step_of(layer, x, grad_y)
        step()
        counter = _CountOps()
        with counter:
            step()
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        # Ops called from Python or from an autograd node, not from inside another op.
        is_op = lambda e: e is not None and e.name.startswith(("aten::", "rosa_kernels::"))  # noqa: E731
        top_level = [e for e in prof.events() if is_op(e) and not is_op(e.cpu_parent)]
        results[name] = {
            "us": median_us(step, device, reps=500, budget=budget),
            "compute ops": len(counter.compute),
            "metadata ops": len(counter.metadata),
            "profiler top-level ops": len(top_level),
            "CUDA kernels": len(kernels) if device.type == "cuda" else None,
            "kernel names": sorted({e.name[:60] for e in kernels}),
            "ops": counter.compute,
        }
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-ops", action="store_true")
    parser.add_argument("--budget", type=float, default=1.5, help="seconds per timed line (at most)")
    parser.add_argument("--shape", action="append", help="SIZE,TOKENS,DENSITY of a layer step (repeatable); "
                        "default 64,16,0.05 and 256,128,0.01, plus 4096,2048,0.003 and 4096,8192,0.003 on a GPU")
    parser.add_argument("--show-ops", action="store_true", help="list the compute ops of each step")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--compare-linear", help="also time the RosaLinear of this linear.py (e.g. an older commit's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = {"torch": torch.__version__, "device": str(device), "threads": args.threads}
    if not args.skip_ops:
        out["ops"] = op_lines(device, budget=args.budget)
        print(f"## public ops, 64 x 64, density 5%, 16 columns ({device}, {args.threads} thread): median us per call")
        print("| op | validate=False | validate=True | raw op | raw, below autograd |")
        print("|---|---|---|---|---|")
        for name, row in out["ops"].items():
            cells = [f"{row[k]:.1f}" if k in row else "" for k in
                     ("validate=False", "validate=True", "raw op", "raw, below autograd")]
            print(f"| {name} | " + " | ".join(cells) + " |")
    shapes = [(64, 16, 0.05), (256, 128, 0.01)]
    if device.type == "cuda":
        shapes += [(4096, 2048, 0.003), (4096, 8192, 0.003)]
    if args.shape:
        shapes = [(int(size), int(tokens), float(density)) for size, tokens, density in
                  (shape.split(",") for shape in args.shape)]
    compare_linear = load_linear_module(args.compare_linear) if args.compare_linear else None
    out["layers"] = {}
    for size, tokens, density in shapes:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        key = f"{size}x{size}, {tokens} tokens, d={density}, {str(dtype).split('.')[-1]}"
        rows = layer_lines(device, size, tokens, density, dtype, compare_linear, budget=args.budget)
        out["layers"][key] = rows
        print(f"\n## layer step (fwd + bwd), {key}: median us per step")
        print("| layer | us | compute ops | metadata ops | profiler top-level ops | CUDA kernels |")
        print("|---|---|---|---|---|---|")
        for name, row in rows.items():
            print(f"| {name} | {row['us']:.1f} | {row['compute ops']} | {row['metadata ops']} | "
                  f"{row['profiler top-level ops']} | {row['CUDA kernels'] if row['CUDA kernels'] is not None else ''} |")
        if args.show_ops:
            for name, row in rows.items():
                print(f"{name}: {' '.join(row['ops'])}")
                if row["kernel names"]:
                    print(f"  kernels: {' | '.join(row['kernel names'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
