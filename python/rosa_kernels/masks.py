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
safetensors files holding int32 CSR structures.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from .csr import CSR, row_order

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
    "load_safetensors",
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
# safetensors without the dependency: the format is an 8-byte little-endian header length, a JSON
# header {name: {dtype, shape, data_offsets}} and the raw little-endian bytes. The official package
# reads what this writes (tested); using the format directly keeps the base package torch-only.
# ----------------------------------------------------------------------------------------------

_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def save_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> None:
    """Writes ``tensors`` (dense, any device) to a ``.safetensors`` file."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs = []
    offset = 0
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            raise TypeError(f"{name} must be a dense torch.Tensor")
        if tensor.dtype not in _ST_DTYPES:
            raise TypeError(f"{name} has dtype {tensor.dtype}, which safetensors does not store")
        t = tensor.detach().to("cpu").contiguous()
        data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data start stays 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for data in blobs:
            f.write(data)


def load_safetensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Reads a ``.safetensors`` file: ``(tensors on the CPU, metadata)``."""
    raw = Path(path).read_bytes()
    if len(raw) < 8:
        raise ValueError(f"{path} is not a safetensors file (too short)")
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    metadata = header.pop("__metadata__", {}) or {}
    start = 8 + length
    tensors = {}
    for name, entry in header.items():
        dtype = _ST_NAMES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        buffer = bytearray(raw[start + begin : start + end])
        flat = torch.frombuffer(buffer, dtype=torch.uint8) if buffer else torch.empty(0, dtype=torch.uint8)
        tensors[name] = flat.view(dtype).reshape(entry["shape"]).clone()
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
    """Loads masks saved by :func:`save_masks` as ``{name: CSR}`` with zero float32 values."""
    tensors, metadata = load_safetensors(path)
    if metadata.get("format") != "rosa_kernels.masks":
        raise ValueError(f"{path} does not hold rosa_kernels masks (metadata format = {metadata.get('format')!r})")
    masks = {}
    for name, shape in json.loads(metadata["shapes"]).items():
        cols = tensors[f"{name}.col_indices"]
        mask = CSR(torch.zeros(cols.shape[0]), tensors[f"{name}.row_offsets"], tensors[f"{name}.row_indices"], cols, tuple(shape))
        masks[name] = mask.to(device) if device is not None else mask
    return masks
