"""Where a layer training step's time goes: GPU time, host time and kernel count per implementation.

    python bench/report.py --profile-layer [--shape 4096x4096x2048] [--density 0.003] [--device cuda]

For each of RosaLinear (sparse phase), the plain-PyTorch LoRA layer and full fine-tuning (the
layers of bench/common.py) it prints, per forward + backward step:
- ``step ms``: CUDA-event median of one step, as bench/report.py measures it;
- ``host ms``: wall time of issuing one step while the GPU is not the bottleneck (the step issued
  back to back ``--reps`` times, divided; on a GPU this is the launch-side cost that sets the
  step time when it exceeds the GPU work);
- ``gpu ms``: the sum of the step's kernel times from torch.profiler;
- ``kernels``: kernels (CUDA) or aten ops (CPU) launched per step.
A step is host-bound when ``host ms`` is close to ``step ms`` and above ``gpu ms``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402


def profile(step, device: torch.device, top: int = 0) -> tuple[float, int]:
    """(summed kernel milliseconds, kernel count) of one step, from torch.profiler; prints the
    ``top`` most expensive kernels (CUDA) or ops (CPU) when asked."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
        common.synchronize(device)
    events = prof.events()
    if top:
        table = prof.key_averages().table(
            sort_by="self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total", row_limit=top)
        print(table)
    if device.type == "cuda":
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        return sum(e.device_time for e in kernels) / 1e3, len(kernels)
    def outermost(e):  # an aten op not called from inside another aten op
        parent = e.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return False
            parent = parent.cpu_parent
        return True

    ops = [e for e in events if e.name.startswith("aten::") and outermost(e)]
    return sum(e.cpu_time for e in ops) / 1e3, len(ops)


def host_time(step, device: torch.device, reps: int) -> float:
    common.synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        step()
    issued = time.perf_counter() - start
    common.synchronize(device)
    return issued / reps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="4096x4096x2048", help="OUTxINxTOKENS")
    parser.add_argument("--density", type=float, default=0.003)
    parser.add_argument("--mask", default="rosa")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--top", type=int, default=0, help="print the N most expensive kernels of each step")
    args = parser.parse_args(argv)
    m, n, tokens = (int(v) for v in args.shape.split("x"))
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    case = common.LayerCase(m=m, n=n, tokens=tokens, density=args.density, mask=args.mask, dtype=dtype,
                            device=args.device)
    device = torch.device(args.device)
    prepared = common.prepare_layer(case)
    print(f"{args.shape} d={args.density} {args.mask} {dtype} on {common.device_name(device)}")
    print(f"{'layer':10s} {'step ms':>8s} {'host ms':>8s} {'gpu ms':>8s} {'kernels':>8s}")
    for name, reason in prepared.unavailable.items():
        print(f"{name:10s} unavailable: {reason}")
    for name, step in prepared.calls.items():
        step_ms = common.measure(step, device, budget=0.3)["median"] * 1e3
        host_ms = host_time(step, device, args.reps) * 1e3
        gpu_ms, kernels = profile(step, device, args.top)
        print(f"{name:10s} {step_ms:8.3f} {host_ms:8.3f} {gpu_ms:8.3f} {kernels:8d}")


if __name__ == "__main__":
    main()
