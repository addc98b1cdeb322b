"""pytest-benchmark suites: every case runs our op and each alternative in one group.

``pytest bench/ --benchmark-only`` runs the CPU set (API_CONTRACTS.md shapes, float32);
``pytest bench/ --benchmark-only --gpu-sweep`` runs the GPU sweep (LLaMA-7B shapes, bf16 + fp32).
Both kinds of parameters carry a marker (``cpu_set`` / ``gpu_sweep``) for ``-m`` selection.
``pytest bench/ --benchmark-disable`` calls each implementation once: a smoke run.
"""

from __future__ import annotations

import functools
import time

import pytest
import torch

from bench import common


def pytest_addoption(parser):
    group = parser.getgroup("rosa_kernels benchmarks")
    group.addoption("--gpu-sweep", action="store_true", default=False,
                    help="run the GPU sweep (LLaMA-7B shapes, tokens 4096, bf16 + fp32) instead of the CPU set")
    group.addoption("--bench-dtypes", default=None,
                    help="comma-separated dtypes (default: float32 on CPU, bfloat16,float32 on the GPU)")
    group.addoption("--bench-budget", type=float, default=None,
                    help="seconds of timed calls per benchmark (default 0.1 on CPU, 0.2 on the GPU)")


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_set: the default CPU benchmark set (bench/)")
    config.addinivalue_line("markers", "gpu_sweep: the full GPU benchmark sweep (bench/)")
    # torch warns once that CSR tensors are "beta"; that is noise in a benchmark log.
    config.addinivalue_line("filterwarnings", "ignore:Sparse CSR tensor support is in beta")


def _gpu_sweep(config) -> bool:
    """--gpu-sweep, or exactly ``-m gpu_sweep``."""
    return config.getoption("--gpu-sweep") or (config.getoption("markexpr", "") or "").strip() == "gpu_sweep"


def _dtypes(config, default):
    option = config.getoption("--bench-dtypes")
    return tuple(option.split(",")) if option else default


def pytest_generate_tests(metafunc):
    """Parametrizes ``case, implementation`` from the module's ``OPS`` (or ``LAYER = True``)."""
    if "case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    gpu = _gpu_sweep(config)
    marker = pytest.mark.gpu_sweep if gpu else pytest.mark.cpu_set
    if getattr(metafunc.module, "LAYER", False):
        cases = (common.gpu_layer_cases(_dtypes(config, ("bfloat16",))) if gpu
                 else [c for c in common.cpu_layer_cases() if c.dtype in _dtypes(config, ("float32",))])
        implementations = {None: common.LAYER_IMPLEMENTATIONS}
    else:
        ops = metafunc.module.OPS
        cases = (common.gpu_cases(ops, _dtypes(config, ("bfloat16", "float32"))) if gpu
                 else common.cpu_cases(ops, _dtypes(config, ("float32",))))
        implementations = {op: (common.OURS, *common.ALTERNATIVES[op]) for op in ops}
    params = [
        pytest.param(case, implementation, id=f"{case.id}-{implementation}",
                     marks=[marker, pytest.mark.benchmark(group=case.group)])
        for case in cases
        for implementation in implementations.get(getattr(case, "op", None), implementations.get(None, ()))
    ]
    metafunc.parametrize("case, implementation", params)


@pytest.fixture(scope="session")
def bench_device(request):
    if _gpu_sweep(request.config):
        if not torch.cuda.is_available():
            pytest.skip("--gpu-sweep needs a CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture(scope="session")
def ceilings(request, bench_device):
    """Measured copy bandwidth and matmul peaks (once per session; None in --benchmark-disable runs)."""
    if request.config.getoption("benchmark_disable", False):
        return None
    return common.measure_ceilings(bench_device, quick=bench_device.type == "cpu")


@functools.lru_cache(maxsize=1)
def _prepared(case):
    # Implementations of one case run one after another, so one cached case at a time suffices
    # (and keeps GPU memory bounded).
    if torch.device(case.device).type == "cuda":
        torch.cuda.empty_cache()
    if isinstance(case, common.LayerCase):
        return common.prepare_layer(case)
    return common.prepare(case)


@pytest.fixture
def benchmark_case(benchmark, request, bench_device, ceilings):
    """Runs one implementation of a case under pytest-benchmark and fills ``extra_info``."""

    def run(case, implementation):
        prepared = _prepared(case)
        if implementation not in prepared.calls:
            pytest.skip(f"{implementation}: {prepared.unavailable.get(implementation, 'not built')}")
        call = common.synchronized(prepared.calls[implementation], case.device)
        default_budget = 0.2 if bench_device.type == "cuda" else 0.1
        budget = request.config.getoption("--bench-budget") or default_budget
        rounds = 1
        if benchmark.enabled:
            call()
            start = time.perf_counter()
            call()
            rounds = int(max(3, min(1000, budget / max(time.perf_counter() - start, 1e-7))))
        benchmark.pedantic(call, rounds=rounds, warmup_rounds=1, iterations=1)
        info = benchmark.extra_info
        info.update(implementation=implementation, nnz=prepared.nnz, input_sets=prepared.sets,
                    min_bytes=prepared.min_bytes, flops=prepared.flops)
        if implementation in prepared.notes:
            info["note"] = prepared.notes[implementation]
        if benchmark.enabled and benchmark.stats is not None:
            median = benchmark.stats.stats.median
            info["GB/s"] = prepared.min_bytes / median / 1e9
            info["TFLOP/s"] = prepared.flops / median / 1e12
            if ceilings is not None and isinstance(case, common.Case):
                floor = common.floor_seconds(prepared.min_bytes, prepared.flops, case.dtype, ceilings)
                info["floor_ms"] = floor * 1e3
                info["floor_fraction"] = floor / median
        info.update(common.versions(bench_device))

    return run
