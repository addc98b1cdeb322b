"""RosaLinear's LoRA dropout, regenerated from a seed.

The LoRA branch of RoSA reads ``drop(X)``. Instead of drawing, applying and saving a T x in keep
mask, RosaLinear draws one 64-bit seed per forward (eagerly on the host, from the input device's
generator; while a CUDA graph is captured and in compiled graphs, :func:`draw_seed` on the device,
read by the kernels, so each replay draws a new mask), and the ops (``torch.ops.rosa_kernels``, CPU
and CUDA) rebuild the mask from it wherever it is needed:

- ``lora_dropout_apply(x, seed, p)`` = ``X ∘ keep`` (the unfused building block);
- ``lora_dropout_add_(dx, g, seed, p, alpha)``: ``dX += alpha * keep ∘ G`` in place, so the mask
  is never saved;
- ``lora_dropout_project(x, seed, p, lora_A)`` = ``(X ∘ keep) A^T`` (forward: the LoRA
  down-projection) and ``lora_dropout_addmm_(dx, g, lora_A, seed, p, alpha)``: ``dX += alpha * keep ∘
  (G A)`` in place (backward, ``G = dY B``): the dropout fused into the products that read or
  write a T x in tensor, one pass over it instead of three (on a GPU, tensor-core kernels for
  16-bit values and ranks up to 64; otherwise the two ops above around a GEMM);
- ``lora_dropout_grad_A(x, seed, p, g, alpha)`` = ``alpha * G^T (X ∘ keep)`` (backward: the gradient
  of ``lora_A``, fused the same way).

``keep(t, j)`` is a counter-based hash of (seed, t, j) (``csrc/dropout_keep.h``), so the CPU and
the GPU draw the same mask from the same seed; :func:`keep_mask` is the same function in torch
integer ops. An element is dropped with probability ``p`` (to 2^-32); the ops leave the
``1 / (1 - p)`` factor to the caller.
"""

from __future__ import annotations

import torch

__all__ = ["draw_seed", "keep_mask"]

_MASK32 = 0xFFFFFFFF


def draw_seed(device: torch.device | str | None = None) -> torch.Tensor:
    """A fresh seed: a one-element int64 tensor from torch's default generator of ``device`` (so
    ``torch.manual_seed`` fixes it). On a CUDA device the seed stays there and the dropout kernels
    read it themselves: no host synchronization, and CUDA graphs and ``torch.compile`` capture the
    draw (a CPU seed would be frozen into a captured graph). Default: a CPU seed."""
    return torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64, device=device)


def _mix(x: torch.Tensor) -> torch.Tensor:
    # Wellons' lowbias32 on int64 tensors holding uint32 values (products wrap mod 2^64, whose low
    # 32 bits are the uint32 product).
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def keep_mask(seed: torch.Tensor | int, tokens: int, features: int, p: float) -> torch.Tensor:
    """The (tokens x features) bool keep mask that the fused ops use for ``seed`` and ``p``."""
    seed = int(seed.item()) if isinstance(seed, torch.Tensor) else int(seed)
    bits = seed & 0xFFFFFFFFFFFFFFFF
    seed_lo, seed_hi = bits & _MASK32, bits >> 32
    threshold = min(max(round(p * 2**32), 0), _MASK32)
    t = torch.arange(tokens, dtype=torch.int64)
    j = torch.arange(features, dtype=torch.int64)
    row_key = _mix(t ^ seed_lo) ^ seed_hi
    hashed = _mix((row_key[:, None] + ((j * 0x9E3779B9) & _MASK32)[None, :]) & _MASK32)
    return hashed >= threshold


def _register_fake_kernels() -> None:
    @torch.library.register_fake("rosa_kernels::lora_dropout_apply")
    def _(x, seed, p):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("rosa_kernels::lora_dropout_add_")
    def _(dx, g, seed, p, alpha):
        return None

    @torch.library.register_fake("rosa_kernels::lora_dropout_project")
    def _(x, seed, p, lora_A):
        return x.new_empty((x.shape[0], lora_A.shape[0]))

    @torch.library.register_fake("rosa_kernels::lora_dropout_addmm_")
    def _(dx, g, lora_A, seed, p, alpha):
        return None

    @torch.library.register_fake("rosa_kernels::lora_dropout_grad_A")
    def _(x, seed, p, g, alpha):
        return x.new_empty((g.shape[1], x.shape[1]))


_register_fake_kernels()
