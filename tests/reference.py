"""Random inputs and float64 references for the op tests (imported by the test modules)."""

import numpy as np
import scipy.sparse as sp
import torch

from rosa_kernels import CSR, csr_from_mask

# Allowed |result - reference| as a fraction of the magnitude bound of each entry (sum of the
# |terms| it adds up): output rounding (unit roundoff 2^-53, 2^-24, 2^-11, 2^-8) plus float32
# accumulation over up to a few hundred terms, with some margin.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = list(TOLERANCE)
DTYPE_IDS = ["f64", "f32", "f16", "bf16"]


def randn(*shape, gen, dtype=torch.float32, device="cpu"):
    """Gaussian entries kept away from zero, so a dropped term can never hide."""
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    x = x + 0.25 * torch.sign(x)
    return x.to(dtype).to(device)


def random_csr(m, n, density, *, gen, dtype=torch.float32, device="cpu", empty_row_fraction=0.3) -> CSR:
    """A random CSR with about ``density * m * n`` nonzeros, some rows emptied on purpose."""
    mask = torch.rand(m, n, generator=gen) < density
    if empty_row_fraction and m:
        mask &= torch.rand(m, 1, generator=gen) >= empty_row_fraction
    structure = csr_from_mask(mask)
    values = randn(structure.nnz, gen=gen, dtype=dtype)
    return CSR(values, structure.row_offsets, structure.row_indices, structure.col_indices, (m, n)).to(device)


def f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float64).numpy()


def scipy64(csr: CSR, values=None) -> sp.csr_matrix:
    values = csr.values if values is None else values
    return sp.csr_matrix(
        (f64(values), csr.col_indices.cpu().numpy(), csr.row_offsets.cpu().numpy()), shape=csr.shape
    )


def assert_close(actual: torch.Tensor, expected: np.ndarray, bound: np.ndarray, dtype: torch.dtype):
    """Checks dtype, shape and |actual - expected| <= TOLERANCE[dtype] * bound elementwise."""
    assert actual.dtype == dtype
    assert tuple(actual.shape) == tuple(expected.shape)
    error = np.abs(f64(actual) - expected)
    limit = TOLERANCE[dtype] * np.abs(bound)
    bad = error > limit
    assert not bad.any(), (
        f"{int(bad.sum())} of {bad.size} entries off; worst error {error.max():.3g} "
        f"(limit there {limit.reshape(-1)[np.argmax(error)]:.3g})"
    )


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same 1-D values as a non-contiguous view (every other element of a larger tensor)."""
    wide = torch.empty(2 * t.shape[0], dtype=t.dtype, device=t.device)
    wide[::2] = t
    view = wide[::2]
    assert t.shape[0] <= 1 or not view.is_contiguous()
    return view
