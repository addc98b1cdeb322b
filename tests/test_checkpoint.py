"""Checkpoint and resume: a run stopped in any phase and resumed from a file, with everything rebuilt
from scratch, selects the same masks and has the same losses as the run that never stopped."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from rosa_kernels import RosaConfig, RosaLinear, get_rosa_model

CONFIG = RosaConfig(rank=2, density=0.1, warmup_steps=3, collect_steps=2, dropout=0.1, target_modules="all-linear")
TOTAL_STEPS = 9
# Stopped after these many steps: in warm-up, right as collection starts, mid-collection, in the sparse phase.
STOPS = {"warmup": 1, "collect-start": 3, "collect": 4, "sparse": 7}


def build(config=CONFIG):
    """The run's setup, as a fresh process would do it: base model, wrapper, optimizer, scheduler."""
    torch.manual_seed(0)  # the "pretrained" base weights and the LoRA init
    base = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    model = get_rosa_model(base, config)
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "sparse" not in n]
    sparse = [p for n, p in model.named_parameters() if p.requires_grad and "sparse" in n]
    optimizer = torch.optim.AdamW([{"params": lora, "lr": 2e-2}, {"params": sparse, "lr": 1e-2}], weight_decay=0.01)
    return model, optimizer, model.scheduler(show_progress=False)


def batch(step):
    """A fixed data stream: the batch of a step depends on the step only."""
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 10, generator=gen)
    return x, torch.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2]


def train(model, optimizer, scheduler, start, stop):
    losses = []
    for step in range(start, stop):
        x, y = batch(step)
        loss = (model(x).squeeze(-1) - y).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


def final_state(model):
    return {name: (layer.row_offsets.clone(), layer.col_indices.clone(), layer.lora_A.detach().clone(),
                   layer.sparse_values.detach().clone()) for name, layer in model.rosa_layers().items()}


def uninterrupted(config=CONFIG):
    model, optimizer, scheduler = build(config)
    torch.manual_seed(123)  # the training stream (dropout seeds)
    losses = train(model, optimizer, scheduler, 0, TOTAL_STEPS)
    assert scheduler.phase == "sparse"
    return losses, final_state(model)


def assert_same_run(losses, state, expected_losses, expected_state, exact_masks=True):
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected_losses), rtol=1e-5, atol=1e-7)
    assert state.keys() == expected_state.keys()
    for name, (row_offsets, col_indices, lora_A, values) in state.items():
        assert torch.equal(row_offsets, expected_state[name][0]) and torch.equal(col_indices, expected_state[name][1])
        torch.testing.assert_close(lora_A, expected_state[name][2], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(values, expected_state[name][3], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stop", list(STOPS.values()), ids=list(STOPS))
def test_resume_from_a_checkpoint_continues_the_same_run(tmp_path, stop):
    expected_losses, expected_state = uninterrupted()
    model, optimizer, scheduler = build()
    torch.manual_seed(123)
    first = train(model, optimizer, scheduler, 0, stop)
    phase = scheduler.phase
    model.save_checkpoint(tmp_path / "checkpoint.pt", optimizer, scheduler)
    del model, optimizer, scheduler
    model, optimizer, scheduler = build()  # everything from scratch, as a new process would
    torch.manual_seed(999)  # whatever the new process' generator holds: the checkpoint restores it
    model.load_checkpoint(tmp_path / "checkpoint.pt", optimizer, scheduler)
    assert scheduler.steps == stop and scheduler.phase == phase
    rest = train(model, optimizer, scheduler, stop, TOTAL_STEPS)
    assert_same_run(first + rest, final_state(model), expected_losses, expected_state)
    assert set(scheduler.masks) == set(expected_state)


def test_collection_state_round_trips_through_the_layer():
    layer = RosaLinear(6, 4, rank=2, density=0.25)
    assert layer.collection_state_dict() == {}
    layer.start_collection("mean")
    layer(torch.randn(3, 6)).sum().backward()
    layer.finish_collection_step()
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in layer.collection_state_dict().items()}
    # One ended step: its gradient stays in pending (the statistic buffer waits for a second step).
    assert state["steps"] == 1 and state["rule"] == "mean" and state["pending"].abs().sum() > 0
    assert state["collect_buffer"] == "auto" and state["statistic"] is None
    fresh = RosaLinear(6, 4, rank=2, density=0.25)
    fresh.load_collection_state_dict(state)
    assert fresh.phase == "collect" and fresh.rule == "mean"
    assert torch.equal(fresh.statistic(), layer.statistic())
    for bad in ({**state, "statistic": torch.zeros(3, 3)}, {**state, "steps": -1}, {**state, "rule": "x"},
                {**state, "pending": state["pending"].float()}, {**state, "collect_buffer": "int8"},
                {**state, "pending_scale": None}, {"pending": state["pending"]}):
        other = RosaLinear(6, 4, rank=2, density=0.25)
        with pytest.raises(ValueError):
            other.load_collection_state_dict(bad)
        assert other.phase == "warmup" and other.collection_state_dict() == {}
    fresh.load_collection_state_dict({})
    assert fresh.phase == "warmup" and fresh.collection_state_dict() == {}
    layer.select_mask()
    with pytest.raises(ValueError, match="mask is already set"):
        layer.load_collection_state_dict(state)


def test_a_mismatched_checkpoint_changes_nothing(tmp_path):
    model, optimizer, scheduler = build()
    torch.manual_seed(123)
    train(model, optimizer, scheduler, 0, STOPS["collect"])
    model.save_checkpoint(tmp_path / "checkpoint.pt", optimizer, scheduler)
    for overrides, message in [({"warmup_steps": 4}, "warmup_steps"), ({"density": 0.2}, "density"),
                               ({"rank": 3}, "rank")]:
        other, other_optimizer, other_scheduler = build(RosaConfig(**{**CONFIG.to_dict(), **overrides}))
        before = {k: v.clone() for k, v in other.state_dict().items()}
        with pytest.raises(ValueError, match=message):
            other.load_checkpoint(tmp_path / "checkpoint.pt", other_optimizer, other_scheduler)
        assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
        assert other_scheduler.steps == 0 and other.scheduler().phase == "warmup"
        assert other_optimizer.state_dict()["state"] == {}
    # The model fits, the optimizer does not (one group instead of two).
    fresh, _, fresh_scheduler = build()
    one_group = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad])
    with pytest.raises(ValueError, match="parameter groups"):
        fresh.load_checkpoint(tmp_path / "checkpoint.pt", one_group, fresh_scheduler)
    assert all(layer.phase == "warmup" for layer in fresh.rosa_layers().values())


def test_a_damaged_checkpoint_is_a_clear_error(tmp_path):
    model, optimizer, scheduler = build()
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(FileNotFoundError, match="checkpoint.pt"):
        model.load_checkpoint(path, optimizer, scheduler)
    model.save_checkpoint(path, optimizer, scheduler)
    data = path.read_bytes()
    for damaged in (data[: len(data) // 2], b"garbage" * 10, b""):
        path.write_bytes(damaged)
        with pytest.raises(ValueError, match="checkpoint"):
            model.load_checkpoint(path, optimizer, scheduler)


def test_a_failed_checkpoint_save_leaves_the_previous_one(tmp_path, monkeypatch):
    model, optimizer, scheduler = build()
    path = tmp_path / "checkpoint.pt"
    model.save_checkpoint(path, optimizer, scheduler)
    before = path.read_bytes()
    train(model, optimizer, scheduler, 0, 2)
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as handle:
            handle.truncate(100)
        raise OSError("injected")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="injected"):
        model.save_checkpoint(path, optimizer, scheduler)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["checkpoint.pt"]


RESUME_SCRIPT = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import test_checkpoint as t
model, optimizer, scheduler = t.build()
model.load_checkpoint(sys.argv[2], optimizer, scheduler)
losses = t.train(model, optimizer, scheduler, int(sys.argv[3]), t.TOTAL_STEPS)
torch.save({"losses": losses, "state": t.final_state(model)}, sys.argv[4])
"""


def test_resume_in_a_new_process(tmp_path):
    expected_losses, expected_state = uninterrupted()
    stop = STOPS["collect"]
    model, optimizer, scheduler = build()
    torch.manual_seed(123)
    first = train(model, optimizer, scheduler, 0, stop)
    model.save_checkpoint(tmp_path / "checkpoint.pt", optimizer, scheduler)
    out = tmp_path / "resumed.pt"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    result = subprocess.run([sys.executable, "-c", RESUME_SCRIPT, os.path.dirname(__file__),
                             str(tmp_path / "checkpoint.pt"), str(stop), str(out)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    resumed = torch.load(out)
    assert_same_run(first + resumed["losses"], resumed["state"], expected_losses, expected_state)


@pytest.mark.parametrize("overrides", [{"reset_adapters_after_mask": True}, {"sparse_mode": "spmm", "rule": "mean"}],
                         ids=["restart-after-mask", "spmm-mean"])
def test_resume_mid_collection_with_other_options(tmp_path, overrides):
    config = RosaConfig(**{**CONFIG.to_dict(), **overrides})
    expected_losses, expected_state = uninterrupted(config)
    model, optimizer, scheduler = build(config)
    torch.manual_seed(123)
    first = train(model, optimizer, scheduler, 0, STOPS["collect"])
    model.save_checkpoint(tmp_path / "checkpoint.pt", optimizer, scheduler)
    model, optimizer, scheduler = build(config)
    model.load_checkpoint(tmp_path / "checkpoint.pt", optimizer, scheduler)
    rest = train(model, optimizer, scheduler, STOPS["collect"], TOTAL_STEPS)
    assert_same_run(first + rest, final_state(model), expected_losses, expected_state)


def per_rank_checkpoint_worker(rank, world, port, out):
    """2 gloo ranks, stopped mid-collection: each rank saves its own checkpoint file; each resumes from
    its own, and loading another rank's (or a one-process run loading one) is a clear error."""
    import torch.distributed as dist
    from test_model import gloo_group

    with gloo_group(rank, world, port):
        model, optimizer, scheduler = build()
        train(model, optimizer, scheduler, 0, STOPS["collect"])
        model.save_checkpoint(f"{out}.rank{rank}", optimizer, scheduler)
        dist.barrier()
        fresh, fresh_optimizer, fresh_scheduler = build()
        other = f"{out}.rank{1 - rank}"
        with pytest.raises(ValueError, match=f"rank {1 - rank} of 2, but this is rank {rank} of 2"):
            fresh.load_checkpoint(other, fresh_optimizer, fresh_scheduler)
        fresh.load_checkpoint(f"{out}.rank{rank}", fresh_optimizer, fresh_scheduler)
        assert {layer.phase for layer in fresh.rosa_layers().values()} == {"collect"}


def test_a_collection_checkpoint_resumes_on_its_own_rank_only(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp
    from test_model import free_port

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    out = str(tmp_path / "run.pt")
    mp.start_processes(per_rank_checkpoint_worker, args=(2, free_port(), out), nprocs=2, join=True,
                       start_method="spawn")
    model, optimizer, scheduler = build()
    with pytest.raises(ValueError, match="collection state of rank 0 of 2, but this is one process"):
        model.load_checkpoint(out + ".rank0", optimizer, scheduler)
