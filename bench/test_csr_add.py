"""pytest-benchmark: `csr_add`, ours against the alternatives (bench/common.py lists them)."""

OPS = ("csr_add",)


def test_csr_add(benchmark_case, case, implementation):
    benchmark_case(case, implementation)
