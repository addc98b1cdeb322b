"""Times the CUDA csr_transpose against Tensor.to_sparse_csc, and splits its host and GPU parts.

Usage (on a GPU machine, after `pip install --no-build-isolation --no-deps .`):
    python scripts/time_csr_transpose.py [--quick] [--profile]

bf16, A of shape m x n in {4096x4096, 11008x4096, 4096x11008}, densities 0.1-3%, `uniform` and
`rosa` masks (the recipe of scripts/time_cuda_ops.py, generated on the GPU). Columns:
- `ours` / `csc`: median CUDA-event time of `torch.ops.rosa_kernels.csr_transpose` and of
  `to_sparse_csc`, L2 flushed between repetitions (triton.testing.do_bench when present). The
  flush keeps the GPU busy while the host enqueues the op, so these are GPU times unless the host
  is slower than the flush.
- `gpu`: the op's GPU time alone, enqueued behind a `torch.cuda._sleep` so that no launch waits on
  the host (inputs rotate over 8 copies; L2 not flushed).
- `host`: CPU time per call of the raw op (torch.ops), and `wrapper` of the public
  `rosa_kernels.csr_transpose(..., validate=False)`, measured as the wall time of 200 calls
  enqueued back to back behind a sleeping GPU.
- `idle`: wall time of one call with the GPU idle, synchronize to synchronize (median of 50).
The correctness check compares all three outputs with to_sparse_csc exactly.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

import rosa_kernels

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from time_cuda_ops import bench, make_mask  # noqa: E402


def gpu_only(fn, calls=40):
    """Mean GPU time of fn when its launches are all queued before the GPU reaches them."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(100_000_000)  # ~50 ms of GPU busy: the host enqueues everything meanwhile
    start.record()
    for i in range(calls):
        fn(i)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def host_per_call(fn, calls=200):
    torch.cuda.synchronize()
    torch.cuda._sleep(100_000_000)
    t0 = time.perf_counter()
    for i in range(calls):
        fn(i)
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) * 1e6 / calls


def idle_latency(fn, reps=50):
    times = []
    for i in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(i)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def run_case(kind, m, n, density, profile):
    mask = make_mask(kind, m, n, density)
    rows, cols = torch.nonzero(mask, as_tuple=True)
    nnz = rows.numel()
    row_offsets = torch.zeros(m + 1, dtype=torch.int32, device="cuda")
    row_offsets[1:] = torch.cumsum(torch.bincount(rows, minlength=m), 0).to(torch.int32)
    col_indices = cols.to(torch.int32)
    copies = [torch.randn(nnz, device="cuda").to(torch.bfloat16) for _ in range(8)]
    structures = [(row_offsets.clone(), col_indices.clone()) for _ in range(8)]
    values = copies[0]
    op = torch.ops.rosa_kernels.csr_transpose
    a_torch = torch.sparse_csr_tensor(row_offsets.long(), col_indices.long(), values, (m, n))

    values_t, offsets_t, cols_t, permutation = op(values, row_offsets, col_indices, m, n)
    expected = a_torch.to_sparse_csc()
    ok = (torch.equal(offsets_t.long(), expected.ccol_indices())
          and torch.equal(cols_t.long(), expected.row_indices())
          and torch.equal(values_t, expected.values())
          and torch.equal(values_t, values[permutation.long()]))
    # Twice more: the same bits every time (determinism).
    for _ in range(2):
        again = op(values, row_offsets, col_indices, m, n)
        ok = ok and all(torch.equal(a, b) for a, b in zip(again, (values_t, offsets_t, cols_t, permutation)))

    def ours(i=0):
        offsets, columns = structures[i % 8]
        return op(copies[i % 8], offsets, columns, m, n)

    def wrapper(i=0):
        offsets, columns = structures[i % 8]
        return rosa_kernels.csr_transpose(copies[i % 8], offsets, columns, m, n, validate=False)

    r = {"kind": kind, "m": m, "n": n, "d": density, "nnz": nnz, "ok": ok}
    r["ours"] = bench(ours)
    r["csc"] = bench(lambda: a_torch.to_sparse_csc())
    r["gpu"] = gpu_only(ours)
    r["host"] = host_per_call(ours)
    r["wrapper"] = host_per_call(wrapper)
    r["idle"] = idle_latency(ours)
    if profile:
        try:
            r["kernels"] = kernel_times(ours)
        except Exception as error:  # the profiler is a diagnostic: never lose the table to it
            r["kernels"] = repr(error)
    return r


def kernel_times(ours):
    """Median device time (us) of each kernel of the op, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    ours()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(10):
            ours(i)
        torch.cuda.synchronize()
    kernels = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels.setdefault(e.name[:60], []).append(e.device_time)
    return {k: round(statistics.median(v), 2) for k, v in kernels.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    assert rosa_kernels.cuda_available(), "needs a GPU and the CUDA build"
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    shapes = [(4096, 4096), (11008, 4096), (4096, 11008)]
    densities = [0.001, 0.01] if args.quick else [0.001, 0.003, 0.01, 0.03]
    results = []
    for m, n in shapes:
        for kind in ("uniform", "rosa"):
            for density in densities:
                profile = args.profile and kind == "rosa" and density == 0.01
                r = run_case(kind, m, n, density, profile)
                results.append(r)
                print(r, flush=True)
    print("\n| shape | mask | d | nnz | ours us | to_sparse_csc us | x csc | gpu us | host us (op) | host us (wrapper) | idle us |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['m']}x{r['n']} | {r['kind']} | {r['d']:.3f} | {r['nnz']} | "
              f"{r['ours']:.1f}{'' if r['ok'] else ' WRONG'} | {r['csc']:.1f} | {r['csc'] / r['ours']:.1f} | "
              f"{r['gpu']:.1f} | {r['host']:.1f} | {r['wrapper']:.1f} | {r['idle']:.1f} |")


if __name__ == "__main__":
    main()
