"""Runs one rosa_kernels SpMM per kernel variant on a LLaMA-shaped case, for a profiler.

Usage (on a GPU machine):
    ncu -k regex:spmm --launch-skip 0 --launch-count 2 --section SpeedOfLight ... \\
        python bench/report.py --profile-spmm [--shape 4096x4096] [--density 0.01] [--kind uniform]
        [--variants rows,slab32] [--tokens 4096]

Each variant (ROSA_SPMM_KERNEL) runs twice (a warm-up and the profiled call); between variants
nothing else launches a kernel named like `spmm`, so `ncu -k regex:spmm` sees only the SpMM kernels.
The mask is the performance protocol's (bench/common.py's ``mask_csr``), bf16 values and operand.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="4096x4096")
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--kind", default="uniform", choices=["uniform", "rosa"])
    parser.add_argument("--variants", default="rows,slab32")
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args(argv)
    m, n = (int(x) for x in args.shape.split("x"))
    mask = common.mask_csr(args.kind, m, n, args.density, "cuda")
    values = torch.randn(mask.nnz, device="cuda").to(torch.bfloat16)
    dense = torch.randn(n, args.tokens, device="cuda").to(torch.bfloat16)
    for variant in args.variants.split(","):
        os.environ["ROSA_SPMM_KERNEL"] = variant
        for _ in range(2):
            torch.ops.rosa_kernels.spmm(values, mask.row_offsets, mask.row_indices, mask.col_indices, dense, m)
        torch.cuda.synchronize()
        print(f"ran {variant}")


if __name__ == "__main__":
    main()
