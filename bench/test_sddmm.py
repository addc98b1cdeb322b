"""pytest-benchmark: `sddmm` on row-major operands and on the training layout (`sddmm_t`:
a = dY.t(), bt = X.t()), ours against the alternatives (bench/common.py lists them)."""

OPS = ("sddmm", "sddmm_t")


def test_sddmm(benchmark_case, case, implementation):
    benchmark_case(case, implementation)
