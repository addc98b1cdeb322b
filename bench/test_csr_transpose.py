"""pytest-benchmark: `csr_transpose`, ours against the alternatives (bench/common.py lists them)."""

OPS = ("csr_transpose",)


def test_csr_transpose(benchmark_case, case, implementation):
    benchmark_case(case, implementation)
