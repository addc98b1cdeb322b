"""Runs one rosa_kernels SpMM per kernel variant on a LLaMA-shaped case, for a profiler.

Usage (on a GPU machine):
    ncu -k regex:spmm --launch-skip 0 --launch-count 2 --section SpeedOfLight ... \\
        python scripts/profile_spmm.py [--shape 4096x4096] [--density 0.01] [--kind uniform]
        [--variants rows,slab32] [--tokens 4096]

Each variant runs twice (a warm-up and the profiled call); between variants nothing else launches
a kernel named like `spmm`, so `ncu -k regex:spmm` sees only the SpMM kernels.
"""

from __future__ import annotations

import argparse
import os

import torch

from rosa_kernels.csr import row_order

from time_cuda_ops import make_mask


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="4096x4096")
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--kind", default="uniform", choices=["uniform", "rosa"])
    parser.add_argument("--variants", default="rows,slab32")
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args()
    m, n = (int(x) for x in args.shape.split("x"))
    mask = make_mask(args.kind, m, n, args.density)
    rows, cols = torch.nonzero(mask, as_tuple=True)
    values = torch.randn(rows.numel(), device="cuda").to(torch.bfloat16)
    row_offsets = torch.zeros(m + 1, dtype=torch.int32, device="cuda")
    row_offsets[1:] = torch.cumsum(torch.bincount(rows, minlength=m), 0).to(torch.int32)
    col_indices = cols.to(torch.int32)
    row_indices = row_order(row_offsets)
    dense = torch.randn(n, args.tokens, device="cuda").to(torch.bfloat16)
    for variant in args.variants.split(","):
        os.environ["ROSA_SPMM_KERNEL"] = variant
        for _ in range(2):
            torch.ops.rosa_kernels.spmm(values, row_offsets, row_indices, col_indices, dense, m)
        torch.cuda.synchronize()
        print(f"ran {variant}")


if __name__ == "__main__":
    main()
