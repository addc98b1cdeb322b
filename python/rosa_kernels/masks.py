"""Mask selection from gradients: the statistic RoSA ranks weights by, and its top-k as CSR.

During the collection phase every :class:`~rosa_kernels.RosaLinear` hands the gradient of its
frozen base weight, ``dW = dY^T X`` (computed in float32), from each of its backward passes to its
:class:`GradientCollector`. A step's gradient is the sum over the backward passes between two
optimizer steps; the statistic sums over steps

- ``'fisher'`` (RoSA's ``mean_squared``): ``sum over steps of dW ∘ dW``
- ``'mean'``: ``sum over steps of dW``

and is divided by the number of steps (and, under ``torch.distributed``, summed over the ranks and
divided by the world size; with one collection step and the Fisher rule, RoSA's recipe, the step's
gradient is averaged over the ranks before it is squared, so the mask is the one a single process
with the whole global batch selects; under FSDP2 the collector is *sharded*: each backward's gradient
is summed over the ranks at once and each rank keeps only its rows, see ``GradientCollector``) before
selection, which keeps the ``round(density * out * in)``
entries of largest magnitude. Where that statistic is kept is the collector's ``buffer``
(``COLLECT_BUFFERS``): nothing is allocated before a layer's first collecting backward, and

- ``'auto'`` (default): a bfloat16 accumulator (2 bytes per weight); the first backward also keeps
  the exact top-k indices of its float32 ``dW``, which the mask uses when the whole collection was
  that one backward (RoSA's recipe without gradient accumulation): exact then, else the top-k of
  the 16-bit statistic;
- ``'one_pass'``: no accumulator at all: the layer's top-k is taken from the float32 ``dW`` of its
  one backward (exact); a second collecting backward raises;
- ``'bfloat16'``: the 16-bit accumulator alone;
- ``'float32'``: a float32 accumulator (4 bytes per weight, 8 with more than one collection step);
- ``'host'``: the same float32 accumulator in (pinned) host memory: nothing kept on the device, but
  each backward copies the layer's ``dW`` to the host and adds it there (synchronously).

Selection runs on the statistic's device: a ``topk``, then one op, ``mask_structure``
(``csrc/mask_structure_ops.cpp``), builds from the top-k's flat indices everything a layer keeps
per mask (the CSR, its transpose, the sorted flat indices and the column counts) with sizes known
from the shapes alone, so nothing goes to the host.

Masks can be saved and loaded on their own (:func:`save_masks` / :func:`load_masks`) as
safetensors files holding int32 CSR structures. Saves are atomic (:func:`atomic_write`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from . import _C  # noqa: F401  (loading the extension registers the ops)
from .csr import CSR, _rows_of, check_size, check_tensor, validate_csr

__all__ = [
    "RULES",
    "COLLECT_BUFFERS",
    "GradientCollector",
    "mask_count",
    "accumulate_gradient",
    "weight_gradient",
    "accumulate_statistic",
    "reduce_statistic",
    "select_mask",
    "top_k_indices",
    "mask_from_indices",
    "mask_structure",
    "MaskStructure",
    "broadcast_mask",
    "broadcast_indices",
    "save_masks",
    "load_masks",
    "save_safetensors",
    "write_safetensors",
    "load_safetensors",
    "atomic_write",
]

_ops = torch.ops.rosa_kernels

RULES = ("fisher", "mean")
COLLECT_BUFFERS = ("auto", "one_pass", "float16", "bfloat16", "float32", "host")


def mask_count(out_features: int, in_features: int, density: float) -> int:
    """The number of nonzeros of a mask: ``round(density * out * in)``."""
    return min(out_features * in_features, int(round(density * out_features * in_features)))


def check_rule(rule) -> str:
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    return rule


def check_collect_buffer(buffer) -> str:
    if buffer not in COLLECT_BUFFERS:
        raise ValueError(f"collect_buffer must be one of {COLLECT_BUFFERS}, got {buffer!r}")
    return buffer


def accumulate_gradient(pending, dY2d: torch.Tensor, X2d: torch.Tensor) -> None:
    """``pending += dY^T X``: the base weight's gradient, summed over the backward passes of one
    optimizer step (several forwards per step, as in gradient accumulation or siamese encoders, add
    up before the statistic squares them). ``pending`` is a float32 tensor or a
    :class:`GradientCollector`. ``dY2d`` is (tokens, out), ``X2d`` (tokens, in)."""
    if isinstance(pending, GradientCollector):
        pending.add(dY2d, X2d)
    else:
        pending.addmm_(dY2d.t().float(), X2d.float())


_MM_OUT_DTYPE = [True]  # whether torch.mm(..., out_dtype=) works here (CUDA, 16-bit inputs)


def weight_gradient(dY2d: torch.Tensor, X2d: torch.Tensor) -> torch.Tensor:
    """``dW = dY^T X`` as a new float32 tensor. For 16-bit CUDA inputs a tensor-core GEMM accumulates
    and writes float32 (the products of 16-bit values are exact in float32: the same float32 sum up
    to its order), without float32 copies of dY and X or a float32 GEMM's time."""
    if _MM_OUT_DTYPE[0] and dY2d.is_cuda and dY2d.dtype in (torch.bfloat16, torch.float16) and X2d.dtype == dY2d.dtype:
        try:
            return torch.mm(dY2d.t(), X2d, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            _MM_OUT_DTYPE[0] = False
    return torch.mm(dY2d.t().float(), X2d.float())


def accumulate_statistic(statistic: torch.Tensor, dY2d: torch.Tensor, X2d: torch.Tensor, rule: str) -> None:
    """One whole step at once: ``statistic += dW ∘ dW`` ('fisher') or ``+= dW`` ('mean'), ``dW = dY^T X``."""
    if rule == "mean":
        accumulate_gradient(statistic, dY2d, X2d)
    else:
        dW = torch.mm(dY2d.t().float(), X2d.float())
        statistic.addcmul_(dW, dW)


def _distributed():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _all_gather(output: torch.Tensor, tensor: torch.Tensor) -> None:
    """``output`` = every rank's ``tensor``, concatenated along dimension 0 (rank order)."""
    dist = _distributed()
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the newer name first
    gather(output, tensor)


def reduce_statistic(statistic: torch.Tensor, steps: int) -> torch.Tensor:
    """The mean statistic over steps and, under ``torch.distributed``, over ranks (a new tensor)."""
    return _reduce_in_place(statistic.clone(), steps)


def _reduce_in_place(result: torch.Tensor, steps: int) -> torch.Tensor:
    world = 1
    dist = _distributed()
    if dist is not None:
        dist.all_reduce(result, op=dist.ReduceOp.SUM)
        world = dist.get_world_size()
    return result.div_(max(1, steps) * world)


def select_mask(statistic: torch.Tensor, nnz: int, *, dtype=torch.float32) -> CSR:
    """The ``nnz`` entries of largest ``|statistic|`` as a row-sorted CSR with zero values.

    Runs on the statistic's device without host synchronization (a ``topk``, then
    :func:`mask_structure`).
    """
    if statistic.dim() != 2:
        raise ValueError(f"statistic must be 2-D, got shape {tuple(statistic.shape)}")
    m, n = statistic.shape
    if not 0 <= nnz <= m * n:
        raise ValueError(f"nnz must lie in [0, {m * n}], got {nnz}")
    return mask_from_indices(top_k_indices(statistic, nnz), m, n, dtype=dtype)


def top_k_indices(statistic: torch.Tensor, nnz: int) -> torch.Tensor:
    """The flat positions of the ``nnz`` entries of largest ``|statistic|`` (int64, unsorted)."""
    return _top_k_indices(statistic.detach().abs().flatten(), nnz)


def _top_k_indices(flat: torch.Tensor, nnz: int) -> torch.Tensor:
    """The flat positions of the ``nnz`` largest entries of ``flat`` (unsorted)."""
    if nnz < flat.numel():
        return torch.topk(flat, nnz, sorted=False).indices
    return torch.arange(flat.numel(), device=flat.device)


class MaskStructure(NamedTuple):
    """What :func:`mask_structure` builds for an m x n mask with nnz nonzeros (all on one device).

    ``row_offsets`` (m + 1,), ``row_indices`` (m,) (:func:`~rosa_kernels.row_order`) and
    ``col_indices`` (nnz,): the row-sorted CSR; ``row_offsets_t`` (n + 1,), ``row_indices_t`` (n,),
    ``col_indices_t`` (nnz,) and ``permutation`` (nnz,): its n x m transpose as
    ``csr_transpose(..., return_permutation=True)`` gives it, ``values_t = values[permutation]``
    (all int32); ``flat_indices`` (nnz,) the row-major positions ``i * n + j`` in CSR (ascending)
    order (int64) and ``column_counts`` (n,) the nonzeros per column (int32)."""

    row_offsets: torch.Tensor
    row_indices: torch.Tensor
    col_indices: torch.Tensor
    row_offsets_t: torch.Tensor
    row_indices_t: torch.Tensor
    col_indices_t: torch.Tensor
    permutation: torch.Tensor
    flat_indices: torch.Tensor
    column_counts: torch.Tensor


def mask_structure(flat_indices: torch.Tensor, m: int, n: int, *, validate: bool = True) -> MaskStructure:
    """The :class:`MaskStructure` of an m x n mask from its distinct row-major flat indices
    ``i * n + j`` (int64 or int32, any order, e.g. a top-k's indices), built by one op on their
    device without host synchronization.

    With ``validate`` the indices are checked to lie in ``[0, m * n)`` and be distinct (on a GPU one
    synchronization; the CPU op always checks them). Unchecked bad indices on a GPU give an
    unspecified structure (clamped into range: nothing is indexed out of bounds).
    Raises ``TypeError`` / ``ValueError`` naming the argument.
    """
    check_tensor(flat_indices, "flat_indices")
    m, n = check_size(m, "m"), check_size(n, "n")
    if not isinstance(validate, bool):
        raise TypeError(f"validate must be a bool, got {type(validate).__name__}")
    structure = MaskStructure(*_ops.mask_structure(flat_indices, m, n))
    if validate and flat_indices.device.type != "cpu" and flat_indices.numel():
        # Before the op's clamp: the range of the input; after its sort: repeats.
        lowest, highest = torch.aminmax(flat_indices)
        chosen = structure.flat_indices
        low, high, repeated = torch.stack([lowest < 0, highest >= m * n, (chosen[1:] == chosen[:-1]).any()]).tolist()
        if low or high:
            raise ValueError(f"flat_indices must lie in [0, m * n = {m * n}), got values in "
                             f"[{int(lowest)}, {int(highest)}]")
        if repeated:
            raise ValueError("flat_indices must be distinct, got a position twice")
    return structure


def mask_from_indices(flat_indices: torch.Tensor, m: int, n: int, *, dtype=torch.float32) -> CSR:
    """The row-sorted CSR (zero values) of an m x n mask from its distinct row-major flat indices
    (any order), built on their device without host synchronization (:func:`mask_structure`)."""
    structure = mask_structure(flat_indices, m, n, validate=False)
    values = torch.zeros(structure.col_indices.shape[0], dtype=dtype, device=structure.col_indices.device)
    return CSR(values, structure.row_offsets, structure.row_indices, structure.col_indices, (m, n))


def csr_flat_indices(row_offsets: torch.Tensor, col_indices: torch.Tensor, n: int) -> torch.Tensor:
    """The row-major flat positions ``i * n + j`` (int64) of a CSR structure's nonzeros, in its order."""
    return _rows_of(row_offsets, col_indices.shape[0]) * n + col_indices.long()


@torch.library.register_fake("rosa_kernels::mask_structure")
def _mask_structure_fake(flat_indices, m, n):
    nnz = flat_indices.shape[0]
    index = {"dtype": torch.int32, "device": flat_indices.device}
    return (torch.empty(m + 1, **index), torch.empty(m, **index), torch.empty(nnz, **index),
            torch.empty(n + 1, **index), torch.empty(n, **index), torch.empty(nnz, **index), torch.empty(nnz, **index),
            torch.empty(nnz, dtype=torch.int64, device=flat_indices.device), torch.empty(n, **index))


class GradientCollector:
    """Collects one layer's gradient statistic during the ``"collect"`` phase (see the module docs).

    State, all on the layer's device and ``None`` until first needed (a checkpoint needs all of it):

    - ``pending``: the sum of ``dW`` over the backward passes of the current step; once a step ends
      (:meth:`end_step`) it is that step's gradient until the next step's first backward folds it
      into ``statistic``, so a collection of one step needs no second buffer;
    - ``statistic``: the sum over the folded steps (``steps - 1`` of them while ``pending`` holds the
      last ended step); in the 16-bit buffers the Fisher rule keeps its square root, whose range is
      the gradient's;
    - ``pending_scale``, ``statistic_scale``: with ``'float16'`` (and ``'auto'``), the buffers hold
      ``value / scale`` per row, ``scale`` (out x 1, float32) a power of two chosen anew at each
      write so that the row's largest entry lies in [2^14, 2^15): float16's 11-bit significand for
      every entry within 2^-29 of its row's largest (bfloat16 has 8 bits);
    - ``top_indices``: the exact top-k flat indices (int64, unsorted) of the first backward's float32
      ``dW`` (``'auto'`` and ``'one_pass'`` outside ``torch.distributed``, or sharded: this rank's
      candidates, as flat indices of the whole layer);
    - ``top_values``: sharded only, the values of those candidates (the ranks' candidates are merged
      by value at selection);
    - ``steps`` (ended steps), ``backward_passes`` (all collecting backward passes) and
      ``pending_ended`` (``pending`` belongs to an ended step).

    ``shard=True`` under ``torch.distributed`` (RosaLinear asks for it when FSDP2 shards its weight):
    ``rows = (first, last)`` is this rank's even share of the rows; each backward all-reduces ``dW``
    (a collective, every rank in the same layer order) and keeps those rows, so ``pending`` and
    ``statistic`` are ``storage_shape`` = (last - first, in) and hold sums over the ranks;
    :meth:`sharded_top_indices` and :meth:`full_statistic` are collectives too.
    """

    def __init__(self, shape, device, rule: str = "fisher", buffer: str = "auto", nnz: int = 0, *,
                 shard: bool = False):
        self.shape, self.device = tuple(int(s) for s in shape), torch.device(device)
        self.rule, self.buffer, self.nnz = check_rule(rule), check_collect_buffer(buffer), int(nnz)
        self.pending = self.statistic = self.top_indices = self.top_values = None
        self.pending_scale = self.statistic_scale = None
        self.steps = self.backward_passes = 0
        self.pending_ended = False
        # Sharded (FSDP2): this rank keeps rows [first, last) of the statistic, of the gradient summed
        # over the ranks at each backward; selection merges the ranks' top-k candidates.
        self.rows = None
        dist = _distributed()
        if shard and dist is not None and dist.get_world_size() > 1:
            m, per_rank = self.shape[0], self._rows_per_rank()
            first = min(m, dist.get_rank() * per_rank)
            self.rows = (first, min(m, first + per_rank))
        elif self.buffer == "one_pass" and dist is not None:
            warnings.warn("collect_buffer='one_pass' under torch.distributed: the statistic is summed over ranks, "
                          "so the layer keeps the float16 accumulator instead", stacklevel=3)

    def _rows_per_rank(self) -> int:
        """Sharded: the rows of each rank's share (the last ranks may hold fewer, or none)."""
        return -(-self.shape[0] // _distributed().get_world_size())

    @property
    def storage_shape(self) -> tuple[int, int]:
        """The shape of ``pending`` and ``statistic``: the layer's, or this rank's rows when sharded."""
        if self.rows is None:
            return self.shape
        return (self.rows[1] - self.rows[0], self.shape[1])

    @property
    def _dtype(self):
        return {"float32": torch.float32, "host": torch.float32, "bfloat16": torch.bfloat16}.get(self.buffer,
                                                                                                 torch.float16)

    @property
    def _storage_device(self):
        """Where ``pending`` and ``statistic`` live: the host for ``'host'``, else the layer's device."""
        return torch.device("cpu") if self.buffer == "host" else self.device

    def memory_bytes(self) -> int:
        """Bytes held now (the buffers, their scales and ``top_indices``)."""
        tensors = (self.pending, self.statistic, self.pending_scale, self.statistic_scale, self.top_indices,
                   self.top_values)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def _encode(self, total: torch.Tensor, tensor, scale):
        """Stores the float32 ``total`` (consumed) into ``tensor`` (allocated when None): (tensor, scale)."""
        if self._dtype == torch.float16:
            # scale = 2^(e - 15) with 2^(e-1) <= row max < 2^e: exact to divide and multiply back.
            lowest, highest = torch.aminmax(total, dim=1, keepdim=True)
            exponent = torch.frexp(torch.maximum(highest, lowest.neg_())).exponent
            # 2^(e - 15) from its bits (exact on every device; normal float32 exponents only).
            biased = (exponent.to(torch.int32) + (127 - 15)).clamp_(1, 254)
            scale = torch.bitwise_left_shift(biased, 23).view(torch.float32)
            total = total.div_(scale)
        if tensor is None:
            tensor = torch.empty(self.storage_shape, dtype=self._dtype, device=self.device)
        tensor.copy_(total)
        return tensor, scale

    @staticmethod
    def _decode(tensor, scale) -> torch.Tensor:
        """A new float32 tensor of the stored values."""
        result = tensor.to(torch.float32, copy=True)
        return result.mul_(scale) if scale is not None else result

    def add(self, dY2d: torch.Tensor, X2d: torch.Tensor) -> None:
        """Adds ``dW = dY^T X`` of one backward pass (called from the layer's backward)."""
        self.backward_passes += 1
        if self.pending_ended:
            self._fold()
        # One pass (exact): the top-k of the float32 dW under the 'fisher' and 'mean' rules alike,
        # valid while this stays the collection's only backward. Under torch.distributed the
        # statistic is a sum over ranks, which the per-rank dW cannot rank: the accumulator decides.
        # (Sharded, the gradient is summed over the ranks first: its top-k ranks the statistic.)
        exact_pass = self.buffer in ("auto", "one_pass") and (_distributed() is None or self.rows is not None)
        keep_accumulator = not (self.buffer == "one_pass" and exact_pass)
        if not keep_accumulator and self.backward_passes > 1:
            raise RuntimeError("collect_buffer='one_pass' takes exactly one collecting backward pass (one step, no "
                               "gradient accumulation); use collect_buffer='auto' or 'float16' for more")
        if self.buffer == "float32" and self.rows is None:
            if self.pending is None:
                self.pending = torch.zeros(self.shape, dtype=torch.float32, device=self.device)
            self.pending.addmm_(dY2d.t().float(), X2d.float())
            return
        dW = self._rows_of(weight_gradient(dY2d, X2d))
        if self.buffer in ("host", "float32"):
            if self.pending is None:
                pinned = self.buffer == "host" and self.device.type == "cuda"
                self.pending = torch.empty(self.storage_shape, dtype=torch.float32, device=self._storage_device,
                                           pin_memory=pinned)
                self.pending.copy_(dW)
            else:
                self.pending.add_(dW.to(self._storage_device))
            return
        if keep_accumulator:
            if self.pending is not None:
                # The sum in float32, rounded once into the 16-bit accumulator.
                if self.pending_scale is None:
                    dW.add_(self.pending)
                else:
                    dW.addcmul_(self.pending, self.pending_scale)
            self.pending, self.pending_scale = self._encode(dW, self.pending, self.pending_scale)
            if self.pending_scale is not None:
                dW.mul_(self.pending_scale)  # undoes the encoding's division by powers of two, exactly
        first = exact_pass and self.backward_passes == 1
        self.top_indices = self.top_values = None
        if first and self.rows is None:
            self.top_indices = _top_k_indices(dW.abs_().view(-1), self.nnz)
        elif first:
            flat = dW.abs_().view(-1)
            self.top_values, local = torch.topk(flat, min(self.nnz, flat.numel()), sorted=False)
            self.top_indices = local + self.rows[0] * self.shape[1]

    def _rows_of(self, dW: torch.Tensor) -> torch.Tensor:
        """``dW`` itself, or, sharded, this rank's rows of its sum over the ranks (a collective)."""
        if self.rows is None:
            return dW
        _distributed().all_reduce(dW)
        return dW[self.rows[0]:self.rows[1]]

    def end_step(self) -> None:
        """Ends an optimizer step (the step's gradient stays in ``pending`` until the next one's)."""
        if self.pending_ended:
            self._fold()
        self.steps += 1
        self.pending_ended = self.pending is not None

    def _fold(self) -> None:
        """``statistic += pending ∘ pending`` ('fisher') or ``+= pending`` ('mean'); empties ``pending``."""
        fisher = self.rule == "fisher"
        if self._dtype == torch.float32:
            if self.statistic is None:
                self.statistic = self.pending.mul(self.pending) if fisher else self.pending.clone()
            elif fisher:
                self.statistic.addcmul_(self.pending, self.pending)
            else:
                self.statistic.add_(self.pending)
            self.pending.zero_()
        else:
            total = self._step_term()
            if self.statistic is not None:
                total.add_(self._stored_statistic())
            if fisher:
                total.sqrt_()  # kept as the root: the range of a gradient, not of its square
            self.statistic, self.statistic_scale = self._encode(total, self.statistic, self.statistic_scale)
            self.pending.zero_()
            if self.pending_scale is not None:
                self.pending_scale.fill_(1.0)
        self.pending_ended = False

    def _stored_statistic(self) -> torch.Tensor:
        """The folded steps' sum, a new float32 tensor."""
        result = self._decode(self.statistic, self.statistic_scale)
        return result.mul_(result) if self.rule == "fisher" and self._dtype != torch.float32 else result

    def _step_term(self) -> torch.Tensor:
        """The last ended step's term of the statistic, a new float32 tensor."""
        gradient = self._decode(self.pending, self.pending_scale)
        return gradient.mul_(gradient) if self.rule == "fisher" else gradient

    def exact_indices(self):
        """The exact top-k flat indices when the whole collection was one backward pass, else None
        (sharded: see :meth:`sharded_top_indices`)."""
        if self.rows is None and self.top_indices is not None and self.backward_passes == 1 and self.steps <= 1:
            return self.top_indices
        return None

    def sharded_top_indices(self) -> torch.Tensor:
        """Sharded: the flat indices of the layer's top-k, the same on every rank (a collective).

        Each rank takes the top-k of its rows (the exact float32 one of the first backward when
        that was the whole collection, else of its rows of :meth:`mean_statistic`); the ranks'
        candidates are gathered and their top-k taken, which is the top-k of the whole statistic:
        every entry of it is among the top-k of its own rows."""
        if self.rows is None:
            raise ValueError("the collector is not sharded")
        if self.top_indices is not None and self.backward_passes == 1 and self.steps <= 1:
            values, indices = self.top_values, self.top_indices
        else:
            flat = self.mean_statistic().abs_().view(-1)
            values, local = torch.topk(flat, min(self.nnz, flat.numel()), sorted=False)
            indices = local + self.rows[0] * self.shape[1]
        dist = _distributed()
        # Every rank sends nnz candidates (padded with -inf, never chosen: the ranks hold >= nnz in all).
        padded_values = torch.full((self.nnz,), -math.inf, dtype=torch.float32, device=self.device)
        padded_indices = torch.zeros(self.nnz, dtype=torch.int64, device=self.device)
        padded_values[:values.numel()] = values
        padded_indices[:indices.numel()] = indices
        world = dist.get_world_size()
        all_values = torch.empty(world * self.nnz, dtype=torch.float32, device=self.device)
        all_indices = torch.empty(world * self.nnz, dtype=torch.int64, device=self.device)
        _all_gather(all_values, padded_values)
        _all_gather(all_indices, padded_indices)
        return all_indices[torch.topk(all_values, self.nnz, sorted=False).indices]

    def full_statistic(self) -> torch.Tensor:
        """:meth:`mean_statistic` of the whole layer: sharded, the ranks' rows gathered (a
        collective; a float32 tensor the layer's size on every rank)."""
        if self.rows is None:
            return self.mean_statistic()
        world, (m, n), per_rank = _distributed().get_world_size(), self.shape, self._rows_per_rank()
        mine = torch.zeros(per_rank, n, dtype=torch.float32, device=self.device)
        mine[:self.rows[1] - self.rows[0]] = self.mean_statistic()
        gathered = torch.empty(world * per_rank, n, dtype=torch.float32, device=self.device)
        _all_gather(gathered, mine)
        return gathered[:m]

    def mean_statistic(self) -> torch.Tensor:
        """The statistic averaged over steps (and ranks under ``torch.distributed``): a new float32
        tensor. Gradients that arrived after the last ended step are not counted (unless no step
        ended: then they are the one step)."""
        if self.steps == 0:
            if self.backward_passes == 0:
                raise ValueError("no gradient statistic was collected: train a step in the collect phase first")
            self.end_step()
        if self.pending is None and self.statistic is None and self.backward_passes > 0:
            raise ValueError("collect_buffer='one_pass' keeps only the top-k indices, not the statistic")
        dist = _distributed()
        if self.rows is not None:
            # Sharded: every step's gradient is already the sum over the ranks (so each step squares the
            # whole global batch's gradient); the mean gradient is that sum over the world size.
            world = dist.get_world_size()
            return self._summed_statistic().div_(max(1, self.steps) * (world * world if self.rule == "fisher"
                                                                       else world))
        if dist is not None and self.rule == "fisher" and self.pending_ended and self.statistic is None \
                and self.steps == 1:
            # One collection step (RoSA's recipe) under torch.distributed: the square of the gradient
            # averaged over the ranks, i.e. of the whole global batch's gradient, as one process
            # would compute it (not the mean of per-rank squares). A collective: every rank calls it,
            # in the same layer order (select_masks walks the model's modules).
            gradient = self._decode(self.pending, self.pending_scale).to(self.device)
            dist.all_reduce(gradient, op=dist.ReduceOp.SUM)
            gradient.div_(dist.get_world_size())
            return gradient.mul_(gradient)
        return _reduce_in_place(self._summed_statistic(), self.steps)

    def _summed_statistic(self) -> torch.Tensor:
        """The ended steps' statistic summed (this rank's rows when sharded), a new float32 tensor on
        the layer's device."""
        result = self._step_term() if self.pending_ended else None
        if self.statistic is not None:
            result = self._stored_statistic() if result is None else result.add_(self._stored_statistic())
        if result is None:  # every step ended without a backward
            result = torch.zeros(self.storage_shape, dtype=torch.float32, device=self.device)
        return result.to(self.device)

    _TENSORS = ("pending", "pending_scale", "statistic", "statistic_scale", "top_indices", "top_values")
    _KEYS = ("rule", "collect_buffer", "steps", "backward_passes", "pending_ended") + _TENSORS
    _OPTIONAL = ("top_values",)  # absent from the states of earlier versions (unsharded: always None)

    def state_dict(self) -> dict:
        """The whole collection state (tensors are the live ones, ``None`` where not allocated)."""
        state = {"rule": self.rule, "collect_buffer": self.buffer, "steps": self.steps,
                 "backward_passes": self.backward_passes, "pending_ended": self.pending_ended}
        return {**state, **{name: getattr(self, name) for name in self._TENSORS}}

    @classmethod
    def from_state_dict(cls, state: dict, shape, device, nnz: int, *, shard: bool = False) -> "GradientCollector":
        """A collector holding :meth:`state_dict`'s state (copied to ``device``); a state that does not
        fit (keys, rule, buffer, counts, or a tensor's shape or dtype: a sharded state loads into the
        same sharding only) raises ``ValueError``."""
        if not isinstance(state, dict) or not set(cls._KEYS) - set(cls._OPTIONAL) <= set(state) <= set(cls._KEYS):
            found = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"collection state must have the keys {sorted(cls._KEYS)}; got {found}")
        state = {"top_values": None, **state}
        collector = cls(shape, device, state["rule"], state["collect_buffer"], nnz, shard=shard)
        for key in ("steps", "backward_passes"):
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"collection state {key} must be an int >= 0, got {value!r}")
        if not isinstance(state["pending_ended"], bool):
            raise ValueError(f"collection state pending_ended must be a bool, got {state['pending_ended']!r}")
        m, n = collector.storage_shape
        row_scale = collector._dtype == torch.float16
        candidates = (min(collector.nnz, m * n),)
        expected = {"pending": ((m, n), collector._dtype),
                    "statistic": ((m, n), collector._dtype),
                    "pending_scale": ((m, 1), torch.float32) if row_scale else None,
                    "statistic_scale": ((m, 1), torch.float32) if row_scale else None,
                    "top_indices": (candidates, torch.int64),
                    "top_values": (candidates, torch.float32) if collector.rows is not None else None}
        for name in cls._TENSORS:
            t = state[name]
            if t is None:
                continue
            if expected[name] is None or not isinstance(t, torch.Tensor) or (tuple(t.shape), t.dtype) != expected[name]:
                got = (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"collection state {name} must be {expected[name] or 'None'} (shape, dtype) for "
                                 f"collect_buffer={collector.buffer!r}, got {got}")
        for scale, tensor in (("pending_scale", "pending"), ("statistic_scale", "statistic")):
            if row_scale and (state[scale] is None) != (state[tensor] is None):
                raise ValueError(f"collection state {tensor} and {scale} must be given together")
        if state["pending_ended"] and state["pending"] is None:
            raise ValueError("collection state pending_ended needs a pending tensor")
        collector.steps, collector.backward_passes = state["steps"], state["backward_passes"]
        collector.pending_ended = state["pending_ended"]
        for name in cls._TENSORS:
            if state[name] is not None:
                device = collector._storage_device if name in ("pending", "statistic") else collector.device
                setattr(collector, name, state[name].to(device=device, copy=True))
        return collector

    def to(self, device) -> "GradientCollector":
        self.device = torch.device(device)
        for name in self._TENSORS:
            if self.buffer == "host" and name in ("pending", "statistic"):
                continue
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.to(device))
        return self


def broadcast_mask(mask: CSR, src: int = 0) -> CSR:
    """Under ``torch.distributed``, every rank receives rank ``src``'s mask (in place); else a no-op."""
    dist = _distributed()
    if dist is None:
        return mask
    for t in (mask.row_offsets, mask.row_indices, mask.col_indices):
        dist.broadcast(t, src)
    return mask


def broadcast_indices(flat_indices: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Under ``torch.distributed``, every rank receives rank ``src``'s flat mask indices (in place; one
    collective, where :func:`broadcast_mask` takes three); else a no-op."""
    dist = _distributed()
    if dist is not None:
        dist.broadcast(flat_indices, src)
    return flat_indices


# ----------------------------------------------------------------------------------------------
# Files: the ``safetensors`` package reads and writes them; every write goes to a temporary file in
# the target's directory that replaces the target only once it is complete (``os.replace`` is
# atomic), so an interrupted save leaves the previous file as it was.
# ----------------------------------------------------------------------------------------------


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as error:  # a core dependency; imported on first use to keep imports light
        raise ImportError("saving and loading adapters needs the safetensors package: pip install safetensors") from error
    return safetensors


def atomic_write(files: dict) -> None:
    """Writes files so that an error cannot leave a half-written one: ``{path: write}``.

    Each ``write(temporary_path)`` writes a temporary file next to its ``path`` (same directory, so
    the final ``os.replace`` is an atomic rename), which is flushed to disk; only when every file is
    complete are they renamed into place, in order. On an error before that every temporary file is
    removed and every ``path`` keeps its previous content.
    """
    staged = []
    try:
        for path, write in files.items():
            path = Path(path)
            temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
            staged.append((temporary, path))
            write(temporary)
            with open(temporary, "rb+") as f:
                os.fsync(f.fileno())
        for temporary, path in staged:
            os.replace(temporary, path)
    except BaseException:
        for temporary, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        raise


def write_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> None:
    """Writes ``tensors`` (dense, any device) to a ``.safetensors`` file at ``path`` (not atomic:
    :func:`save_safetensors` is)."""
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            raise TypeError(f"{name} must be a dense torch.Tensor")
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
    _safetensors().torch.save_file(cpu, str(path), metadata=metadata)


def save_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> None:
    """Writes ``tensors`` (dense, any device) to a ``.safetensors`` file, atomically: on an error the
    previous file at ``path`` stays as it was (:func:`atomic_write`)."""
    atomic_write({path: lambda temporary: write_safetensors(tensors, temporary, metadata)})


def load_safetensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Reads a ``.safetensors`` file: ``(tensors on the CPU, metadata)``.

    A missing file raises ``FileNotFoundError``; a truncated, corrupt or foreign one ``ValueError``
    naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    safetensors = _safetensors()
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            # The file is memory-mapped: copy, so the tensors outlive it (and a later save over it).
            tensors = {name: f.get_tensor(name).clone() for name in f.keys()}
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") from error
    return tensors, metadata


def save_masks(path, masks: dict[str, CSR]) -> None:
    """Saves masks ``{name: CSR}`` (structures only, int32) to a safetensors file."""
    tensors, shapes = {}, {}
    for name, mask in masks.items():
        if not isinstance(mask, CSR):
            raise TypeError(f"masks[{name!r}] must be a rosa_kernels.CSR, got {type(mask).__name__}")
        tensors[f"{name}.row_offsets"] = mask.row_offsets.to(torch.int32)
        tensors[f"{name}.col_indices"] = mask.col_indices.to(torch.int32)
        tensors[f"{name}.row_indices"] = mask.row_indices.to(torch.int32)
        shapes[name] = [int(s) for s in mask.shape]
    save_safetensors(tensors, path, {"format": "rosa_kernels.masks", "shapes": json.dumps(shapes)})


def load_masks(path, *, device=None) -> dict[str, CSR]:
    """Loads masks saved by :func:`save_masks` as ``{name: CSR}`` with zero float32 values.

    Every structure is validated; a file that is not a complete, valid mask file raises
    ``ValueError`` (a missing one ``FileNotFoundError``).
    """
    tensors, metadata = load_safetensors(path)
    if metadata.get("format") != "rosa_kernels.masks":
        raise ValueError(f"{path} does not hold rosa_kernels masks (metadata format = {metadata.get('format')!r})")
    try:
        shapes = json.loads(metadata["shapes"])
        if not isinstance(shapes, dict):
            raise ValueError("not a JSON object")
    except (KeyError, ValueError) as error:
        raise ValueError(f"{path}: the masks' shapes in the metadata are missing or unreadable ({error})") from error
    masks = {}
    for name, shape in shapes.items():
        fields = [f"{name}.{field}" for field in ("row_offsets", "col_indices", "row_indices")]
        missing = [key for key in fields if key not in tensors]
        if missing:
            raise ValueError(f"{path}: mask {name!r} lacks the tensors {missing}")
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise ValueError(f"{path}: mask {name!r} has an invalid shape {shape!r}")
        row_offsets, col_indices, row_indices = (tensors[key] for key in fields)
        try:
            row_offsets, col_indices, row_indices = validate_csr(row_offsets, col_indices, shape[0], shape[1],
                                                                 row_indices=row_indices)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: mask {name!r} is not a valid CSR structure: {error}") from error
        mask = CSR(torch.zeros(col_indices.shape[0]), row_offsets, row_indices, col_indices, tuple(shape))
        masks[name] = mask.to(device) if device is not None else mask
    return masks
