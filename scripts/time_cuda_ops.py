"""Times the CUDA spmm / csr_transpose / csr_add of rosa_kernels against torch's alternatives.

Usage (on a GPU machine, after `pip install --no-build-isolation --no-deps .`):
    python scripts/time_cuda_ops.py [--quick] [--tokens 4096] [--out FILE.json]
        [--variants rows,rows2] [--densities 0.001,0.01] [--no-other-ops]

bf16, tokens 4096, A of shape m x n in {4096x4096, 11008x4096, 4096x11008}, densities 0.1-3%,
mask kinds `uniform` and `rosa` (the recipe of rosa_kernels.testing, generated on the GPU to keep
the run short). Every time is a median of CUDA-event timings with the L2 cache flushed between
repetitions (triton.testing.do_bench when present). Compared in the same run: torch.sparse.mm
(cuSPARSE), dense torch.mm, Tensor.to_sparse_csc; "floor" is max(bytes / 3.0 TB/s, FLOPs / 67
TFLOP/s): the dense operand read once, the output written once, the CSR read once. Each SpMM
kernel variant (ROSA_SPMM_KERNEL, --variants) is timed and checked too ("max err": the largest
relative error of any variant). Prints a Markdown table last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

import rosa_kernels
from rosa_kernels.csr import row_order

BANDWIDTH = 3.0e12
FP32_RATE = 67e12


def bench(fn, reps=25):
    try:
        from triton.testing import do_bench

        return do_bench(fn, warmup=5, rep=reps, return_mode="median") * 1e3
    except ImportError:
        pass
    cache = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        cache.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def make_mask(kind, m, n, density, seed=0):
    """A bool m x n mask with round(density*m*n) nonzeros: uniform or the RoSA outlier recipe."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    count = int(round(density * m * n))
    if kind == "uniform":
        scores = torch.rand(m * n, generator=gen, device="cuda")
    else:
        out_scale = torch.exp(torch.randn(m, generator=gen, device="cuda"))
        in_scale = torch.exp(2.5 * torch.randn(n, generator=gen, device="cuda"))
        grad_out = torch.randn(512, m, generator=gen, device="cuda") * out_scale
        inputs = torch.randn(512, n, generator=gen, device="cuda") * in_scale
        scores = (grad_out.T @ inputs).abs_().view(-1)
    mask = torch.zeros(m * n, dtype=torch.bool, device="cuda")
    mask[torch.topk(scores, count, sorted=False).indices] = True
    return mask.view(m, n)


def run_case(kind, m, n, density, tokens, dtype, variants, other_ops=True):
    mask = make_mask(kind, m, n, density)
    rows, cols = torch.nonzero(mask, as_tuple=True)
    nnz = rows.numel()
    values = torch.randn(nnz, device="cuda", dtype=torch.float32).to(dtype)
    row_offsets = torch.zeros(m + 1, dtype=torch.int32, device="cuda")
    row_offsets[1:] = torch.cumsum(torch.bincount(rows, minlength=m), 0).to(torch.int32)
    col_indices = cols.to(torch.int32)
    row_indices = row_order(row_offsets)
    dense = torch.randn(n, tokens, device="cuda", dtype=dtype)
    a_torch = torch.sparse_csr_tensor(row_offsets.long(), col_indices.long(), values, (m, n))
    a_dense = a_torch.to_dense()
    ops = torch.ops.rosa_kernels
    result = {"kind": kind, "m": m, "n": n, "density": density, "tokens": tokens, "nnz": nnz,
              "dtype": str(dtype).replace("torch.", "")}

    # Correctness first, on these very inputs.
    reference = (a_dense.double() @ dense.double())
    out = ops.spmm(values, row_offsets, row_indices, col_indices, dense, m)
    result["spmm_rel_error"] = float((out.double() - reference).norm() / reference.norm())

    bytes_spmm = n * tokens * dense.element_size() + m * tokens * dense.element_size() + nnz * 6 + 4 * m
    result["spmm_floor_us"] = max(bytes_spmm / BANDWIDTH, 2 * nnz * tokens / FP32_RATE) * 1e6
    for variant in variants:
        os.environ["ROSA_SPMM_KERNEL"] = variant
        got = ops.spmm(values, row_offsets, row_indices, col_indices, dense, m)
        result[f"spmm_{variant}_rel_error"] = float((got.double() - reference).norm() / reference.norm())
        result[f"spmm_{variant}_us"] = bench(
            lambda: ops.spmm(values, row_offsets, row_indices, col_indices, dense, m))
    os.environ.pop("ROSA_SPMM_KERNEL", None)
    result["spmm_cusparse_us"] = bench(lambda: torch.sparse.mm(a_torch, dense))
    result["spmm_dense_us"] = bench(lambda: torch.mm(a_dense, dense))
    if not other_ops:
        return result

    transposed = ops.csr_transpose(values, row_offsets, col_indices, m, n)
    expected_t = a_torch.to_sparse_csc()
    result["transpose_ok"] = bool(
        torch.equal(transposed[1].long(), expected_t.ccol_indices())
        and torch.equal(transposed[2].long(), expected_t.row_indices())
        and torch.equal(transposed[0], expected_t.values()))
    result["transpose_us"] = bench(lambda: ops.csr_transpose(values, row_offsets, col_indices, m, n))
    result["to_sparse_csc_us"] = bench(lambda: a_torch.to_sparse_csc())
    w = torch.randn(m, n, device="cuda", dtype=dtype)
    result["csr_add_inplace_us"] = bench(lambda: ops.csr_add_(values, row_offsets, row_indices, col_indices, w))
    result["csr_add_floor_us"] = nnz * (6 + 2 * 2 * dense.element_size()) / BANDWIDTH * 1e6
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--out", default=None)
    parser.add_argument("--variants", default="rows,dense",
                        help="comma-separated ROSA_SPMM_KERNEL values to time")
    parser.add_argument("--densities", default=None, help="comma-separated, e.g. 0.001,0.01")
    parser.add_argument("--no-other-ops", action="store_true", help="time spmm only")
    args = parser.parse_args()
    assert rosa_kernels.cuda_available(), "needs a GPU and the CUDA build"
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    shapes = [(4096, 4096), (11008, 4096)] if args.quick else [(4096, 4096), (11008, 4096), (4096, 11008)]
    densities = [0.001, 0.01] if args.quick else [0.001, 0.003, 0.01, 0.03]
    if args.densities:
        densities = [float(d) for d in args.densities.split(",")]
    variants = args.variants.split(",")
    if "auto" not in variants:
        variants.insert(0, "auto")
    results = []
    for m, n in shapes:
        for kind in ("uniform", "rosa"):
            for density in densities:
                r = run_case(kind, m, n, density, args.tokens, torch.bfloat16, variants,
                             not args.no_other_ops)
                results.append(r)
                print(json.dumps(r), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)

    others = [v for v in variants if v != "auto"]
    print("\n| shape | mask | d | ours us | " + " | ".join(others) + " | cuSPARSE | dense | x best alt | "
          "floor | x floor | max err | transpose us | csc us | x csc | csr_add_ us |")
    print("|" + "---|" * (15 + len(others)))
    for r in results:
        best = min(r["spmm_cusparse_us"], r["spmm_dense_us"])
        error = max(r[f"spmm_{v}_rel_error"] for v in variants)
        row = (f"| {r['m']}x{r['n']} | {r['kind']} | {r['density']:.3f} | {r['spmm_auto_us']:.1f} | "
               + " | ".join(f"{r[f'spmm_{v}_us']:.1f}" for v in others)
               + f" | {r['spmm_cusparse_us']:.1f} | {r['spmm_dense_us']:.1f} | {best / r['spmm_auto_us']:.2f} | "
               f"{r['spmm_floor_us']:.1f} | {r['spmm_auto_us'] / r['spmm_floor_us']:.2f} | {error:.1e} | ")
        if "transpose_us" in r:
            row += (f"{r['transpose_us']:.1f}{'' if r['transpose_ok'] else ' WRONG'} | {r['to_sparse_csc_us']:.1f} | "
                    f"{r['to_sparse_csc_us'] / r['transpose_us']:.1f} | {r['csr_add_inplace_us']:.1f} |")
        else:
            row += "- | - | - | - |"
        print(row)

if __name__ == "__main__":
    main()
