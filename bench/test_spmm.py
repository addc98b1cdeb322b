"""pytest-benchmark: `spmm`, ours against the alternatives (bench/common.py lists them)."""

OPS = ("spmm",)


def test_spmm(benchmark_case, case, implementation):
    benchmark_case(case, implementation)
