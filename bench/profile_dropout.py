"""RosaLinear's fused LoRA dropout products against their unfused form, per call on one device.

    python bench/report.py --profile-dropout [--device cuda|cpu] [--shapes 8192x4096,2048x11008]
        [--rank 16] [--dtype bfloat16] [--p 0.05] [--repeats 30]

For each TOKENSxFEATURES shape and each of ``lora_dropout_project`` (h = (X ∘ keep) A^T),
``lora_dropout_addmm_`` (dX += alpha keep ∘ (G A)) and ``lora_dropout_grad_A`` (dA = alpha G^T (X ∘
keep)): the op as RosaLinear calls it (on a GPU the tensor-core kernel where dtype and rank allow)
and with ``ROSA_KERNELS_FUSED_DROPOUT=0`` (the elementwise dropout kernel plus a GEMM), each timed
with CUDA events (wall clock on the CPU) as the median of ``--repeats`` calls after warm-up calls,
on random (nonzero) inputs, next to the time the op's bytes take at ``--bandwidth`` GB/s (one read
of X for project and grad_A, a read and a write of dX for addmm). First the two forms are compared
with each other (the largest difference relative to the largest magnitude: one rounding of float32
sums taken in another order); the tests compare both with float64 references.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rosa_kernels  # noqa: E402,F401  (registers the ops)
from rosa_kernels.dropout import draw_seed  # noqa: E402

ops = torch.ops.rosa_kernels
FUSED_ENV = "ROSA_KERNELS_FUSED_DROPOUT"


def _median_ms(fn, device: torch.device, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


@contextlib.contextmanager
def _fused(enabled: bool):
    """The fused kernels on (the default) or off, around a whole measurement (not inside the timed
    calls: setting the environment there would add host time between the CUDA events)."""
    before = os.environ.get(FUSED_ENV)
    if enabled:
        os.environ.pop(FUSED_ENV, None)
    else:
        os.environ[FUSED_ENV] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(FUSED_ENV, None)
        else:
            os.environ[FUSED_ENV] = before


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() if b.numel() else 0.0


def measure(tokens: int, features: int, rank: int, dtype: torch.dtype, device: torch.device, p: float,
            repeats: int, bandwidth_gbs: float) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, features, generator=gen, device=device).to(dtype)
    lora_A = (torch.randn(rank, features, generator=gen, device=device) * 0.05).to(dtype)
    g = torch.randn(tokens, rank, generator=gen, device=device).to(dtype)
    dx = torch.randn(tokens, features, generator=gen, device=device).to(dtype)
    seed = draw_seed(device)
    bytes_x = tokens * features * x.element_size()

    def addmm(target):
        ops.lora_dropout_addmm_(target, g, lora_A, seed, p, 1e-3)
        return target

    cases = {
        "project": (lambda: ops.lora_dropout_project(x, seed, p, lora_A), bytes_x),
        "addmm_": (lambda: addmm(dx), 2 * bytes_x),
        "grad_A": (lambda: ops.lora_dropout_grad_A(x, seed, p, g, 1.0), bytes_x),
    }
    rows = []
    for name, (fn, moved) in cases.items():
        check = (lambda: addmm(dx.clone())) if name == "addmm_" else fn  # addmm_: on copies, dx keeps changing
        row = {"op": name, "tokens": tokens, "features": features, "rank": rank,
               "dtype": str(dtype).replace("torch.", ""), "bytes_ms": moved / (bandwidth_gbs * 1e9) * 1e3}
        forms = ((True, "fused"), (False, "unfused"))
        outputs = {}
        for enabled, key in forms:  # both before any timed call (those change dx)
            with _fused(enabled):
                outputs[key] = check()
        row["relative_difference"] = _relative_difference(outputs["fused"], outputs["unfused"])
        for enabled, key in forms:
            with _fused(enabled):
                row[f"{key}_ms"] = _median_ms(fn, device, repeats)
        rows.append(row)
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default="8192x4096,8192x2048,8192x5632,2048x4096,2048x11008",
                        help="comma-separated TOKENSxFEATURES")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--p", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--bandwidth", type=float, default=3350.0, help="GB/s for the bytes column (H100 HBM3)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"## LoRA dropout products, fused / unfused: {name}, {args.dtype}, rank {args.rank}, p {args.p} "
          f"(median of {args.repeats}; bytes at {args.bandwidth:g} GB/s)")
    print("| op | tokens x features | fused us | unfused us | fused / unfused | bytes us | rel. difference |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for shape in args.shapes.split(","):
        tokens, features = (int(v) for v in shape.lower().split("x"))
        for row in measure(tokens, features, args.rank, dtype, device, args.p, args.repeats, args.bandwidth):
            rows.append(row)
            print(f"| {row['op']} | {tokens} x {features} | {row['fused_ms'] * 1e3:.1f} | {row['unfused_ms'] * 1e3:.1f} | "
                  f"{row['fused_ms'] / row['unfused_ms']:.2f} | {row['bytes_ms'] * 1e3:.1f} | "
                  f"{row['relative_difference']:.1e} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
