"""QRoSA: RoSA over a frozen bitsandbytes 4-bit base, as QLoRA is LoRA over one.

A :class:`QRosaLinear` keeps a ``bitsandbytes.nn.Linear4bit`` (NF4 or FP4, with or without double
quantization) as its frozen ``base_layer`` and trains RosaLinear's adapters on top of it:

    Y = X W^T + b + scale * (drop(X) A^T) B^T + X S^T          W = dequantize(base_layer.weight)

W is dequantized in forward and again in backward, a transient of each call that is never saved
(bitsandbytes' own training path does the same), so memory stays QLoRA's: the 4-bit base, the
adapters, and one dense W at a time. A 4-bit base cannot hold ``W + S``, so ``sparse_mode="merged"``
is refused; S enters the math by

- ``"csr_add"`` (default): S is added into the dequantized W (``csr_add`` in place: nnz values in a
  tensor that is written anyway), so forward and dX are one GEMM each, as in QLoRA;
- ``"spmm"``: ``X S^T`` and ``dY S`` by ``spmm`` with S's structure and its cached transpose; the
  dequantized W is used as it is.

dS goes through the mask's plan (or ``sparse_grad``) and LoRA dropout is regenerated from a seed,
as in RosaLinear. The life cycle is RosaLinear's: the collected statistic is that of
``dW = dY^T X``, computed from dY and X, so W is not needed for it. Everything runs in the adapters'
dtype (by default the base's ``compute_dtype``); the output comes back in the input's dtype, as
``Linear4bit`` does. Eager mode (no ``torch.compile``).

bitsandbytes is an optional dependency (the ``qrosa`` extra). Nothing here imports it before a QRoSA
entry point needs it (:class:`QRosaLinear`, :func:`quantize_linear`), and those raise an
``ImportError`` naming the extra when it is missing; plain ``nn.Linear`` models never need it.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from .linear import RosaLinear

__all__ = ["QRosaLinear", "QUANTIZED_SPARSE_MODES", "is_quantized_linear", "quantize_linear", "require_bitsandbytes"]

EXTRA = "pip install 'rosa_kernels[qrosa]'"
# The sparse modes a 4-bit base allows; the first is the default (and what RosaConfig's "merged" means there).
QUANTIZED_SPARSE_MODES = ("csr_add", "spmm")


def require_bitsandbytes():
    """The ``bitsandbytes`` module, or an ``ImportError`` that says how to install it."""
    try:
        import bitsandbytes
    except ImportError as error:
        raise ImportError(f"QRoSA (RoSA on a 4-bit base) needs bitsandbytes: {EXTRA}") from error
    return bitsandbytes


def is_quantized_linear(module) -> bool:
    """True for a bitsandbytes quantized linear layer (a subclass of ``nn.Linear``). Imports nothing:
    a model can hold one only once bitsandbytes is imported."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None or not isinstance(module, nn.Linear):
        return False
    return isinstance(module, tuple(getattr(bnb.nn, name) for name in ("Linear4bit", "Linear8bitLt")
                                    if hasattr(bnb.nn, name)))


def quantize_linear(linear: nn.Linear, *, compute_dtype=torch.bfloat16, quant_type: str = "nf4",
                    double_quant: bool = True, device=None) -> nn.Module:
    """A ``bitsandbytes.nn.Linear4bit`` holding ``linear``'s weight quantized and a copy of its bias.

    Defaults are QLoRA's (NF4, double quantization, bf16 compute), what ``transformers``'
    ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=torch.bfloat16)`` builds when it loads a model. For models built in code;
    ``device`` defaults to ``linear``'s (bitsandbytes quantizes when the weight moves there).
    """
    bnb = require_bitsandbytes()
    if not isinstance(linear, nn.Linear) or is_quantized_linear(linear):
        raise TypeError(f"linear must be a plain torch.nn.Linear, got {type(linear).__name__}")
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    if not isinstance(compute_dtype, torch.dtype) or not compute_dtype.is_floating_point:
        raise TypeError(f"compute_dtype must be a floating torch.dtype, got {compute_dtype!r}")
    device = linear.weight.device if device is None else torch.device(device)
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=bool(double_quant),
                              quant_type=quant_type, device="meta")
    layer.weight = bnb.nn.Params4bit(linear.weight.detach(), requires_grad=False, quant_type=quant_type,
                                     compress_statistics=bool(double_quant))
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer.to(device)


def _check_sparse_mode(mode) -> str:
    if mode not in QUANTIZED_SPARSE_MODES:
        detail = (" (a 4-bit base cannot hold W + S: 'csr_add' adds S into the dequantized W of each call)"
                  if mode == "merged" else "")
        raise ValueError(f"sparse_mode must be one of {QUANTIZED_SPARSE_MODES} on a 4-bit base, got {mode!r}{detail}")
    return mode


class QRosaLinear(RosaLinear):
    """RosaLinear over a frozen ``bitsandbytes.nn.Linear4bit`` (QRoSA); see the module docs.

    Args:
        base_layer: the quantized layer (its weight already quantized: on its device). It is kept,
            not copied, as the frozen submodule ``base_layer``; ``weight`` and ``bias`` are its own.
        rank, density, alpha, dropout, use_rslora, rule, sparse_grad: as RosaLinear.
        sparse_mode: ``"csr_add"`` (default) or ``"spmm"``; ``"merged"`` raises ``ValueError``.
        dtype: the adapters' (and the computation's) dtype; default the base's ``compute_dtype``
            (else the dtype its weight had before quantization).

    ``merge()`` (and ``merge_and_unload()``) returns a plain, dequantized ``nn.Linear`` in the
    adapters' dtype holding W + S + scale * B A: the 4-bit base itself cannot hold it.
    """

    _owns_base = False

    def __init__(self, base_layer, *, rank=16, density=0.006, alpha=16.0, dropout=0.05, use_rslora=False,
                 rule="fisher", sparse_mode="csr_add", sparse_grad="auto", dtype=None):
        bnb = require_bitsandbytes()
        if not isinstance(base_layer, bnb.nn.Linear4bit):
            raise TypeError(f"base_layer must be a bitsandbytes.nn.Linear4bit (QRoSA takes 4-bit bases), got "
                            f"{type(base_layer).__name__}")
        _check_sparse_mode(sparse_mode)
        weight = base_layer.weight
        quant_state = getattr(weight, "quant_state", None)
        if quant_state is None or not getattr(weight, "bnb_quantized", True):
            raise ValueError("base_layer's weight is not quantized yet: bitsandbytes quantizes it when the layer "
                             "moves to its device (base_layer.to(device))")
        if getattr(quant_state, "packing_format_for_cpu", False):
            raise ValueError("base_layer's weight is in bitsandbytes' CPU inference packing (it ran an inference "
                             "forward on a CPU): rebuild it from the checkpoint to train on it")
        if dtype is None:
            dtype = base_layer.compute_dtype if base_layer.compute_dtype is not None else quant_state.dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        super().__init__(base_layer.in_features, base_layer.out_features, False, rank=rank, density=density,
                         alpha=alpha, dropout=dropout, use_rslora=use_rslora, rule=rule, sparse_mode=sparse_mode,
                         sparse_grad=sparse_grad, device=weight.device, dtype=dtype, _init_base=False)
        base_layer.requires_grad_(False)
        self.base_layer = base_layer

    @classmethod
    def from_linear(cls, linear, *, rank=16, density=0.006, alpha=16.0, dropout=0.05, **kwargs):
        """QRosaLinear over ``linear`` (a ``Linear4bit``, kept as ``base_layer``, not copied)."""
        return cls(linear, rank=rank, density=density, alpha=alpha, dropout=dropout, **kwargs)

    # The base's own tensors, as PEFT's wrappers expose them (W packed in 4 bits: see base_weight()).
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def _adapter_dtype(self) -> torch.dtype:
        return self._parameters["sparse_values"].dtype

    @property
    def sparse_mode(self) -> str:
        return self._sparse_mode

    @sparse_mode.setter
    def sparse_mode(self, mode):
        self._sparse_mode = _check_sparse_mode(mode)
        self._sync_transpose()

    def forward(self, x):
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have {self.in_features} features in its last dimension, got shape {tuple(x.shape)}")
        parameters = self._parameters
        dtype = parameters["sparse_values"].dtype
        input_dtype = x.dtype
        mode = self._sparse_mode if self.phase == "sparse" else "nomask"
        collecting = self.phase == "collect" and self._collector is not None and torch.is_grad_enabled()
        bias = self.base_layer.bias
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        if input_dtype != dtype:
            x = x.to(dtype)
        args = (x, None, bias, parameters["lora_A"], parameters["lora_B"], parameters["sparse_values"], collecting, mode,
                self._dense_base)
        if torch.is_autocast_enabled(x.device.type):  # the layer runs in its own dtype, as Linear4bit does
            with torch.autocast(x.device.type, enabled=False):
                y = self._apply_function(*args)
        else:
            y = self._apply_function(*args)
        return y if input_dtype == dtype else y.to(input_dtype)

    def _dense_base(self, dtype) -> torch.Tensor:
        """W dequantized into a new tensor of ``dtype`` (what _RosaFunction calls in forward and backward)."""
        weight = self.base_layer.weight
        return require_bitsandbytes().functional.dequantize_4bit(weight, weight.quant_state).to(dtype)

    def base_weight(self) -> torch.Tensor:
        """W dequantized (a new tensor, in the dtype the weight had before quantization)."""
        weight = self.base_layer.weight
        with torch.no_grad():
            return require_bitsandbytes().functional.dequantize_4bit(weight, weight.quant_state)

    def extra_repr(self):
        state = self.base_layer.weight.quant_state
        return f"{super().extra_repr()}, base={getattr(state, 'quant_type', '4bit')}"
