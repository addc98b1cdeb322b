#!/usr/bin/env python
"""The benchmark report: our ops and the RoSA layer step against every alternative, in one run.

    python bench/report.py [--device cpu|cuda] [--quick] [--out DIR]
    python bench/report.py --model [--device cpu|cuda] [--out DIR]    # the model training step
    python bench/report.py --host-overhead | --profile-layer | --profile-spmm | --profile-collect | --profile-step | --profile-dropout [ARGS]  # see TOOLS


Measures the machine's ceilings first (copy bandwidth counting read + write bytes, dense matmul
peaks in float32 and bfloat16), then the layer training step (RosaLinear vs plain LoRA vs full
fine-tuning), on CUDA the peak memory of a 32-layer stack, and then the standard op sweep of the
device (CPU: the CPU shapes in float32; CUDA: the LLaMA-7B shapes in bfloat16 plus float32 at
4096x4096). Op cases still waiting when ``--time-limit`` has passed are listed as skipped.
Progress goes to stderr; stdout gets the ceilings and then the Markdown tables, last. Writes
``DIR/bench.json`` (raw numbers), ``DIR/bench.md`` (the tables) and ``DIR/bench.png`` (time
against density per op and shape; only when matplotlib is importable). ``--model`` runs the model
training-step sweep of bench/model_step.py instead (full FT / PEFT LoRA / RoSA on HF Llama models,
RoSA's phases, compiled rows) and writes ``DIR/model_step.json`` and ``DIR/model_step.md``.
``--host-overhead``, ``--profile-layer``, ``--profile-spmm``, ``--profile-collect``, ``--profile-step`` and ``--profile-dropout`` (first argument) run the in-depth
tools of ``TOOLS`` with the arguments that follow (``--help`` after one lists them).
See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import common  # noqa: E402

OP_TITLES = {
    "spmm": "spmm: Y = A @ D, A m x n sparse, D n x tokens",
    "sddmm": "sddmm: mask ∘ (a @ btᵀ), a m x tokens, bt n x tokens (row-major)",
    "sddmm_t": "sddmm_t: mask ∘ (dYᵀ X), a = dY.t(), bt = X.t() of row-major dY (tokens x m), X (tokens x n)",
    "csr_transpose": "csr_transpose: m x n CSR -> n x m CSR",
    "csr_add": "csr_add: D + A (out of place), D m x n dense",
}
LAYER_NAMES = {common.OURS: "RosaLinear", "lora": "LoRA", "full": "full FT"}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclasses.dataclass
class Config:
    device: str
    quick: bool
    op_cases: list
    layer_cases: list
    stack_case: common.LayerCase | None
    stack_depth: int
    budget: float
    warmup: int = 2
    min_reps: int = 5
    time_limit: float | None = None  # seconds after which the remaining op cases are skipped


def standard_config(device: str, quick: bool) -> Config:
    """The sweep of API_CONTRACTS.md for the device; ``quick`` keeps one shape and one (CPU) or two
    (CUDA) densities."""
    if device == "cuda":
        stack = common.LayerCase(4096, 4096, 2048, 0.01, "rosa", "bfloat16", "cuda")
        if quick:
            ops = common.op_cases(common.OPS, common.GPU_SHAPES[:1], (0.003, 0.03), common.MASKS, ("bfloat16",), device)
            layers = [common.LayerCase(4096, 4096, 2048, 0.01, "rosa", "bfloat16", "cuda")]
            return Config(device, quick, ops, layers, stack, 32, 0.05, warmup=1, min_reps=3)
        # bf16 everywhere; fp32 at one shape keeps the sweep under 5 minutes.
        ops = common.op_cases(common.OPS, common.GPU_SHAPES, common.DENSITIES, common.MASKS, ("bfloat16",), device)
        ops += common.op_cases(common.OPS, common.GPU_SHAPES[:1], common.DENSITIES, common.MASKS, ("float32",), device)
        return Config(device, quick, ops, common.gpu_layer_cases(), stack, 32, 0.1)
    if quick:
        ops = common.op_cases(common.OPS, common.CPU_SHAPES[:1], (0.01,), common.MASKS, ("float32",), device)
        layers = [common.LayerCase(1024, 1024, 512, 0.01, "rosa", "float32", "cpu")]
        return Config(device, quick, ops, layers, None, 0, 0.03, warmup=1, min_reps=3)
    return Config(device, quick, common.cpu_cases(), common.cpu_layer_cases(), None, 0, 0.1)


def custom_config(args, config: Config) -> Config:
    """Applies --shapes/--densities/--masks/--ops/--dtypes/--budget/--no-layer to a standard config."""
    if any(v is not None for v in (args.shapes, args.densities, args.masks, args.ops, args.dtypes)):
        shapes = ([tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")] if args.shapes
                  else sorted({(c.m, c.n, c.tokens) for c in config.op_cases}))
        densities = [float(d) for d in args.densities.split(",")] if args.densities else common.DENSITIES
        masks = args.masks.split(",") if args.masks else common.MASKS
        ops = args.ops.split(",") if args.ops else common.OPS
        dtypes = args.dtypes.split(",") if args.dtypes else sorted({c.dtype for c in config.op_cases})
        config.op_cases = common.op_cases(ops, shapes, densities, masks, dtypes, config.device)
        if args.shapes:
            config.layer_cases = [common.LayerCase(m, n, t, densities[-1], masks[-1], dtypes[0], config.device)
                                  for m, n, t in shapes]
            config.stack_case = None
    if args.budget is not None:
        config.budget = args.budget
    default_limit = 270.0 if config.device == "cuda" else 160.0
    config.time_limit = args.time_limit if args.time_limit is not None else default_limit
    if args.no_layer:
        config.layer_cases, config.stack_case = [], None
    return config


def _error_text(error: Exception) -> str:
    text = str(error).splitlines()[0][:160] if str(error) else ""
    return f"{type(error).__name__}: {text}"


def _measure_prepared(prepared, config: Config, record: dict) -> None:
    for name, call in prepared.calls.items():
        try:
            timing = common.measure(call, config.device, budget=config.budget, warmup=config.warmup,
                                    min_reps=config.min_reps)
            record["times"][name] = timing["median"]
            record.setdefault("min_times", {})[name] = timing["min"]
        except Exception as error:  # noqa: BLE001 - one failing implementation must not end the report
            record["unavailable"][name] = _error_text(error)


def run(config: Config) -> dict:
    """Runs the sweep and returns everything the JSON file holds."""
    device = torch.device(config.device)
    started = time.perf_counter()
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "versions": common.versions(device),
        "device": config.device,
        "quick": config.quick,
        "timing": "CUDA events, median" if device.type == "cuda" else "time.perf_counter, median",
        "budget_s": config.budget,
    }
    log(f"measuring ceilings on {results['versions']['device']} ...")
    dtypes = {case.dtype for case in (*config.op_cases, *config.layer_cases)}
    ceilings = common.measure_ceilings(device, quick=config.quick, dtypes=sorted(dtypes))
    results["ceilings"] = ceilings
    log(_ceilings_text(ceilings, results["versions"]))

    results["layers"] = []
    for case in config.layer_cases:
        record = {**dataclasses.asdict(case), "shape": case.shape, "times": {}, "unavailable": {}, "notes": {}}
        results["layers"].append(record)
        try:
            prepared = common.prepare_layer(case)
        except Exception as error:  # noqa: BLE001
            record["error"] = _error_text(error)
            continue
        record["unavailable"] = dict(prepared.unavailable)
        _measure_prepared(prepared, config, record)
        del prepared
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log(f"layer {case.id}: " + ", ".join(f"{k} {v * 1e3:.3g} ms" for k, v in record["times"].items()))

    results["stack"] = None
    if config.stack_case is not None and device.type == "cuda":
        stack = {**dataclasses.asdict(config.stack_case), "depth": config.stack_depth, "memory": {}, "unavailable": {}}
        for implementation in (common.OURS, "lora", "full"):
            try:
                stack["memory"][implementation] = common.stack_peak_memory(
                    implementation, config.stack_case, config.stack_depth)
            except Exception as error:  # noqa: BLE001
                stack["unavailable"][implementation] = _error_text(error)
        results["stack"] = stack
        log(f"stack of {config.stack_depth}: {stack['memory']} {stack['unavailable']}")
    results["ops"] = []
    for index, case in enumerate(config.op_cases):
        record = {**dataclasses.asdict(case), "shape": case.shape, "times": {}, "unavailable": {}, "notes": {}}
        results["ops"].append(record)
        if config.time_limit and time.perf_counter() - started > config.time_limit:
            # A safety net: the report must print within the GPU check's time; say what was left out.
            record["error"] = f"skipped: the report's time limit ({config.time_limit:.0f} s) was reached"
            continue
        try:
            prepared = common.prepare(case)
        except Exception as error:  # noqa: BLE001
            record["error"] = _error_text(error)
            log(f"[{index + 1}/{len(config.op_cases)}] {case.id}: {record['error']}")
            continue
        floor = common.floor_seconds(prepared.min_bytes, prepared.flops, case.dtype, ceilings)
        record.update(nnz=prepared.nnz, min_bytes=prepared.min_bytes, flops=prepared.flops, floor_s=floor,
                      input_sets=prepared.sets, unavailable=dict(prepared.unavailable), notes=dict(prepared.notes))
        _measure_prepared(prepared, config, record)
        del prepared
        if device.type == "cuda":
            torch.cuda.empty_cache()
        ours = record["times"].get(common.OURS)
        log(f"[{index + 1}/{len(config.op_cases)}] {case.id}: "
            + ", ".join(f"{k} {v * 1e3:.3g} ms" for k, v in record["times"].items())
            + (f" (floor {floor * 1e3:.3g} ms)" if ours else f" (ours: {record['unavailable'].get(common.OURS)})"))

    results["elapsed_s"] = time.perf_counter() - started
    return results


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


def _ms(seconds) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.3g}"


def _ms_of(milliseconds) -> str:
    """A row's millisecond value as :func:`_ms` prints times ("n/a" when missing)."""
    return _ms(None if milliseconds is None else milliseconds / 1e3)


def _ratio(value) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _ceilings_text(ceilings: dict, versions: dict) -> str:
    peaks = ", ".join(f"{dtype} {flops / 1e12:.3g} TFLOP/s" for dtype, flops in ceilings["peak_flops"].items())
    tf32 = "" if ceilings.get("allow_tf32") is None else f" (allow_tf32={ceilings['allow_tf32']})"
    return (f"- device: {versions['device']}; torch {versions['torch']}, rosa_kernels {versions['rosa_kernels']}"
            f" (git {versions.get('git')}), scipy {versions.get('scipy')}\n"
            f"- copy bandwidth: {ceilings['bandwidth'] / 1e9:.4g} GB/s (read + write of a "
            f"{ceilings['copy_bytes'] >> 20} MiB copy)\n"
            f"- dense matmul peak (torch.mm): {peaks}{tf32}")


def speedups(record: dict, alternatives) -> tuple[dict, float | None]:
    """alternative time / our time per alternative, and over the best (fastest) alternative.

    Our own variants (``common.VARIANTS``, e.g. ours+plan) get a ratio but are not alternatives a
    user has, so they never count as the best one."""
    ours = record["times"].get(common.OURS)
    if not ours:
        return {}, None
    ratios = {name: record["times"][name] / ours for name in alternatives if name in record["times"]}
    best = min((record["times"][name] for name in ratios if name not in common.VARIANTS), default=None)
    return ratios, (best / ours if best else None)


def op_table(op: str, records: list[dict]) -> str:
    # Columns only for alternatives that ran somewhere in the table (no scipy column on a GPU).
    alternatives = [a for a in common.ALTERNATIVES[op] if any(a in r["times"] for r in records)]
    header = (["op", "shape", "density", "mask", "dtype", "ours ms"] + [f"{a} ms" for a in alternatives]
              + [f"× {a}" for a in alternatives] + ["× best", "floor ms", "floor frac"])
    lines = [f"### {OP_TITLES[op]}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = {}
    for record in records:
        ratios, best = speedups(record, alternatives)
        ours = record["times"].get(common.OURS)
        cells = [op, record["shape"], f"{record['density']:g}", record["mask"], record["dtype"], _ms(ours)]
        for name in alternatives:
            cell = _ms(record["times"].get(name))
            if name in record.get("notes", {}):
                mark = "†" * (list(notes).index(record["notes"][name]) + 1 if record["notes"][name] in notes
                              else len(notes) + 1)
                notes.setdefault(record["notes"][name], mark)
                cell += mark
            cells.append(cell)
        cells += [_ratio(ratios.get(name)) for name in alternatives]
        floor = record.get("floor_s")
        cells += [_ratio(best), _ms(floor), f"{floor / ours:.2f}" if ours and floor else "n/a"]
        if "error" in record:
            cells[5] = f"error: {record['error']}"
        elif not ours:
            cells[5] = f"n/a ({record['unavailable'].get(common.OURS, 'not built')})"
        lines.append("| " + " | ".join(cells) + " |")
    for note, mark in notes.items():
        lines.append(f"\n{mark} {note}")
    return "\n".join(lines)


def layer_table(records: list[dict]) -> str:
    header = ["step", "out x in x tokens", "density", "mask", "dtype", "RosaLinear ms", "LoRA ms", "full FT ms",
              "× LoRA", "× full FT", "× best"]
    lines = ["### RoSA layer training step (forward + backward, rank 16, dropout 0.05)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    reasons = set()
    for record in records:
        ratios, best = speedups(record, ("lora", "full"))
        cells = ["fwd+bwd", record["shape"], f"{record['density']:g}", record["mask"], record["dtype"]]
        cells += [_ms(record["times"].get(name)) for name in common.LAYER_IMPLEMENTATIONS]
        cells += [_ratio(ratios.get("lora")), _ratio(ratios.get("full")), _ratio(best)]
        if common.OURS in record["unavailable"]:
            reasons.add(record["unavailable"][common.OURS])
        lines.append("| " + " | ".join(cells) + " |")
    for reason in sorted(reasons):
        lines.append(f"\nRosaLinear n/a: {reason}")
    return "\n".join(lines)


def stack_table(stack: dict) -> str:
    memory = stack["memory"]
    gib = 1 << 30
    lines = [f"### Peak GPU memory, stack of {stack['depth']} layers {stack['m']}x{stack['n']}, "
             f"{stack['tokens']} tokens, density {stack['density']:g}, {stack['dtype']} (one fwd+bwd step)", "",
             "| layer | peak GiB | step GiB (above the model) | peak / LoRA peak |", "|---|---|---|---|"]
    lora = memory.get("lora", {}).get("peak")
    for implementation in (common.OURS, "lora", "full"):
        if implementation in memory:
            m = memory[implementation]
            ratio = f"{m['peak'] / lora:.3f}" if lora else "n/a"
            lines.append(f"| {LAYER_NAMES[implementation]} | {m['peak'] / gib:.3f} | {m['step'] / gib:.3f} | {ratio} |")
        else:
            lines.append(f"| {LAYER_NAMES[implementation]} | n/a ({stack['unavailable'].get(implementation)}) | | |")
    lines.append("\nTarget (issue 6): RosaLinear peak ≤ 1.1x the LoRA peak.")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    parts = [f"## rosa_kernels benchmark report ({results['device']}, {results['date']}, "
             f"{'quick' if results['quick'] else 'standard'} sweep, {results['timing']})", "",
             _ceilings_text(results["ceilings"], results["versions"]),
             "- × X = X's time / our time (above 1: we are faster); × best: over the fastest alternative; "
             f"{', '.join(common.VARIANTS)}: our per-mask plan (rosa_kernels.MaskPlan), not counted in × best "
             "(its × below 1: the plan is faster than ours); "
             "floor = max(min bytes / copy bandwidth, FLOPs / matmul peak of the dtype); "
             "floor frac = floor / our time (1.0 = at the floor)"]
    for op in common.OPS:
        records = [r for r in results["ops"] if r["op"] == op]
        if records:
            parts += ["", op_table(op, records)]
    if results.get("layers"):
        parts += ["", layer_table(results["layers"])]
    if results.get("stack"):
        parts += ["", stack_table(results["stack"])]
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------------------------
# The model training step (bench/model_step.py): issue 11's table, RoSA's phases, compiled rows
# ----------------------------------------------------------------------------------------------


def _gib(value) -> str:
    return "n/a" if value is None else f"{value / 2**30:.3g}"


def _div(a, b) -> str:
    return "n/a" if a is None or not b else f"{a / b:.2f}"


def _model_cells(rows: list[dict]):
    """(model, tokens) -> method -> row, in the order the rows came."""
    cells: dict = {}
    for row in rows:
        cells.setdefault((row["model"], row["tokens"]), {})[row["method"]] = row
    return cells


def _ok(row) -> dict | None:
    return row if row is not None and row.get("status") == "ok" else None


def _value(row, key):
    row = _ok(row)
    return None if row is None else row.get(key)


def _time_cell(row) -> str:
    if row is None:
        return "not run"
    if row.get("status") != "ok":
        return row["status"] if row["status"].startswith("skipped") else f"failed: {row['status']}"
    return f"{row['gpu_ms']:.4g}"


def model_tables(results: dict) -> str:
    """Issue 11's table (full FT / PEFT LoRA / RoSA), then RoSA's way into the sparse phase (issue
    13's memory targets), then the compiled (CUDA graph) rows."""
    from bench import model_step

    env = results["environment"]
    cells = _model_cells(results["rows"])
    lines = [f"### Model training step ({env.get('device')}, {results['date']})", "",
             f"- step: {results['step']}; {results['timing']}",
             f"- host CPU: {env.get('cpu')}; torch {env.get('torch')}, transformers {env.get('transformers')}, "
             f"peft {env.get('peft')}, rosa_kernels {env.get('rosa_kernels')} (git {env.get('git')})",
             f"- steps per row: {results['options']['warmup']} untimed + {results['options']['timed']} timed "
             f"(RoSA phases: {results['options']['phase_timed']} timed; one-shot steps once)",
             "- LoRA: peft r 16, alpha 16, dropout 0.05, all-linear; RoSA: r 16, alpha 16, dropout 0.05, "
             "density 0.6%, all-linear, merged; memory: peak above the weights / with the weights (GiB)", ""]
    header = ["model, tokens per step", "full FT ms", "PEFT LoRA ms", "RoSA ms", "RoSA / LoRA", "RoSA / full",
              "host ms full / LoRA / RoSA", "above weights GiB full / LoRA / RoSA", "RoSA / LoRA memory",
              "with weights GiB full / LoRA / RoSA", "RoSA, rosa-recipe masks: ms (/ LoRA, / full)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (model, tokens), methods in cells.items():
        full, lora, rosa = (methods.get(m) for m in ("full", "lora", "rosa"))
        if full is None and lora is None and rosa is None:
            continue
        t = {name: _value(r, "gpu_ms") for name, r in (("full", full), ("lora", lora), ("rosa", rosa))}
        structured = methods.get("rosa-structured")
        t_structured = _value(structured, "gpu_ms")
        lines.append("| " + " | ".join([
            f"{model}, {tokens}", _time_cell(full), _time_cell(lora), _time_cell(rosa),
            _div(t["rosa"], t["lora"]), _div(t["rosa"], t["full"]),
            " / ".join(_ms_of(_value(r, "host_ms"))
                       for r in (full, lora, rosa)),
            " / ".join(_gib(_value(r, "above_weights_bytes")) for r in (full, lora, rosa)),
            _div(_value(rosa, "above_weights_bytes"), _value(lora, "above_weights_bytes")),
            " / ".join(_gib(_value(r, "peak_bytes")) for r in (full, lora, rosa)),
            "n/a" if structured is None else
            f"{_time_cell(structured)} ({_div(t_structured, t['lora'])}, {_div(t_structured, t['full'])})",
        ]) + " |")

    phase_rows = [(key, methods) for key, methods in cells.items() if any(p in methods for p in model_step.PHASES)]
    if phase_rows:
        lines += ["", "#### RoSA's way into the sparse phase", "",
                  "| model, tokens per step | step | ms | host ms | above weights GiB | with weights GiB | "
                  "with weights / LoRA's | ms / sparse step's | note |", "|---|---|---|---|---|---|---|---|---|"]
        for (model, tokens), methods in phase_rows:
            lora, rosa = methods.get("lora"), methods.get("rosa")
            for name in (*model_step.PHASES, "rosa"):
                row = methods.get(name)
                if row is None:
                    continue
                lines.append("| " + " | ".join([
                    f"{model}, {tokens}", model_step.METHOD_NAMES[name], _time_cell(row),
                    _ms_of(_value(row, "host_ms")),
                    _gib(_value(row, "above_weights_bytes")), _gib(_value(row, "peak_bytes")),
                    _div(_value(row, "peak_bytes"), _value(lora, "peak_bytes")),
                    _div(_value(row, "gpu_ms"), _value(rosa, "gpu_ms")), row.get("note", "") or "",
                ]) + " |")
        lines.append("\nTargets (issue 13): with the weights, warm-up ≤ 1.05x and collection (1 and 8 "
                     "micro-batches) ≤ 1.25x a PEFT LoRA step's peak; a collection step ≤ 3x a sparse step's time.")

    compiled = [(key, methods) for key, methods in cells.items() if any(c in methods for c in model_step.COMPILED)]
    if compiled:
        lines += ["", "#### torch.compile(model, mode=\"reduce-overhead\") (CUDA graphs)", "",
                  "| model, tokens per step | full FT ms | PEFT LoRA ms | RoSA ms | RoSA / LoRA | RoSA / full | "
                  "compiled / eager full / LoRA / RoSA | host ms full / LoRA / RoSA | compile s full / LoRA / RoSA |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for (model, tokens), methods in compiled:
            rows = [methods.get(f"{m}+compile") for m in model_step.METHODS]
            eager = [methods.get(m) for m in model_step.METHODS]
            t = [_value(r, "gpu_ms") for r in rows]
            lines.append("| " + " | ".join([
                f"{model}, {tokens}", *(_time_cell(r) for r in rows), _div(t[2], t[1]), _div(t[2], t[0]),
                " / ".join(_div(c, _value(e, "gpu_ms")) for c, e in zip(t, eager)),
                " / ".join(_ms_of(_value(r, "host_ms")) for r in rows),
                " / ".join("n/a" if _value(r, "compile_s") is None else f"{_value(r, 'compile_s'):.0f}"
                           for r in rows),
            ]) + " |")
        lines.append("\nTargets (issue 11): RoSA compiles; its step ≤ 0.8x PEFT LoRA's and ≤ 1.0x full FT's, "
                     "each compiled the same way.")

    quantized = [(key, methods) for key, methods in cells.items() if any(q in methods for q in model_step.QUANTIZED)]
    if quantized:
        lines += ["", "#### On a 4-bit base (bitsandbytes NF4, double quantization): PEFT QLoRA and QRoSA", "",
                  "| model, tokens per step | PEFT QLoRA ms | QRoSA ms | QRoSA spmm ms | QRoSA / QLoRA (csr_add / spmm) | "
                  "host ms QLoRA / QRoSA / spmm | above weights GiB QLoRA / QRoSA / spmm | "
                  "with weights GiB QLoRA / QRoSA / spmm | QRoSA / QLoRA peak with weights (csr_add / spmm) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for (model, tokens), methods in quantized:
            rows = [methods.get(m) for m in model_step.QUANTIZED]  # QLoRA, QRoSA csr_add, QRoSA spmm
            t = [_value(r, "gpu_ms") for r in rows]
            peaks = [_value(r, "peak_bytes") for r in rows]
            lines.append("| " + " | ".join([
                f"{model}, {tokens}", *(_time_cell(r) for r in rows), " / ".join(_div(v, t[0]) for v in t[1:]),
                " / ".join(_ms_of(_value(r, "host_ms")) for r in rows),
                " / ".join(_gib(_value(r, "above_weights_bytes")) for r in rows),
                " / ".join(_gib(v) for v in peaks), " / ".join(_div(v, peaks[0]) for v in peaks[1:]),
            ]) + " |")
        lines.append("\nTargets (issue 14): QRoSA's step ≤ 1.1x PEFT QLoRA's, its peak memory ≤ 1.0x QLoRA's.")
    if any("rosa-structured" in methods for methods in cells.values()):
        lines.append("\nThe last column of the first table: RoSA in the sparse phase with masks of DESIGN.md's `rosa` "
                     "recipe (the column structure of real RoSA masks) instead of the near-uniform masks collected "
                     "on the random model.")
    lines.append("\nTargets (issue 11): RoSA / LoRA ≤ 0.5 at 2048 tokens and ≤ 0.6 at 8192; RoSA / full ≤ 1.0; "
                 "RoSA's peak above the weights ≤ 0.6x PEFT LoRA's.")
    return "\n".join(lines) + "\n"


def model_summary(results: dict) -> str:
    """A short plain-text table: one line per (model, tokens), the ratios and the failures."""
    from bench import model_step

    lines = ["model, tokens | full ms | LoRA ms | RoSA ms | RoSA/LoRA | RoSA/full | mem RoSA/LoRA | compiled "
             "full/LoRA/RoSA ms | RoSA rosa-recipe masks ms (/full)"]
    cells = _model_cells(results["rows"])
    for (model, tokens), methods in cells.items():
        t = {m: _value(methods.get(m), "gpu_ms") for m in model_step.ALL_METHODS}
        compiled = " / ".join(("skip" if methods[f"{m}+compile"]["status"].startswith("skipped") else "fail")
                              if methods.get(f"{m}+compile") is not None and t[f"{m}+compile"] is None
                              else _ms_of(t[f"{m}+compile"])
                              for m in model_step.METHODS)
        lines.append(" | ".join([f"{model}, {tokens}", *(_ms_of(t[m]) for m in model_step.METHODS),
                                 _div(t["rosa"], t["lora"]), _div(t["rosa"], t["full"]),
                                 _div(_value(methods.get("rosa"), "above_weights_bytes"),
                                      _value(methods.get("lora"), "above_weights_bytes")), compiled,
                                 f"{_ms_of(t['rosa-structured'])} ({_div(t['rosa-structured'], t['full'])})"]))
    for (model, tokens), methods in cells.items():
        t = [_value(methods.get(m), "gpu_ms") for m in model_step.QUANTIZED]
        if any(m in methods for m in model_step.QUANTIZED):
            memory = [_value(methods.get(m), "peak_bytes") for m in model_step.QUANTIZED]
            lines.append(f"{model}, {tokens}, 4-bit base | QLoRA {_ms_of(t[0])} | "
                         f"QRoSA csr_add / spmm {' / '.join(_ms_of(v) for v in t[1:])} | "
                         f"QRoSA/QLoRA {' / '.join(_div(v, t[0]) for v in t[1:])} | "
                         f"peak QRoSA/QLoRA {' / '.join(_div(v, memory[0]) for v in memory[1:])}")
    failures = [r for r in results["rows"] if r.get("status") != "ok"]
    for row in failures:
        lines.append(f"not ok: {row['model']}, {row['tokens']}, {row['method']}: {row['status']}")
    return "\n".join(lines)


def run_model(args) -> dict:
    """``--model``: the model training-step sweep; writes model_step.json and model_step.md."""
    from bench import model_step

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.model_shapes:
        shapes = args.model_shapes.split(",")
    else:
        shapes = list(model_step.GPU_SHAPES) if device == "cuda" else [model_step.CPU_SHAPE]
    unknown = [s for s in shapes if s not in model_step.SHAPES]
    if unknown:
        raise SystemExit(f"--model-shapes: unknown {unknown}; choose from {sorted(model_step.SHAPES)}")
    seq = args.model_seq or (model_step.GPU_SEQ if device == "cuda" else model_step.CPU_SEQ)
    batches = ([int(b) for b in args.model_batches.split(",")] if args.model_batches
               else list(model_step.GPU_BATCHES) if device == "cuda" else [model_step.CPU_BATCH])
    dtype = "bfloat16" if device == "cuda" else "float32"
    cases = [model_step.ModelCase(s, b, seq, dtype, device, args.model_kv_heads) for s in shapes for b in batches]
    methods = tuple(args.model_methods.split(",")) if args.model_methods else model_step.default_methods()
    if args.no_compile or (device == "cpu" and not args.model_methods):  # CUDA graphs need a GPU
        methods = tuple(m for m in methods if m not in model_step.COMPILED)
    options = model_step.Options()
    if args.model_steps:
        warmup, timed, *phase = (int(x) for x in args.model_steps.split(","))
        options = model_step.Options(warmup=warmup, timed=timed, phase_timed=phase[0] if phase else timed)
    compile_cases = args.compile_cases.split(",") if args.compile_cases else None
    eager = tuple(m for m in methods if m not in model_step.COMPILED)
    compiled = tuple(m for m in methods if m in model_step.COMPILED)
    # Eager rows of every case first, then the compiled rows (minutes of compiling each): when time
    # runs short, the main table is complete and the compiled rows are what is left out.
    passes = [(case, eager) for case in cases] + [
        (case, compiled) for case in cases
        if compiled and (compile_cases is None or f"{case.shape}:{case.tokens}" in compile_cases)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = model_step.run_sweep([], methods, options)
    for case, case_methods in passes:
        if not case_methods:
            continue
        if args.time_limit and time.perf_counter() - started > args.time_limit:
            results["rows"] += [model_step.failure_row(case, m, f"skipped: --time-limit {args.time_limit:.0f} s "
                                                       "was reached") for m in case_methods]
            continue
        part = model_step.run_sweep([case], case_methods, options, log=log)
        results["environment"], results["rows"] = part["environment"], results["rows"] + part["rows"]
        results["elapsed_s"] = time.perf_counter() - started
        # Written after each case: a run cut short still leaves what it measured.
        (out / "model_step.json").write_text(json.dumps(results, indent=1, default=str))
    order = {m: i for i, m in enumerate(model_step.ALL_METHODS)}
    index = {(c.shape, c.tokens): i for i, c in enumerate(cases)}
    results["rows"].sort(key=lambda r: (index.get((r["shape"], r["tokens"]), 0), order[r["method"]]))
    results["elapsed_s"] = time.perf_counter() - started
    (out / "model_step.json").write_text(json.dumps(results, indent=1, default=str))
    table = model_tables(results)
    (out / "model_step.md").write_text(table)
    log(f"wrote {out / 'model_step.json'}, {out / 'model_step.md'} in {results['elapsed_s']:.0f} s")
    sys.stdout.flush()
    print(table, flush=True)
    return results


# ----------------------------------------------------------------------------------------------
# Plot
# ----------------------------------------------------------------------------------------------


def plot(results: dict, path: Path) -> bool:
    """Time against density, ours vs each alternative, one panel per op and shape (main dtype)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: skipping bench.png")
        return False
    records = [r for r in results["ops"] if r["times"]]
    if not records:
        return False
    dtype = "bfloat16" if any(r["dtype"] == "bfloat16" for r in records) else records[0]["dtype"]
    records = [r for r in records if r["dtype"] == dtype]
    ops = [op for op in common.OPS if any(r["op"] == op for r in records)]
    shapes = sorted({(r["m"], r["n"]) for r in records})
    fig, axes = plt.subplots(len(ops), len(shapes), figsize=(4.2 * len(shapes), 3.2 * len(ops)), squeeze=False)
    colors = {name: f"C{i}" for i, name in enumerate([common.OURS, "torch.sparse", "dense", "scipy", "argsort",
                                                       "index_add", *common.VARIANTS])}
    for row, op in enumerate(ops):
        for col, (m, n) in enumerate(shapes):
            ax = axes[row][col]
            for mask, style in (("rosa", "-o"), ("uniform", "--x")):
                subset = sorted((r for r in records if r["op"] == op and (r["m"], r["n"]) == (m, n)
                                 and r["mask"] == mask), key=lambda r: r["density"])
                for name in (common.OURS, *common.ALTERNATIVES[op]):
                    points = [(r["density"], r["times"][name] * 1e3) for r in subset if name in r["times"]]
                    if points:
                        ax.plot(*zip(*points), style, color=colors[name], linewidth=2.5 if name == common.OURS else 1,
                                markersize=4, label=f"{name} ({mask})")
                floors = [(r["density"], r["floor_s"] * 1e3) for r in subset if r.get("floor_s")]
                if floors and mask == "rosa":
                    ax.plot(*zip(*floors), ":", color="gray", label="floor (rosa)")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{op} {m}x{n} {dtype}", fontsize=9)
            ax.set_xlabel("density")
            ax.set_ylabel("ms")
            ax.grid(True, which="both", alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(fontsize=6)
            elif ax.get_legend_handles_labels()[0] and col == 0:
                ax.legend(fontsize=6)
    fig.suptitle(f"rosa_kernels vs alternatives on {results['versions']['device']} ({results['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# Tools that measure one thing in depth; ``report.py --NAME ARGS`` hands ARGS to the module's main.
TOOLS = {
    "--host-overhead": "bench.host_overhead",   # host cost of the public ops and of a layer step
    "--profile-layer": "bench.profile_layer",   # step / host / kernel time and kernel count of a layer step
    "--profile-spmm": "bench.profile_spmm",     # one SpMM per kernel variant, for ncu
    "--profile-collect": "bench.profile_collect",  # where RoSA's collection step spends its time
    "--profile-step": "bench.profile_step",     # a model step's kernel time by class, method by method
    "--profile-dropout": "bench.profile_dropout",  # the fused LoRA dropout products against their unfused form
}


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in TOOLS:
        import importlib

        return importlib.import_module(TOOLS[argv[0]]).main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when a GPU and the CUDA kernels are present, else cpu")
    parser.add_argument("--quick", action="store_true", help="one shape, one or two densities: a smoke run")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                        help="folder for bench.json, bench.md and bench.png (default: bench/results)")
    parser.add_argument("--shapes", help="override: comma-separated MxNxTOKENS")
    parser.add_argument("--densities", help="override: comma-separated densities")
    parser.add_argument("--masks", help="override: comma-separated mask kinds (uniform, rosa)")
    parser.add_argument("--ops", help=f"override: comma-separated ops out of {','.join(common.OPS)}")
    parser.add_argument("--dtypes", help="override: comma-separated dtypes (float32, bfloat16)")
    parser.add_argument("--budget", type=float, help="seconds of timed calls per measurement")
    parser.add_argument("--no-layer", action="store_true", help="skip the layer step and the memory stack")
    parser.add_argument("--time-limit", type=float,
                        help="seconds after which remaining op cases are skipped (default: 270 on cuda, 160 on cpu)")
    parser.add_argument("--no-plot", action="store_true", help="do not write bench.png")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for the CPU (default: torch's choice)")
    model = parser.add_argument_group("model training step (--model; needs the bench extra: transformers, peft)")
    model.add_argument("--model", action="store_true",
                       help="run the model training-step sweep (bench/model_step.py) instead of the op sweep")
    model.add_argument("--model-shapes", help="comma-separated: 7b-slice, tinyllama, tiny (default: the GPU "
                                              "pair on cuda, tiny on cpu)")
    model.add_argument("--model-batches", help="comma-separated sequences per step (default 1,4 on cuda, 1 on cpu)")
    model.add_argument("--model-seq", type=int, help="tokens per sequence (default 2048 on cuda, 32 on cpu)")
    model.add_argument("--model-kv-heads", type=int, help="key/value heads (default: as many as heads)")
    model.add_argument("--model-methods", help="comma-separated methods (default: all of bench/model_step.py's "
                                               "ALL_METHODS)")
    model.add_argument("--model-steps", help="WARMUP,TIMED[,PHASE_TIMED] steps per row (default 3,5,3)")
    model.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    model.add_argument("--compile-cases", help="comma-separated SHAPE:TOKENS that get the compiled rows "
                                               "(default: every case)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        return run_model(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    config = custom_config(args, standard_config(device, args.quick))
    results = run(config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=1, default=str))
    table = markdown(results)
    (out / "bench.md").write_text(table)
    plotted = False if args.no_plot else plot(results, out / "bench.png")
    log(f"wrote {out / 'bench.json'}, {out / 'bench.md'}" + (f", {out / 'bench.png'}" if plotted else "")
        + f" in {results['elapsed_s']:.0f} s")
    sys.stdout.flush()
    print(table, flush=True)
    return results


if __name__ == "__main__":
    main()
