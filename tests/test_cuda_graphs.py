"""A whole RoSA training step under CUDA graphs: captured by hand with ``torch.cuda.graph`` (forward,
backward, optimizer step and the merged layers' re-scatter) and by
``torch.compile(mode="reduce-overhead")``, each against the same steps run eagerly. GPU only."""

import copy

import pytest
import torch
from torch import nn

import rosa_kernels as rk

from conftest import CUDA

pytestmark = pytest.mark.skipif(not CUDA, reason="needs the CUDA kernels and a GPU")


def rosa_model(dropout, sparse_mode="merged", seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        rk.RosaLinear(64, 96, rank=4, density=0.05, dropout=dropout, sparse_mode=sparse_mode),
        nn.ReLU(),
        rk.RosaLinear(96, 32, rank=4, density=0.05, dropout=dropout, sparse_mode=sparse_mode),
    ).cuda()
    gen = torch.Generator().manual_seed(seed + 1)
    for layer in model[::2]:
        flat = torch.zeros(layer.out_features * layer.in_features, dtype=torch.bool)
        flat[torch.randperm(flat.numel(), generator=gen)[: layer.nnz]] = True
        layer.set_mask(flat.view(layer.out_features, layer.in_features).cuda())
        with torch.no_grad():
            layer.sparse_values.normal_(0, 0.05)
            layer.lora_B.normal_(0, 0.05)
        layer.refresh_merged_weight()
    return model


def batches(steps, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 5, 64, generator=gen).cuda(), torch.randn(8, 5, 32, generator=gen).cuda())
            for _ in range(steps)]


def optimizer_for(model, lr=1e-2):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, capturable=True)


def step(model, optimizer, x, target):
    loss = (model(x) - target).square().mean()
    loss.backward()
    optimizer.step()
    return loss


def eager_losses(model, optimizer, data):
    losses = []
    for x, target in data:
        optimizer.zero_grad(set_to_none=True)
        losses.append(step(model, optimizer, x, target).detach())
    return torch.stack(losses)


def captured_losses(model, optimizer, data, warmup):
    """``warmup`` eager steps on a side stream (as torch.cuda.graph requires), one captured step,
    then the rest of ``data`` by replaying it with the batch copied into the static inputs."""
    static_x, static_target = data[0][0].clone(), data[0][1].clone()
    losses = []
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, target in data[:warmup]:
            optimizer.zero_grad(set_to_none=True)
            losses.append(step(model, optimizer, x, target).detach())
    torch.cuda.current_stream().wait_stream(side)
    optimizer.zero_grad(set_to_none=True)  # the captured backward allocates the grads from the graph's pool
    graph = torch.cuda.CUDAGraph()
    static_x.copy_(data[warmup][0])
    static_target.copy_(data[warmup][1])
    with torch.cuda.graph(graph):
        static_loss = step(model, optimizer, static_x, static_target)
    graph.replay()
    losses.append(static_loss.detach().clone())
    for x, target in data[warmup + 1:]:
        static_x.copy_(x)
        static_target.copy_(target)
        graph.replay()
        losses.append(static_loss.detach().clone())
    return torch.stack(losses), graph, static_loss


@pytest.mark.parametrize("sparse_mode", ["merged", "spmm"])
def test_a_captured_training_step_matches_eager(sparse_mode):
    data = batches(8)
    eager_model = rosa_model(0.0, sparse_mode)
    graph_model = copy.deepcopy(eager_model)
    initial = eager_model[0].sparse_values.detach().clone()
    want = eager_losses(eager_model, optimizer_for(eager_model), data)
    got, _, _ = captured_losses(graph_model, optimizer_for(graph_model), data, warmup=3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(graph_model[0].sparse_values, initial)  # the replays trained S
    for a, b in zip(graph_model[::2], eager_model[::2]):
        torch.testing.assert_close(a.sparse_values, b.sparse_values, rtol=1e-4, atol=1e-6)
        # the replays re-scattered W_eff[mask] = W + S after each captured optimizer step
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-4, atol=1e-6)


def test_each_replay_draws_a_new_dropout_mask():
    model = rosa_model(0.5)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0, capturable=True)
    data = batches(4)
    x, target = data[0]
    losses, graph, static_loss = captured_losses(model, optimizer, [(x, target)] * 4, warmup=2)
    # lr = 0 and one batch: only the dropout mask changes between replays
    assert len(set(losses[2:].tolist())) == 2


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_reduce_overhead_compile_matches_eager(dropout):
    torch._dynamo.reset()
    data = batches(6)
    eager_model = rosa_model(dropout)
    compiled_model = copy.deepcopy(eager_model)
    compiled = torch.compile(compiled_model, mode="reduce-overhead")
    eager_optimizer, compiled_optimizer = optimizer_for(eager_model), optimizer_for(compiled_model)
    want, got = [], []
    for x, target in data:
        for model, optimizer, out in ((eager_model, eager_optimizer, want), (compiled, compiled_optimizer, got)):
            optimizer.zero_grad(set_to_none=True)
            out.append(step(model, optimizer, x, target).detach().clone())
    want, got = torch.stack(want), torch.stack(got)
    if dropout == 0.0:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    else:  # other dropout masks: the same trend, not the same numbers
        assert torch.isfinite(got).all() and got[-1] < got[0] * 1.5
