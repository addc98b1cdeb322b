"""pytest-benchmark: one training step (forward + backward) of `RosaLinear` against a plain
PyTorch LoRA layer of the same rank and a full fine-tuning step of the same `nn.Linear`."""

import pytest

import rosa_kernels

if not hasattr(rosa_kernels, "RosaLinear"):
    pytest.skip("rosa_kernels.RosaLinear is not in this build (python/rosa_kernels/linear.py missing)",
                allow_module_level=True)

LAYER = True


def test_layer_step(benchmark_case, case, implementation):
    benchmark_case(case, implementation)
