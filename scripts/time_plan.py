"""Times rosa_kernels.MaskPlan against the raw ops and the alternatives, in one run, on one GPU.

For each shape (m x n mask, k tokens), mask kind (uniform, rosa) and density, bf16:
- SDDMM in RoSA's layout dS = mask ∘ (dY^T X), dY (k x m), X (k x n) row-major: plan.sddmm(dY.t(),
  X.t()) for several hot_fill rules ("auto" = the default, and fixed thresholds), the raw
  rosa_kernels.sddmm on the same views, and torch.mm(dY.t(), X) + torch.take of the mask positions;
- SpMM Y = A @ D, D (n x k) row-major: plan.spmm(values, D) for the same rules, plan.spmm on a
  transposed view D = X.t() (RosaLinear's layout, "auto" only), the raw rosa_kernels.spmm,
  torch.sparse.mm on a CSR tensor (cuSPARSE) and dense torch.mm with the densified A.

Timing: CUDA events around each call, median of the repetitions, the L2 cache flushed (a 256 MiB
write) before every repetition, inputs rotating over 3 random sets (never zeros). Each case is
checked first: the plan against the raw op (relative error of the whole vector). A JSON line per
case goes to stdout (and to --out), then Markdown tables.

    python scripts/time_plan.py [--quick] [--shapes 4096x4096,...] [--densities 0.001,...] [--out f.jsonl]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import rosa_kernels
from rosa_kernels import MaskPlan

sys.path.insert(0, str(Path(__file__).resolve().parent))
from time_sddmm import csr_of, rosa_bool, uniform_bool  # noqa: E402  (the GPU mask recipes)

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
DENSITIES = [0.001, 0.003, 0.01, 0.03]
KINDS = ["rosa", "uniform"]
HOT_FILLS = ["auto", 0.0, 0.005, 0.02, 0.05, 1.0]
SETS = 3

_flush = None


def timed(fn, arguments, reps):
    """Median ms of fn(*arguments[i % SETS]) with the L2 flushed before each repetition."""
    global _flush
    if _flush is None:
        _flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    for i in range(2):
        fn(*arguments[i % len(arguments)])
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for i, (start, end) in enumerate(events):
        _flush.fill_(i & 0xFF)
        start.record()
        fn(*arguments[i % len(arguments)])
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def timed_or_none(fn, arguments, reps):
    """timed(), or None (reported as n/a) when an alternative has no kernel for the inputs."""
    try:
        return timed(fn, arguments, reps)
    except (RuntimeError, NotImplementedError) as error:
        print(f"unavailable: {str(error).splitlines()[0][:120]}", file=sys.stderr)
        return None


def relative_error(x, y):
    x, y = x.float(), y.float()
    return float((x - y).norm() / y.norm().clamp_min(1e-30))


def run_case(m, n, k, kind, density, reps, activations):
    mask = (uniform_bool if kind == "uniform" else rosa_bool)(m, n, density)
    row_offsets, row_indices, col_indices, rows, cols = csr_of(mask)
    del mask
    nnz = col_indices.shape[0]
    flat = rows * n + cols
    gen = torch.Generator(device="cuda").manual_seed(1)
    dys, xs = activations
    sddmm_args = [(dy.t(), x.t()) for dy, x in zip(dys, xs)]
    values = [torch.randn(nnz, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(SETS)]
    dense = [x.t().contiguous() for x in xs]  # D (n x k) row-major
    spmm_args = list(zip(values, dense))
    record = {"m": m, "n": n, "k": k, "kind": kind, "density": density, "nnz": nnz,
              "nonempty_columns": int((torch.bincount(cols, minlength=n) > 0).sum()), "sddmm": {}, "spmm": {},
              "plans": {}}

    def raw_sddmm(a, bt):
        return torch.ops.rosa_kernels.sddmm(row_offsets, row_indices, col_indices, a, bt)

    def raw_spmm(v, d):
        return torch.ops.rosa_kernels.spmm(v, row_offsets, row_indices, col_indices, d, m)

    reference_sddmm = raw_sddmm(*sddmm_args[0])
    reference_spmm = raw_spmm(*spmm_args[0])
    record["sddmm"]["ours"] = timed(raw_sddmm, sddmm_args, reps)
    record["sddmm"]["mm+take"] = timed(lambda a, bt: torch.take(torch.mm(a, bt.t()), flat), sddmm_args, reps)
    record["spmm"]["ours"] = timed(raw_spmm, spmm_args, reps)
    sparse = [(torch.sparse_csr_tensor(row_offsets, col_indices, v, (m, n), check_invariants=False), d)
              for v, d in spmm_args]
    record["spmm"]["torch.sparse"] = timed_or_none(torch.sparse.mm, sparse, reps)
    del sparse
    dense_a = [(torch.sparse_csr_tensor(row_offsets, col_indices, v, (m, n), check_invariants=False).to_dense(), d)
               for v, d in spmm_args]
    record["spmm"]["dense"] = timed(torch.mm, dense_a, reps)
    del dense_a
    errors = {}
    for hot_fill in HOT_FILLS:
        started = time.perf_counter()
        plan = MaskPlan(row_offsets, col_indices, m, n, hot_fill=hot_fill, dtype=torch.bfloat16, validate=False)
        torch.cuda.synchronize()
        build_ms = (time.perf_counter() - started) * 1e3
        name = f"plan:{hot_fill}"
        record["plans"][name] = {"hot_columns": plan.hot_columns.numel(), "hot_nnz": plan.hot_nnz,
                                 "rest_nnz": plan.rest_nnz, "hot_fill": plan.hot_fill, "build_ms": build_ms}
        errors[name] = (relative_error(plan.sddmm(*sddmm_args[0]), reference_sddmm),
                        relative_error(plan.spmm(*spmm_args[0]), reference_spmm))
        record["sddmm"][name] = timed(plan.sddmm, sddmm_args, reps)
        record["spmm"][name] = timed(plan.spmm, spmm_args, reps)
        if hot_fill == "auto":
            transposed = [(v, x.t()) for v, x in zip(values, xs)]  # RosaLinear's spmm mode: X.t()
            record["spmm"]["plan:auto X.t()"] = timed(plan.spmm, transposed, reps)
        del plan
    record["relative_error_vs_raw"] = errors
    return record


def best_of(times, names):
    return min(times[name] for name in names if times.get(name) is not None)


def best_rule(times):
    """The fastest plan rule of a case and its time."""
    name = min((f"plan:{h}" for h in HOT_FILLS), key=lambda key: times[key])
    return f"{name[5:]} {times[name]:.4f}"


def _ms(value):
    return "n/a" if value is None else f"{value:.4f}"


def tables(records):
    lines = ["### SDDMM, RoSA layout (a = dY.t(), bt = X.t()), bf16, ms; × = time of the other / plan:auto", "",
             "| m x n | mask | d | nnz | non-empty cols | auto: J / rest nnz | plan:auto | ours (raw) | mm+take | "
             "× ours | × mm+take | plan:0 | plan:0.005 | plan:0.02 | plan:0.05 | plan:1 | best rule |", "|" + "---|" * 17]
    for r in records:
        t, p = r["sddmm"], r["plans"]["plan:auto"]
        auto = t["plan:auto"]
        lines.append(f"| {r['m']}x{r['n']} | {r['kind']} | {r['density']:g} | {r['nnz']} | {r['nonempty_columns']} | "
                     f"{p['hot_columns']} / {p['rest_nnz']} | **{auto:.4f}** | {t['ours']:.4f} | {t['mm+take']:.4f} | "
                     f"{t['ours'] / auto:.2f}x | {t['mm+take'] / auto:.2f}x | "
                     + " | ".join(f"{t[f'plan:{h}']:.4f}" for h in HOT_FILLS[1:]) + f" | {best_rule(t)} |")
    lines += ["", "### SpMM, A @ D with D (n x k) row-major, bf16, ms; × = time of the other / plan:auto", "",
              "| m x n | mask | d | plan:auto | plan:auto on X.t() | ours (raw) | torch.sparse | dense | × ours | "
              "× best alternative | plan:0 | plan:0.005 | plan:0.02 | plan:0.05 | plan:1 | best rule |", "|" + "---|" * 16]
    for r in records:
        t = r["spmm"]
        auto = t["plan:auto"]
        best = best_of(t, ("torch.sparse", "dense"))
        lines.append(f"| {r['m']}x{r['n']} | {r['kind']} | {r['density']:g} | **{auto:.4f}** | "
                     f"{t['plan:auto X.t()']:.4f} | {t['ours']:.4f} | {_ms(t['torch.sparse'])} | {t['dense']:.4f} | "
                     f"{t['ours'] / auto:.2f}x | {best / auto:.2f}x | "
                     + " | ".join(f"{t[f'plan:{h}']:.4f}" for h in HOT_FILLS[1:]) + f" | {best_rule(t)} |")
    worst = max(max(e for pair in r["relative_error_vs_raw"].values() for e in pair) for r in records)
    lines += ["", f"largest relative error (plan vs raw op, whole vector, bf16): {worst:.2e}"]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--shapes", default=None)
    parser.add_argument("--densities", default=None)
    parser.add_argument("--out", default=None, help="JSON lines, one per case")
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    densities = [float(d) for d in args.densities.split(",")] if args.densities else DENSITIES
    reps = 10 if args.quick else 25
    k = args.tokens
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, rosa_kernels "
          f"{rosa_kernels.__version__}, tokens {k}, reps {reps}", flush=True)
    out = open(args.out, "w") if args.out else None
    records = []
    for m, n in shapes:
        gen = torch.Generator(device="cuda").manual_seed(0)
        activations = ([torch.randn(k, m, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(SETS)],
                       [torch.randn(k, n, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(SETS)])
        for kind in KINDS:
            for density in densities:
                record = run_case(m, n, k, kind, density, reps, activations)
                records.append(record)
                line = json.dumps(record)
                print(line, flush=True)
                if out:
                    out.write(line + "\n")
                    out.flush()
        del activations
        torch.cuda.empty_cache()
    print()
    print(tables(records))


if __name__ == "__main__":
    main()
