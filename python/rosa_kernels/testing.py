"""Seeded sparse inputs for tests and benchmarks: the mask kinds of the performance protocol.

- :func:`uniform_mask`: nonzeros uniformly at random.
- :func:`rosa_mask`: the synthetic RoSA recipe: top-k of ``|dO^T X|`` where ``dO`` (tokens x m) and
  ``X`` (tokens x n) are Gaussian with per-channel scales ``exp(1.0 N(0,1))`` and
  ``exp(2.5 N(0,1))``. Like real RoSA masks, the nonzeros crowd into a few input columns.
- :func:`real_masks`: the 36 masks RoSA selected on all-MiniLM-L6-v2 (``shared/data/masks``).

Every mask has exactly ``round(density * m * n)`` nonzeros and is returned as a :class:`CSR` whose
values are random (never zeros) unless ``values="zeros"``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from .csr import CSR, csr_from_mask

__all__ = ["uniform_mask", "rosa_mask", "random_csr", "real_masks", "find_real_masks", "mask_count"]


def mask_count(m: int, n: int, density: float) -> int:
    """The number of nonzeros of an m x n mask of the given density: round(density * m * n)."""
    return min(m * n, int(round(density * m * n)))


def _with_values(mask: torch.Tensor, dtype, device, seed: int, values: str) -> CSR:
    csr = csr_from_mask(mask)
    if values == "zeros":
        vals = torch.zeros(csr.nnz, dtype=dtype)
    else:
        gen = torch.Generator().manual_seed(seed + 1)
        vals = torch.randn(csr.nnz, generator=gen, dtype=torch.float32).to(dtype)
    return CSR(vals, csr.row_offsets, csr.row_indices, csr.col_indices, csr.shape).to(device)


@functools.lru_cache(maxsize=32)
def _uniform_bool(m: int, n: int, density: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    k = mask_count(m, n, density)
    flat = torch.randperm(m * n, generator=gen)[:k]
    mask = torch.zeros(m * n, dtype=torch.bool)
    mask[flat] = True
    return mask.view(m, n)


@functools.lru_cache(maxsize=32)
def _rosa_bool(m: int, n: int, density: float, seed: int, tokens: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    out_scale = torch.exp(1.0 * torch.randn(m, generator=gen))
    in_scale = torch.exp(2.5 * torch.randn(n, generator=gen))
    grad_out = torch.randn(tokens, m, generator=gen) * out_scale
    inputs = torch.randn(tokens, n, generator=gen) * in_scale
    gradient = (grad_out.T @ inputs).abs_().view(-1)
    k = mask_count(m, n, density)
    mask = torch.zeros(m * n, dtype=torch.bool)
    if k:
        mask[torch.topk(gradient, k, sorted=False).indices] = True
    return mask.view(m, n)


def uniform_mask(m, n, density, *, seed=0, dtype=torch.float32, device="cpu", values="random") -> CSR:
    """A mask with nonzeros placed uniformly at random."""
    return _with_values(_uniform_bool(m, n, float(density), seed), dtype, device, seed, values)


def rosa_mask(m, n, density, *, seed=0, tokens=512, dtype=torch.float32, device="cpu", values="random") -> CSR:
    """A mask of the synthetic RoSA recipe (outlier input channels; see the module docstring)."""
    return _with_values(_rosa_bool(m, n, float(density), seed, tokens), dtype, device, seed, values)


def random_csr(m, n, density, *, seed=0, dtype=torch.float32, device="cpu", empty_row_fraction=0.0) -> CSR:
    """A uniform random CSR whose rows are emptied with probability ``empty_row_fraction``."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(m, n, generator=gen) < density
    if empty_row_fraction > 0 and m:
        mask &= (torch.rand(m, 1, generator=gen) >= empty_row_fraction)
    return _with_values(mask, dtype, device, seed, "random")


def find_real_masks() -> Path | None:
    """The path of ``minilm_rosa_masks.npz``: ``$ROSA_KERNELS_MASKS``, else ``shared/data/masks``
    or ``../shared/data/masks`` above the working directory or this package; ``None`` if absent."""
    env = os.environ.get("ROSA_KERNELS_MASKS")
    if env:
        return Path(env) if Path(env).is_file() else None
    relative = Path("data/masks/minilm_rosa_masks.npz")
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for folder in (start, *start.parents):
            for candidate in (folder / "shared" / relative, folder.parent / "shared" / relative):
                if candidate.is_file():
                    return candidate
    return None


def real_masks(path=None, *, dtype=torch.float32, device="cpu", seed=0) -> dict[str, CSR]:
    """The real RoSA masks by name (``encoder.layer.0.attention.self.query@0.003``, ...)."""
    import numpy as np

    path = Path(path) if path is not None else find_real_masks()
    if path is None or not path.is_file():
        raise FileNotFoundError("minilm_rosa_masks.npz not found; set ROSA_KERNELS_MASKS to its path")
    data = np.load(path)
    names = sorted({key.rsplit("/", 1)[0] for key in data.files})
    masks = {}
    for i, name in enumerate(names):
        m, n = (int(s) for s in data[f"{name}/shape"])
        row_offsets = torch.from_numpy(data[f"{name}/row_offsets"].astype(np.int32))
        col_indices = torch.from_numpy(data[f"{name}/col_indices"].astype(np.int32))
        counts = (row_offsets[1:] - row_offsets[:-1]).long()
        rows = torch.repeat_interleave(torch.arange(m), counts)
        mask = torch.zeros(m, n, dtype=torch.bool)
        mask[rows, col_indices.long()] = True
        masks[name] = _with_values(mask, dtype, device, seed + i, "random")
    return masks
