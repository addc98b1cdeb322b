"""Shared fixtures: every op test runs on each available device and draws fresh seeded inputs.

``device`` is "cpu" always and "cuda" when the CUDA kernels are built and a GPU is present; the
CUDA cases show up as skipped elsewhere, so the same suite is the GPU suite.
"""

import zlib

import pytest
import torch

import rosa_kernels

CUDA = rosa_kernels.cuda_available()
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs the CUDA kernels and a GPU")),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture
def gen(request):
    """A CPU generator seeded from the test's id: fresh inputs for every case, reproducible runs."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="session")
def real_masks_sample():
    """A few real RoSA masks (both densities, square and rectangular); skips if the file is absent."""
    from rosa_kernels import testing

    if testing.find_real_masks() is None:
        pytest.skip("real masks not found (set ROSA_KERNELS_MASKS)")
    masks = testing.real_masks()
    names = [
        "encoder.layer.0.attention.self.query@0.003",
        "encoder.layer.3.intermediate.dense@0.01",
        "encoder.layer.5.output.dense@0.003",
    ]
    return {name: masks[name] for name in names}


def pytest_configure(config):
    # Also registered in pyproject.toml by the GPU check; repeated here so the suite runs alone.
    config.addinivalue_line("markers", "sanitizer: small CUDA cases run under compute-sanitizer")


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """Runs a test with torch (and so the CPU kernels' OpenMP) on 1 and on 2 threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)
