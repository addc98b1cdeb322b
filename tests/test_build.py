"""The build: version, build flags, op registration and the CMake configure messages."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rosa_kernels
from rosa_kernels import _C

ROOT = Path(__file__).resolve().parents[1]
OPS = ["spmm", "sddmm", "csr_transpose", "csr_add", "csr_add_"]


def test_version_matches_pyproject():
    text = (ROOT / "pyproject.toml").read_text()
    assert rosa_kernels.__version__ == re.search(r'^version = "(.+)"', text, re.M).group(1)


def test_build_flags():
    assert isinstance(rosa_kernels.cuda_built(), bool)
    assert rosa_kernels.cuda_available() == (rosa_kernels.cuda_built() and torch.cuda.is_available())
    if torch.version.cuda is None:
        assert not rosa_kernels.cuda_built(), "a CPU-only torch cannot have CUDA kernels built against it"


def test_cpu_kernels_use_openmp_when_the_compiler_has_it():
    assert isinstance(_C.openmp_built(), bool)
    if sys.platform.startswith("linux"):
        assert _C.openmp_built(), "gcc/clang on Linux ship OpenMP: the CPU kernels should use it"


@pytest.mark.parametrize("name", OPS)
def test_ops_are_registered(name):
    op = getattr(torch.ops.rosa_kernels, name)
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"rosa_kernels::{name}", "CPU")
    if rosa_kernels.cuda_built():
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"rosa_kernels::{name}", "CUDA")
    assert op.default._schema.name == f"rosa_kernels::{name}"


def test_public_api_is_exported():
    for name in rosa_kernels.__all__:
        assert hasattr(rosa_kernels, name), name


def configure(tmp_path, *defines):
    """Runs only CMake's configure step of this project (a few seconds) and returns its output."""
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake not on PATH")
    pybind11 = pytest.importorskip("pybind11")
    command = [cmake, "-S", str(ROOT), "-B", str(tmp_path / "build"), f"-DPython_EXECUTABLE={sys.executable}",
               f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", *defines]
    if shutil.which("ninja"):
        command += ["-G", "Ninja"]
    env = {k: v for k, v in os.environ.items() if k != "ROSA_CUDA"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    return result.returncode, result.stdout + result.stderr


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the message of a CPU-only torch")
def test_cpu_only_torch_configures_a_cpu_build_with_a_clear_message(tmp_path):
    code, output = configure(tmp_path)
    assert code == 0, output
    assert "CUDA kernels are off (CPU build)" in output, output


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the message of a CPU-only torch")
def test_rosa_cuda_on_fails_clearly_without_cuda_torch(tmp_path):
    code, output = configure(tmp_path, "-DROSA_CUDA=ON")
    assert code != 0
    assert "ROSA_CUDA=ON but the installed torch has no CUDA" in output, output


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
@pytest.mark.parametrize("spec, expected", [
    ({"TORCH_CUDA_ARCH_LIST": "8.0;9.0"}, "8.0;9.0+PTX"),
    ({"TORCH_CUDA_ARCH_LIST": "8.0 8.6 9.0a"}, "8.0;8.6;9.0a;9.0+PTX"),  # sm_90a PTX runs nowhere else
    ({"TORCH_CUDA_ARCH_LIST": "8.6;10.0;9.0"}, "8.6;9.0;10.0+PTX"),
    ({"TORCH_CUDA_ARCH_LIST": "7.5;9.0+PTX"}, "7.5;9.0+PTX"),  # the user's PTX choice stands
    ({"CMAKE_CUDA_ARCHITECTURES": "80-real;90"}, "8.0;9.0+PTX"),
])
def test_cuda_architectures_follow_the_users_setting_plus_ptx_of_the_newest(spec, expected):
    env = {k: v for k, v in os.environ.items() if k != "TORCH_CUDA_ARCH_LIST"}
    defines = [f"-DPython_EXECUTABLE={sys.executable}"]
    if "TORCH_CUDA_ARCH_LIST" in spec:
        env["TORCH_CUDA_ARCH_LIST"] = spec["TORCH_CUDA_ARCH_LIST"]
    else:
        defines.append(f"-DCMAKE_CUDA_ARCHITECTURES={spec['CMAKE_CUDA_ARCHITECTURES']}")
    out = subprocess.run(["cmake", *defines, "-P", str(ROOT / "cmake" / "rosa_cuda_archs.cmake")], env=env,
                         capture_output=True, text=True, check=True)
    archs, source = out.stderr.strip().split("|")
    assert archs == expected
    assert ("TORCH_CUDA_ARCH_LIST" in source) == ("TORCH_CUDA_ARCH_LIST" in spec)


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_cuda_architectures_default_to_the_visible_gpus_or_torchs_list():
    env = {k: v for k, v in os.environ.items() if k != "TORCH_CUDA_ARCH_LIST"}
    out = subprocess.run(["cmake", f"-DPython_EXECUTABLE={sys.executable}", "-P",
                          str(ROOT / "cmake" / "rosa_cuda_archs.cmake")], env=env, capture_output=True, text=True,
                         check=True)
    archs, source = out.stderr.strip().split("|")
    assert archs.endswith("+PTX") and archs.count("+PTX") == 1
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        assert f"{major}.{minor}" in archs and source == "the GPUs visible at build time"
    elif not torch.cuda.get_arch_list():
        assert archs == "8.0;9.0+PTX" and source.startswith("a fallback")
