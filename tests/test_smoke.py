import torch

import rosa_kernels


def test_version_and_build_flags():
    assert isinstance(rosa_kernels.__version__, str)
    assert isinstance(rosa_kernels.cuda_built(), bool)
    assert rosa_kernels.cuda_available() == (rosa_kernels.cuda_built() and torch.cuda.is_available())
