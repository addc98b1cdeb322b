"""torch.compile traces the public ops (validate=False) into one graph, forward and backward."""

import pytest
import torch

import rosa_kernels
from reference import randn, random_csr


def rosa_step(values, row_offsets, row_indices, col_indices, x, weight, grad_out):
    """One sparse adapter's worth of work: Y = X (W + S)^T, S^T @ ..., dS = SDDMM(mask, dY^T, X^T)."""
    m, n = weight.shape
    merged = rosa_kernels.csr_add(values, row_offsets, row_indices, col_indices, weight, validate=False)
    y = x @ merged.t()
    values_t, offsets_t, cols_t = rosa_kernels.csr_transpose(values, row_offsets, col_indices, m, n, validate=False)
    sparse_part = rosa_kernels.spmm(values, row_offsets, row_indices, col_indices, x.t(), m, validate=False)
    grad_values = rosa_kernels.sddmm(row_offsets, row_indices, col_indices, grad_out.t(), x.t(), validate=False)
    return y, values_t, offsets_t, cols_t, sparse_part, grad_values


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend, gen):
    torch._dynamo.reset()
    m, n, tokens = 12, 10, 7
    A = random_csr(m, n, 0.3, gen=gen)
    x = randn(tokens, n, gen=gen)
    weight = randn(m, n, gen=gen)
    grad_out = randn(tokens, m, gen=gen)
    args = (A.values, A.row_offsets, A.row_indices, A.col_indices, x, weight, grad_out)
    compiled = torch.compile(rosa_step, fullgraph=True, backend=backend)
    for got, want in zip(compiled(*args), rosa_step(*args)):
        torch.testing.assert_close(got, want)


def test_compile_fullgraph_backward(gen):
    torch._dynamo.reset()
    A = random_csr(9, 8, 0.4, gen=gen)
    x = randn(5, 8, gen=gen)

    def loss(values, x):
        y = rosa_kernels.spmm(values, A.row_offsets, A.row_indices, A.col_indices, x.t(), 9, validate=False)
        s = rosa_kernels.sddmm(A.row_offsets, A.row_indices, A.col_indices, y, x.t(), validate=False)
        return s.square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    grads = []
    for f in (compiled, loss):
        values = A.values.clone().requires_grad_()
        xx = x.clone().requires_grad_()
        f(values, xx).backward()
        grads.append((values.grad, xx.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)
