"""Mask selection from gradients: the statistic RoSA ranks weights by, and its top-k as CSR.

During the collection phase every :class:`~rosa_kernels.RosaLinear` adds the gradient of its frozen
base weight, ``dW = dY^T X``, from its own backward passes into a float32 buffer; at the end of each
optimizer step that step's ``dW`` goes into a float32 statistic on the layer's device:

- ``'fisher'`` (RoSA's ``mean_squared``): ``sum over steps of dW ∘ dW``
- ``'mean'``: ``sum over steps of dW``

The statistic is divided by the number of steps (and, under ``torch.distributed``, summed over the
ranks and divided by the world size) before selection, which keeps the ``round(density * out * in)``
entries of largest magnitude. Selection runs on the statistic's device: a ``topk``, a sort of the
flat indices, and a device-side count + scan for the row offsets, so nothing goes to the host.

Masks can be saved and loaded on their own (:func:`save_masks` / :func:`load_masks`) as
safetensors files holding int32 CSR structures. Saves are atomic (:func:`atomic_write`).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path

import torch

from .csr import CSR, row_order, validate_csr

__all__ = [
    "RULES",
    "mask_count",
    "accumulate_gradient",
    "fold_step",
    "accumulate_statistic",
    "reduce_statistic",
    "select_mask",
    "broadcast_mask",
    "save_masks",
    "load_masks",
    "save_safetensors",
    "write_safetensors",
    "load_safetensors",
    "atomic_write",
]

RULES = ("fisher", "mean")


def mask_count(out_features: int, in_features: int, density: float) -> int:
    """The number of nonzeros of a mask: ``round(density * out * in)``."""
    return min(out_features * in_features, int(round(density * out_features * in_features)))


def check_rule(rule) -> str:
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    return rule


def accumulate_gradient(pending: torch.Tensor, dY2d: torch.Tensor, X2d: torch.Tensor) -> None:
    """``pending += dY^T X`` in float32: the base weight's gradient, summed over the backward passes
    of one optimizer step (several forwards per step, as in gradient accumulation or siamese
    encoders, add up before the statistic squares them). ``dY2d`` is (tokens, out), ``X2d``
    (tokens, in)."""
    pending.addmm_(dY2d.t().float(), X2d.float())


def fold_step(statistic: torch.Tensor, pending: torch.Tensor, rule: str) -> None:
    """Ends a step: ``statistic += pending ∘ pending`` ('fisher') or ``+= pending`` ('mean'); zeroes ``pending``."""
    if rule == "mean":
        statistic.add_(pending)
    else:
        statistic.addcmul_(pending, pending)
    pending.zero_()


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


def reduce_statistic(statistic: torch.Tensor, steps: int) -> torch.Tensor:
    """The mean statistic over steps and, under ``torch.distributed``, over ranks (a new tensor)."""
    result = statistic.clone()
    world = 1
    dist = _distributed()
    if dist is not None:
        dist.all_reduce(result, op=dist.ReduceOp.SUM)
        world = dist.get_world_size()
    return result.div_(max(1, steps) * world)


def select_mask(statistic: torch.Tensor, nnz: int, *, dtype=torch.float32) -> CSR:
    """The ``nnz`` entries of largest ``|statistic|`` as a row-sorted CSR with zero values.

    Runs on the statistic's device without host synchronization: the flat indices of the top-k are
    sorted (row-major order is CSR order), and the row offsets are a scatter-add count followed by a
    cumulative sum.
    """
    if statistic.dim() != 2:
        raise ValueError(f"statistic must be 2-D, got shape {tuple(statistic.shape)}")
    m, n = statistic.shape
    if not 0 <= nnz <= m * n:
        raise ValueError(f"nnz must lie in [0, {m * n}], got {nnz}")
    flat = statistic.detach().abs().flatten()
    chosen = torch.topk(flat, nnz, sorted=False).indices if nnz < m * n else torch.arange(m * n, device=flat.device)
    chosen = torch.sort(chosen).values
    rows = torch.div(chosen, n, rounding_mode="floor")
    cols = (chosen - rows * n).to(torch.int32)
    counts = torch.zeros(m, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, rows, torch.ones_like(rows))
    row_offsets = torch.zeros(m + 1, dtype=torch.int32, device=flat.device)
    row_offsets[1:] = torch.cumsum(counts, 0).to(torch.int32)
    values = torch.zeros(nnz, dtype=dtype, device=flat.device)
    return CSR(values, row_offsets, row_order(row_offsets), cols, (m, n))


def broadcast_mask(mask: CSR, src: int = 0) -> CSR:
    """Under ``torch.distributed``, every rank receives rank ``src``'s mask (in place); else a no-op."""
    dist = _distributed()
    if dist is None:
        return mask
    for t in (mask.row_offsets, mask.row_indices, mask.col_indices):
        dist.broadcast(t, src)
    return mask


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
