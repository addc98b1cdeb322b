"""Where a model training step's GPU time goes, per method, by kernel class.

    python bench/report.py --profile-step [--shape tinyllama] [--batch 4] [--methods full,lora,rosa] [--top 12]

Builds the model benchmark's HF Llama model (``bench/model_step.py``; ``--shape tiny`` on CPU) once
per method, brings it to its steady state (RoSA: one warm-up step, one collection step, then sparse
steps) and profiles one step with torch.profiler. It prints, per method, the step's kernel time split
into classes (matrix products, attention, rosa_kernels' own kernels, the optimizer's, the rest:
elementwise, reductions, copies) and the ``--top`` most expensive kernels; then one line per class
with every method side by side, so the difference between two methods reads as which classes grow.
On a CPU it reports operators instead of kernels (self CPU time), which only checks the tool.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import re
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import model_step  # noqa: E402

# Kernel classes, tried in order on the kernel's (or, on a CPU, the operator's) name.
CLASSES = (
    ("rosa_kernels", re.compile(r"rosa|sddmm|spmm|csr_|lora_dropout|merged_scatter|dropout_keep", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|efficient_attention|sdpa", re.I)),
    ("matrix products", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|matmul|aten::mm|aten::addmm|aten::bmm|"
                                   r"aten::linear|sm\d+_.*_tn|sm\d+_.*_nt|sm\d+_.*_nn", re.I)),
    ("optimizer", re.compile(r"multi_tensor|adam|foreach", re.I)),
)
OTHER = "other (elementwise, reductions, copies)"


def kernel_class(name: str) -> str:
    for label, pattern in CLASSES:
        if pattern.search(name):
            return label
    return OTHER


def _kernel_times(prof, device: torch.device) -> dict[str, tuple[float, int]]:
    """{kernel (or operator) name: (self time in ms, calls)} of a finished profile."""
    times = {}
    for e in prof.key_averages():
        if device.type == "cuda":
            if e.device_type != torch.autograd.DeviceType.CUDA or e.self_device_time_total <= 0:
                continue
            ms = e.self_device_time_total / 1e3
        else:
            if not e.key.startswith(("aten::", "rosa_kernels::")) or e.self_cpu_time_total <= 0:
                continue
            ms = e.self_cpu_time_total / 1e3
        total, calls = times.get(e.key, (0.0, 0))
        times[e.key] = (total + ms, calls + e.count)
    return times


def profile_method(case: model_step.ModelCase, method: str, steady_steps: int = 2) -> dict[str, tuple[float, int]]:
    """The kernel times of one steady-state training step of ``method`` (full, lora, rosa or rosa-warmup)."""
    rosa_warmup = method == "rosa-warmup"
    model, scheduler = model_step.wrap(model_step.build_model(case), "rosa" if rosa_warmup else method,
                                       warmup_steps=10**6 if rosa_warmup else 1, collect_steps=1)
    trainer = model_step.Trainer(model, case, scheduler)
    warm = steady_steps + (2 if method == "rosa" else 0)  # RoSA: warm-up and collection steps first
    for _ in range(warm):
        trainer.step()
    if scheduler is not None and method == "rosa":
        assert scheduler.phase == "sparse", scheduler.phase
    device = torch.device(case.device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        trainer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    times = _kernel_times(prof, device)
    del trainer, model, scheduler, prof
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return times


def by_class(times: dict[str, tuple[float, int]]) -> dict[str, float]:
    classes = {label: 0.0 for label, _ in CLASSES} | {OTHER: 0.0}
    for name, (ms, _) in times.items():
        classes[kernel_class(name)] += ms
    return classes


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default=None, choices=sorted(model_step.SHAPES),
                        help="default: tinyllama on cuda, tiny on cpu")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 4 on cuda, 1 on cpu)")
    parser.add_argument("--methods", default="full,lora,rosa-warmup,rosa",
                        help="comma-separated: full, lora (PEFT), rosa-warmup (RoSA's LoRA-only phase), rosa")
    parser.add_argument("--top", type=int, default=12, help="kernels listed per method")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    shape = args.shape or ("tinyllama" if cuda else "tiny")
    batch = args.batch or (4 if cuda else 1)
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in ("full", "lora", "rosa-warmup", "rosa"):
            parser.error(f"--methods: unknown method {m!r} (full, lora, rosa-warmup, rosa)")
    missing = model_step.missing_requirements(tuple(m for m in methods if m != "rosa-warmup"))
    if missing:
        print(f"skipped: {missing}")
        return {"skipped": missing}
    seq = model_step.GPU_SEQ if cuda else model_step.CPU_SEQ
    case = model_step.ModelCase(shape, batch, seq, "bfloat16" if cuda else "float32", args.device)
    what = "kernel" if cuda else "operator (CPU: a check of the tool, not a GPU profile)"
    print(f"{model_step.SHAPES[shape].name}, {case.tokens} tokens, {case.dtype}, on "
          f"{torch.cuda.get_device_name(device) if cuda else 'cpu'}; one profiled step per method, {what} times")
    results = {}
    for method in methods:
        times = profile_method(case, method)
        results[method] = {"classes": by_class(times), "kernels": times}
        total = sum(ms for ms, _ in times.values())
        print(f"\n## {method}: {total:.1f} ms of {what} time")
        for label, ms in results[method]["classes"].items():
            print(f"  {label:40s} {ms:9.2f} ms")
        print(f"  top {args.top}:")
        for name, (ms, calls) in sorted(times.items(), key=lambda item: -item[1][0])[:args.top]:
            print(f"  {ms:9.2f} ms {calls:5d} x  [{kernel_class(name)}] {name[:110]}")
    print("\n| class | " + " | ".join(f"{m} ms" for m in methods) + " |")
    print("|---|" + "---|" * len(methods))
    for label in list(results[methods[0]]["classes"]):
        print(f"| {label} | " + " | ".join(f"{results[m]['classes'][label]:.2f}" for m in methods) + " |")
    print("| total | " + " | ".join(f"{sum(results[m]['classes'].values()):.2f}" for m in methods) + " |")
    return {"case": dataclasses.asdict(case), "classes": {m: r["classes"] for m, r in results.items()}}


if __name__ == "__main__":
    main()
