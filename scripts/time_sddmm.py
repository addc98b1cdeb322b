"""Times the CUDA SDDMM against the alternatives a user has, in one run, on one GPU.

For each shape (m x n mask, k tokens), density and mask kind it reports the median time of
- ours, bf16, RoSA's layout: sddmm(mask, dY.t(), X.t()) with dY (k x m), X (k x n) row-major
  (auto: the sparse kernel, or one GEMM + gather where that is predicted faster), and the same
  with the sparse kernel forced (ROSA_SDDMM_KERNEL=sparse);
- ours, bf16, row-major a (m x k) and bt (n x k);
- ours, fp32, RoSA's layout;
- dense bf16 torch.mm(dY.t(), X) followed by a gather of the mask positions;
- torch.sparse.sampled_addmm (cuSPARSE) in fp32 (it has no bf16 kernel);
and the floor max(bytes of a and bt once / 3.0 TB/s, 2 nnz k / 67 TFLOP/s). Times are CUDA-event
medians over repeats with the L2 flushed between runs (triton.testing.do_bench). Masks are built
on the GPU with the recipes of rosa_kernels.testing (uniform, and the outlier-channel `rosa`
recipe), so the sweep spends its time timing. A Markdown table is printed last.

    python scripts/time_sddmm.py [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

import rosa_kernels
from rosa_kernels.testing import mask_count

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
DENSITIES = [0.001, 0.003, 0.01, 0.03]
KINDS = ["uniform", "rosa"]


def uniform_bool(m, n, density, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    flat = torch.randperm(m * n, generator=gen, device="cuda")[: mask_count(m, n, density)]
    mask = torch.zeros(m * n, dtype=torch.bool, device="cuda")
    mask[flat] = True
    return mask.view(m, n)


def rosa_bool(m, n, density, seed=0, tokens=512):
    """testing.rosa_mask's recipe (same random draws), with the product and top-k on the GPU."""
    gen = torch.Generator().manual_seed(seed)
    out_scale = torch.exp(1.0 * torch.randn(m, generator=gen))
    in_scale = torch.exp(2.5 * torch.randn(n, generator=gen))
    grad_out = (torch.randn(tokens, m, generator=gen) * out_scale).cuda()
    inputs = (torch.randn(tokens, n, generator=gen) * in_scale).cuda()
    gradient = (grad_out.T @ inputs).abs_().view(-1)
    mask = torch.zeros(m * n, dtype=torch.bool, device="cuda")
    mask[torch.topk(gradient, mask_count(m, n, density), sorted=False).indices] = True
    return mask.view(m, n)


def csr_of(mask):
    rows, cols = mask.nonzero(as_tuple=True)
    m = mask.shape[0]
    counts = torch.bincount(rows, minlength=m)
    row_offsets = torch.zeros(m + 1, dtype=torch.int32, device=mask.device)
    row_offsets[1:] = counts.cumsum(0)
    row_indices = rosa_kernels.row_order(row_offsets)
    return row_offsets, row_indices.to(torch.int32), cols.to(torch.int32), rows, cols


def bench(fn, quick):
    try:
        from triton.testing import do_bench

        return do_bench(fn, warmup=5 if quick else 25, rep=20 if quick else 100, return_mode="median")
    except ImportError:  # plain events, no L2 flush
        for _ in range(3):
            fn()
        times = []
        for _ in range(10 if quick else 50):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--out", default=None)
    parser.add_argument("--shapes", default=None, help="e.g. 4096x4096,11008x4096")
    parser.add_argument("--densities", default=None, help="e.g. 0.001,0.01")
    parser.add_argument("--no-cusparse", action="store_true")
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    densities = [float(d) for d in args.densities.split(",")] if args.densities else DENSITIES
    k = args.tokens
    sddmm = torch.ops.rosa_kernels.sddmm
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, tokens {k}")
    results = []
    for m, n in shapes:
        gen = torch.Generator(device="cuda").manual_seed(0)
        dy = torch.randn(k, m, generator=gen, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(k, n, generator=gen, device="cuda", dtype=torch.bfloat16)
        dy32, x32 = dy.float(), x.float()
        a_rows, bt_rows = dy.t().contiguous(), x.t().contiguous()
        for kind in KINDS:
            for density in densities:
                mask = (uniform_bool if kind == "uniform" else rosa_bool)(m, n, density)
                row_offsets, row_indices, col_indices, rows, cols = csr_of(mask)
                nnz = col_indices.shape[0]
                flat = rows * n + cols
                # correctness spot check against fp32 dense before timing
                ours = sddmm(row_offsets, row_indices, col_indices, dy.t(), x.t())
                ref = (dy32.t() @ x32).view(-1)[flat]
                rel = ((ours.float() - ref).norm() / ref.norm()).item()
                row = {"m": m, "n": n, "k": k, "kind": kind, "density": density, "nnz": nnz, "rel_err_bf16": rel}
                row["ours_bf16_tokens"] = bench(lambda: sddmm(row_offsets, row_indices, col_indices, dy.t(), x.t()), args.quick)
                os.environ["ROSA_SDDMM_KERNEL"] = "sparse"
                row["sparse_bf16_tokens"] = bench(lambda: sddmm(row_offsets, row_indices, col_indices, dy.t(), x.t()), args.quick)
                os.environ.pop("ROSA_SDDMM_KERNEL")
                row["ours_bf16_rows"] = bench(lambda: sddmm(row_offsets, row_indices, col_indices, a_rows, bt_rows), args.quick)
                row["ours_fp32_tokens"] = bench(lambda: sddmm(row_offsets, row_indices, col_indices, dy32.t(), x32.t()), args.quick)
                row["mm_gather_bf16"] = bench(lambda: torch.mm(dy.t(), x).view(-1)[flat], args.quick)
                if not args.no_cusparse:
                    sparse = torch.sparse_csr_tensor(row_offsets, col_indices,
                                                     torch.ones(nnz, device="cuda"), (m, n))
                    row["sampled_addmm_fp32"] = bench(
                        lambda: torch.sparse.sampled_addmm(sparse, dy32.t(), x32, beta=0.0), args.quick)
                floor_s = max((m + n) * k * 2 / 3.0e12, 2 * nnz * k / 67e12)
                row["floor"] = floor_s * 1e3
                results.append(row)
                print(json.dumps(row), flush=True)
                del mask
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print()
    print("| m x n | kind | d | nnz | ours bf16 T-major ms | sparse kernel ms | ours bf16 row-major ms | ours fp32 ms | mm+gather bf16 ms | sampled_addmm fp32 ms | best alt / ours (T-major) | ours / floor | rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        alts = [r["mm_gather_bf16"]] + ([r["sampled_addmm_fp32"]] if "sampled_addmm_fp32" in r else [])
        print(f"| {r['m']}x{r['n']} | {r['kind']} | {r['density']} | {r['nnz']} | {r['ours_bf16_tokens']:.4f} | "
              f"{r['sparse_bf16_tokens']:.4f} | "
              f"{r['ours_bf16_rows']:.4f} | {r['ours_fp32_tokens']:.4f} | {r['mm_gather_bf16']:.4f} | "
              f"{r.get('sampled_addmm_fp32', float('nan')):.4f} | {min(alts) / r['ours_bf16_tokens']:.2f}x | "
              f"{r['ours_bf16_tokens'] / r['floor']:.1f} | {r['rel_err_bf16']:.1e} |")


if __name__ == "__main__":
    main()
