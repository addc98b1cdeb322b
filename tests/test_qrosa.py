"""QRoSA: RosaLinear over a bitsandbytes 4-bit base, against a float64 reference on the dequantized W.

Skips without bitsandbytes (the ``qrosa`` extra), except the test that its absence gives a clear error.
"""

import sys

import pytest
import torch
from torch import nn

import rosa_kernels
from rosa_kernels import RosaConfig, RosaLinear, RosaModel, apply_rosa, get_rosa_model
from rosa_kernels.dropout import draw_seed, keep_mask
from rosa_kernels.model import find_target_modules
from rosa_kernels.qrosa import QRosaLinear, quantize_linear

from test_model import Net, data, train, train_phases
from test_rosa_linear import assert_close, random_mask, reference

try:
    import bitsandbytes  # noqa: F401
    HAVE_BNB = True
except ImportError:
    HAVE_BNB = False

needs_bnb = pytest.mark.skipif(not HAVE_BNB, reason="needs bitsandbytes (pip install 'rosa_kernels[qrosa]')")
MODES = ["csr_add", "spmm"]
PHASES = ["warmup", "collect", "sparse"]


def make_layer(in_features, out_features, *, mode="csr_add", dtype=torch.float32, phase="sparse", bias=True,
               dropout=0.0, rank=3, density=0.3, seed=0, device="cpu"):
    """A QRosaLinear over a freshly quantized (NF4, double quantization) random nn.Linear, with visible
    LoRA and sparse terms (B and S nonzero) in ``phase``."""
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias, device=device)
    layer = QRosaLinear(quantize_linear(linear, compute_dtype=dtype), rank=rank, density=density, alpha=8.0,
                        dropout=dropout, sparse_mode=mode)
    with torch.no_grad():
        layer.lora_B.normal_()
    if phase == "collect":
        layer.start_collection()
    elif phase == "sparse":
        layer.set_mask(random_mask(out_features, in_features, layer.nnz, seed + 1))
        with torch.no_grad():
            layer.sparse_values.normal_()
    return layer


def check_against_reference(layer, x, dy, dtype, keep=None):
    y = layer(x)
    y.backward(dy)
    y_ref, dx_ref, dA_ref, dB_ref, dS_ref = reference(layer, x, dy, keep)
    assert y.dtype == x.dtype and y.shape == dy.shape
    assert_close(y, y_ref, dtype, "y")
    assert_close(x.grad, dx_ref, dtype, "dx")
    assert_close(layer.lora_A.grad, dA_ref, dtype, "dA")
    assert_close(layer.lora_B.grad, dB_ref, dtype, "dB")
    if dS_ref is not None:
        assert_close(layer.sparse_values.grad, dS_ref, dtype, "dS")
    else:
        assert float(layer.sparse_values.grad.abs().sum()) == 0.0
    assert all(p.grad is None for p in layer.base_layer.parameters())


@needs_bnb
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_features,out_features,tokens,bias", [(40, 24, 7, True), (33, 17, 9, False),
                                                                  (7, 5, 3, True), (1, 12, 5, False)])
def test_forward_and_gradients_match_float64_reference(phase, mode, dtype, in_features, out_features, tokens, bias):
    layer = make_layer(in_features, out_features, mode=mode, dtype=dtype, phase=phase, bias=bias,
                       seed=in_features * 31 + out_features)
    assert layer.sparse_values.dtype == dtype and layer.phase == phase
    x = torch.randn(2, tokens, in_features, dtype=dtype, requires_grad=True)
    dy = torch.randn(2, tokens, out_features, dtype=dtype)
    check_against_reference(layer, x, dy, dtype)


@needs_bnb
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("phase", ["warmup", "sparse"])
def test_dropout_matches_reference_with_the_same_keep_mask(mode, phase):
    layer = make_layer(10, 7, mode=mode, dtype=torch.float64, phase=phase, dropout=0.3)
    x = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(6, 7, dtype=torch.float64)
    torch.manual_seed(123)
    keep = keep_mask(draw_seed(), 6, 10, 0.3)  # the layer's first random draw is its dropout seed
    torch.manual_seed(123)
    check_against_reference(layer, x, dy, torch.float64, keep)
    layer.eval()  # no dropout in eval: deterministic
    assert torch.equal(layer(x), layer(x))


@needs_bnb
@pytest.mark.parametrize("sparse_grad", ["sddmm", "dense"])
def test_rank_zero_and_the_sparse_grad_paths(sparse_grad):
    layer = make_layer(40, 24, rank=0, dtype=torch.float64)
    layer.sparse_grad = sparse_grad
    assert layer.scale == 0.0 and layer.lora_A.shape == (0, 40)
    x = torch.randn(3, 11, 40, dtype=torch.float64, requires_grad=True)
    check_against_reference(layer, x, torch.randn(3, 11, 24, dtype=torch.float64), torch.float64)


@needs_bnb
def test_inputs_in_another_dtype_and_autocast_run_in_the_adapters_dtype():
    layer = make_layer(40, 24, dtype=torch.bfloat16)
    x = torch.randn(5, 40, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert x.grad.dtype == torch.float32 and layer.sparse_values.grad.dtype == torch.bfloat16
    expected = layer(x.detach().bfloat16()).float()
    torch.testing.assert_close(y.detach(), expected)
    with torch.autocast("cpu", dtype=torch.float16):
        assert layer(x).dtype == torch.float32


@needs_bnb
def test_state_dict_holds_the_adapters_and_the_4bit_base():
    layer = make_layer(40, 24, seed=1)
    state = layer.state_dict()
    assert {"lora_A", "lora_B", "sparse_values", "row_offsets", "row_indices", "col_indices", "has_mask",
            "base_layer.weight", "base_layer.bias"} <= set(state)
    assert state["base_layer.weight"].dtype == torch.uint8  # packed 4-bit, with its quantization state
    # The adapters' entries load into a fresh layer over the same base (bitsandbytes loads its own).
    fresh = make_layer(40, 24, seed=1, phase="warmup")
    result = fresh.load_state_dict({k: v for k, v in state.items() if not k.startswith("base_layer.")}, strict=False)
    assert not result.unexpected_keys and all(k.startswith("base_layer.") for k in result.missing_keys)
    assert fresh.phase == "sparse"
    x = torch.randn(3, 40)
    layer.eval(), fresh.eval()
    assert torch.equal(fresh(x), layer(x))


def stack():
    """Two layers in a row: the first one's dY depends on the second one's (dequantized) W."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48), nn.Tanh(), nn.Linear(48, 16))


@needs_bnb
@pytest.mark.parametrize("collect_buffer", ["auto", "float32"])
def test_statistic_and_mask_equal_plain_rosa_on_the_dequantized_weight(collect_buffer):
    quantized = stack()
    for i in (0, 2):
        quantized[i] = quantize_linear(quantized[i], compute_dtype=torch.float32)
    plain = stack()
    with torch.no_grad():  # the plain model holds the dequantized W (the biases are copies already)
        for i in (0, 2):
            plain[i].weight.copy_(QRosaLinear(quantized[i], density=0.1).base_weight())
    masks = []
    for model in (quantized, plain):
        torch.manual_seed(1)  # the same LoRA factors
        layers = apply_rosa(model, RosaConfig(rank=2, density=0.05, target_modules=["0", "2"], dropout=0.0,
                                              collect_buffer=collect_buffer))
        assert all(isinstance(layer, QRosaLinear) == (model is quantized) for layer in layers.values())
        with torch.no_grad():
            for layer in layers.values():
                layer.lora_B.normal_()
        for layer in layers.values():
            layer.start_collection()
        x = torch.randn(20, 32, generator=torch.Generator().manual_seed(2))
        model(x).square().mean().backward()
        for layer in layers.values():
            layer.finish_collection_step()
        statistics = {name: layer.statistic() for name, layer in layers.items()}
        masks.append(({name: layer.select_mask() for name, layer in layers.items()}, statistics))
    (quantized_masks, quantized_stats), (plain_masks, plain_stats) = masks
    for name in quantized_masks:
        torch.testing.assert_close(quantized_stats[name], plain_stats[name], rtol=1e-5, atol=0)
        assert torch.equal(quantized_masks[name].row_offsets, plain_masks[name].row_offsets), name
        assert torch.equal(quantized_masks[name].col_indices, plain_masks[name].col_indices), name


# ----------------------------------------------------------------------------------------------
# The model API on a model whose linear layers are 4-bit
# ----------------------------------------------------------------------------------------------


def quantized_net(seed=0, compute_dtype=torch.float32):
    """test_model's Net with every linear layer but lm_head in 4 bits (the same W for the same seed)."""
    torch.manual_seed(seed)
    net = Net()
    for name, module in list(net.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, child,
                    quantize_linear(module, compute_dtype=compute_dtype))
    return net


def qrosa_config(**kwargs):
    return RosaConfig(rank=2, density=0.1, warmup_steps=3, collect_steps=1, dropout=0.0, **kwargs)


@needs_bnb
@pytest.mark.parametrize("sparse_mode", ["merged", "spmm"])
def test_life_cycle_on_a_4bit_model_and_loss_falls(sparse_mode):
    model = get_rosa_model(quantized_net(), qrosa_config(sparse_mode=sparse_mode))
    layers = model.rosa_layers()
    assert sorted(layers) == ["encoder.query", "encoder.value", "mlp.0", "mlp.2"]
    # The config's default "merged" means csr_add on a 4-bit base.
    expected_mode = "csr_add" if sparse_mode == "merged" else sparse_mode
    assert all(isinstance(layer, QRosaLinear) and layer.sparse_mode == expected_mode for layer in layers.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"base_model.{n}.{p}" for n in layers for p in ("lora_A", "lora_B", "sparse_values")}
    # The bases inside the wrappers are not targets again.
    assert find_target_modules(model.base_model, model.config) == []
    phases, losses = train_phases(model, model.scheduler(show_progress=False))
    assert phases[:5] == ["warmup"] * 3 + ["collect", "sparse"]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0]
    assert all(layer.sparse_values.abs().sum() > 0 for layer in layers.values())


def trained_qrosa_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = get_rosa_model(quantized_net(seed), qrosa_config(**kwargs))
    x, y = data(seed)
    train(model, 6, x, y, model.scheduler(show_progress=False))
    return model


@needs_bnb
def test_save_pretrained_round_trip_and_merge_and_unload(tmp_path):
    model = trained_qrosa_model()
    assert model.scheduler(show_progress=False).phase == "sparse"
    model.save_pretrained(tmp_path)
    x, _ = data(5)
    model.eval()
    expected = model(x)
    # Into a fresh 4-bit model with the same base: exact.
    loaded = RosaModel.from_pretrained(quantized_net(0), tmp_path)
    loaded.eval()
    assert torch.equal(loaded(x), expected)
    for name, layer in model.rosa_layers().items():
        other = loaded.rosa_layers()[name]
        assert isinstance(other, QRosaLinear)
        for key in ("lora_A", "lora_B", "sparse_values", "row_offsets", "col_indices", "row_indices"):
            assert torch.equal(getattr(other, key), getattr(layer, key)), (name, key)
    # Into a plain model holding the dequantized weights: the same function to rounding.
    plain = Net()
    plain.load_state_dict(merged_base_state(quantized_net(0)))
    unquantized = RosaModel.from_pretrained(plain, tmp_path)
    unquantized.eval()
    assert not any(isinstance(layer, QRosaLinear) for layer in unquantized.rosa_layers().values())
    torch.testing.assert_close(unquantized(x), expected, rtol=1e-5, atol=1e-5)
    # And back: the plain model's adapter into a fresh 4-bit model.
    unquantized.save_pretrained(tmp_path / "plain")
    again = RosaModel.from_pretrained(quantized_net(0), tmp_path / "plain")
    again.eval()
    torch.testing.assert_close(again(x), expected, rtol=1e-5, atol=1e-5)
    # merge_and_unload: plain, dequantized nn.Linear layers with W + S + scale B A.
    merged = model.merge_and_unload()
    assert not any(isinstance(m, (RosaLinear, bitsandbytes.nn.Linear4bit)) for m in merged.modules())
    torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-5)


def merged_base_state(net):
    """``net``'s state with each 4-bit layer's weight dequantized: a plain Net's state_dict."""
    state = {}
    for name, module in net.named_modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            state[f"{name}.weight"] = bitsandbytes.functional.dequantize_4bit(module.weight, module.weight.quant_state)
            if module.bias is not None:
                state[f"{name}.bias"] = module.bias.detach()
        elif isinstance(module, (nn.Linear, nn.LayerNorm)):
            state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    return state


@needs_bnb
def test_checkpoint_resume_on_a_4bit_model(tmp_path):
    model = trained_qrosa_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    path = tmp_path / "run.pt"
    model.save_checkpoint(path, optimizer)
    again = get_rosa_model(quantized_net(0), model.config)
    again_optimizer = torch.optim.AdamW([p for p in again.parameters() if p.requires_grad], lr=1e-2)
    again.load_checkpoint(path, again_optimizer)
    x, _ = data(4)
    model.eval(), again.eval()
    assert torch.equal(again(x), model(x))


@needs_bnb
def test_mixed_model_wraps_each_kind_and_bad_arguments_raise():
    net = quantized_net()
    net.mlp[2] = nn.Linear(16, 16, bias=False)  # one plain layer among the 4-bit ones
    layers = apply_rosa(net, qrosa_config())
    assert type(layers["mlp.2"]) is RosaLinear and layers["mlp.2"].sparse_mode == "merged"
    assert all(isinstance(layers[n], QRosaLinear) for n in ("encoder.query", "encoder.value", "mlp.0"))
    layer = layers["mlp.0"]
    with pytest.raises(ValueError, match="4-bit base"):
        layer.sparse_mode = "merged"
    assert layer.sparse_mode == "csr_add"
    base = quantized_net().mlp[0]
    with pytest.raises(ValueError, match="cannot hold W \\+ S"):
        QRosaLinear(base, density=0.1, sparse_mode="merged")
    with pytest.raises(ValueError, match="cannot hold W \\+ S"):
        RosaLinear.from_linear(base, density=0.1, sparse_mode="merged")
    with pytest.raises(ValueError, match="sparse_mode"):
        QRosaLinear(base, density=0.1, sparse_mode="dense")
    with pytest.raises(TypeError, match="Linear4bit"):
        QRosaLinear(nn.Linear(4, 4), density=0.1)
    with pytest.raises(TypeError, match="Linear4bit"):
        QRosaLinear.from_linear(bitsandbytes.nn.Linear8bitLt(16, 16, has_fp16_weights=False), density=0.1)
    with pytest.raises(TypeError, match="dtype"):
        QRosaLinear(base, density=0.1, dtype=torch.int32)
    with pytest.raises(ValueError, match="density"):
        QRosaLinear(base, density=0.0)
    unquantized = bitsandbytes.nn.Linear4bit(16, 16, compute_dtype=torch.float32, device="meta")
    with pytest.raises(ValueError, match="not quantized"):
        QRosaLinear(unquantized, density=0.1)
    with pytest.raises(TypeError, match="plain torch.nn.Linear"):
        quantize_linear(base)
    with pytest.raises(ValueError, match="quant_type"):
        quantize_linear(nn.Linear(4, 4), quant_type="int4")
    with pytest.raises(ValueError, match="features"):
        layer(torch.randn(3, 15))


def test_without_bitsandbytes_qrosa_raises_a_clear_import_error_and_plain_models_work(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now fails
    with pytest.raises(ImportError, match=r"rosa_kernels\[qrosa\]"):
        quantize_linear(nn.Linear(8, 8))
    with pytest.raises(ImportError, match=r"rosa_kernels\[qrosa\]"):
        QRosaLinear(nn.Linear(8, 8))
    model = get_rosa_model(Net(), qrosa_config())
    assert all(type(layer) is RosaLinear for layer in model.rosa_layers().values())
    x, y = data(0)
    assert all(torch.isfinite(torch.tensor(train(model, 5, x, y, model.scheduler(show_progress=False)))))


@needs_bnb
@pytest.mark.skipif(not rosa_kernels.cuda_available(), reason="needs the CUDA kernels and a GPU")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_cuda_bf16_matches_float64_reference(mode, phase, dropout):
    """bf16 on the GPU: bitsandbytes' CUDA dequantization, the CUDA kernels (spmm, csr_add, the mask's
    plan for dS, the dropout ops), against the float64 reference on the dequantized W."""
    layer = make_layer(256, 192, mode=mode, dtype=torch.bfloat16, phase=phase, dropout=dropout, density=0.02,
                       rank=8, device="cuda")
    assert layer.weight.device.type == "cuda" and layer.lora_A.device.type == "cuda"
    x = torch.randn(3, 64, 256, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    dy = torch.randn(3, 64, 192, dtype=torch.bfloat16, device="cuda")
    keep = None
    if dropout:
        torch.manual_seed(7)
        seed = draw_seed("cuda")
        keep = keep_mask(seed.cpu(), 192, 256, dropout).view(3, 64, 256).cuda()
        torch.manual_seed(7)
    check_against_reference(layer, x, dy, torch.bfloat16, keep)
