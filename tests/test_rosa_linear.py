"""RosaLinear against a float64 dense reference of the same math: W + S + scale * B A."""

import copy
import math

import pytest
import torch
from torch import nn

import rosa_kernels
from rosa_kernels import CSR, RosaLinear
from rosa_kernels.dropout import draw_seed, keep_mask
from rosa_kernels.linear import _RosaFunction

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not rosa_kernels.cuda_available(), reason="needs CUDA"))]
MODES = ["merged", "csr_add", "spmm"]
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def random_mask(out_features, in_features, nnz, seed):
    gen = torch.Generator().manual_seed(seed)
    flat = torch.zeros(out_features * in_features, dtype=torch.bool)
    flat[torch.randperm(out_features * in_features, generator=gen)[:nnz]] = True
    return flat.view(out_features, in_features)


def make_layer(in_features, out_features, *, mode="merged", dtype=torch.float32, device="cpu", density=0.3,
               rank=3, dropout=0.0, seed=0, bias=True, with_mask=True):
    torch.manual_seed(seed)
    layer = RosaLinear(in_features, out_features, bias, rank=rank, density=density, alpha=8.0, dropout=dropout,
                       sparse_mode=mode)
    with torch.no_grad():
        layer.lora_B.normal_()  # B starts at zero; make the LoRA path visible to the test
    if with_mask:
        layer.set_mask(random_mask(out_features, in_features, layer.nnz, seed + 1))
        with torch.no_grad():
            layer.sparse_values.normal_()
    return layer.to(device=device, dtype=dtype)


def reference(layer, x, dy, keep=None):
    """Float64 dense autograd of Y = X W^T + b + X S^T + scale * (drop(X) A^T) B^T."""
    f64 = dict(dtype=torch.float64)
    W = layer.base_weight().to(**f64)
    S = layer.sparse_delta().to(**f64).requires_grad_()
    A = layer.lora_A.detach().to(**f64).requires_grad_()
    B = layer.lora_B.detach().to(**f64).requires_grad_()
    x64 = x.detach().to(**f64).requires_grad_()
    xd = x64 if keep is None else x64 * keep.to(**f64) / (1 - layer.dropout)
    y = x64 @ (W + S).t() + layer.scale * (xd @ A.t()) @ B.t()
    if layer.bias is not None:
        y = y + layer.bias.to(**f64)
    y.backward(dy.to(**f64))
    mask = layer.sparse_delta() != 0 if layer.phase == "sparse" else None
    rows, cols = layer.flat_indices // layer.in_features, layer.flat_indices % layer.in_features
    dS = S.grad[rows, cols] if mask is not None else None
    return y.detach(), x64.grad, A.grad, B.grad, dS


def assert_close(actual, expected, dtype, name):
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    err = (actual.double().cpu() - expected.cpu()).abs().max().item() if expected.numel() else 0.0
    assert err <= TOL[dtype] * scale * 10, f"{name}: max error {err} (scale {scale})"


SHAPES = [(1, 1, 1), (7, 5, 3), (33, 17, 9), (16, 1, 4), (1, 12, 5), (9, 6, 0)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("in_features,out_features,tokens", SHAPES)
def test_forward_backward_match_float64_reference(device, mode, dtype, in_features, out_features, tokens):
    layer = make_layer(in_features, out_features, mode=mode, dtype=dtype, device=device,
                       seed=in_features * 31 + out_features)
    x = torch.randn(2, tokens, in_features, dtype=dtype, device=device, requires_grad=True)
    dy = torch.randn(2, tokens, out_features, dtype=dtype, device=device)
    y = layer(x)
    y.backward(dy)
    y_ref, dx_ref, dA_ref, dB_ref, dS_ref = reference(layer, x, dy)
    assert y.dtype == dtype and y.shape == (2, tokens, out_features)
    assert_close(y, y_ref, dtype, "y")
    assert_close(x.grad, dx_ref, dtype, "dx")
    assert_close(layer.lora_A.grad, dA_ref, dtype, "dA")
    assert_close(layer.lora_B.grad, dB_ref, dtype, "dB")
    assert_close(layer.sparse_values.grad, dS_ref, dtype, "dS")
    assert layer.weight.grad is None and layer.bias.grad is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sparse_grad", ["sddmm", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_grad_paths_match_float64_reference(device, sparse_grad, dtype):
    layer = make_layer(40, 24, dtype=dtype, device=device, seed=5)
    layer.sparse_grad = sparse_grad
    x = torch.randn(3, 11, 40, dtype=dtype, device=device, requires_grad=True)
    dy = torch.randn(3, 11, 24, dtype=dtype, device=device)
    layer(x).backward(dy)
    *_, dS_ref = reference(layer, x, dy)
    assert_close(layer.sparse_values.grad, dS_ref, dtype, f"dS ({sparse_grad})")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hot_fill", [0.0, 0.05, 1.0])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_planned_sparse_grad_matches_float64_reference(device, hot_fill, dropout):
    """sparse_grad="auto" through a plan with hot columns (forced here: on a CPU the automatic plan
    keeps every nonzero in the SDDMM), in every sparse mode's backward."""
    from rosa_kernels import MaskPlan

    layer = make_layer(40, 24, dtype=torch.float64, device=device, seed=6, dropout=dropout)
    layer._use_plan(MaskPlan(layer.row_offsets, layer.col_indices, 24, 40, hot_fill=hot_fill).sddmm_parts())
    assert layer._plan_parts(torch.empty(1, device=device), "merged")[5] > 0 or hot_fill == 1.0
    x = torch.randn(3, 11, 40, dtype=torch.float64, device=device, requires_grad=True)
    dy = torch.randn(3, 11, 24, dtype=torch.float64, device=device)
    torch.manual_seed(9)
    keep = keep_mask(draw_seed(), 33, 40, dropout).view(3, 11, 40).to(device) if dropout else None
    torch.manual_seed(9)
    layer(x).backward(dy)
    *_, dS_ref = reference(layer, x, dy, keep)
    assert_close(layer.sparse_values.grad, dS_ref, torch.float64, f"dS (plan, hot_fill {hot_fill})")


def test_auto_sparse_grad_builds_the_plan_with_the_mask_and_follows_the_layer():
    layer = make_layer(40, 24, seed=7)
    assert layer._grad_plan_key == (layer.weight.device, layer.weight.dtype)
    # On a CPU the plan keeps everything in the SDDMM: the backward takes the raw op.
    assert layer._grad_plan is None and layer._plan_parts(torch.empty(1), "merged")[5] == 0
    layer.to(torch.float64)
    assert layer._grad_plan_key == (layer.weight.device, torch.float64)
    fresh = RosaLinear(40, 24, rank=3, density=0.3)
    assert fresh._grad_plan_key is None and fresh._plan_parts(torch.empty(1), "nomask")[5] == 0
    fresh.load_state_dict(layer.to(torch.float32).state_dict())
    assert fresh._grad_plan_key == (fresh.weight.device, torch.float32)
    if torch.cuda.is_available() and rosa_kernels.cuda_available():
        fresh.cuda()  # rebuilt on the GPU, where RoSA-like masks get hot columns
        assert fresh._grad_plan_key[0].type == "cuda"


@pytest.mark.parametrize("mode", MODES)
def test_dropout_matches_reference_with_the_same_keep_mask(mode):
    layer = make_layer(10, 7, mode=mode, dtype=torch.float64, dropout=0.3)
    x = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(6, 7, dtype=torch.float64)
    torch.manual_seed(123)
    keep = keep_mask(draw_seed(), 6, 10, 0.3)  # the layer's first random draw is its dropout seed
    torch.manual_seed(123)
    layer(x).backward(dy)
    y_ref, dx_ref, dA_ref, dB_ref, dS_ref = reference(layer, x, dy, keep)
    assert_close(x.grad, dx_ref, torch.float64, "dx")
    assert_close(layer.lora_A.grad, dA_ref, torch.float64, "dA")
    assert_close(layer.lora_B.grad, dB_ref, torch.float64, "dB")
    assert_close(layer.sparse_values.grad, dS_ref, torch.float64, "dS")
    layer.eval()  # no dropout in eval: deterministic
    assert torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("mode", ["csr_add", "spmm"])
@pytest.mark.parametrize("grad_path", ["sddmm", "dense", "plan"])
def test_gradcheck_float64(mode, grad_path):
    from rosa_kernels import MaskPlan
    from rosa_kernels.linear import _NO_PLAN

    layer = make_layer(6, 5, mode=mode, dtype=torch.float64, density=0.4)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    plan_parts = (MaskPlan(layer.row_offsets, layer.col_indices, 5, 6, hot_fill=0.3).sddmm_parts()
                  if grad_path == "plan" else _NO_PLAN)

    def f(x, A, B, values):
        return _RosaFunction.apply(x, layer.weight, layer.bias, A, B, values, layer.row_offsets, layer.row_indices,
                                   layer.col_indices, layer.row_offsets_t, layer.row_indices_t, layer.col_indices_t,
                                   layer.permutation, layer.flat_indices, *plan_parts, None, layer.scale, 0.0, mode,
                                   grad_path == "dense")

    params = [p.detach().clone().requires_grad_() for p in (layer.lora_A, layer.lora_B, layer.sparse_values)]
    assert torch.autograd.gradcheck(f, (x, *params))


@pytest.mark.parametrize("mode,dropout,most", [("merged", 0.1, 11), ("merged", 0.0, 9), ("csr_add", 0.1, 13),
                                               ("spmm", 0.1, 16)])
def test_a_training_step_dispatches_few_ops_and_no_casts_or_copies(mode, dropout, most):
    """A GPU step is launch-bound at moderate sizes: every op counts (docs/benchmarks.md, host overhead).
    With dropout one of them is the seed draw on the CPU (randint), which launches nothing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and func.overloadpacket.__name__ not in ("detach", "lift_fresh"):
                self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    layer = make_layer(16, 12, mode=mode, dropout=dropout, bias=False)
    x, dy = torch.randn(5, 16, requires_grad=True), torch.randn(5, 12)
    counter = Count()
    with counter:
        layer(x).backward(dy)
    assert len(counter.ops) <= most, counter.ops
    if dropout:  # the dropout rides on the rank-sized products: no separate pass before h or after (dY B) A
        assert counter.ops.count("lora_dropout_apply") <= 1 and "lora_dropout_add_" not in counter.ops, counter.ops
    assert not {"_to_copy", "copy_", "clone", "contiguous"} & set(counter.ops), counter.ops


@pytest.mark.parametrize("phase", ["warmup", "sparse"])
@pytest.mark.parametrize("dropout", [0.1, 0.0])
def test_a_merged_or_warmup_forward_is_one_op_call_from_python(phase, dropout):
    """The host cost of a layer step is mostly per call from Python: in the common case forward
    issues the layer op (which draws the dropout seed itself), backward runs in C++."""
    from torch.overrides import TorchFunctionMode

    class Calls(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") != "__get__":  # attribute reads (tensor._version)
                self.calls.append(func)
            return func(*args, **(kwargs or {}))

    layer = make_layer(16, 12, dropout=dropout, bias=True, with_mask=phase == "sparse")
    x = torch.randn(5, 16, requires_grad=True)
    calls = Calls()
    with calls:
        y = layer(x)
    y.sum().backward()
    assert calls.calls == [torch.ops.rosa_kernels.rosa_linear.default], calls.calls


def test_rosa_linear_op_draws_the_seed_draw_seed_would():
    """Without a seed the op draws what rosa_kernels.dropout.draw_seed() would from the same state
    of torch's CPU generator, so torch.manual_seed fixes the dropout mask (and the reference tests
    can rebuild it with keep_mask(draw_seed(), ...))."""
    layer, f, (x, lora_A, lora_B, values), index, *_ = rosa_linear_op_case("sddmm", dropout=0.3)
    args = (layer.weight, layer.bias, lora_A, lora_B, values, index)
    for state in range(3):
        torch.manual_seed(state)
        drawn = torch.ops.rosa_kernels.rosa_linear(x, *args, None, layer.scale, 0.3, "sddmm")
        after = torch.randn(3)
        torch.manual_seed(state)
        given = torch.ops.rosa_kernels.rosa_linear(x, *args, draw_seed(), layer.scale, 0.3, "sddmm")
        assert torch.equal(drawn, given) and torch.equal(after, torch.randn(3))
    with pytest.raises(Exception, match="seed"):  # a compiled graph must take the seed as an input
        torch.compile(lambda x: torch.ops.rosa_kernels.rosa_linear(x, *args, None, layer.scale, 0.3, "sddmm"),
                      backend="aot_eager", fullgraph=True)(x)


@pytest.mark.skipif(not rosa_kernels.cuda_available(), reason="needs CUDA")
def test_rosa_linear_op_on_a_gpu_draws_its_seed_on_the_host():
    """Eagerly on a GPU the op draws the dropout seed on the host from the CUDA generator (no randint
    kernel, no dispatcher call): torch.manual_seed fixes the mask, each call draws a new one, and the
    output is the layer's math with the mask of some seed (gradients: the float64 tests)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    layer, f, (x, lora_A, lora_B, values), index, *_ = rosa_linear_op_case("sddmm", dropout=0.5, device="cuda",
                                                                          dtype=torch.float32)
    args = (layer.weight, layer.bias, lora_A, lora_B, values, index, None, layer.scale, 0.5, "sddmm")
    x = x.detach().repeat(40, 1, 1)  # enough elements that two masks differ
    torch.manual_seed(3)
    first, second = (torch.ops.rosa_kernels.rosa_linear(x, *args) for _ in range(2))
    torch.manual_seed(3)
    again = torch.ops.rosa_kernels.rosa_linear(x, *args)
    assert torch.equal(first, again) and not torch.equal(first, second)
    ops = Ops()
    with ops:
        torch.ops.rosa_kernels.rosa_linear(x, *args)
    assert not any("randint" in name for name in ops.names), ops.names
    # some seed's mask gives the output: the no-dropout output plus the masked LoRA term
    no_dropout = torch.ops.rosa_kernels.rosa_linear(x, *args[:6], None, layer.scale, 0.0, "sddmm")
    assert not torch.equal(first, no_dropout) and torch.isfinite(first).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["merged", "csr_add"])
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_recomputes_the_same_dropout(device, mode, use_reentrant):
    """Under torch.utils.checkpoint (HF's gradient_checkpointing) the forward runs again in backward:
    it must draw the same dropout seed, or dA, dB and dX would belong to another mask. checkpoint
    restores the CPU and CUDA generators' states before recomputing; the seed comes from them."""
    import copy

    from torch.utils.checkpoint import checkpoint

    first = make_layer(16, 12, mode=mode, dropout=0.4, seed=1, device=device)
    second = make_layer(12, 10, mode=mode, dropout=0.4, seed=2, device=device)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 9, 16, generator=gen).to(device)
    dy = torch.randn(4, 9, 10, generator=gen).to(device)

    def run(layers, checkpointed):
        a, b = layers
        x_in = x.clone().requires_grad_()
        torch.manual_seed(11)
        block = lambda t: b(torch.relu(a(t)))  # noqa: E731
        y = checkpoint(block, x_in, use_reentrant=use_reentrant) if checkpointed else block(x_in)
        torch.manual_seed(12)  # the recompute must not read the generator's state at backward time
        y.backward(dy)
        return [x_in.grad] + [p.grad for layer in layers for p in (layer.lora_A, layer.lora_B, layer.sparse_values)]

    plain = run((first, second), False)
    again = run(copy.deepcopy((first, second)), True)
    assert all(g is not None for g in again)
    for got, want in zip(again, plain):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert plain[1].abs().sum() > 0  # dA saw a mask (dropout 0.4 keeps most inputs)


# ----------------------------------------------------------------------------------------------
# The registered layer op (merged mode and the warm-up: csrc/rosa_linear_ops.cpp)
# ----------------------------------------------------------------------------------------------


def rosa_linear_op_case(grad_path, *, dropout, bias=True, seed=0, dtype=torch.float64, device="cpu"):
    """A merged layer's operands for torch.ops.rosa_kernels.rosa_linear and a function of the
    differentiable ones (x, lora_A, lora_B, values) that rebuilds W + S from the values it is given,
    as the layer's re-scatter does: finite differences in the values then see S in the weight."""
    from rosa_kernels import MaskPlan

    layer = make_layer(7, 5, dtype=dtype, density=0.4, seed=seed, bias=bias, device=device)
    if grad_path == "none":
        index, width, rest_nnz = [], 0, 0
    elif grad_path == "dense":
        index, width, rest_nnz = [layer.flat_indices], 0, 0
    elif grad_path == "sddmm":
        index, width, rest_nnz = [layer.row_offsets, layer.row_indices, layer.col_indices], 0, 0
    else:  # "plan": with a gather of hot columns (0.3) or all columns hot (0.0, no gather)
        hot_fill = 0.3 if grad_path == "plan" else 0.0
        gather, target, *rest, width, rest_nnz = MaskPlan(layer.row_offsets, layer.col_indices, 5, 7,
                                                          hot_fill=hot_fill).sddmm_parts()
        index = [target, *rest] + ([] if gather is None else [gather])
        grad_path = "plan"
    base = layer.base_weight()
    seed_tensor = torch.tensor([1234567891011], dtype=torch.int64) if dropout else None

    def f(x, lora_A, lora_B, values):
        weight = base.clone()
        if grad_path != "none":
            weight.view(-1).index_add_(0, layer.flat_indices, values.detach())
        return torch.ops.rosa_kernels.rosa_linear(x, weight, layer.bias, lora_A, lora_B, values, index, seed_tensor,
                                                  layer.scale, dropout, grad_path, width, rest_nnz)

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in (layer.lora_A, layer.lora_B, layer.sparse_values)]
    return layer, f, (x, *params), index, seed_tensor, width, rest_nnz


GRAD_PATHS = ["none", "dense", "sddmm", "plan", "plan_all_columns"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_path", GRAD_PATHS)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_rosa_linear_op_gradcheck_float64(device, grad_path, dropout, bias):
    _, f, inputs, *_ = rosa_linear_op_case(grad_path, dropout=dropout, bias=bias, device=device)
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_path", GRAD_PATHS)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_rosa_linear_op_opcheck(device, grad_path, dropout):
    layer, f, (x, lora_A, lora_B, values), index, seed, width, rest_nnz = rosa_linear_op_case(
        grad_path, dropout=dropout, device=device)
    path = "plan" if grad_path.startswith("plan") else grad_path
    args = (x, layer.weight.detach(), layer.bias.detach(), lora_A, lora_B, values, index, seed, layer.scale, dropout,
            path, width, rest_nnz)
    torch.library.opcheck(torch.ops.rosa_kernels.rosa_linear.default, args)
    no_grad = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.rosa_kernels.rosa_linear.default, no_grad)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_rosa_linear_op_matches_the_python_function(dropout):
    """Merged mode through the op and csr_add through the Python autograd function give the same
    output and gradients (the same seed: each forward's first random draw)."""
    layer = make_layer(12, 9, dtype=torch.float64, dropout=dropout, seed=4)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 5, 9, dtype=torch.float64)
    results = []
    for mode in ("merged", "csr_add"):
        layer.sparse_mode = mode
        layer.zero_grad()
        x.grad = None
        torch.manual_seed(5)
        y = layer(x)
        y.backward(dy)
        results.append([y, x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.sparse_values.grad])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


def test_rosa_linear_op_checks_its_operands():
    layer, f, (x, lora_A, lora_B, values), index, *_ = rosa_linear_op_case("sddmm", dropout=0.0)
    op = torch.ops.rosa_kernels.rosa_linear
    with pytest.raises(ValueError, match="features"):
        op(x[..., :6], layer.weight, layer.bias, lora_A, lora_B, values, index, None, 1.0, 0.0, "sddmm")
    with pytest.raises(ValueError, match="grad_path"):
        op(x, layer.weight, layer.bias, lora_A, lora_B, values, index, None, 1.0, 0.0, "spmm")
    with pytest.raises(ValueError, match="index tensors"):
        op(x, layer.weight, layer.bias, lora_A, lora_B, values, index[:2], None, 1.0, 0.0, "sddmm")
    with pytest.raises(ValueError, match="dropout"):
        op(x, layer.weight, layer.bias, lora_A, lora_B, values, index, None, 1.0, 1.0, "sddmm")
    with pytest.raises(TypeError, match="seed"):
        op(x, layer.weight, layer.bias, lora_A, lora_B, values, index, torch.zeros(1), 1.0, 0.1, "sddmm")


def _scatter_case(shapes, dtype, device, index_dtype=torch.int32, seed=0):
    """Random layers for merged_scatter_: weights, the CSR of a random mask of each, base values
    and values; with the expected weights (the sum in promote(dtype, float32), rounded once)."""
    gen = torch.Generator().manual_seed(seed)
    weights, offsets, cols, base, values, expected = [], [], [], [], [], []
    for i, (m, n, nnz) in enumerate(shapes):
        w = torch.randn(m, n, generator=gen).to(dtype)
        flat = torch.randperm(m * n, generator=gen)[:nnz].sort().values
        rows = flat // max(n, 1)
        offsets.append(torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(rows, minlength=m).cumsum(0)]))
        cols.append(flat % max(n, 1))
        b = torch.randn(nnz, generator=gen).mul(100).to(dtype)
        # the third layer keeps its values in float32 (mixed dtypes)
        v = torch.randn(nnz, generator=gen).mul(1e-3).to(torch.float32 if i == 2 else dtype)
        want = w.clone()
        wide = torch.promote_types(dtype, torch.float32)
        want.view(-1)[flat] = (b.to(wide) + v.to(wide)).to(dtype)
        weights.append(w), base.append(b), values.append(v), expected.append(want)
    move = lambda ts, dt=None: [t.to(device=device, dtype=dt or t.dtype) for t in ts]  # noqa: E731
    return (move(weights), move(offsets, index_dtype), move(cols, index_dtype), move(base), move(values),
            move(expected))


@pytest.mark.sanitizer  # small: the compute-sanitizer subset on a GPU
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_merged_scatter_is_the_float32_sum_rounded_once(device, dtype, index_dtype):
    """W_eff[r, c] = round(float32(base) + float32(S)) at every nonzero (r, c) of each layer's CSR,
    for every layer of one call, whatever the mix of dtypes; nothing else of a weight changes.
    Shapes include empty rows, a layer without nonzeros, single rows and columns and an empty
    weight; 30 layers take two launches on a GPU (24 per launch)."""
    shapes = [(7, 9, 20), (16, 3, 48), (5, 5, 1), (4, 6, 0), (1, 13, 5), (11, 1, 4), (0, 3, 0), (3, 0, 0)]
    shapes += [(9 + i % 5, 7 + i % 3, 10 + i) for i in range(22)]
    weights, offsets, cols, base, values, expected = _scatter_case(shapes, dtype, device, index_dtype)
    torch.ops.rosa_kernels.merged_scatter_(weights, offsets, cols, base, values)
    for got, want in zip(weights, expected):
        assert torch.equal(got, want)
    torch.library.opcheck(torch.ops.rosa_kernels.merged_scatter_.default, (weights, offsets, cols, base, values))


@pytest.mark.parametrize("device", DEVICES)
def test_merged_scatter_of_a_strided_weight_writes_through_its_strides(device):
    weights, offsets, cols, base, values, expected = _scatter_case([(6, 8, 17)], torch.float32, device)
    storage = weights[0].t().contiguous()  # the same values, column-major
    transposed_view = storage.t()
    torch.ops.rosa_kernels.merged_scatter_([transposed_view], offsets, cols, base, values)
    assert torch.equal(transposed_view, expected[0])


@pytest.mark.sanitizer  # small: the compute-sanitizer subset on a GPU
@pytest.mark.parametrize("device", DEVICES)
def test_merged_scatter_never_writes_outside_a_weight(device):
    """Broken CSRs (a column out of range, offsets that decrease or exceed nnz) are not checked by
    content (that would synchronize a GPU): the op still writes only inside the weight, at rows in
    [0, m) and columns in [0, n)."""
    m, n = 5, 4
    for offsets, cols in [([0, 2, 2, 3, 3, 4], [1, 9, -3, 2]),  # columns out of range
                          ([0, 3, 1, 4, 2, 4], [0, 1, 2, 3]),  # offsets decrease
                          ([0, 9, 9, 9, 9, 9], [0, 1, 2, 3])]:  # offsets beyond nnz
        guard = torch.full((3, m, n), 7.0, device=device)
        weight = guard[1]
        before = guard.clone()
        torch.ops.rosa_kernels.merged_scatter_(
            [weight], [torch.tensor(offsets, dtype=torch.int32, device=device)],
            [torch.tensor(cols, dtype=torch.int32, device=device)], [torch.ones(4, device=device)],
            [torch.ones(4, device=device)])
        assert torch.equal(guard[0], before[0]) and torch.equal(guard[2], before[2])
        assert set(weight.unique().tolist()) <= {7.0, 2.0}
        assert (weight == 2.0).any()


@pytest.mark.parametrize("device", DEVICES)
def test_merged_scatter_bad_input(device):
    weights, offsets, cols, base, values, _ = _scatter_case([(5, 6, 7), (4, 4, 3)], torch.float32, device)
    op = torch.ops.rosa_kernels.merged_scatter_
    with pytest.raises(ValueError, match="same length"):
        op(weights, offsets[:1], cols, base, values)
    with pytest.raises(ValueError, match="2-D"):
        op([weights[0].view(-1), weights[1]], offsets, cols, base, values)
    with pytest.raises(ValueError, match="row_offsets\\[0\\]"):
        op(weights, [offsets[0][:-1], offsets[1]], cols, base, values)
    with pytest.raises(TypeError, match="int32 or both int64"):
        op(weights, offsets, [cols[0].long(), cols[1]], base, values)
    with pytest.raises(TypeError, match="int32 or both int64"):
        op(weights, [o.float() for o in offsets], cols, base, values)
    with pytest.raises(TypeError, match="floating point"):
        op(weights, offsets, cols, [base[0].int(), base[1]], values)
    with pytest.raises(ValueError, match="one length"):
        op(weights, offsets, cols, base, [values[0][:-1], values[1]])
    if device == "cuda":
        with pytest.raises(ValueError, match="device"):
            op(weights, [offsets[0].cpu(), offsets[1]], cols, base, values)


def test_one_scatter_call_for_all_merged_layers_after_an_optimizer_step():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    layers = [make_layer(8, 6, seed=i) for i in range(5)]
    optimizer = torch.optim.SGD([layer.sparse_values for layer in layers[:3]], lr=0.1)
    x = torch.randn(4, 8)
    sum(layer(x).sum() for layer in layers).backward()
    counter = Count()
    with counter:
        optimizer.step()
    assert counter.ops.count("merged_scatter_") == 1
    for layer in layers:
        assert torch.equal(layer.weight.view(-1)[layer.flat_indices],
                           layer.base_values + layer.sparse_values.detach())
        assert layer._merged_version == layer.sparse_values._version


def test_gradcheck_float64_merged_through_the_layer():
    # In merged mode S lives inside the dense weight, so check the layer as a whole: the gradient
    # of every trainable parameter against finite differences of the layer's own output.
    layer = make_layer(5, 4, dtype=torch.float64, density=0.5)
    x = torch.randn(3, 5, dtype=torch.float64)
    params = [layer.lora_A, layer.lora_B, layer.sparse_values]
    (layer(x) * torch.sin(torch.arange(4.0, dtype=torch.float64))).sum().backward()
    eps = 1e-6
    for p in params:
        for i in range(p.numel()):
            with torch.no_grad():
                p.view(-1)[i] += eps
            up = (layer(x) * torch.sin(torch.arange(4.0, dtype=torch.float64))).sum().item()
            with torch.no_grad():
                p.view(-1)[i] -= 2 * eps
            down = (layer(x) * torch.sin(torch.arange(4.0, dtype=torch.float64))).sum().item()
            with torch.no_grad():
                p.view(-1)[i] += eps
            assert abs((up - down) / (2 * eps) - p.grad.view(-1)[i].item()) < 1e-6


def test_merged_and_unmerged_agree_through_training_without_drift():
    torch.manual_seed(0)
    layers = {mode: make_layer(20, 12, mode=mode, seed=3) for mode in MODES}
    for layer in layers.values():
        layer.load_state_dict(layers["merged"].state_dict())
    optimizers = {mode: torch.optim.AdamW([p for p in l.parameters() if p.requires_grad], lr=1e-2)
                  for mode, l in layers.items()}
    for step in range(4):
        x = torch.randn(8, 20)
        for mode, layer in layers.items():
            optimizers[mode].zero_grad()
            layer(x).square().mean().backward()
            optimizers[mode].step()
    x = torch.randn(5, 20)
    outputs = {mode: layer(x) for mode, layer in layers.items()}
    torch.testing.assert_close(outputs["merged"], outputs["spmm"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs["csr_add"], outputs["spmm"], rtol=1e-5, atol=1e-5)
    merged = layers["merged"]
    # W_eff[mask] was recomputed from the saved W: exactly base + S, no accumulated rounding.
    assert torch.equal(merged.weight.view(-1)[merged.flat_indices], merged.base_values + merged.sparse_values.detach())
    # Switching modes un-merges and re-merges exactly.
    before = merged.weight.detach().clone()
    merged.sparse_mode = "spmm"
    torch.testing.assert_close(merged(x), outputs["merged"], rtol=1e-5, atol=1e-5)
    merged.sparse_mode = "merged"
    assert torch.equal(merged.weight, before)


def test_manual_value_change_is_seen_by_the_next_forward():
    layer = make_layer(8, 6)
    x = torch.randn(4, 8)
    with torch.no_grad():
        layer.sparse_values.mul_(3.0)
    expected = x @ (layer.base_weight() + layer.sparse_delta() + layer.scale * layer.lora_B @ layer.lora_A).t() + layer.bias
    torch.testing.assert_close(layer(x), expected.detach())


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_round_trip_into_fresh_layer_is_exact(mode):
    layer = make_layer(14, 9, mode=mode, seed=5)
    state = layer.state_dict()
    assert set(state) == {"weight", "bias", "lora_A", "lora_B", "sparse_values", "row_offsets", "row_indices",
                          "col_indices", "has_mask"}
    assert torch.equal(state["weight"], layer.base_weight())  # always the original W
    for target_mode in MODES:
        fresh = RosaLinear(14, 9, rank=3, density=0.3, alpha=8.0, dropout=0.0, sparse_mode=target_mode)
        fresh.load_state_dict(state)
        assert fresh.phase == "sparse"
        x = torch.randn(3, 14)
        torch.testing.assert_close(fresh(x), layer(x), rtol=1e-6, atol=1e-6)
        assert torch.equal(fresh.mask().col_indices, layer.mask().col_indices)
        assert torch.equal(fresh.sparse_values, layer.sparse_values)


def test_to_dtype_and_merge():
    layer = make_layer(10, 8)
    x = torch.randn(4, 10)
    y32 = layer(x)
    merged = layer.merge()
    assert type(merged) is nn.Linear and not any(p is layer.weight for p in merged.parameters())
    torch.testing.assert_close(merged(x), y32, rtol=1e-5, atol=1e-5)
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16 and layer.row_offsets.dtype == torch.int32
    torch.testing.assert_close(layer(x.bfloat16()).float(), y32, rtol=3e-2, atol=3e-2)
    assert torch.equal(layer.weight.view(-1)[layer.flat_indices],
                       (layer.base_values.float() + layer.sparse_values.float()).bfloat16())


def test_no_grad_eval_and_gradient_checkpointing():
    layer = make_layer(12, 7, dropout=0.0)
    x = torch.randn(5, 12, requires_grad=True)
    with torch.no_grad():
        y0 = layer(x)
    assert not y0.requires_grad
    y = layer(x)
    y.sum().backward()
    grads = [p.grad.clone() for p in (layer.lora_A, layer.lora_B, layer.sparse_values)] + [x.grad.clone()]
    layer.zero_grad()
    x.grad = None
    y_ckpt = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
    y_ckpt.sum().backward()
    torch.testing.assert_close(y_ckpt, y)
    for g, p in zip(grads, [layer.lora_A, layer.lora_B, layer.sparse_values, x]):
        torch.testing.assert_close(p.grad, g)


def two_layer_model(first_mode, second_mode, with_masks):
    """RosaLinear -> GELU -> RosaLinear, with random masks and non-zero adapters when asked."""
    torch.manual_seed(0)
    model = nn.Sequential(
        RosaLinear(16, 24, rank=4, density=0.1, dropout=0.1, sparse_mode=first_mode),
        nn.GELU(),
        RosaLinear(24, 8, rank=4, density=0.1, dropout=0.1, sparse_mode=second_mode),
    )
    if with_masks:
        for i, layer in enumerate(model[::2]):
            layer.set_mask(random_mask(layer.out_features, layer.in_features, layer.nnz, i))
            with torch.no_grad():
                layer.sparse_values.normal_()
                layer.lora_B.normal_()
            layer.refresh_merged_weight()  # values changed outside an optimizer step
    return model


def assert_compiled_matches_eager_through_training(model, backend):
    """torch.compile(fullgraph=True): same outputs as eager before and after two optimizer steps."""
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    x = torch.randn(2, 3, 16)
    model.eval()
    torch.testing.assert_close(compiled(x), model(x))
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):
        optimizer.zero_grad()
        compiled(x).square().mean().backward()
        optimizer.step()
    assert model[0].lora_A.grad is not None
    model.eval()
    torch.testing.assert_close(compiled(x), model(x))


def test_torch_compile_fullgraph_with_a_planned_sparse_grad():
    """The planned dS (forced: a CPU's automatic plan keeps everything in the SDDMM) compiles and
    gives eager's gradients."""
    from rosa_kernels import MaskPlan

    model = two_layer_model("merged", "merged", with_masks=True)
    for layer in model[::2]:
        layer._use_plan(MaskPlan(layer.row_offsets, layer.col_indices, layer.out_features, layer.in_features,
                                 hot_fill=0.0).sddmm_parts())
    model.eval()  # no dropout: the eager and compiled steps see the same function
    x = torch.randn(2, 3, 16)
    model(x).square().mean().backward()
    eager = [layer.sparse_values.grad.clone() for layer in model[::2]]
    model.zero_grad()
    torch._dynamo.reset()
    torch.compile(model, fullgraph=True, backend="aot_eager")(x).square().mean().backward()
    for layer, expected in zip(model[::2], eager):
        torch.testing.assert_close(layer.sparse_values.grad, expected)


@pytest.mark.parametrize("phase", ["warmup", "sparse"])
def test_torch_compile_fullgraph_training_step_with_dropout_matches_eager(phase):
    """In training mode the compiled graph takes the dropout seed as an input (draw_seed's randint)
    where eager lets the op draw it: from the same generator state both draw the same seed, so the
    outputs and gradients agree."""
    model = two_layer_model("merged", "merged", with_masks=phase == "sparse").train()
    x = torch.randn(2, 3, 16)
    results = []
    for run in (torch.compile(model, fullgraph=True, backend="aot_eager"), model):
        model.zero_grad()
        torch.manual_seed(11)
        y = run(x)
        y.square().mean().backward()
        results.append([y.detach()] + [p.grad.clone() for p in model.parameters() if p.requires_grad])
    torch._dynamo.reset()
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("mode", ["merged", "spmm"])
@pytest.mark.parametrize("phase", ["warmup", "sparse"])
def test_torch_compile_fullgraph(mode, phase):
    model = two_layer_model(mode, mode, with_masks=phase == "sparse")
    assert_compiled_matches_eager_through_training(model, "aot_eager")


# ----------------------------------------------------------------------------------------------
# Gradient collection and mask selection
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("collect_buffer", ["float32", "host", "auto", "bfloat16"])
@pytest.mark.parametrize("rule", ["fisher", "mean"])
def test_selected_mask_is_the_top_k_of_the_collected_statistic(rule, collect_buffer):
    torch.manual_seed(0)
    linear = nn.Linear(15, 11)
    layer = RosaLinear.from_linear(linear, rank=2, density=0.2, dropout=0.0, rule=rule)
    layer.start_collection(collect_buffer=collect_buffer)
    assert layer.phase == "collect"
    statistic = torch.zeros(11, 15, dtype=torch.float64)
    optimizer = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.0)
    for step in range(3):
        # Two forwards per step (a siamese encoder): the step's gradient is their sum.
        x, x2 = torch.randn(2, 4, 15), torch.randn(3, 15)
        target, target2 = torch.randn(2, 4, 11), torch.randn(3, 11)
        ((layer(x) * target).sum() + (layer(x2) * target2).sum()).backward()
        optimizer.step()  # ends the step: statistic += dW ∘ dW
        # Independent: the dense gradient of an ordinary nn.Linear.
        linear.zero_grad()
        ((linear(x) * target).sum() + (linear(x2) * target2).sum()).backward()
        g = linear.weight.grad.double()
        statistic += g * g if rule == "fisher" else g
    statistic /= 3
    if collect_buffer not in ("float32", "host"):
        # The 16-bit accumulator: each step's gradient and the statistic rounded to bfloat16 (2^-8
        # relative), so the mask is the top-k up to entries within that rounding of the threshold.
        # (the mean rule sums signed gradients: the rounding is relative to the summands)
        scale = float(statistic.abs().max())
        torch.testing.assert_close(layer.statistic().double(), statistic, rtol=2e-2, atol=2e-2 * scale)
        mask = layer.select_mask()
        kept = statistic.abs().flatten()[layer.flat_indices]
        threshold = torch.topk(statistic.abs().flatten(), layer.nnz).values[-1]
        assert mask.nnz == layer.nnz and bool((kept >= threshold * (1 - 3e-2)).all())
        return
    torch.testing.assert_close(layer.statistic().double(), statistic, rtol=1e-5, atol=1e-5)
    mask = layer.select_mask()
    expected = torch.zeros(11 * 15, dtype=torch.bool)
    expected[torch.topk(statistic.abs().flatten(), layer.nnz).indices] = True
    assert layer.phase == "sparse" and mask.nnz == layer.nnz == round(0.2 * 11 * 15)
    assert torch.equal(layer.sparse_delta() != 0, torch.zeros(11, 15, dtype=torch.bool))  # S starts at 0
    selected = torch.zeros(11, 15, dtype=torch.bool)
    rows = torch.repeat_interleave(torch.arange(11), (mask.row_offsets[1:] - mask.row_offsets[:-1]).long())
    selected[rows, mask.col_indices.long()] = True
    assert torch.equal(selected.flatten(), expected)
    assert layer.weight.requires_grad is False


@pytest.mark.parametrize("collect_buffer", ["auto", "bfloat16", "float32"])
def test_collection_does_not_count_no_grad_or_eval_forwards(collect_buffer):
    layer = RosaLinear(6, 4, rank=2, density=0.5, dropout=0.0)
    layer.start_collection(collect_buffer=collect_buffer)
    collector = layer._collector
    with torch.no_grad():
        layer(torch.randn(3, 6))
    assert collector.pending is None and collector.backward_passes == 0
    layer(torch.randn(3, 6)).sum().backward()
    assert float(collector.pending.abs().sum()) > 0.0 and collector.backward_passes == 1
    layer.finish_collection_step()
    assert collector.steps == 1 and collector.pending_ended


@pytest.mark.parametrize("collect_buffer", ["auto", "one_pass"])
def test_one_collecting_backward_selects_the_exact_top_k(collect_buffer):
    """RoSA's recipe without accumulation: the mask is the exact top-k of the float32 dW, although the
    kept entries exceed the dropped ones by 2^-20 relative (beyond any 16-bit accumulator)."""
    m, n = 9, 20
    layer = RosaLinear(n, m, rank=2, density=0.05, dropout=0.0)
    gen = torch.Generator().manual_seed(3)
    gradient = torch.rand(m, n, generator=gen) * 0.5
    positions = torch.randperm(m * n, generator=gen)
    gradient.view(-1)[positions[:layer.nnz]] = -(1.0 + 2.0 ** -20)
    gradient.view(-1)[positions[layer.nnz:3 * layer.nnz]] = 1.0
    layer.start_collection(collect_buffer=collect_buffer)
    (layer(torch.eye(n)) * gradient.t()).sum().backward()  # dW = dY^T X = gradient
    mask = layer.select_mask()
    assert layer.phase == "sparse" and layer._collector is None
    expected = torch.zeros(m * n, dtype=torch.bool)
    expected[positions[:layer.nnz]] = True
    chosen = torch.zeros(m * n, dtype=torch.bool)
    rows = torch.repeat_interleave(torch.arange(m), (mask.row_offsets[1:] - mask.row_offsets[:-1]).long())
    chosen[rows * n + mask.col_indices.long()] = True
    assert torch.equal(chosen, expected)


@pytest.mark.parametrize("collect_buffer", ["auto", "one_pass", "float16", "bfloat16", "float32", "host"])
def test_start_collection_allocates_nothing_until_a_backward(collect_buffer):
    layer = RosaLinear(32, 24, rank=2, density=0.05, dropout=0.0)
    optimizer = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.0)
    layer(torch.randn(4, 32)).sum().backward()  # the warm-up step that ends with start_collection
    optimizer.step()
    layer.start_collection(collect_buffer=collect_buffer)
    assert layer._collector.memory_bytes() == 0
    layer(torch.randn(4, 32)).sum().backward()
    per_weight = {"one_pass": 0, "float32": 4, "host": 4}.get(collect_buffer, 2)  # host: in host memory
    top_k = 8 * layer.nnz if collect_buffer in ("auto", "one_pass") else 0
    scales = 4 * 24 if collect_buffer in ("auto", "float16") else 0
    assert layer._collector.memory_bytes() == per_weight * 24 * 32 + top_k + scales
    optimizer.step()
    layer.select_mask()
    assert layer.phase == "sparse"


def test_collect_buffer_is_checked():
    layer = RosaLinear(8, 4, rank=2, density=0.25)
    with pytest.raises(ValueError, match="collect_buffer"):
        layer.start_collection(collect_buffer="int8")
    assert layer.phase == "warmup" and layer._collector is None


# ----------------------------------------------------------------------------------------------
# Bad input: clear errors, layer unchanged
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,error", [
    ({"density": 0.0}, ValueError), ({"density": 1.5}, ValueError), ({"density": -0.1}, ValueError),
    ({"rank": -1}, ValueError), ({"rank": -2}, ValueError), ({"rank": 2.5}, TypeError),
    ({"density": "0.1"}, TypeError), ({"dropout": 1.0}, ValueError), ({"sparse_mode": "dense"}, ValueError),
    ({"rule": "max"}, ValueError), ({"sparse_grad": "spmm"}, ValueError),
])
def test_bad_hyperparameters(kwargs, error):
    with pytest.raises(error):
        RosaLinear(8, 4, **{"rank": 2, "density": 0.1, **kwargs})


def test_bad_masks_leave_the_layer_unchanged():
    layer = make_layer(9, 7, seed=2)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    weight = layer.weight.detach().clone()
    bad = [
        (random_mask(7, 8, layer.nnz, 0), ValueError, "shape"),
        (random_mask(7, 9, layer.nnz + 1, 0), ValueError, "nonzeros"),
        (random_mask(7, 9, layer.nnz, 0).float(), TypeError, "bool"),
        ([[True]], TypeError, "CSR"),
        (CSR(torch.zeros(layer.nnz), torch.zeros(8, dtype=torch.int32), torch.arange(7, dtype=torch.int32),
             torch.zeros(layer.nnz, dtype=torch.int32), (7, 9)), ValueError, "row_offsets"),
    ]
    for mask, error, match in bad:
        with pytest.raises(error, match=match):
            layer.set_mask(mask)
        assert layer.phase == "sparse"
        for k, v in layer.state_dict().items():
            assert torch.equal(v, state[k]), k
        assert torch.equal(layer.weight, weight)
    with pytest.raises(ValueError, match="features"):
        layer(torch.randn(3, 8))


def test_from_linear_copies_and_freezes():
    linear = nn.Linear(5, 3, dtype=torch.float64)
    layer = RosaLinear.from_linear(linear, rank=2, density=0.4)
    assert torch.equal(layer.weight, linear.weight) and torch.equal(layer.bias, linear.bias)
    assert layer.weight.dtype == torch.float64
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B", "sparse_values"]
    assert layer.sparse_values.shape == (round(0.4 * 15),)
    assert math.isclose(layer.scale, 16.0 / 2)
    assert math.isclose(RosaLinear(5, 3, rank=4, use_rslora=True).scale, 16.0 / 2)
    with pytest.raises(TypeError):
        RosaLinear.from_linear(nn.Conv1d(2, 2, 1))


@pytest.mark.slow
def test_torch_compile_fullgraph_inductor():
    """The default backend too (C++ code generation on the CPU): no graph breaks, same results."""
    model = two_layer_model("merged", "spmm", with_masks=True)
    assert_compiled_matches_eager_through_training(model, "inductor")

def test_real_rosa_masks_load_and_match_the_reference():
    """Masks RoSA selected on all-MiniLM-L6-v2 (shared/data/masks) work as they are."""
    from rosa_kernels.testing import real_masks

    try:
        masks = real_masks()
    except FileNotFoundError:
        pytest.skip("real masks not found")
    for name in list(masks)[:4]:
        mask = masks[name]
        m, n = mask.shape
        torch.manual_seed(0)
        layer = RosaLinear(n, m, rank=4, density=mask.nnz / (m * n), dropout=0.0)
        layer.set_mask(mask)
        assert layer.nnz == mask.nnz
        with torch.no_grad():
            layer.sparse_values.copy_(mask.values)
            layer.lora_B.normal_()
        x = torch.randn(12, n, requires_grad=True)
        dy = torch.randn(12, m)
        y = layer(x)
        y.backward(dy)
        y_ref, dx_ref, dA_ref, dB_ref, dS_ref = reference(layer, x, dy)
        assert_close(y, y_ref, torch.float32, name)
        assert_close(x.grad, dx_ref, torch.float32, name)
        assert_close(layer.sparse_values.grad, dS_ref, torch.float32, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_autocast_runs_in_the_autocast_dtype(device, mode):
    layer = make_layer(24, 10, mode=mode, device=device)
    x = torch.randn(6, 24, device=device, requires_grad=True)
    dy = torch.randn(6, 10, device=device)
    y_ref, dx_ref, dA_ref, dB_ref, dS_ref = reference(layer, x, dy)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().backward(dy)
    assert layer.lora_A.grad.dtype == torch.float32 and layer.sparse_values.grad.dtype == torch.float32
    assert_close(y, y_ref, torch.bfloat16, "y")
    assert_close(x.grad, dx_ref, torch.bfloat16, "dx")
    assert_close(layer.lora_A.grad, dA_ref, torch.bfloat16, "dA")
    assert_close(layer.sparse_values.grad, dS_ref, torch.bfloat16, "dS")


def test_a_deep_copied_merged_model_compiled_trains_like_the_original():
    """A deepcopy (or unpickled) merged layer registers with the optimizer post-step hook: compiled
    forwards skip the eager version check, so only the hook re-scatters W + S after each step."""
    import copy

    torch.manual_seed(0)
    original = torch.nn.Sequential(RosaLinear(16, 24, rank=2, density=0.1, dropout=0.0), torch.nn.Tanh(),
                                   RosaLinear(24, 8, rank=2, density=0.1, dropout=0.0))
    for i, layer in enumerate(original[::2]):
        layer.set_mask(random_mask(layer.out_features, layer.in_features, layer.nnz, i))
    copied = copy.deepcopy(original)
    torch._dynamo.reset()
    compiled = torch.compile(copied, fullgraph=True, backend="aot_eager")
    x, target = torch.randn(10, 16), torch.randn(10, 8)
    losses = {}
    for name, model, params in (("eager", original, original), ("compiled", compiled, copied)):
        optimizer = torch.optim.AdamW([p for p in params.parameters() if p.requires_grad], lr=0.05)
        losses[name] = []
        for _ in range(4):
            optimizer.zero_grad()
            loss = (model(x) - target).square().mean()
            loss.backward()
            optimizer.step()
            losses[name].append(loss.item())
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-5, abs=1e-6)
    for a, b in zip(copied[::2], original[::2]):
        torch.testing.assert_close(a.weight, b.weight)


def test_merging_reads_the_base_values_whatever_their_buffers_dtype():
    # base_values normally has the weight's dtype (one index_select into it); a layer whose buffer
    # was cast apart from the weight still merges (a copy that casts) and gives the same output.
    torch.manual_seed(0)
    layer = RosaLinear(24, 16, rank=2, density=0.1, dropout=0.0)
    other = copy.deepcopy(layer)
    other.base_values = other.base_values.double()
    mask = torch.zeros(16 * 24, dtype=torch.bool)
    mask[torch.randperm(16 * 24)[:layer.nnz]] = True
    mask = mask.view(16, 24)
    for l in (layer, other):
        l.set_mask(mask)
        with torch.no_grad():
            l.sparse_values.copy_(torch.linspace(-1, 1, l.nnz))
    x = torch.randn(5, 24)
    torch.testing.assert_close(other(x), layer(x))
    torch.testing.assert_close(other.base_values.float(), layer.base_values)


@pytest.mark.parametrize("device", DEVICES)
def test_a_layer_keeps_the_transpose_only_in_spmm_mode(device):
    """The mask's transpose and its permutation (8 bytes per nonzero) exist only in sparse_mode
    "spmm", which reads them; switching modes builds and drops them, and every mode computes the
    same step."""
    from rosa_kernels.ops import csr_transpose

    torch.manual_seed(0)
    x = torch.randn(6, 12, device=device)
    dy = torch.randn(6, 10, device=device)
    layer = make_layer(12, 10, mode="merged", device=device)
    results = {}
    for mode in ["merged", "spmm", "csr_add", "spmm", "merged"]:
        layer.sparse_mode = mode
        if mode == "spmm":
            _, offsets_t, cols_t, permutation = csr_transpose(layer.sparse_values.detach(), layer.row_offsets,
                                                              layer.col_indices, 10, 12, return_permutation=True)
            assert torch.equal(layer.row_offsets_t, offsets_t) and torch.equal(layer.col_indices_t, cols_t)
            assert torch.equal(layer.permutation, permutation)
            assert torch.equal(layer.row_indices_t, rosa_kernels.row_order(offsets_t))
        else:
            assert layer.col_indices_t.numel() == 0 and layer.permutation.numel() == 0
        xi = x.clone().requires_grad_()
        layer.zero_grad()
        layer(xi).backward(dy)
        step = (xi.grad, layer.lora_A.grad, layer.lora_B.grad, layer.sparse_values.grad)
        results.setdefault(mode, step)
        for got, want in zip(step, results["merged"]):
            torch.testing.assert_close(got, want)
    # A new mask in "spmm" mode replaces the transpose kept for the old one.
    layer.sparse_mode = "spmm"
    layer.set_mask(make_layer(12, 10, seed=7, device=device).mask())
    _, offsets_t, cols_t, permutation = csr_transpose(layer.sparse_values.detach(), layer.row_offsets,
                                                      layer.col_indices, 10, 12, return_permutation=True)
    assert torch.equal(layer.col_indices_t, cols_t) and torch.equal(layer.permutation, permutation)
    assert torch.equal(layer.row_offsets_t, offsets_t)


def test_a_merged_layer_holds_12_bytes_per_nonzero_in_float32():
    """Beyond W, b and the LoRA factors a merged float32 layer keeps, per nonzero: the column index
    (4 bytes), S (4) and W at the mask (4): no flat positions, no transpose, no permutation."""
    layer = make_layer(64, 48, density=0.05)
    assert layer._merged
    skip = {"weight", "bias", "lora_A", "lora_B"}
    held = sum(t.numel() * t.element_size() for name, t in [*layer.named_parameters(), *layer.named_buffers()]
               if name not in skip)
    per_row_or_column = 4 * (2 * 48 + 2 * 65 + 1) + 1  # row offsets/order, the transpose's offsets/order, has_mask
    assert held - per_row_or_column <= 12 * layer.nnz
    assert torch.equal(layer.flat_indices, rosa_kernels.masks.csr_flat_indices(layer.row_offsets, layer.col_indices, 64))


@pytest.mark.parametrize("sparse_grad", ["dense", "sddmm", "auto"])
@pytest.mark.parametrize("how", ["set_mask", "select_mask", "load_state_dict"])
def test_every_sparse_grad_reads_the_mask_it_was_given(sparse_grad, how):
    """dS = (dY^T X)[mask] right after the mask arrives, whichever dS path the layer was built
    with (a path whose index tensors were taken before the layer entered the sparse phase would
    read the empty mask of the warm-up)."""
    torch.manual_seed(0)
    layer = RosaLinear(12, 10, rank=2, density=0.3, dropout=0.0, sparse_grad=sparse_grad)
    if how == "select_mask":
        layer.start_collection()
        layer(torch.randn(7, 12)).square().sum().backward()
        layer.select_mask()
    else:
        donor = make_layer(12, 10, density=0.3, rank=2)
        if how == "set_mask":
            layer.set_mask(donor.mask())
        else:
            layer.load_state_dict(donor.state_dict())
    x, dy = torch.randn(5, 12), torch.randn(5, 10)
    layer.zero_grad()
    layer(x).backward(dy)
    expected = (dy.t() @ x).view(-1)[layer.flat_indices]
    torch.testing.assert_close(layer.sparse_values.grad, expected)
