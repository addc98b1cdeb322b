"""Mask selection (top-k of a gradient statistic as row-sorted CSR) and mask files."""

import pytest
import torch

from rosa_kernels import load_masks, row_order, save_masks, select_mask, validate_csr
from rosa_kernels.masks import accumulate_statistic, load_safetensors, mask_count, reduce_statistic, save_safetensors


@pytest.mark.parametrize("m,n,density", [(1, 1, 1.0), (7, 5, 0.3), (33, 17, 0.05), (1, 40, 0.2), (40, 1, 0.2),
                                         (16, 16, 1.0), (9, 6, 0.001)])
def test_select_mask_is_the_independent_top_k(m, n, density):
    gen = torch.Generator().manual_seed(m * 100 + n)
    statistic = torch.randn(m, n, generator=gen)
    nnz = mask_count(m, n, density)
    mask = select_mask(statistic, nnz)
    assert mask.nnz == nnz and mask.shape == (m, n)
    assert mask.row_offsets.dtype == mask.col_indices.dtype == mask.row_indices.dtype == torch.int32
    validate_csr(mask.row_offsets, mask.col_indices, m, n, nnz, mask.row_indices)
    assert torch.equal(mask.row_indices, row_order(mask.row_offsets))
    assert torch.equal(mask.values, torch.zeros(nnz))
    expected = torch.zeros(m * n, dtype=torch.bool)
    expected[torch.topk(statistic.abs().flatten(), nnz).indices] = True
    selected = torch.zeros(m, n, dtype=torch.bool)
    rows = torch.repeat_interleave(torch.arange(m), (mask.row_offsets[1:] - mask.row_offsets[:-1]).long())
    selected[rows, mask.col_indices.long()] = True
    assert torch.equal(selected.flatten(), expected)


def test_select_mask_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        select_mask(torch.zeros(3), 1)
    with pytest.raises(ValueError, match="nnz"):
        select_mask(torch.zeros(2, 2), 5)


@pytest.mark.parametrize("rule", ["fisher", "mean"])
def test_accumulate_statistic(rule):
    statistic = torch.zeros(4, 6)
    expected = torch.zeros(4, 6, dtype=torch.float64)
    for _ in range(3):
        dy, x = torch.randn(5, 4, dtype=torch.bfloat16), torch.randn(5, 6, dtype=torch.bfloat16)
        accumulate_statistic(statistic, dy, x, rule)
        g = dy.double().t() @ x.double()
        expected += g * g if rule == "fisher" else g
    torch.testing.assert_close(reduce_statistic(statistic, 3).double(), expected / 3, rtol=1e-5, atol=1e-5)


def test_mask_files_round_trip(tmp_path):
    masks = {"layer.0": select_mask(torch.randn(8, 5), 7), "empty": select_mask(torch.randn(3, 3), 0)}
    save_masks(tmp_path / "masks.safetensors", masks)
    loaded = load_masks(tmp_path / "masks.safetensors")
    assert set(loaded) == set(masks)
    for name, mask in masks.items():
        got = loaded[name]
        assert got.shape == mask.shape
        for field in ("row_offsets", "row_indices", "col_indices"):
            assert torch.equal(getattr(got, field), getattr(mask, field))
    with pytest.raises(TypeError):
        save_masks(tmp_path / "bad.safetensors", {"x": torch.zeros(2, 2)})
    save_safetensors({"a": torch.ones(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="masks"):
        load_masks(tmp_path / "other.safetensors")


def test_safetensors_files_round_trip_every_dtype(tmp_path):
    tensors = {"f32": torch.randn(3, 4), "bf16": torch.randn(5).bfloat16(), "f16": torch.randn(2, 2).half(),
               "i32": torch.arange(7, dtype=torch.int32), "empty": torch.zeros(0, dtype=torch.int32),
               "f64": torch.randn(1, dtype=torch.float64), "flag": torch.tensor(True),
               "strided": torch.randn(4, 6)[:, ::2]}
    save_safetensors(tensors, tmp_path / "a.safetensors", {"k": "v"})
    back, metadata = load_safetensors(tmp_path / "a.safetensors")
    assert metadata == {"k": "v"}
    assert list(tmp_path.iterdir()) == [tmp_path / "a.safetensors"]  # no temporary file left
    for name, t in tensors.items():
        assert torch.equal(back[name], t)
    with pytest.raises(TypeError, match="dense"):
        save_safetensors({"s": torch.eye(3).to_sparse()}, tmp_path / "b.safetensors")


# ----------------------------------------------------------------------------------------------
# GradientCollector: where the collection keeps its statistic (collect_buffer)
# ----------------------------------------------------------------------------------------------

BUFFERS = ["auto", "one_pass", "float16", "bfloat16", "float32"]


def selected(indices, numel):
    chosen = torch.zeros(numel, dtype=torch.bool)
    chosen[indices] = True
    return chosen


def collector_mask(collector) -> torch.Tensor:
    """The bool mask a layer would select from ``collector`` (the exact indices when it has them)."""
    indices = collector.exact_indices()
    if indices is None:
        indices = torch.topk(collector.mean_statistic().abs().flatten(), collector.nnz).indices
    return selected(indices, collector.shape[0] * collector.shape[1])


def exact_mask(statistic, nnz):
    return selected(torch.topk(statistic.abs().flatten(), nnz).indices, statistic.numel())


def outlier_gradients(out, inp, tokens, micro_batches, seed):
    """DESIGN.md's `rosa` recipe: per-channel scales exp(1.0 N(0,1)) for dY, exp(2.5 N(0,1)) for X
    (LLM inputs have a few huge outlier channels), bfloat16 activations."""
    gen = torch.Generator().manual_seed(seed)
    dy_scale, x_scale = torch.exp(torch.randn(out, generator=gen)), torch.exp(2.5 * torch.randn(inp, generator=gen))
    return [((torch.randn(tokens, out, generator=gen) * dy_scale).bfloat16(),
             (torch.randn(tokens, inp, generator=gen) * x_scale).bfloat16()) for _ in range(micro_batches)]


def test_nothing_is_allocated_before_the_first_backward():
    from rosa_kernels.masks import GradientCollector

    for buffer in BUFFERS:
        collector = GradientCollector((64, 32), "cpu", "fisher", buffer, nnz=10)
        collector.end_step()  # a step without a collecting backward
        assert collector.memory_bytes() == 0, buffer


@pytest.mark.parametrize("buffer", ["auto", "one_pass"])
def test_one_pass_is_the_exact_float32_top_k(buffer):
    """One backward pass: the exact top-k of dW, although the entries to keep exceed the ones to drop
    by 2^-20 relative, which no 16-bit accumulator resolves (the float16 one, checked, does not)."""
    from rosa_kernels.masks import GradientCollector

    m, n, nnz = 12, 10, 6
    gen = torch.Generator().manual_seed(0)
    gradient = torch.rand(m, n, generator=gen) * 0.5  # well below the threshold
    positions = torch.randperm(m * n, generator=gen)
    gradient.view(-1)[positions[:nnz]] = 1.0 + 2.0 ** -20
    gradient.view(-1)[positions[nnz:3 * nnz]] = -1.0
    expected = selected(positions[:nnz], m * n)
    # dW = dY^T X with X = I: dY = dW^T.
    dy, x = gradient.t().contiguous(), torch.eye(n)
    for rule in ("fisher", "mean"):
        collector = GradientCollector((m, n), "cpu", rule, buffer, nnz)
        collector.add(dy, x)
        collector.end_step()
        assert torch.equal(collector_mask(collector), expected), rule
        rounded = GradientCollector((m, n), "cpu", rule, "float16", nnz)
        rounded.add(dy, x)
        rounded.end_step()
        assert not torch.equal(collector_mask(rounded), expected)
    if buffer == "one_pass":
        assert collector.memory_bytes() == nnz * 8  # the indices only
        with pytest.raises(RuntimeError, match="one_pass"):
            collector.add(dy, x)


@pytest.mark.parametrize("buffer", BUFFERS[:1] + BUFFERS[2:])
@pytest.mark.parametrize("rule", ["fisher", "mean"])
def test_micro_batches_are_summed_before_the_square(buffer, rule):
    """dW1 = G, dW2 = H - G: the step's gradient is H, whose top-k differs from that of G^2 + (H - G)^2."""
    from rosa_kernels.masks import GradientCollector

    m, n, nnz = 16, 12, 10
    gen = torch.Generator().manual_seed(1)
    G = torch.randn(m, n, generator=gen) * 8
    H = torch.rand(m, n, generator=gen) - 0.5  # its top-k stands out far beyond any rounding
    H.view(-1)[torch.randperm(m * n, generator=gen)[:nnz]] = 3.0
    collector = GradientCollector((m, n), "cpu", rule, buffer, nnz)
    for dW in (G, H - G):
        collector.add(dW.t().contiguous(), torch.eye(n))
    collector.end_step()
    assert collector.exact_indices() is None  # two backward passes: the accumulator decides
    assert torch.equal(collector_mask(collector), exact_mask(H, nnz))
    squares_first = exact_mask(G * G + (H - G) ** 2, nnz)
    assert not torch.equal(collector_mask(collector), squares_first)


@pytest.mark.parametrize("buffer,minimum", [("auto", 0.995), ("float16", 0.995), ("bfloat16", 0.99)])
@pytest.mark.parametrize("micro_batches,steps", [(1, 1), (8, 1), (2, 3)])
def test_16_bit_buffers_keep_99_percent_of_the_float32_mask(buffer, minimum, micro_batches, steps):
    from rosa_kernels.masks import GradientCollector

    m, n = 192, 320
    nnz = mask_count(m, n, 0.01)
    gradients = outlier_gradients(m, n, 64, micro_batches * steps, seed=micro_batches * 10 + steps)
    collectors = {b: GradientCollector((m, n), "cpu", "fisher", b, nnz) for b in ("float32", buffer)}
    reference = torch.zeros(m, n, dtype=torch.float64)
    for step in range(steps):
        step_gradient = torch.zeros(m, n, dtype=torch.float64)
        for dy, x in gradients[step * micro_batches:(step + 1) * micro_batches]:
            for c in collectors.values():
                c.add(dy, x)
            step_gradient += dy.double().t() @ x.double()
        reference += step_gradient ** 2
        for c in collectors.values():
            c.end_step()
    float32 = collector_mask(collectors["float32"])
    assert torch.equal(float32, exact_mask(reference, nnz))
    overlap = float((collector_mask(collectors[buffer]) & float32).sum()) / nnz
    assert overlap >= minimum, overlap
    if buffer == "auto" and micro_batches * steps == 1:
        assert overlap == 1.0


@pytest.mark.parametrize("buffer", ["float16", "bfloat16", "float32"])
def test_statistic_over_steps_with_one_buffer_per_step_and_rule(buffer):
    """A collection of one step keeps one buffer (the step's gradient, squared at selection); more
    steps add the statistic's buffer. The mean statistic matches float64 to the buffer's rounding."""
    from rosa_kernels.masks import GradientCollector

    m, n = 24, 40
    size = {"float16": 2, "bfloat16": 2, "float32": 4}[buffer]
    scale_bytes = 4 * m if buffer == "float16" else 0
    tolerance = {"float16": 2e-3, "bfloat16": 2e-2, "float32": 1e-5}[buffer]
    for rule in ("fisher", "mean"):
        collector = GradientCollector((m, n), "cpu", rule, buffer, nnz=5)
        expected = torch.zeros(m, n, dtype=torch.float64)
        for step in range(3):
            step_gradient = torch.zeros(m, n, dtype=torch.float64)
            for dy, x in outlier_gradients(m, n, 16, 2, seed=step):
                collector.add(dy, x)
                step_gradient += dy.double().t() @ x.double()
            collector.end_step()
            expected += step_gradient ** 2 if rule == "fisher" else step_gradient
            buffers = 1 if step == 0 else 2
            assert collector.memory_bytes() == buffers * (m * n * size + scale_bytes), (rule, step)
        scale = float(expected.abs().max())
        torch.testing.assert_close(collector.mean_statistic().double(), expected / 3, rtol=tolerance,
                                   atol=tolerance * scale)


@pytest.mark.parametrize("buffer", BUFFERS)
def test_collector_state_round_trips_mid_collection(buffer):
    """A collector rebuilt from its state_dict after one step goes on to the same statistic and mask."""
    from rosa_kernels.masks import GradientCollector

    m, n, nnz = 20, 36, 12
    gradients = outlier_gradients(m, n, 8, 3, seed=5)
    collector = GradientCollector((m, n), "cpu", "fisher", buffer, nnz)
    collector.add(*gradients[0])
    collector.end_step()
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in collector.state_dict().items()}
    resumed = GradientCollector.from_state_dict(state, (m, n), "cpu", nnz)
    assert resumed.memory_bytes() == collector.memory_bytes()
    if buffer == "one_pass":
        assert torch.equal(collector_mask(resumed), collector_mask(collector))
        return
    for c in (collector, resumed):
        for dy, x in gradients[1:]:
            c.add(dy, x)
        c.end_step()
    assert torch.equal(resumed.mean_statistic(), collector.mean_statistic())
    with pytest.raises(ValueError, match="pending"):
        GradientCollector.from_state_dict({**state, "pending": torch.zeros(m, n, dtype=torch.float64)}, (m, n),
                                          "cpu", nnz)


def test_float16_scales_are_powers_of_two_and_rows_fill_the_range():
    from rosa_kernels.masks import GradientCollector

    m, n = 6, 50
    rows = torch.tensor([1e-30, 1e-3, 1.0, 3.0e4, 1e30, 0.0])[:, None]
    dW = torch.randn(m, n, generator=torch.Generator().manual_seed(0)) * rows
    collector = GradientCollector((m, n), "cpu", "fisher", "float16", nnz=5)
    collector.add(dW.t().contiguous(), torch.eye(n))
    scale = collector.pending_scale.flatten()
    mantissa, _ = torch.frexp(scale)
    assert torch.equal(mantissa, torch.full_like(mantissa, 0.5))  # powers of two
    largest = collector.pending.float().abs().amax(dim=1)
    assert bool(((largest[:5] >= 2 ** 14) & (largest[:5] < 2 ** 15 + 1)).all()) and largest[5] == 0
    assert torch.isfinite(collector.pending).all()
    torch.testing.assert_close(collector.pending.float() * collector.pending_scale, dW, rtol=2 ** -11, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("buffer", ["auto", "float16", "one_pass"])
def test_cuda_collection_and_selection_never_synchronize_and_match_the_cpu(buffer):
    """On the GPU (bf16 activations: dW by the tensor-core GEMM with float32 output): collecting and
    selecting make no host synchronization, and the masks agree with the CPU's float32 path."""
    from rosa_kernels import RosaLinear
    from rosa_kernels.masks import GradientCollector, mask_from_indices

    m, n = 384, 512
    nnz = mask_count(m, n, 0.01)
    micro_batches = 1 if buffer == "one_pass" else 3
    gradients = outlier_gradients(m, n, 128, micro_batches, seed=7)
    reference = GradientCollector((m, n), "cpu", "fisher", "float32", nnz)
    collector = GradientCollector((m, n), "cuda", "fisher", buffer, nnz)
    cuda_gradients = [(dy.cuda(), x.cuda()) for dy, x in gradients]
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for dy, x in cuda_gradients:
            collector.add(dy, x)
        collector.end_step()
        indices = collector.exact_indices()
        if indices is None:
            mask = select_mask(collector.mean_statistic(), nnz)
        else:
            mask = mask_from_indices(indices, m, n)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    for dy, x in gradients:
        reference.add(dy, x)
    reference.end_step()
    expected = select_mask(reference.mean_statistic(), nnz)

    def dense(csr):
        rows = torch.repeat_interleave(torch.arange(m), (csr.row_offsets[1:] - csr.row_offsets[:-1]).long().cpu())
        out = torch.zeros(m * n, dtype=torch.bool)
        out[rows * n + csr.col_indices.long().cpu()] = True
        return out

    overlap = float((dense(mask) & dense(expected)).sum()) / nnz
    # one_pass: the same float32 top-k up to the GEMMs' summation order; else the float16 accumulator.
    assert overlap >= (0.999 if buffer == "one_pass" else 0.995), overlap
    layer = RosaLinear(n, m, rank=2, density=0.01, dropout=0.0, device="cuda", dtype=torch.bfloat16)
    layer.start_collection(collect_buffer=buffer)
    layer(gradients[0][1].cuda()).float().square().sum().backward()
    assert layer.select_mask().nnz == nnz and layer.phase == "sparse"
