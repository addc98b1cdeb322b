"""Times rosa_kernels' CPU spmm and sddmm against scipy.sparse and torch.sparse on the CPU sweep.

Sweep (API_CONTRACTS.md): (m, n, tokens) in {(1024, 1024, 512), (2752, 1024, 512)}, densities
{0.001, 0.003, 0.01, 0.03}, masks `uniform` and `rosa`, float32 (scipy has no bfloat16).
SpMM: A (m x n, CSR) @ dense (n x tokens). SDDMM: out[p] = <a[i], bt[j]>, a (m x tokens),
bt (n x tokens).

    python scripts/time_cpu_ops.py [--threads 2] [--repeats 15] [--quick] [--dtype float32]

Prints one Markdown table per op: best-of-repeats milliseconds and our speed-up over each alternative.
"""

from __future__ import annotations

import argparse
import time

import warnings

import numpy as np
import torch

import rosa_kernels
from rosa_kernels import testing

SHAPES = [(1024, 1024, 512), (2752, 1024, 512)]
DENSITIES = [0.001, 0.003, 0.01, 0.03]
KINDS = ["uniform", "rosa"]


def best_ms(fn, repeats):
    """The fastest of `repeats` calls after a warm-up. On a shared 2-core machine the median mostly
    measures other processes (a descheduled OpenMP thread stalls the whole call by a time slice,
    ~4 ms); the minimum is the kernel's own time, for every implementation alike."""
    fn()  # warm-up (allocations, first-touch, thread pool)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def spmm_cases(A, dense, dtype):
    sp = A.to_scipy()
    dense_np = dense.float().numpy()
    torch_csr = torch.sparse_csr_tensor(A.row_offsets.long(), A.col_indices.long(), A.values, size=A.shape)
    m = A.shape[0]
    return {
        "rosa_kernels": lambda: rosa_kernels.spmm(A.values, A.row_offsets, A.row_indices, A.col_indices, dense, m,
                                                  validate=False),
        "scipy.sparse": lambda: sp @ dense_np,
        "torch.sparse.mm": lambda: torch.sparse.mm(torch_csr, dense),
    }


def sddmm_cases(A, a, bt, dtype):
    m, n = A.shape
    mask_sp = A.to_scipy()
    rows = np.repeat(np.arange(m), np.diff(A.row_offsets.numpy()))
    cols = A.col_indices.numpy()
    a_np, bt_np = a.float().numpy(), bt.float().numpy()
    torch_mask = torch.sparse_csr_tensor(A.row_offsets.long(), A.col_indices.long(), A.values, size=A.shape)
    rows_t, cols_t = torch.from_numpy(rows), A.col_indices.long()
    return {
        "rosa_kernels": lambda: rosa_kernels.sddmm(A.row_offsets, A.row_indices, A.col_indices, a, bt,
                                                   validate=False),
        # What a scipy user writes: the dense product, sampled at the mask.
        "scipy mask.multiply(a@bt.T)": lambda: mask_sp.multiply(a_np @ bt_np.T),
        # The best plain NumPy route: gather the rows of each nonzero, dot them.
        "numpy gather+dot": lambda: np.einsum("ij,ij->i", a_np[rows], bt_np[cols]),
        "torch.sparse.sampled_addmm": lambda: torch.sparse.sampled_addmm(torch_mask, a, bt.t(), beta=0.0),
        "torch mm+gather": lambda: (a @ bt.t())[rows_t, cols_t],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    parser.add_argument("--quick", action="store_true", help="one shape, two densities")
    parser.add_argument("--ops", default="spmm,sddmm")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Sparse")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    shapes = SHAPES[:1] if args.quick else SHAPES
    densities = [0.003, 0.03] if args.quick else DENSITIES
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, dtype {args.dtype}, "
          f"OpenMP build: {rosa_kernels._C.openmp_built()}")
    for op in args.ops.split(","):
        rows = []
        names = None
        for m, n, tokens in shapes:
            for kind in KINDS:
                for density in densities:
                    make = testing.uniform_mask if kind == "uniform" else testing.rosa_mask
                    A = make(m, n, density, seed=0, dtype=dtype)
                    gen = torch.Generator().manual_seed(1)
                    if op == "spmm":
                        dense = torch.randn(n, tokens, generator=gen).to(dtype)
                        cases = spmm_cases(A, dense, dtype)
                    else:
                        a = torch.randn(m, tokens, generator=gen).to(dtype)
                        bt = torch.randn(n, tokens, generator=gen).to(dtype)
                        cases = sddmm_cases(A, a, bt, dtype)
                    times = {name: best_ms(fn, args.repeats) for name, fn in cases.items()}
                    names = list(times)
                    rows.append((f"{m}x{n}x{tokens}", kind, density, times))
        print(f"\n### {op} ({args.dtype}, {args.threads} threads): best-of-repeats ms, speed-up of rosa_kernels\n")
        others = [name for name in names if name != "rosa_kernels"]
        print("| shape | mask | density | rosa_kernels ms | " + " | ".join(f"{o} ms (x)" for o in others) + " |")
        print("|---|---|---|---|" + "---|" * len(others))
        for shape, kind, density, times in rows:
            ours = times["rosa_kernels"]
            cells = " | ".join(f"{times[o]:.3f} ({times[o] / ours:.1f}x)" for o in others)
            print(f"| {shape} | {kind} | {density} | {ours:.3f} | {cells} |")


if __name__ == "__main__":
    main()
