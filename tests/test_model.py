"""The model-level API: targeting, the phase scheduler, saving/loading, merging, DDP."""

import contextlib
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from rosa_kernels import RosaConfig, RosaLinear, RosaModel, RosaScheduler, apply_rosa, get_rosa_model, merge_and_unload
from rosa_kernels.model import find_target_modules


class Net(nn.Module):
    def __init__(self, hidden=16, inputs=10):
        super().__init__()
        self.encoder = nn.ModuleDict({"query": nn.Linear(inputs, hidden), "value": nn.Linear(inputs, hidden)})
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, hidden, bias=False))
        self.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, 1)

    def forward(self, x):
        h = torch.tanh(self.encoder["query"](x)) * self.encoder["value"](x)
        return self.lm_head(self.norm(self.mlp(h))).squeeze(-1)


def data(seed, n=64, inputs=10):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, inputs, generator=gen)
    y = torch.sin(x[:, 0] * 2) + x[:, 1] * x[:, 2]
    return x, y


@pytest.mark.parametrize("targets,expected", [
    ("all-linear", ["encoder.query", "encoder.value", "mlp.0", "mlp.2"]),
    (["query", "value"], ["encoder.query", "encoder.value"]),
    (["mlp.0"], ["mlp.0"]),
    (r"encoder\..*", ["encoder.query", "encoder.value"]),
    (r"mlp\.\d", ["mlp.0", "mlp.2"]),
])
def test_targeting(targets, expected):
    model = Net()
    replaced = apply_rosa(model, RosaConfig(target_modules=targets, rank=2, density=0.1))
    assert list(replaced) == expected
    assert all(isinstance(model.get_submodule(n), RosaLinear) for n in expected)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{p}" for n in expected for p in ("lora_A", "lora_B", "sparse_values")}


def test_exclude_and_errors_leave_the_model_unchanged():
    model = Net()
    assert find_target_modules(model, RosaConfig(exclude_modules=["value"])) == ["encoder.query", "mlp.0", "mlp.2"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for kwargs, error in [({"density": 0.0}, ValueError), ({"density": 2.0}, ValueError), ({"rank": -1}, ValueError),
                          ({"target_modules": ["nothing"]}, ValueError), ({"rule": "x"}, ValueError),
                          ({"target_modules": 3}, TypeError)]:
        with pytest.raises(error):
            apply_rosa(model, **kwargs)
        assert not any(isinstance(m, RosaLinear) for m in model.modules())
        assert all(p.requires_grad for p in model.parameters())
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def train(model, steps, x, y, scheduler=None, lr=2e-2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        i = (step * 16) % x.shape[0]
        loss = (model(x[i:i + 16]) - y[i:i + 16]).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def train_phases(model, scheduler, steps=40):
    """``steps`` steps of AdamW on the first 32 samples of ``data(0)`` through ``scheduler``: the
    phase at each step and the losses."""
    x, y = data(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    phases, losses = [], []
    for _ in range(steps):
        phases.append(scheduler.phase)
        loss = (model(x[:32]) - y[:32]).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return phases, losses


def test_scheduler_life_cycle_and_loss_falls():
    torch.manual_seed(0)
    model = get_rosa_model(Net(), RosaConfig(rank=2, density=0.1, warmup_steps=3, collect_steps=2, dropout=0.0))
    scheduler = model.scheduler(show_progress=True)
    phases, losses = train_phases(model, scheduler)
    assert phases[:6] == ["warmup"] * 3 + ["collect"] * 2 + ["sparse"]
    assert set(scheduler.masks) == set(model.layer_names)
    assert losses[-1] < 0.5 * losses[0]
    # The sparse values trained.
    assert all(layer.sparse_values.abs().sum() > 0 for layer in model.rosa_layers().values())


def test_restart_option_and_trainer_callback():
    model = get_rosa_model(Net(), rank=2, density=0.1, warmup_steps=0, collect_steps=1,
                           reset_adapters_after_mask=True)
    assert RosaScheduler(model).phase == "collect"
    x, y = data(1)
    scheduler = RosaScheduler(model, show_progress=False)
    with torch.no_grad():
        for layer in model.rosa_layers().values():
            layer.lora_B.fill_(1.0)
    (model(x) - y).square().mean().backward()
    scheduler.step()
    assert scheduler.phase == "sparse"
    assert all(float(l.lora_B.detach().abs().sum()) == 0.0 for l in model.rosa_layers().values())
    transformers = pytest.importorskip("transformers")
    callback = scheduler.trainer_callback()
    assert isinstance(callback, transformers.TrainerCallback)


def trained_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    config = RosaConfig(rank=2, density=0.1, warmup_steps=2, collect_steps=1, dropout=0.0, **kwargs)
    model = get_rosa_model(Net(), config)
    x, y = data(seed)
    train(model, 6, x, y, model.scheduler(show_progress=False))
    return model


def test_save_pretrained_round_trip_is_exact(tmp_path):
    model = trained_model()
    base_state = {k: v for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["rank"] == 2 and config["layers"]["mlp.0"] == [16, 16, round(0.1 * 256)]
    # A fresh base with the same pretrained weights: copy them out of the trained model's base.
    torch.manual_seed(0)
    fresh_base = Net()
    loaded = RosaModel.from_pretrained(fresh_base, tmp_path)
    x, _ = data(5)
    model.eval(), loaded.eval()
    assert torch.equal(loaded(x), model(x))
    for name, layer in model.rosa_layers().items():
        other = loaded.rosa_layers()[name]
        for key in ("lora_A", "lora_B", "sparse_values", "row_offsets", "col_indices", "row_indices"):
            assert torch.equal(getattr(other, key), getattr(layer, key)), (name, key)
    # state_dict into a freshly wrapped model (before any mask) is exact too.
    torch.manual_seed(0)
    again = get_rosa_model(Net(), model.config)
    again.load_state_dict(base_state)
    again.eval()
    assert torch.equal(again(x), model(x))


def test_loading_into_another_shape_raises_and_leaves_the_model_unchanged(tmp_path):
    model = trained_model()
    model.save_pretrained(tmp_path)
    other = Net(hidden=12)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="does not fit"):
        RosaModel.from_pretrained(other, tmp_path)
    assert not any(isinstance(m, RosaLinear) for m in other.modules())
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    wrapped = get_rosa_model(Net(hidden=12), model.config)
    with pytest.raises(ValueError, match="does not fit"):
        wrapped.load_adapter(tmp_path)
    assert all(layer.phase == "warmup" for layer in wrapped.rosa_layers().values())


def test_masks_alone_and_merge_and_unload(tmp_path):
    model = trained_model()
    model.save_masks(tmp_path / "masks.safetensors")
    fresh = get_rosa_model(Net(), model.config)
    fresh.load_masks(tmp_path / "masks.safetensors")
    for name, layer in fresh.rosa_layers().items():
        assert layer.phase == "sparse"
        assert torch.equal(layer.col_indices, model.rosa_layers()[name].col_indices)
        assert float(layer.sparse_values.abs().sum()) == 0.0
    x, _ = data(3)
    model.eval()
    expected = model(x)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, RosaLinear) for m in plain.modules())
    torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)
    other = trained_model(seed=1)
    other.eval()
    expected = other(x)
    torch.testing.assert_close(merge_and_unload(other.base_model)(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("collect_buffer", ["auto", "float32"])
def test_scheduler_passes_collect_buffer_and_warmup_allocates_nothing(collect_buffer):
    model = get_rosa_model(Net(), RosaConfig(rank=2, density=0.1, warmup_steps=1, collect_steps=1, dropout=0.0,
                                             collect_buffer=collect_buffer))
    scheduler = model.scheduler(show_progress=False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = data(3, n=8)
    (model(x) - y).square().mean().backward()
    optimizer.step()
    scheduler.step()  # the warm-up's last step starts the collection
    layers = model.rosa_layers().values()
    assert all(layer.phase == "collect" and layer._collector.buffer == collect_buffer for layer in layers)
    assert sum(layer._collector.memory_bytes() for layer in layers) == 0
    optimizer.zero_grad()
    (model(x) - y).square().mean().backward()
    assert all(layer._collector.memory_bytes() > 0 for layer in layers)
    optimizer.step()
    scheduler.step()
    assert scheduler.phase == "sparse"
    with pytest.raises(ValueError, match="collect_buffer"):
        RosaConfig(collect_buffer="float8").validate()


# ----------------------------------------------------------------------------------------------
# DistributedDataParallel with 2 CPU processes (gloo) matches a single-process run
# ----------------------------------------------------------------------------------------------

DDP_STEPS = 8


def ddp_config(collect_buffer="float32"):
    # 'mean' rule: the mean over ranks of per-rank mean-loss gradients is the full-batch gradient,
    # so the selected mask equals the single-process one (the Fisher rule would differ by design).
    return RosaConfig(rank=2, density=0.1, warmup_steps=2, collect_steps=2, dropout=0.0, rule="mean",
                      collect_buffer=collect_buffer)


def run_training(world, rank, model, collect_buffer="float32", *, config=None, steps=DDP_STEPS,
                 before_scheduler_step=None):
    """``steps`` steps through RoSA's life cycle (``config``, default ``ddp_config``) on this rank's
    share of a global batch of 32; returns the losses. ``before_scheduler_step(step)``, when given,
    runs after each optimizer step, before the scheduler's."""
    x, y = data(7, n=64)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2, weight_decay=0.0)
    scheduler = RosaScheduler(model.module if hasattr(model, "module") else model,
                              config if config is not None else ddp_config(collect_buffer), show_progress=False)
    losses = []
    for step in range(steps):
        i = (step * 32) % 64
        xb, yb = x[i:i + 32], y[i:i + 32]
        per = 32 // world
        xb, yb = xb[rank * per:(rank + 1) * per], yb[rank * per:(rank + 1) * per]
        loss = (model(xb) - yb).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if before_scheduler_step is not None:
            before_scheduler_step(step)
        scheduler.step()
        losses.append(loss.detach())
    return losses


@contextlib.contextmanager
def gloo_group(rank, world, port):
    """This spawned process as rank ``rank`` of a gloo process group on localhost, one thread."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def ddp_worker(rank, world, port, out, collect_buffer):
    with gloo_group(rank, world, port):
        torch.manual_seed(0)
        net = Net()
        apply_rosa(net, ddp_config(collect_buffer))
        model = nn.parallel.DistributedDataParallel(net)
        losses = run_training(world, rank, model, collect_buffer)
        mean_losses = torch.stack(losses)
        dist.all_reduce(mean_losses)
        if rank == 0:
            torch.save({"state": net.state_dict(), "losses": (mean_losses / world).tolist()}, out)
        else:
            torch.save({"state": net.state_dict()}, f"{out}.{rank}")


def rosa_layers_of(net):
    return {name: m for name, m in net.named_modules() if isinstance(m, RosaLinear)}


def mask_tensors(net):
    """Every RosaLinear's mask structure (row offsets, column indices), cloned, by state_dict key."""
    return {f"{name}.{key}": getattr(layer, key).clone() for name, layer in rosa_layers_of(net).items()
            for key in ("row_offsets", "col_indices")}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
@pytest.mark.parametrize("collect_buffer", ["float32", "auto"])
def test_ddp_two_cpu_processes_match_single_process(tmp_path, collect_buffer):
    out = str(tmp_path / "ddp.pt")
    mp.start_processes(ddp_worker, args=(2, free_port(), out, collect_buffer), nprocs=2, join=True,
                       start_method="spawn")
    result = torch.load(out)
    torch.manual_seed(0)
    net = Net()
    apply_rosa(net, ddp_config())
    losses = [loss.item() for loss in run_training(1, 0, net)]
    assert result["losses"][-1] < 0.7 * result["losses"][0]
    if collect_buffer != "float32":
        # The 16-bit accumulator (all-reduced at selection) on both ranks: one mask everywhere, and
        # the float32 single-process mask up to entries within bfloat16 rounding of the threshold
        # (these layers keep 16 entries each, so one swap is 6%).
        other = torch.load(f"{out}.1")["state"]
        overlaps = []
        for key, value in result["state"].items():
            if key.endswith(("row_offsets", "col_indices")):
                assert torch.equal(value, other[key]), key
            if key.endswith("has_mask"):
                assert bool(value) and bool(other[key])
        single = net.state_dict()
        for name, layer in rosa_layers_of(net).items():
            dense = {}
            for state, tag in ((result["state"], "ddp"), (single, "single")):
                offsets, cols = state[f"{name}.row_offsets"], state[f"{name}.col_indices"]
                rows = torch.repeat_interleave(torch.arange(layer.out_features), (offsets[1:] - offsets[:-1]).long())
                dense[tag] = set((rows * layer.in_features + cols.long()).tolist())
            overlaps.append(len(dense["ddp"] & dense["single"]) / layer.nnz)
        assert min(overlaps) >= 0.8 and sum(overlaps) / len(overlaps) >= 0.9, overlaps
        return
    assert losses == pytest.approx(result["losses"], rel=1e-4, abs=1e-5)
    single = net.state_dict()
    for key, value in result["state"].items():
        if value.is_floating_point():
            torch.testing.assert_close(value, single[key], rtol=1e-4, atol=1e-5, msg=key)
        else:
            assert torch.equal(value, single[key]), key
    assert all(bool(m.has_mask) for m in net.modules() if isinstance(m, RosaLinear))


def test_base_package_imports_without_transformers_or_safetensors():
    import subprocess
    import sys

    code = ("import sys; sys.modules['transformers'] = None; sys.modules['safetensors'] = None; "
            "sys.modules['tqdm'] = None; import rosa_kernels, rosa_kernels.model, rosa_kernels.demo; "
            "print(rosa_kernels.RosaLinear.__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "RosaLinear" in result.stdout
