"""bench/host_overhead.py runs end to end on a tiny CPU configuration (its numbers are not checked:
they are the benchmark's job)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import host_overhead  # noqa: E402


@pytest.fixture(autouse=True)
def keep_torch_threads():
    # host_overhead.main sets torch's thread count (--threads, default 1): put it back after each test.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_host_overhead_runs_on_a_tiny_configuration(tmp_path, capsys):
    out = host_overhead.main(["--shape", "16,4", "--rounds", "3", "--layers", "3",
                              "--select-layers", "2", "--select-shape", "8,12,0.1",
                              "--json", str(tmp_path / "host.json")])
    layers = out["layers"]
    assert layers["nn.Linear (full)"]["x full"] == 1.0
    assert {"LoRA (PEFT-style)", "RosaLinear merged", "RosaLinear warm-up (no mask)"} <= set(layers)
    assert all(row["us"] > 0 and row["ops"] > 0 for row in layers.values())
    assert set(out["scatter"]) == {"changed", "unchanged"}
    assert "sddmm" in out["ops"]
    assert out["selection"]["layers"] == 2 and out["selection"]["ops per layer"] > 0
    assert "| RosaLinear merged |" in capsys.readouterr().out
    assert (tmp_path / "host.json").exists()


def test_selection_as_on_a_gpu_leaves_the_plans_cost_model_as_it_was():
    import rosa_kernels.plan

    before = rosa_kernels.plan._MODELLED_DEVICE_TYPES
    out = host_overhead.main(["--shape", "16,4", "--rounds", "1", "--layers", "0", "--skip-ops",
                              "--select-layers", "2", "--select-shape", "8,12,0.1", "--select-as-gpu"])
    assert out["selection"]["ops per layer"] > 0
    assert rosa_kernels.plan._MODELLED_DEVICE_TYPES == before == ("cuda",)
