"""Where RoSA's collection step spends its time (issue: collection <= 3x a sparse step).

    python bench/report.py --profile-collect [--shape 7b-slice] [--device cuda] [--top 25]

Builds the model benchmark's HF Llama model (``bench/model_step.py``; ``--shape tiny`` on CPU),
wraps it with RoSA (1 warm-up step, 1 collection step) and times, on one model after another in
the same process (the first pays the one-time costs: CUDA module loads, cuBLAS heuristics for new
GEMM shapes, allocator growth; the second shows what a run pays once those are warm):

- the warm-up step that ends with ``start_collection``;
- the collection step, split into forward + backward (where each layer computes ``dW``, encodes
  it and keeps its top-k), the optimizer step, and ``scheduler.step()`` (mask selection: CSR build,
  plans, merge);
- a sparse step, the unit the target is counted in.

With ``--top N`` it prints torch.profiler's N most expensive ops of the second model's collection
step (by self CUDA time on a GPU, by self CPU time otherwise) and how many host synchronizations
it made. ``--topk`` also times ``torch.topk`` alone on the model's weight shapes (and a few building blocks
of other top-k methods).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import model_step  # noqa: E402
from rosa_kernels.masks import mask_count  # noqa: E402


class Clock:
    """Wall time of sections of one step, the device synchronized at each boundary."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, {}

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def section(self, name, fn):
        self.sync()
        start = time.perf_counter()
        result = fn()
        self.sync()
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start
        return result


def split_step(trainer: model_step.Trainer, clock: Clock) -> dict:
    """One training step of ``trainer`` in three timed sections; returns the sections' seconds."""
    clock.times = {}

    def forward_backward():
        loss = trainer.model(input_ids=trainer.input_ids, labels=trainer.input_ids).loss
        loss.backward()

    def optimizer():
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    clock.section("forward+backward", forward_backward)
    clock.section("optimizer", optimizer)
    clock.section("scheduler.step", trainer.scheduler.step)
    times = dict(clock.times)
    times["step"] = sum(times.values())
    return times


def life_cycle(case: model_step.ModelCase, clock: Clock, sparse_steps: int = 3, profile_top: int = 0) -> dict:
    model, scheduler = model_step.wrap(model_step.build_model(case), "rosa", warmup_steps=1, collect_steps=1)
    trainer = model_step.Trainer(model, case, scheduler)
    result = {"warm-up step (ends with start_collection)": split_step(trainer, clock)["step"]}
    if profile_top:
        result["collection"] = profiled(lambda: split_step(trainer, clock), clock.device, profile_top)
    else:
        result["collection"] = split_step(trainer, clock)
    assert scheduler.phase == "sparse", scheduler.phase
    result["sparse step"] = statistics.median(split_step(trainer, clock)["step"] for _ in range(sparse_steps))
    del trainer, model, scheduler
    gc.collect()
    if clock.device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _labelled(owner, name: str, label: str):
    """Wraps ``owner.name`` so that each call is a torch.profiler range ``label`` (bench only)."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        with torch.profiler.record_function(label):
            return original(*args, **kwargs)

    setattr(owner, name, wrapper)
    return owner, name, original


def _label_stages():
    """Profiler ranges around the stages of the collection and of mask selection; returns an undo list."""
    from rosa_kernels import linear, masks, plan

    targets = [(masks.GradientCollector, "add", "collect: GradientCollector.add (dW, encode, top-k)"),
               (masks, "weight_gradient", "collect: weight_gradient (dW GEMM)"),
               (masks, "_top_k_indices", "collect: top-k"),
               (linear, "select_masks_of", "select: select_masks_of (all)"),
               (linear.RosaLinear, "_select_structure", "select: RosaLinear._select_structure (top-k to merge)"),
               (masks, "mask_structure", "select: mask_structure (CSR, transpose, flat positions)"),
               (masks, "broadcast_indices", "select: broadcast_indices"),
               (linear.RosaLinear, "_merge", "select: _merge"),
               (plan, "host_copies", "select: host copies of the column counts"),
               (plan, "sddmm_parts_of", "select: the plans (host decision, mask_plan)"),
               (plan, "hot_column_choice", "select: the plans' host decision")]
    return [_labelled(*target) for target in targets if hasattr(target[0], target[1])]


def profiled(fn, device: torch.device, top: int):
    undo = _label_stages()
    try:
        return _profiled(fn, device, top)
    finally:
        for owner, name, original in undo:
            setattr(owner, name, original)


def _profiled(fn, device: torch.device, top: int):
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        result = fn()
    averages = prof.key_averages()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(averages.table(sort_by=key, row_limit=top))
    print(averages.table(sort_by="cpu_time_total", row_limit=top))
    stages = sorted((e for e in averages if e.key.startswith(("collect:", "select:"))), key=lambda e: -e.cpu_time_total)
    for e in stages:
        print(f"stage {e.key:60s} calls {e.count:5d}  host total {e.cpu_time_total / 1e3:9.2f} ms  "
              f"device total {e.device_time_total / 1e3:9.2f} ms")
    syncs = sum(e.count for e in averages if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                       "aten::_local_scalar_dense", "cudaMemcpyAsync"))
    print(f"host synchronizations (or device->host copies) in the profiled step: {syncs}")
    return result


def time_topk(case: model_step.ModelCase, device: torch.device, density: float, reps: int = 5) -> None:
    shape = case.model_shape
    for m, n in sorted({(shape.hidden, shape.hidden), (shape.intermediate, shape.hidden),
                        (shape.hidden, shape.intermediate)}):
        flat = torch.randn(m * n, device=device).abs_()
        k = mask_count(m, n, density)
        bits = flat.view(torch.int32)
        calls = {"torch.topk sorted=False": lambda: torch.topk(flat, k, sorted=False),
                 "torch.topk sorted=True": lambda: torch.topk(flat, k, sorted=True),
                 "torch.sort": lambda: torch.sort(flat),
                 "torch.histc 2048 bins": lambda: torch.histc(flat, bins=2048, min=0.0, max=8.0),
                 "torch.bincount(bits >> 20)": lambda: torch.bincount(bits >> 20, minlength=2048),
                 "nonzero_static(flat > t)": lambda: torch.nonzero_static(flat > 3.0, size=k),
                 "abs_ (one elementwise pass)": lambda: flat.abs_()}
        for name, call in calls.items():
            times = []
            for _ in range(reps):
                clock = Clock(device)
                clock.section(name, call)
                times.append(clock.times[name])
            print(f"{name} {m}x{n} k={k}: median {statistics.median(times) * 1e3:.3f} ms")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default=None, choices=sorted(model_step.SHAPES),
                        help="default: 7b-slice on cuda, tiny on cpu")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step")
    parser.add_argument("--models", type=int, default=2, help="life cycles in a row (the first is cold)")
    parser.add_argument("--top", type=int, default=0, help="profile the last model's collection step")
    parser.add_argument("--topk", action="store_true", help="also time torch.topk on the weight shapes")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shape = args.shape or ("7b-slice" if device.type == "cuda" else "tiny")
    seq = model_step.GPU_SEQ if device.type == "cuda" else model_step.CPU_SEQ
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    case = model_step.ModelCase(shape, args.batch, seq, dtype, args.device)
    print(f"{model_step.SHAPES[shape].name}, {case.tokens} tokens, {dtype}, on "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    clock = Clock(device)
    results = []
    for index in range(args.models):
        top = args.top if index == args.models - 1 else 0
        result = life_cycle(case, clock, profile_top=top)
        results.append(result)
        collection = result["collection"]
        sparse = result["sparse step"]
        parts = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in collection.items() if k != "step")
        print(f"model {index + 1}: warm-up-end {result['warm-up step (ends with start_collection)'] * 1e3:.1f} ms | "
              f"collection {collection['step'] * 1e3:.1f} ms ({parts}) | sparse step {sparse * 1e3:.1f} ms | "
              f"collection / sparse {collection['step'] / sparse:.2f}x")
    if args.topk:
        time_topk(case, device, model_step.DENSITY)
    return {"case": dataclasses.asdict(case), "results": results}


if __name__ == "__main__":
    main()
