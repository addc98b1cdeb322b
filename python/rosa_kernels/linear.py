"""RosaLinear: a drop-in ``nn.Linear`` with a LoRA adapter and a sparse adapter (RoSA).

The layer computes, for X (tokens x in),

    Y = X W^T + b + scale * (drop(X) A^T) B^T + X S^T

with the frozen base weight ``W`` (out x in) and bias ``b``, the trainable LoRA factors ``lora_A``
(rank x in) and ``lora_B`` (out x rank), ``scale = alpha / rank`` (``alpha / sqrt(rank)`` with
``use_rslora``; 0 at rank 0, a sparse-only adapter: SpA), and the trainable sparse adapter ``S``
whose ``nnz = round(density * out * in)`` values live in the 1-D parameter ``sparse_values`` (fixed size from construction on, so optimizers,
DDP and FSDP see one parameter that never changes shape) at the positions of a row-sorted CSR mask
kept in int32 buffers.

Life cycle (``layer.phase``): ``"warmup"`` trains LoRA only; ``"collect"`` also adds the statistic of
the base weight's gradient ``dW = dY^T X`` from the layer's own backward (see
:mod:`rosa_kernels.masks`); :meth:`RosaLinear.select_mask` (or :meth:`RosaLinear.set_mask` with a
mask computed elsewhere) fixes the mask and switches to ``"sparse"``: LoRA + sparse training.

How the sparse adapter enters the math (``sparse_mode``):

- ``"merged"`` (default): the dense ``weight`` holds ``W_eff = W + S``, and the original W at the
  mask positions is kept in ``base_values``. Forward and dX are then plain dense GEMMs; the only
  sparse work per step is ``dS = sddmm(mask, dY^T, X^T)``. When ``sparse_values`` change (after an
  optimizer step; detected through the tensor's version counter and a global optimizer post-step
  hook; under ``torch.compile`` only the hook, see :meth:`RosaLinear.refresh_merged_weight`) the mask
  positions are re-scattered as ``W_eff[mask] = base_values + S``: recomputed from
  the saved W, never accumulated, so rounding cannot drift.
- ``"csr_add"``: ``W + S`` is built by ``csr_add`` in forward (and again in backward), W untouched.
- ``"spmm"``: ``X S^T`` and ``dY S`` by ``spmm`` with S's structure and its cached transpose.

All three give the same result to rounding. Nothing in a training step synchronizes with the host;
a mask is validated once, when it is set. Over a frozen bitsandbytes 4-bit base (QRoSA),
:class:`rosa_kernels.qrosa.QRosaLinear` dequantizes W in each forward and backward and uses
``"csr_add"`` (into that transient) or ``"spmm"``.

Host cost: in the common case (merged mode, and the LoRA-only warm-up) a layer's forward is one
call of the registered op ``torch.ops.rosa_kernels.rosa_linear`` (``csrc/rosa_linear_ops.cpp``:
forward, autograd and autocast in C++), and the re-scatter after an optimizer step is one call of
``torch.ops.rosa_kernels.merged_scatter_`` for all merged layers. ``csr_add``, ``spmm`` and the
collection phase take the Python autograd function below.
"""

from __future__ import annotations

import math
import numbers
import warnings
import weakref

import torch
import torch.nn.functional as F
import torch.optim.optimizer as _optimizer
from torch import nn

from . import masks as _masks
from . import plan as _plan
from .csr import CSR, csr_from_mask, index_counts, validate_csr
from .dropout import draw_seed
from .plan import planned_sddmm

_ops = torch.ops.rosa_kernels

__all__ = ["RosaLinear", "PHASES", "SPARSE_MODES", "SPARSE_GRADS"]

PHASES = ("warmup", "collect", "sparse")
SPARSE_MODES = ("merged", "csr_add", "spmm")
# How dS is computed: "sddmm" only at the mask, "dense" as (dY^T X)[mask] with one dense GEMM, or
# "auto": through the mask's MaskPlan (rosa_kernels.plan), built once when the mask is set: on a GPU
# the plan sends the columns where a GEMM is cheaper (for RoSA masks: the few hot input columns)
# through one skinny tensor-core GEMM and the rest through the SDDMM; on the CPU it is the SDDMM.
SPARSE_GRADS = ("auto", "sddmm", "dense")
_NO_PLAN = (None, None, None, None, None, 0, 0)
# rosa_linear's (grad_index, grad_path, plan_width, plan_rest_nnz) before a mask exists: dS = 0.
_NO_MASK_GRAD = ([], "none", 0, 0)
_rosa_linear = _ops.rosa_linear.default
_merged_scatter = _ops.merged_scatter_.default
# The buffers that hold a mask's CSR (rosa_kernels.masks.MaskStructure's first fields), and those of
# its transpose with the permutation (the next four), which only sparse_mode="spmm" reads: they are
# kept in that mode only (8 bytes per nonzero otherwise unused; see RosaLinear._sync_transpose).
_STRUCTURE_BUFFERS = ("row_offsets", "row_indices", "col_indices")
_TRANSPOSE_BUFFERS = ("row_offsets_t", "row_indices_t", "col_indices_t", "permutation")


def _register_fake_kernels() -> None:
    @torch.library.register_fake("rosa_kernels::rosa_linear")
    def _(x, weight, bias, lora_A, lora_B, values, grad_index, seed, scale, dropout, grad_path, plan_width=0,
          plan_rest_nnz=0):
        if x.shape[-1] != weight.shape[1]:
            raise ValueError(f"x must have {weight.shape[1]} features in its last dimension, got shape "
                             f"{tuple(x.shape)}")
        if dropout > 0 and seed is None:
            raise ValueError("rosa_linear with dropout > 0 draws its seed at run time in eager mode only: "
                             "pass seed=rosa_kernels.dropout.draw_seed(x.device) in a traced or compiled graph")
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("rosa_kernels::merged_scatter_")
    def _(weights, row_offsets, col_indices, base_values, values):
        return None


_register_fake_kernels()


# ----------------------------------------------------------------------------------------------
# The whole layer as one autograd function: the input is saved once, with the small T x rank
# product h = drop(X) A^T (so that dB needs no recompute) and, under dropout, a 64-bit seed: neither
# the keep mask nor X ∘ keep is saved (a T x in tensor per layer: the 32-layer memory target), the
# dropout ops regenerate them in backward (rosa_kernels.dropout).
# A step on a GPU is launch-bound up to ~2048 tokens at 4096 x 4096, so every pass counts: the
# LoRA product accumulates into the base GEMM's output (addmm_), scales ride on GEMMs' alpha (or
# inside the dropout ops), and nothing is cast or copied. Merged mode, dropout > 0: 3 ops forward
# (linear, lora_dropout_project, addmm_), 5 backward (dY B, dY W, lora_dropout_addmm_,
# lora_dropout_grad_A, dB; + the SDDMM or the plan's GEMM and gather).
# ----------------------------------------------------------------------------------------------


class _RosaFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, values, row_offsets, row_indices, col_indices,
                row_offsets_t, row_indices_t, col_indices_t, permutation, flat_indices,
                plan_gather, plan_target, plan_row_offsets, plan_row_indices, plan_col_indices, plan_width,
                plan_rest_nnz, pending, scale, dropout, mode, dense_grad, dense_base=None):
        # A quantized base (QRoSA, rosa_kernels.qrosa): weight is None and dense_base(dtype) dequantizes
        # W, here and again in backward: a transient of each call (as in QLoRA), never saved.
        saved_weight = weight
        if weight is None:
            weight = dense_base(x.dtype)
        out_features, in_features = weight.shape
        x2d = x.reshape(-1, in_features)
        # mode: "nomask" (LoRA only), "merged" (the weight already holds W + S), "csr_add", "spmm".
        # The mask was validated when it was set: the raw ops skip the public wrappers' checks.
        if mode == "csr_add":
            y = F.linear(x2d, _weight_plus_sparse(values, row_offsets, row_indices, col_indices, weight,
                                                  dense_base is not None), bias)
        else:
            y = F.linear(x2d, weight, bias)
        if mode == "spmm":
            # X S^T = (S X^T)^T
            y.add_(_ops.spmm(values, row_offsets, row_indices, col_indices, x2d.t(), out_features).t())
        # h = (X ∘ keep) A^T without the dropout's 1 / (1 - p): that factor rides on the LoRA scale,
        # kept_scale = scale / (1 - p), which every LoRA term carries (Y, dX, dA, dB).
        if dropout > 0.0:
            seed = draw_seed(x2d.device)
            h = _ops.lora_dropout_project(x2d, seed, dropout, lora_A)
        else:
            seed = None
            h = torch.mm(x2d, lora_A.t())
        kept_scale = scale / (1.0 - dropout)
        y.addmm_(h, lora_B.t(), alpha=kept_scale)
        # dS's path, and only what this mode's backward reads: each saved tensor costs host time.
        if mode == "nomask":
            grad_path, sparse = "none", (values,)
        elif dense_grad:
            grad_path, sparse = "dense", (flat_indices,)
        elif plan_width:
            grad_path, sparse = "plan", (plan_gather, plan_target, plan_row_offsets, plan_row_indices,
                                         plan_col_indices)
        else:
            grad_path, sparse = "sddmm", (row_offsets, row_indices, col_indices)
        if mode in ("csr_add", "spmm"):
            sparse = sparse + (values, row_offsets, row_indices, col_indices, row_offsets_t, row_indices_t,
                               col_indices_t, permutation)
        ctx.save_for_backward(x2d, seed, h, saved_weight, lora_A, lora_B, *sparse)
        ctx.dense_base = dense_base
        # Not saved for backward: every backward of the step adds into it in place, which would
        # trip the saved-tensor version check of the other forwards of the same step.
        ctx.pending = pending
        ctx.kept_scale, ctx.dropout, ctx.mode, ctx.grad_path = kept_scale, dropout, mode, grad_path
        ctx.plan_sizes = (plan_width, plan_rest_nnz)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, dy):
        x2d, seed, h, weight, lora_A, lora_B, *sparse = ctx.saved_tensors
        kept_scale, mode, grad_path = ctx.kept_scale, ctx.mode, ctx.grad_path
        path_tensors = {"none": 1, "dense": 1, "plan": 5, "sddmm": 3}[grad_path]
        grad_tensors, mode_tensors = sparse[:path_tensors], sparse[path_tensors:]
        if mode_tensors:
            (values, row_offsets, row_indices, col_indices, row_offsets_t, row_indices_t, col_indices_t,
             permutation) = mode_tensors
        in_features = x2d.shape[1]
        dy2d = dy.reshape(-1, lora_B.shape[0])
        dx = d_lora_A = d_lora_B = d_values = None
        g = torch.mm(dy2d, lora_B)  # dY B: T x rank, shared by dX and dA
        if ctx.needs_input_grad[0]:
            # dX = dY (W + S) + scale / (1 - p) * ((dY B) A) ∘ keep
            transient = weight is None
            if transient:
                weight = ctx.dense_base(dy2d.dtype)
            if mode == "csr_add":
                dx = torch.mm(dy2d, _weight_plus_sparse(values, row_offsets, row_indices, col_indices, weight,
                                                        transient))
            else:
                dx = torch.mm(dy2d, weight)
            if mode == "spmm":
                # dY S = (S^T dY^T)^T with the cached transpose; values_t = values[permutation].
                values_t = values.index_select(0, permutation)
                dx.add_(_ops.spmm(values_t, row_offsets_t, row_indices_t, col_indices_t, dy2d.t(), in_features).t())
            if seed is None:
                dx.addmm_(g, lora_A, alpha=kept_scale)
            else:
                _ops.lora_dropout_addmm_(dx, g, lora_A, seed, ctx.dropout, kept_scale)
            dx = dx.view(ctx.x_shape)
        # dA = scale / (1 - p) * (dY B)^T (X ∘ keep), dB = scale / (1 - p) * dY^T h. With beta=0 addmm
        # ignores its first operand (only its shape is used, NaNs included): the scale is the alpha.
        if ctx.needs_input_grad[3]:
            if seed is None:
                d_lora_A = torch.addmm(lora_A, g.t(), x2d, beta=0, alpha=kept_scale)
            else:
                d_lora_A = _ops.lora_dropout_grad_A(x2d, seed, ctx.dropout, g, kept_scale)
        if ctx.needs_input_grad[4]:
            d_lora_B = torch.addmm(lora_B, dy2d.t(), h, beta=0, alpha=kept_scale)
        if ctx.needs_input_grad[5]:
            if grad_path == "none":
                d_values = torch.zeros_like(grad_tensors[0])
            elif grad_path == "dense":
                # dS = (dY^T X)[mask] through one dense GEMM (sparse_grad="dense"); the m x n product is
                # freed at once.
                d_values = torch.mm(dy2d.t(), x2d).view(-1).index_select(0, grad_tensors[0])
            elif grad_path == "plan":
                # dS through the mask's plan: G = dY^T X[:, J] for the hot columns J by one GEMM, the
                # remaining nonzeros by the SDDMM, gathered into the mask's order.
                d_values = planned_sddmm(dy2d.t(), x2d.t(), *grad_tensors, *ctx.plan_sizes)
            else:
                # dS = SDDMM(mask, dY^T, X^T): transposed views, read without copies by the kernels.
                d_values = _ops.sddmm(*grad_tensors, dy2d.t(), x2d.t())
        if ctx.pending is not None:
            _masks.accumulate_gradient(ctx.pending, dy2d, x2d)  # dW = dY^T X of the frozen base
        return (dx, None, None, d_lora_A, d_lora_B, d_values) + (None,) * 21


def _weight_plus_sparse(values, row_offsets, row_indices, col_indices, weight, transient):
    """W + S by csr_add: into W itself when W is a transient (a dequantized base), else a new tensor."""
    if transient:
        _ops.csr_add_(values, row_offsets, row_indices, col_indices, weight)
        return weight
    return _ops.csr_add(values, row_offsets, row_indices, col_indices, weight)


# Optimizer steps change sparse_values in place; merged layers re-scatter right after (eagerly,
# outside any compiled graph). The version check in forward catches every other in-place change.
# Collecting layers end their statistic's step there too.
_MERGED_LAYERS: "weakref.WeakSet[RosaLinear]" = weakref.WeakSet()
_COLLECTING_LAYERS: "weakref.WeakSet[RosaLinear]" = weakref.WeakSet()


try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch without torch.distributed
    _DTensor = None


def _is_sharded(tensor) -> bool:
    """True for a DTensor: a parameter that FSDP2 (``fully_shard``) shards across ranks."""
    return _DTensor is not None and isinstance(tensor, _DTensor)


def _after_optimizer_step(optimizer, args, kwargs):
    changed = [layer for layer in _MERGED_LAYERS
               if layer._merged and layer._parameters["sparse_values"]._version != layer._merged_version]
    for layer in changed:
        if _is_sharded(layer._parameters["weight"]):  # sharded after the merge: leaves the merged mode
            layer._leave_merged_mode_for_sharding()
    _scatter_layers([layer for layer in changed if layer._merged])
    for layer in list(_COLLECTING_LAYERS):
        layer.finish_collection_step()


_optimizer.register_optimizer_step_post_hook(_after_optimizer_step)


@torch.no_grad()
def _scatter_layers(layers) -> None:
    """W_eff[mask] = base_values + S for every layer, in (at least) float32 from the saved W (no
    drift), as one call for all of them."""
    if not layers:
        return
    parameters, buffers = [layer._parameters for layer in layers], [layer._buffers for layer in layers]
    values = [p["sparse_values"] for p in parameters]
    _merged_scatter([p["weight"] for p in parameters], [b["row_offsets"] for b in buffers],
                    [b["col_indices"] for b in buffers], [b["base_values"] for b in buffers], values)
    for layer, v in zip(layers, values):
        layer.__dict__["_merged_version"] = v._version  # nn.Module.__setattr__ cost ~2 us a layer


def select_masks_of(layers) -> list[CSR]:
    """:meth:`RosaLinear.select_mask` of each layer, in order (every rank in the same order: the
    selection's collectives follow it), returning the masks.

    Each layer's plan decides its hot columns on the host from the mask's column counts: their
    host copies are made once for all the layers (one synchronization per device), not once per
    layer, so the GPU runs every layer's selection without the host waiting in between."""
    chosen, masks, counts = [], [], []
    for layer in layers:  # may be a progress bar's iterator: once
        mask, column_counts = layer._select_structure()
        chosen.append(layer)
        masks.append(mask)
        counts.append(column_counts)
    needed = [_plan.needs_column_counts(c.device) for c in counts]
    host = iter(_plan.host_copies([c for c, need in zip(counts, needed) if need]))
    for layer, column_counts, need in zip(chosen, counts, needed):
        layer._build_plan(column_counts, next(host) if need else None)
    return masks


_SHARDED_NOTICE_GIVEN = False


def _notice_sharded_merge() -> None:
    global _SHARDED_NOTICE_GIVEN
    if not _SHARDED_NOTICE_GIVEN:
        _SHARDED_NOTICE_GIVEN = True
        warnings.warn("rosa_kernels: the base weights are sharded (FSDP2), so S is not merged into them: "
                      "RosaLinear layers use sparse_mode='spmm' (same results, an SpMM per step)", stacklevel=3)


def _check_features(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def check_hyperparameters(rank, density, alpha, dropout):
    """Validates the adapter hyper-parameters (shared with the model-level API). Rank 0 is SpA."""
    _check_features(rank, "rank")
    if isinstance(density, bool) or not isinstance(density, numbers.Real):
        raise TypeError(f"density must be a float, got {type(density).__name__}")
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must lie in (0, 1], got {density}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a number, got {type(alpha).__name__}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
        raise TypeError(f"dropout must be a float, got {type(dropout).__name__}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout}")


class RosaLinear(nn.Module):
    """``nn.Linear`` + LoRA + a sparse adapter whose mask is chosen from gradients (RoSA).

    Args:
        in_features, out_features, bias: as ``nn.Linear`` (weight and bias are frozen).
        rank: LoRA rank (>= 0; 0 is sparse-only adaptation, SpA).
        density: fraction of weights in the sparse adapter, in (0, 1].
        alpha: LoRA scale numerator. dropout: dropout on the LoRA input.
        use_rslora: scale by ``alpha / sqrt(rank)`` instead of ``alpha / rank``.
        rule: gradient statistic for mask selection, ``'fisher'`` (mean of squares) or ``'mean'``.
        sparse_mode: ``'merged'`` (default), ``'csr_add'`` or ``'spmm'`` (see the module docs).
        sparse_grad: how the sparse values' gradient is computed: ``'auto'`` (default), ``'sddmm'``
            or ``'dense'`` (see ``SPARSE_GRADS``). All give the same gradient to rounding.
    """

    # False in rosa_kernels.qrosa.QRosaLinear, whose frozen base is a bitsandbytes 4-bit module.
    _owns_base = True

    def __init__(self, in_features, out_features, bias=True, *, rank=16, density=0.006, alpha=16.0, dropout=0.05,
                 use_rslora=False, rule="fisher", sparse_mode="merged", sparse_grad="auto", device=None, dtype=None,
                 _init_base=True):
        super().__init__()
        in_features = _check_features(in_features, "in_features")
        out_features = _check_features(out_features, "out_features")
        check_hyperparameters(rank, density, alpha, dropout)
        _masks.check_rule(rule)
        if sparse_mode not in SPARSE_MODES:
            raise ValueError(f"sparse_mode must be one of {SPARSE_MODES}, got {sparse_mode!r}")
        if sparse_grad not in SPARSE_GRADS:
            raise ValueError(f"sparse_grad must be one of {SPARSE_GRADS}, got {sparse_grad!r}")
        self._sparse_grad = sparse_grad
        # The parts of the mask's MaskPlan that dS needs (built with the mask), and where they live.
        self._grad_plan = self._grad_plan_key = None
        # rosa_linear's dS arguments in the sparse phase (see _update_grad_args).
        self._grad_args = _NO_MASK_GRAD
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.density, self.alpha = int(rank), float(density), float(alpha)
        self.dropout, self.use_rslora, self.rule = float(dropout), bool(use_rslora), rule
        # Rank 0 (SpA): the LoRA factors are empty and their product zero; the scale is defined as 0.
        self.scale = self.alpha / (math.sqrt(self.rank) if use_rslora else self.rank) if self.rank else 0.0
        self.nnz = _masks.mask_count(out_features, in_features, self.density)

        if self._owns_base:  # a QRosaLinear's base is its 4-bit base_layer
            self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
            self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, **factory))
        self.sparse_values = nn.Parameter(torch.zeros(self.nnz, **factory))

        index = {"device": device, "dtype": torch.int32}
        self.register_buffer("row_offsets", torch.zeros(out_features + 1, **index))
        self.register_buffer("row_indices", torch.arange(out_features, **index))
        self.register_buffer("col_indices", torch.zeros(self.nnz, **index))
        self.register_buffer("has_mask", torch.zeros((), dtype=torch.bool, device=device))
        # Derived from the mask (rebuilt when it is set or loaded), so not part of the state_dict. The
        # transpose and its permutation are empty until sparse_mode "spmm" needs them (_sync_transpose).
        self.register_buffer("row_offsets_t", torch.zeros(in_features + 1, **index), persistent=False)
        self.register_buffer("row_indices_t", torch.arange(in_features, **index), persistent=False)
        self.register_buffer("col_indices_t", torch.zeros(0, **index), persistent=False)
        self.register_buffer("permutation", torch.zeros(0, **index), persistent=False)
        # W at the mask positions while S is merged into the weight (empty in the other modes).
        self.register_buffer("base_values", torch.zeros(0, **factory), persistent=False)

        self.phase = "warmup"
        self._sparse_mode = sparse_mode
        self._merged = False
        self._merged_version = -1
        # The collection state (rosa_kernels.masks.GradientCollector: the accumulator, the
        # statistic, the step count) is a plain attribute, not buffers: DDP re-broadcasts buffers
        # from rank 0 every forward, which would overwrite each rank's own accumulation. None
        # outside the "collect" phase.
        self._collector = None
        self.reset_parameters(init_base=_init_base)

    # ------------------------------------------------------------------------------------------
    def reset_parameters(self, init_base=True):
        """nn.Linear's init for W and b (when ``init_base``), PEFT's for LoRA: A kaiming-uniform, B zero."""
        with torch.no_grad():
            if init_base and self._owns_base:
                nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
                if self.bias is not None:
                    bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
                    nn.init.uniform_(self.bias, -bound, bound)
            self.reset_adapters()

    def reset_adapters(self):
        """Re-initializes LoRA (A kaiming-uniform, B zero) and zeroes the sparse values."""
        with torch.no_grad():
            if self.rank:  # torch warns on initializing an empty tensor
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_B.zero_()
            self.sparse_values.zero_()
        if self._merged:
            self._scatter()

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, rank=16, density=0.006, alpha=16.0, dropout=0.05, **kwargs):
        """A RosaLinear whose frozen base is a copy of ``linear``'s weight and bias.

        A bitsandbytes 4-bit ``Linear4bit`` is not copied: it becomes the frozen ``base_layer`` of a
        :class:`rosa_kernels.qrosa.QRosaLinear` (QRoSA).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        from . import qrosa

        if qrosa.is_quantized_linear(linear):
            return qrosa.QRosaLinear.from_linear(linear, rank=rank, density=density, alpha=alpha, dropout=dropout,
                                                 **kwargs)
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, rank=rank, density=density,
                    alpha=alpha, dropout=dropout, device=linear.weight.device, dtype=linear.weight.dtype,
                    _init_base=False, **kwargs)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"rank={self.rank}, density={self.density}, nnz={self.nnz}, alpha={self.alpha}, "
                f"dropout={self.dropout}, phase={self.phase!r}, sparse_mode={self._sparse_mode!r}, "
                f"sparse_grad={self.sparse_grad!r}")

    # ------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------
    def forward(self, x):
        # The common case in one op call: merged (W + S in the dense weight) or no mask yet. The op
        # checks x's shape and applies autocast itself.
        phase = self.phase
        if phase == "sparse":
            if not self._merged:
                return self._forward_function(x)
            if (not torch.compiler.is_compiling()
                    and self._parameters["sparse_values"]._version != self._merged_version):
                self._scatter()
            grad_index, grad_path, plan_width, plan_rest_nnz = self._grad_args
        elif phase == "collect":  # one step of the life cycle: the Python function adds the statistic
            return self._forward_function(x)
        else:
            grad_index, grad_path, plan_width, plan_rest_nnz = _NO_MASK_GRAD
        p = self.dropout if self.training else 0.0
        # Eager, the op draws the dropout seed itself (on the CPU the value draw_seed() would; on a GPU
        # on the host, from the CUDA generator, unless a CUDA graph is being captured); a compiled graph
        # takes it as an input.
        seed = draw_seed(x.device) if p and torch.compiler.is_compiling() else None
        parameters = self._parameters
        return _rosa_linear(x, parameters["weight"], parameters.get("bias"), parameters["lora_A"], parameters["lora_B"],
                            parameters["sparse_values"], grad_index, seed, self.scale, p, grad_path, plan_width,
                            plan_rest_nnz)

    def _forward_function(self, x):
        """The Python autograd function's path: csr_add, spmm and the collection phase."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have {self.in_features} features in its last dimension, got shape {tuple(x.shape)}")
        if self._merged and not torch.compiler.is_compiling() and self.sparse_values._version != self._merged_version:
            self._scatter()
        # Before a mask exists the sparse values still take part (their gradient is zero), so DDP
        # sees every trainable parameter used in every step.
        mode = ("merged" if self._merged else self._sparse_mode) if self.phase == "sparse" else "nomask"
        collecting = self.phase == "collect" and self._collector is not None and torch.is_grad_enabled()
        weight, bias, lora_A, lora_B, values = self.weight, self.bias, self.lora_A, self.lora_B, self.sparse_values
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # Under autocast, run the whole function in the autocast dtype (as nn.Linear would) with
            # autocast off inside, so forward and backward see the same dtypes; the casts are
            # differentiable, so the trainable parameters still get gradients in their own dtype.
            dtype = torch.get_autocast_dtype(device_type)
            x, weight, lora_A, lora_B, values = (t.to(dtype) for t in (x, weight, lora_A, lora_B, values))
            bias = bias.to(dtype) if bias is not None else None
            with torch.autocast(device_type, enabled=False):
                return self._apply_function(x, weight, bias, lora_A, lora_B, values, collecting, mode)
        return self._apply_function(x, weight, bias, lora_A, lora_B, values, collecting, mode)

    def _apply_function(self, x, weight, bias, lora_A, lora_B, values, collecting, mode, dense_base=None):
        buffers = self._buffers  # a dict lookup each, instead of nn.Module.__getattr__'s slower path
        return _RosaFunction.apply(
            x, weight, bias, lora_A, lora_B, values,
            buffers["row_offsets"], buffers["row_indices"], buffers["col_indices"],
            buffers["row_offsets_t"], buffers["row_indices_t"], buffers["col_indices_t"], buffers["permutation"],
            self._grad_args[0][0] if self._grad_args[1] == "dense" else None, *self._plan_parts(x, mode),
            self._collector if collecting else None,
            self.scale, self.dropout if self.training else 0.0, mode, self.sparse_grad == "dense", dense_base,
        )

    def _plan_parts(self, x, mode) -> tuple:
        """The tensors and sizes of the mask's plan for dS (``sparse_grad="auto"``), or none."""
        parts = self._grad_plan
        if self.sparse_grad != "auto" or mode == "nomask" or parts is None or self._grad_plan_key[0] != x.device:
            return _NO_PLAN
        return parts

    def _build_plan(self, column_counts=None, host_counts=None):
        """The parts of the mask's MaskPlan that dS needs, on the layer's device (when the mask is set
        or the layer moves; the plan's cost model decides per device, from a host copy of the
        column counts: ``host_counts`` when given, else one host synchronization). ``column_counts``:
        the mask's nonzeros per column, read off the transpose's offsets when not given."""
        if column_counts is None:
            column_counts = index_counts(self.col_indices.long(), self.in_features).int()
        self._use_plan(_plan.sddmm_parts_of(self.row_offsets, self.col_indices, self.out_features, self.in_features,
                                            dtype=self._adapter_dtype, column_counts=column_counts,
                                            host_counts=host_counts))

    def _use_plan(self, parts):
        """Keeps a plan's ``MaskPlan.sddmm_parts()`` for dS (None or width 0: the plan is the SDDMM)."""
        # Only what planned_sddmm reads is kept (the plan's other index tensors would cost a few MB
        # per layer); the gather index as int32, which index_select takes as well.
        self._grad_plan = None
        if parts is not None and parts[5]:
            gather, target, *rest, width, rest_nnz = parts
            small = target.numel() == 0 or int(self.out_features) * width + rest_nnz < 2**31 - 1
            self._grad_plan = (gather, target.int() if small else target, *rest, width, rest_nnz)
        self._grad_plan_key = (self.row_offsets.device, self._adapter_dtype)
        self._update_grad_args()

    @property
    def sparse_grad(self) -> str:
        return self._sparse_grad

    @sparse_grad.setter
    def sparse_grad(self, sparse_grad):
        if sparse_grad not in SPARSE_GRADS:
            raise ValueError(f"sparse_grad must be one of {SPARSE_GRADS}, got {sparse_grad!r}")
        self._sparse_grad = sparse_grad
        self._update_grad_args()

    def _update_grad_args(self):
        """rosa_linear's dS arguments (grad_index, grad_path, plan_width, plan_rest_nnz) in the
        sparse phase, kept with the mask, its plan and the buffers (rebuilt when any changes)."""
        buffers = self._buffers
        if self._sparse_grad == "dense":  # the flat positions, computed (and kept) in this mode only
            self._grad_args = ([self.flat_indices], "dense", 0, 0)
        elif self._sparse_grad == "auto" and self._grad_plan is not None:
            gather, target, offsets, rows, cols, width, rest_nnz = self._grad_plan
            index = [target, offsets, rows, cols] + ([] if gather is None else [gather])
            self._grad_args = (index, "plan", width, rest_nnz)
        else:
            self._grad_args = ([buffers["row_offsets"], buffers["row_indices"], buffers["col_indices"]], "sddmm", 0, 0)

    # ------------------------------------------------------------------------------------------
    # Sparse mode and merging of S into the dense weight
    # ------------------------------------------------------------------------------------------
    @property
    def sparse_mode(self) -> str:
        return self._sparse_mode

    @sparse_mode.setter
    def sparse_mode(self, mode):
        if mode not in SPARSE_MODES:
            raise ValueError(f"sparse_mode must be one of {SPARSE_MODES}, got {mode!r}")
        if self._merged and mode != "merged":
            self._unmerge()
        self._sparse_mode = mode
        self._sync_transpose()
        if mode == "merged" and self.phase == "sparse" and not self._merged:
            self._merge()

    def _sync_transpose(self, structure: _masks.MaskStructure | None = None):
        """Keeps the mask's transpose and its permutation (``spmm``'s dX = dY S reads them) in the
        sparse phase of ``sparse_mode="spmm"`` only; in the other modes those buffers are empty.
        ``structure``: a new mask's, whose transpose replaces the kept one (else it is built from
        the CSR when missing)."""
        want = self.phase == "sparse" and self._sparse_mode == "spmm"
        buffers = self._buffers
        kept = buffers["col_indices_t"].shape[0] == self.nnz
        if want and (structure is not None or not kept):
            if structure is None:
                structure = _masks.mask_structure(self.flat_indices, self.out_features, self.in_features,
                                                  validate=False)
            with torch.no_grad():
                for name, tensor in zip(_TRANSPOSE_BUFFERS, structure[len(_STRUCTURE_BUFFERS):]):
                    if buffers[name].shape == tensor.shape:
                        buffers[name].copy_(tensor)
                    else:
                        buffers[name] = tensor.to(device=buffers[name].device, dtype=buffers[name].dtype)
        elif not want and kept and self.nnz:
            for name in ("col_indices_t", "permutation"):
                buffers[name] = buffers[name].new_empty(0)

    def _scatter(self):
        """W_eff[mask] = base_values + S, computed in (at least) float32 from the saved W (no drift)."""
        _scatter_layers([self])

    def refresh_merged_weight(self) -> None:
        """Re-scatters ``W_eff[mask] = W + S`` now.

        Needed only under ``torch.compile`` after changing ``sparse_values`` in place *outside* an
        optimizer step (eager forwards notice such changes themselves; optimizer steps, ``set_mask``,
        ``load_state_dict`` and ``.to()`` refresh it already).
        """
        if self._merged:
            self._scatter()

    def _merge(self):
        if _is_sharded(self.weight):
            # FSDP2 shards the frozen weight across ranks: S cannot be scattered into it, so it is
            # added by SpMM instead (the same result to rounding; docs/rosa_linear.md, FSDP2).
            self._use_spmm_for_sharding()
            return
        with torch.no_grad():
            self._buffers["base_values"] = self.weight.view(-1).index_select(0, self.flat_indices)
        self._merged = True
        _MERGED_LAYERS.add(self)
        self._scatter()

    @torch.no_grad()
    def _leave_merged_mode_for_sharding(self):
        """The layer was merged, then its weight was sharded (``fully_shard`` after the mask): puts W
        back at the mask positions of this rank's shard (no communication) and switches to "spmm"."""
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        weight, n = self.weight, self.in_features
        local = weight.to_local()
        local_shape, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh,
                                                                    weight.placements)
        first_row, rows = offset[0], local_shape[0]
        flat_indices = self.flat_indices
        mask_rows = flat_indices // n
        here = (mask_rows >= first_row) & (mask_rows < first_row + rows)
        local.reshape(-1)[:rows * n].index_copy_(0, flat_indices[here] - first_row * n, self.base_values[here])
        self._end_merge()
        self._use_spmm_for_sharding()

    def _use_spmm_for_sharding(self):
        """A sharded weight cannot hold W + S: S is added by SpMM instead (docs/rosa_linear.md, FSDP2)."""
        _notice_sharded_merge()
        self._sparse_mode = "spmm"
        self._sync_transpose()

    @torch.no_grad()
    def _unmerge(self):
        self.weight.view(-1).index_copy_(0, self.flat_indices, self.base_values)
        self._end_merge()

    def _end_merge(self):
        """W is back at the mask positions: the saved copy goes, and the post-step hook forgets the layer."""
        self._buffers["base_values"] = self.base_values.new_empty(0)
        self._merged = False
        _MERGED_LAYERS.discard(self)

    @property
    def _adapter_dtype(self) -> torch.dtype:
        """The dtype of S (its dense form, its mask and plan) and of ``merge()``: the weight's here."""
        return self.weight.dtype

    def base_weight(self) -> torch.Tensor:
        """The original frozen W (a copy when S is merged into ``weight``)."""
        if not self._merged:
            return self.weight.detach()
        w = self.weight.detach().clone()
        w.view(-1).index_copy_(0, self.flat_indices, self.base_values)
        return w

    def __setstate__(self, state):
        # copy.deepcopy and pickle rebuild the layer without _merge / start_collection: register the
        # copy with the optimizer post-step hook too, or a compiled or graph-captured copy (which skips
        # the forward's version check) would never re-scatter W + S after its optimizer steps.
        super().__setstate__(state)
        if self.__dict__.get("_merged"):
            _MERGED_LAYERS.add(self)
        if self.__dict__.get("phase") == "collect" and self.__dict__.get("_collector") is not None:
            _COLLECTING_LAYERS.add(self)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self._collector is not None:
            self._collector.to(self.weight.device)
        if self._merged:
            self._scatter()
        if self._grad_plan_key is not None and self._grad_plan_key != (self.weight.device, self._adapter_dtype):
            self._build_plan()
        self._update_grad_args()  # the buffers are new tensors
        return self

    # ------------------------------------------------------------------------------------------
    # Mask life cycle
    # ------------------------------------------------------------------------------------------
    def start_collection(self, rule=None, collect_buffer="auto"):
        """Enters the ``"collect"`` phase: backward passes add the statistic of dW = dY^T X.

        ``collect_buffer`` (``rosa_kernels.masks.COLLECT_BUFFERS``) says where: ``"auto"`` (default;
        a row-scaled float16 accumulator, 2 bytes per weight, and the exact top-k when the collection
        is one backward pass), ``"one_pass"`` (exact, nothing kept but the top-k indices; one
        backward pass only), ``"float16"``, ``"bfloat16"`` (2 bytes per weight, 4 over several
        steps), ``"float32"`` (4 bytes per weight, 8 over several steps) or ``"host"`` (float32 in
        pinned host memory, nothing on the device; a host synchronization per layer and backward).
        Nothing is allocated here: the layer's first collecting backward allocates what it keeps.
        """
        if self.phase == "sparse":
            raise ValueError("the mask is already set; gradient collection happens before it")
        _masks.check_collect_buffer(collect_buffer)
        if rule is not None:
            self.rule = _masks.check_rule(rule)
        # Under FSDP2 (a sharded weight) each rank keeps only its rows of the statistic.
        self._collector = _masks.GradientCollector((self.out_features, self.in_features), self.weight.device,
                                                   self.rule, collect_buffer, self.nnz,
                                                   shard=_is_sharded(self.weight))
        self.phase = "collect"
        _COLLECTING_LAYERS.add(self)

    def finish_collection_step(self) -> None:
        """Ends this step's gradient for the statistic (called after each optimizer step).

        The gradient of a step is the sum over all backward passes since the previous step, so
        gradient accumulation and several forwards per step (siamese encoders) square the true
        per-step gradient. Eager only: do not ``torch.compile`` the collection steps.
        """
        if self.phase == "collect" and self._collector is not None:
            self._collector.end_step()

    def collection_state_dict(self) -> dict:
        """What the layer holds for gradient collection, for checkpoints; ``{}`` when not collecting.

        Like ``state_dict()``, the tensors are the layer's own (not copies); see
        ``rosa_kernels.masks.GradientCollector`` for the keys. Everything a resumed run needs to
        select the same mask goes through this method and :meth:`load_collection_state_dict`.
        """
        if self.phase != "collect" or self._collector is None:
            return {}
        return self._collector.state_dict()

    def load_collection_state_dict(self, state: dict) -> None:
        """Restores :meth:`collection_state_dict`: a non-empty state puts the layer into ``"collect"``
        with those buffers (copied to the layer's device); ``{}`` ends a collection in progress (back
        to ``"warmup"``). Checked first: a bad state raises ``ValueError`` and leaves the layer unchanged."""
        if not state:
            if self.phase == "collect":
                self._end_collection()
                self.phase = "warmup"
            return
        if self.phase == "sparse":
            raise ValueError("the mask is already set; a collection state loads into a layer without one")
        collector = _masks.GradientCollector.from_state_dict(state, (self.out_features, self.in_features),
                                                              self.weight.device, self.nnz,
                                                              shard=_is_sharded(self.weight))
        self.rule = collector.rule
        self._collector = collector
        self.phase = "collect"
        _COLLECTING_LAYERS.add(self)

    def statistic(self) -> torch.Tensor:
        """The collected statistic averaged over steps (and over ranks under torch.distributed), in
        float32 (decoded from the 16-bit buffers where the layer keeps those). Under FSDP2 the ranks'
        rows are gathered: a collective, call it on every rank."""
        if self._collector is None:
            raise ValueError("no gradient statistic was collected: call start_collection() and train a step first")
        return self._collector.full_statistic()

    def select_mask(self) -> CSR:
        """Top-k of the collected statistic -> the mask (rank 0's top-k broadcast; under FSDP2 the
        ranks' candidates are gathered instead); switches to ``"sparse"``.

        When the whole collection was one backward pass (``collect_buffer`` ``"auto"`` or
        ``"one_pass"``), the exact top-k of that pass's float32 gradient, kept since then.
        ``rosa_kernels.model.select_masks`` selects many layers' masks at once (see
        :func:`select_masks_of`)."""
        return select_masks_of([self])[0]

    def _select_structure(self) -> tuple[CSR, torch.Tensor]:
        """:meth:`select_mask` but the plan: ``(mask, column counts)`` (see :func:`select_masks_of`).

        The top-k's positions are distinct by construction, so they are not validated: one op
        (``rosa_kernels.masks.mask_structure``) builds every structure the layer keeps from them,
        on the device (mask selection's per-layer host cost was most of the collection step's
        time)."""
        collector = self._collector
        if collector is not None and collector.rows is not None:  # sharded: the same top-k on every rank
            indices = collector.sharded_top_indices()
        else:
            indices = collector.exact_indices() if collector is not None else None
            if indices is None:
                indices = _masks.top_k_indices(self.statistic(), self.nnz)
            indices = _masks.broadcast_indices(indices)
        shape = (self.out_features, self.in_features)
        structure = _masks.mask_structure(indices, *shape, validate=False)
        self._install_mask(structure, build_plan=False)
        mask = CSR(self.sparse_values.detach().clone(), structure.row_offsets, structure.row_indices,
                   structure.col_indices, shape)
        return mask, structure.column_counts

    def set_mask(self, mask):
        """Fixes the sparse adapter's mask and enters the ``"sparse"`` phase with ``S = 0``.

        ``mask`` is a bool tensor (out x in) or a :class:`~rosa_kernels.CSR` of shape (out, in), with
        exactly ``nnz = round(density * out * in)`` nonzeros. It is validated here (the one host
        synchronization of the life cycle); a bad mask raises and leaves the layer unchanged.
        """
        shape = (self.out_features, self.in_features)
        if isinstance(mask, torch.Tensor):
            if mask.dtype != torch.bool:
                raise TypeError(f"mask must be a bool tensor or a rosa_kernels.CSR, got a tensor of dtype {mask.dtype}")
            if tuple(mask.shape) != shape:
                raise ValueError(f"mask must have shape {shape}, got {tuple(mask.shape)}")
            mask = csr_from_mask(mask)
        elif not isinstance(mask, CSR):
            raise TypeError(f"mask must be a bool tensor or a rosa_kernels.CSR, got {type(mask).__name__}")
        if tuple(int(s) for s in mask.shape) != shape:
            raise ValueError(f"mask must have shape {shape}, got {tuple(mask.shape)}")
        if mask.nnz != self.nnz:
            raise ValueError(f"mask must have exactly round(density * out * in) = {self.nnz} nonzeros, got {mask.nnz}")
        device = self.weight.device
        row_offsets, col_indices, row_indices = validate_csr(
            mask.row_offsets.to(device), mask.col_indices.to(device), shape[0], shape[1], self.nnz,
            mask.row_indices.to(device),
        )
        self._install_mask(self._structure_of(row_offsets, col_indices, row_indices))

    def _structure_of(self, row_offsets, col_indices, row_indices) -> _masks.MaskStructure:
        """The structures the layer keeps for a validated CSR, whose row_indices it keeps as given."""
        flat_indices = _masks.csr_flat_indices(row_offsets, col_indices, self.in_features)
        structure = _masks.mask_structure(flat_indices, self.out_features, self.in_features, validate=False)
        return structure._replace(row_indices=row_indices)

    def _install_mask(self, structure: _masks.MaskStructure, build_plan: bool = True):
        """A new mask (``S = 0``), then :meth:`_use_structure`."""
        if self._merged:
            self._unmerge()
        with torch.no_grad():
            self.has_mask.fill_(True)
            self.sparse_values.zero_()
        self._use_structure(structure, build_plan)

    def _use_structure(self, structure: _masks.MaskStructure, build_plan: bool = True):
        """Keeps the mask's structures (the CSR, its transpose and the flat positions, all fixed
        while the mask is) in the buffers, builds its plan (unless the caller builds it later:
        until then dS takes the SDDMM) and enters the ``"sparse"`` phase."""
        with torch.no_grad():
            buffers = self._buffers
            torch._foreach_copy_([buffers[name] for name in _STRUCTURE_BUFFERS],
                                 list(structure[:len(_STRUCTURE_BUFFERS)]))
        # In the sparse phase before the plan: dS's arguments (_update_grad_args) read the new mask.
        self._end_collection()
        self.phase = "sparse"
        if build_plan:
            self._build_plan(structure.column_counts)
        else:
            self._use_plan(None)
        self._sync_transpose(structure)
        if self._sparse_mode == "merged":
            self._merge()

    def _end_collection(self):
        self._collector = None
        _COLLECTING_LAYERS.discard(self)

    @property
    def flat_indices(self) -> torch.Tensor:
        """The mask's row-major positions ``r * in_features + c`` (nnz,) int64 in CSR order (zeros
        before a mask is set), computed from the CSR buffers on each access (not kept: 8 bytes per
        nonzero)."""
        if self.phase != "sparse":
            return torch.zeros(self.nnz, dtype=torch.int64, device=self.col_indices.device)
        return _masks.csr_flat_indices(self.row_offsets, self.col_indices, self.in_features)

    def mask(self) -> CSR | None:
        """The mask as a CSR whose values are a copy of the sparse values (None before one is set)."""
        if self.phase != "sparse":
            return None
        return CSR(self.sparse_values.detach().clone(), self.row_offsets.clone(), self.row_indices.clone(),
                   self.col_indices.clone(), (self.out_features, self.in_features))

    def sparse_delta(self) -> torch.Tensor:
        """S as a dense (out x in) tensor (zeros before a mask is set)."""
        s = torch.zeros(self.out_features, self.in_features, dtype=self._adapter_dtype, device=self.weight.device)
        if self.phase == "sparse":
            s.view(-1).index_copy_(0, self.flat_indices, self.sparse_values.detach())
        return s

    def delta_weight(self) -> torch.Tensor:
        """S + scale * B A in float32."""
        return self.sparse_delta().float() + self.scale * (self.lora_B.detach().float() @ self.lora_A.detach().float())

    def merge(self) -> nn.Linear:
        """A plain ``nn.Linear`` with weight W + S + scale * B A (computed in float32)."""
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                           device=self.weight.device, dtype=self._adapter_dtype)
        with torch.no_grad():
            linear.weight.copy_(self.base_weight().float() + self.delta_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    # ------------------------------------------------------------------------------------------
    # state_dict: ``weight`` is always saved as the original W, whatever the sparse mode, so a state
    # loads into any RosaLinear of the same shape; loading rebuilds the derived tensors.
    # ------------------------------------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._merged:
            destination[prefix + "weight"] = self.base_weight()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Shapes are checked by nn.Module before anything is copied; check ours first, too, so a
        # mismatching state leaves the layer unchanged.
        key = prefix + "sparse_values"
        if key in state_dict and state_dict[key].shape != self.sparse_values.shape:
            error_msgs.append(f"size mismatch for {key}: the state has {tuple(state_dict[key].shape)}, this layer "
                              f"{tuple(self.sparse_values.shape)} (density {self.density} of {self.out_features}x"
                              f"{self.in_features})")
            return
        was_merged = self._merged
        if was_merged:
            self._unmerge()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if bool(self.has_mask):
            validate_csr(self.row_offsets, self.col_indices, self.out_features, self.in_features, self.nnz,
                         self.row_indices)
            self._use_structure(self._structure_of(self.row_offsets, self.col_indices, self.row_indices))
        elif self.phase == "sparse":
            self.phase = "warmup"
            self._sync_transpose()
