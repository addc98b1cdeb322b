"""Host cost per layer: the CPU time to issue one training step of one layer, and of the
post-optimizer-step re-scatter of merged RosaLinear layers (issue 11, item 2), and of the public ops.

    python bench/report.py --host-overhead [--device cpu|cuda] [--shape 64,16] [--layers 154]
        [--skip-ops] [--show-ops] [--compare-linear FILE] [--budget S] [--json FILE]
        [--select-layers 56] [--select-shape 512,1376,0.006]
    (or python -m bench.host_overhead ...)

**Method.** A layer step is ``x.grad = None``, the parameters' ``.grad = None`` and
``layer(x).backward(dy)``, at a shape where compute is negligible (default 64 x 64, 16 tokens,
float32 on the CPU, one thread; at 256 x 256 a 16-token GEMM already costs a visible part of a
CPU step), so the time measured is the host's: Python, the autograd engine,
the dispatcher, op checks and allocation. On the CPU the clock is the thread's CPU time (the
autograd engine runs CPU work on the calling thread), so the other processes on a shared machine
do not count; on a GPU it is wall time over batches of back-to-back steps with one synchronization
per batch: the time to enqueue. Implementations are timed in interleaved rounds (each round one
batch of each), each reported as the median over rounds of the per-step time, and as a ratio to
``nn.Linear`` with a trainable weight (full fine-tuning, the target: RosaLinear <= 1.5x), next to
a plain-PyTorch LoRA layer (``bench.common.LoraLinear``, PEFT's layer). RosaLinear runs in the
sparse phase, merged mode (the common case) with and without dropout and with each ``sparse_grad``,
and in the LoRA-only warm-up phase (no mask); ``csr_add`` and ``spmm`` for reference. The ops a
step dispatches below autograd are counted with a ``TorchDispatchMode`` (views apart), on a GPU
also the CUDA kernels it launches (torch.profiler).

The re-scatter is the optimizer post-step hook of :mod:`rosa_kernels.linear` over ``--layers``
merged layers (154: TinyLlama's 22 x 7 linears) whose sparse values all changed, the in-place
changes made outside the timed region (median of single calls); "unchanged" is the same hook when
no value changed (an optimizer step over other parameters).

``--compare-linear FILE`` also times the RosaLinear of another ``linear.py`` (e.g. an older
commit's: ``git show REV:python/rosa_kernels/linear.py > /tmp/linear_old.py``) in the same process
on the same build, for before/after numbers that share the machine's state.

``--select-layers N`` (0: skip) times mask selection, ``rosa_kernels.select_masks`` after one
collection backward (``collect_buffer="auto"``: the exact top-k is kept), over N layers of
``--select-shape`` (``M,N[,DENSITY]``; default 512,1376,0.006: a LLaMA-shaped MLP projection at a
modest size) in merged mode: the wall time per layer (median over rounds, each on a freshly
collected model) and the ops one layer's selection issues, counted below autograd by a
``TorchDispatchMode`` (views apart) and as torch.profiler's ``aten::`` events (nested ones included).
``--select-as-gpu`` lets the plans decide their hot columns by the GPU's cost model on the CPU too
(``rosa_kernels.plan._MODELLED_DEVICE_TYPES``), so the ops counted are the ones a GPU's selection issues.

Unless ``--skip-ops``: the public raw ops' host cost (64 x 64, 5% density, 16 columns): the Python
wrapper with ``validate=False`` / ``True``, the raw ``torch.ops.rosa_kernels`` call, and the raw
call below the autograd key, next to ``torch.mm`` of the same size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rosa_kernels  # noqa: E402
from rosa_kernels.model import select_masks  # noqa: E402
from bench.common import LoraLinear  # noqa: E402

_ops = torch.ops.rosa_kernels


def _clock(device: torch.device):
    return time.perf_counter if device.type == "cuda" else time.thread_time


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def batch_size(fn, device: torch.device, target_s: float = 0.002) -> int:
    """Calls per timed batch: enough to keep the timer's resolution out of the sample."""
    clock = _clock(device)
    for _ in range(10):
        fn()
    _sync(device)
    start = clock()
    for _ in range(10):
        fn()
    _sync(device)
    per_call = max((clock() - start) / 10, 1e-7)
    return max(10 if device.type == "cuda" else 1, int(target_s / per_call))


def time_batch(fn, device: torch.device, batch: int) -> float:
    """Seconds per call over one batch of back-to-back calls."""
    clock = _clock(device)
    _sync(device)
    begin = clock()
    for _ in range(batch):
        fn()
    _sync(device)
    return (clock() - begin) / batch


def interleaved_medians(fns: dict, device: torch.device, rounds: int) -> dict:
    """Median microseconds per call of each callable, timed in interleaved rounds."""
    batches = {name: batch_size(fn, device) for name, fn in fns.items()}
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(time_batch(fn, device, batches[name]))
    return {name: statistics.median(s) * 1e6 for name, s in samples.items()}


# ----------------------------------------------------------------------------------------------
# Layer steps
# ----------------------------------------------------------------------------------------------


class _CountOps(TorchDispatchMode):
    """The ops that reach a backend (below autograd), views and other metadata-only ops apart."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket.__name__ not in ("detach", "lift_fresh"):
            self.ops.append(f"{func.namespace}::{func.overloadpacket.__name__}")
        return func(*args, **(kwargs or {}))


def random_mask(m: int, n: int, nnz: int, seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    flat = torch.zeros(m * n, dtype=torch.bool)
    flat[torch.randperm(m * n, generator=gen)[:nnz]] = True
    return flat.view(m, n)


def load_linear_module(path):
    """Another version of linear.py, loaded into this build's package (its relative imports)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("rosa_kernels._linear_compared", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rosa_layer(size, device, dtype, *, mode="merged", dropout=0.05, sparse_grad="auto", density=0.006,
               with_mask=True, rank=16, module=None):
    torch.manual_seed(0)
    cls = rosa_kernels.RosaLinear if module is None else module.RosaLinear
    layer = cls(size, size, bias=False, rank=rank, density=density, alpha=16.0,
                                    dropout=dropout, sparse_mode=mode, sparse_grad=sparse_grad)
    if with_mask:
        layer.set_mask(random_mask(size, size, layer.nnz))
    with torch.no_grad():
        layer.sparse_values.normal_()
        layer.lora_B.normal_()
    layer.refresh_merged_weight()
    return layer.to(device=device, dtype=dtype).train()


FULL = "nn.Linear (full)"


def layers_of(size, device, dtype, density, compared=None) -> dict:
    layers = {FULL: torch.nn.Linear(size, size, bias=False, device=device, dtype=dtype),
              "LoRA (PEFT-style)": LoraLinear(size, size, rank=16, dropout=0.05, device=device, dtype=dtype)}
    for suffix, module in [("", None)] + ([(" (compared)", compared)] if compared is not None else []):
        common = {"density": density, "module": module}
        layers[f"RosaLinear merged{suffix}"] = rosa_layer(size, device, dtype, **common)  # dropout 0.05
        layers[f"RosaLinear merged, dropout 0{suffix}"] = rosa_layer(size, device, dtype, dropout=0.0, **common)
        for grad in ("sddmm", "dense"):
            layers[f"RosaLinear merged, sparse_grad={grad}{suffix}"] = rosa_layer(size, device, dtype,
                                                                                  sparse_grad=grad, **common)
        layers[f"RosaLinear warm-up (no mask){suffix}"] = rosa_layer(size, device, dtype, with_mask=False, **common)
    for mode in ("csr_add", "spmm"):
        layers[f"RosaLinear {mode}"] = rosa_layer(size, device, dtype, mode=mode, density=density)
    return {name: layer.train() for name, layer in layers.items()}


def step_of(layer, x, dy):
    parameters = [p for p in layer.parameters() if p.requires_grad]

    def step():
        x.grad = None
        for p in parameters:
            p.grad = None
        layer(x).backward(dy)

    return step


def cuda_kernels(step) -> int:
    """CUDA kernels one step launches (torch.profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events())


def layer_rows(device, size=64, tokens=16, rounds=41, compared=None, density=0.006) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(tokens, size, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    dy = torch.randn(tokens, size, generator=gen).to(device=device, dtype=dtype)
    steps = {name: step_of(layer, x, dy) for name, layer in layers_of(size, device, dtype, density, compared).items()}
    counts, kernels = {}, {}
    for name, step in steps.items():
        step()
        counter = _CountOps()
        with counter:
            step()
        counts[name] = counter.ops
        kernels[name] = cuda_kernels(step) if device.type == "cuda" else None
    times = interleaved_medians(steps, device, rounds)
    full = times[FULL]
    return {name: {"us": us, "x full": us / full, "ops": len(counts[name]), "op names": counts[name],
                   "CUDA kernels": kernels[name]} for name, us in times.items()}


# ----------------------------------------------------------------------------------------------
# The post-optimizer-step re-scatter
# ----------------------------------------------------------------------------------------------


def scatter_rows(device, layers=154, size=64, reps=201, module=None) -> dict:
    from rosa_kernels import linear

    linear = module or linear
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = [rosa_layer(size, device, dtype, dropout=0.0, module=module) for _ in range(layers)]
    values = [layer.sparse_values for layer in model]
    clock = _clock(device)

    def hook():
        linear._after_optimizer_step(None, (), {})

    def timed(change: bool) -> float:
        samples = []
        for _ in range(reps):
            if change:
                with torch.no_grad():
                    torch._foreach_add_(values, 1e-3)  # one in-place change per layer, as a step makes
            _sync(device)
            begin = clock()
            hook()
            _sync(device)
            samples.append(clock() - begin)
        return statistics.median(samples) * 1e6

    hook()
    result = {"changed": timed(True), "unchanged": timed(False)}
    for layer in model:  # exact: W_eff[mask] = base + S after the last hook
        assert torch.equal(layer.weight.view(-1)[layer.flat_indices],
                           (layer.base_values.float() + layer.sparse_values.detach().float()).to(dtype))
    return {name: {"us": us, "us per layer": us / layers} for name, us in result.items()}


# ----------------------------------------------------------------------------------------------
# Mask selection
# ----------------------------------------------------------------------------------------------


def collected_layers(layers: int, m: int, n: int, device, dtype, density: float,
                     tokens: int = 8) -> torch.nn.ModuleList:
    """``layers`` merged RosaLinear layers (m x n) after one collection backward: ready to select.
    The inputs have RoSA's outlier channels (DESIGN.md's ``rosa`` recipe), so the masks crowd into
    a few columns."""
    torch.manual_seed(0)
    model = torch.nn.ModuleList(rosa_kernels.RosaLinear(n, m, bias=False, rank=4, density=density, dropout=0.0,
                                                        device=device, dtype=dtype) for _ in range(layers))
    for layer in model:
        layer.start_collection(collect_buffer="auto")
    x = torch.randn(tokens, n) * torch.exp(2.5 * torch.randn(n))
    x = x.to(device=device, dtype=dtype)
    sum(layer(x).square().sum() for layer in model).backward()
    return model


def selection_rows(device, layers=56, m=512, n=1376, density=0.006, rounds=5) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    counter = _CountOps()
    model = collected_layers(1, m, n, device, dtype, density)
    with counter:
        select_masks(model)
    model = collected_layers(1, m, n, device, dtype, density)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        select_masks(model)
    aten_events = sum(e.name.startswith("aten::") for e in prof.events())
    samples = []
    for _ in range(rounds):
        model = collected_layers(layers, m, n, device, dtype, density)
        _sync(device)
        begin = time.perf_counter()
        select_masks(model)
        _sync(device)
        samples.append(time.perf_counter() - begin)
        assert all(layer.phase == "sparse" for layer in model)
    ms = statistics.median(samples) * 1e3
    return {"layers": layers, "shape": [m, n], "density": density, "ms": ms, "ms per layer": ms / layers,
            "ops per layer": len(counter.ops), "aten events per layer": aten_events, "op names": counter.ops}


# ----------------------------------------------------------------------------------------------
# The raw ops
# ----------------------------------------------------------------------------------------------


def op_rows(device, size=64, tokens=16, density=0.05, rounds=21) -> dict:
    m = n = size
    gen = torch.Generator().manual_seed(0)
    mask = random_mask(m, n, round(density * m * n), seed=0)
    csr = rosa_kernels.csr_from_mask(mask, torch.randn(m, n, generator=gen)).to(device)
    values, offsets, order, cols = csr.values, csr.row_offsets, csr.row_indices, csr.col_indices
    dense = torch.randn(n, tokens, generator=gen).to(device)
    a = torch.randn(m, tokens, generator=gen).to(device)
    bt = torch.randn(n, tokens, generator=gen).to(device)
    weight = torch.randn(m, n, generator=gen).to(device)
    calls = {
        "csr_transpose": (lambda v: rosa_kernels.csr_transpose(values, offsets, cols, m, n, validate=v),
                          lambda: _ops.csr_transpose(values, offsets, cols, m, n)),
        "sddmm": (lambda v: rosa_kernels.sddmm(offsets, order, cols, a, bt, validate=v),
                  lambda: _ops.sddmm(offsets, order, cols, a, bt)),
        "spmm": (lambda v: rosa_kernels.spmm(values, offsets, order, cols, dense, m, validate=v),
                 lambda: _ops.spmm(values, offsets, order, cols, dense, m)),
        "csr_add": (lambda v: rosa_kernels.csr_add(values, offsets, order, cols, weight, validate=v),
                    lambda: _ops.csr_add(values, offsets, order, cols, weight)),
    }
    rows = {}
    for name, (public, raw) in calls.items():
        def below(raw=raw):
            with torch._C._AutoDispatchBelowAutograd():
                raw()

        rows[name] = interleaved_medians({"validate=False": lambda: public(False), "validate=True": lambda: public(True),
                                          "raw op": raw, "raw, below autograd": below}, device, rounds)
    rows["torch.mm"] = interleaved_medians({"raw op": lambda: torch.mm(a, bt.t())}, device, rounds)
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shape", default="64,16", help="SIZE,TOKENS[,DENSITY] of the layer step (default "
                                                             "64,16,0.006)")
    parser.add_argument("--rounds", type=int, default=41, help="interleaved rounds per layer step")
    parser.add_argument("--budget", type=float, help="seconds of timed steps per layer (sets --rounds)")
    parser.add_argument("--layers", type=int, default=154, help="merged layers re-scattered (0: skip)")
    parser.add_argument("--skip-ops", action="store_true", help="do not time the public raw ops")
    parser.add_argument("--show-ops", action="store_true", help="list the ops each layer step dispatches")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--compare-linear", help="also time the RosaLinear of this linear.py (e.g. an older commit's)")
    parser.add_argument("--select-layers", type=int, default=56, help="layers whose mask selection is timed (0: skip)")
    parser.add_argument("--select-shape", default="512,1376,0.006", help="M,N[,DENSITY] of those layers")
    parser.add_argument("--select-as-gpu", action="store_true",
                        help="plans decide their hot columns as on a GPU (the GPU's ops, counted on the CPU)")
    args = parser.parse_args(argv)
    compared = load_linear_module(args.compare_linear) if args.compare_linear else None
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    size, tokens, *density = args.shape.split(",")
    size, tokens, density = int(size), int(tokens), float(density[0]) if density else 0.006
    rounds = args.rounds if args.budget is None else max(3, int(args.budget / 0.002))
    out = {"torch": torch.__version__, "device": str(device), "threads": args.threads}

    out["layers"] = layer_rows(device, size, tokens, rounds, compared, density)
    print(f"## layer step (forward + backward), {size}x{size}, {tokens} tokens, {device}, {args.threads} thread: "
          "median host us per step")
    kernel_column = device.type == "cuda"
    print("| layer | us | x nn.Linear | ops |" + (" CUDA kernels |" if kernel_column else ""))
    print("|---|---|---|---|" + ("---|" if kernel_column else ""))
    for name, row in out["layers"].items():
        print(f"| {name} | {row['us']:.1f} | {row['x full']:.2f} | {row['ops']} |"
              + (f" {row['CUDA kernels']} |" if kernel_column else ""))
    if args.show_ops:
        for name, row in out["layers"].items():
            print(f"{name}: {' '.join(row['op names'])}")
    if args.layers:
        out["scatter"] = scatter_rows(device, args.layers, size)
        if compared is not None:
            out["scatter"].update({f"{name} (compared)": row for name, row in
                                   scatter_rows(device, args.layers, size, module=compared).items()})
        print(f"\n## optimizer post-step hook over {args.layers} merged {size}x{size} layers: median us per call")
        print("| sparse values | us | us per layer |")
        print("|---|---|---|")
        for name, row in out["scatter"].items():
            print(f"| {name} | {row['us']:.1f} | {row['us per layer']:.2f} |")
    if args.select_layers:
        modelled = rosa_kernels.plan._MODELLED_DEVICE_TYPES
        if args.select_as_gpu:
            rosa_kernels.plan._MODELLED_DEVICE_TYPES = ("cuda", "cpu")
        m, n, *select_density = args.select_shape.split(",")
        try:
            row = out["selection"] = selection_rows(device, args.select_layers, int(m), int(n),
                                                    float(select_density[0]) if select_density else 0.006)
        finally:  # the tool also runs inside other processes (bench/report.py, the tests)
            rosa_kernels.plan._MODELLED_DEVICE_TYPES = modelled
        print(f"\n## mask selection (select_masks) of {row['layers']} merged {m}x{n} layers, density {row['density']}")
        print("| ms | ms per layer | ops per layer (below autograd) | aten:: profiler events per layer |")
        print("|---|---|---|---|")
        print(f"| {row['ms']:.1f} | {row['ms per layer']:.3f} | {row['ops per layer']} | "
              f"{row['aten events per layer']} |")
        if args.show_ops:
            print(f"selection of one layer: {' '.join(row['op names'])}")
    if not args.skip_ops:
        out["ops"] = op_rows(device)
        print("\n## public ops, 64 x 64, density 5%, 16 columns: median us per call")
        print("| op | validate=False | validate=True | raw op | raw, below autograd |")
        print("|---|---|---|---|---|")
        for name, row in out["ops"].items():
            cells = [f"{row[k]:.1f}" if k in row else "" for k in
                     ("validate=False", "validate=True", "raw op", "raw, below autograd")]
            print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
