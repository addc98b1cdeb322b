"""rosa_kernels: sparse kernels and a drop-in RoSA layer for PyTorch.

Raw ops (call-compatible with ``spops``): :func:`spmm`, :func:`sddmm`, :func:`csr_transpose`,
:func:`csr_add`; CSR helpers in :mod:`rosa_kernels.csr`; :class:`MaskPlan` (a per-mask plan that
sends a mask's hot columns through dense GEMMs).
"""

from __future__ import annotations

import torch  # noqa: F401  (torch's libraries must be loaded before the extension)

from . import _C
from .csr import (
    CSR,
    csr_from_dense,
    csr_from_mask,
    csr_from_scipy,
    csr_from_torch_sparse,
    csr_to_dense,
    csr_to_scipy,
    csr_to_torch_sparse,
    row_order,
    validate_csr,
)
from .ops import csr_add, csr_transpose, sddmm, spmm
from . import dropout  # noqa: F401  (fake kernels of the fused LoRA dropout ops)
from .linear import RosaLinear
from .plan import MaskPlan
from .masks import load_masks, save_masks, select_mask
from .model import RosaConfig, RosaModel, RosaScheduler, apply_rosa, get_rosa_model, merge_and_unload
from .qrosa import QRosaLinear, quantize_linear
from .recipe import parameter_groups, random_masks, restart_optimizer

__version__ = "0.1.0"


def cuda_built() -> bool:
    """True when this build of rosa_kernels contains the CUDA kernels."""
    return bool(_C.cuda_built())


def cuda_available() -> bool:
    """True when the CUDA kernels are built and a CUDA device is present."""
    return cuda_built() and torch.cuda.is_available()


__all__ = [
    "__version__",
    "cuda_built",
    "cuda_available",
    "spmm",
    "sddmm",
    "csr_transpose",
    "csr_add",
    "row_order",
    "validate_csr",
    "CSR",
    "csr_from_dense",
    "csr_from_mask",
    "csr_from_scipy",
    "csr_from_torch_sparse",
    "csr_to_dense",
    "csr_to_scipy",
    "csr_to_torch_sparse",
    "RosaLinear",
    "QRosaLinear",
    "quantize_linear",
    "MaskPlan",
    "select_mask",
    "save_masks",
    "load_masks",
    "RosaConfig",
    "RosaModel",
    "RosaScheduler",
    "apply_rosa",
    "get_rosa_model",
    "merge_and_unload",
    "parameter_groups",
    "restart_optimizer",
    "random_masks",
]
