"""bench/host_overhead.py runs end to end on a tiny CPU configuration (its numbers are not checked:
they are the benchmark's job)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import host_overhead  # noqa: E402


def test_host_overhead_runs_on_a_tiny_configuration(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        out = host_overhead.main(["--shape", "16,4", "--rounds", "3", "--layers", "3",
                                  "--select-layers", "2", "--select-shape", "8,12,0.1",
                                  "--json", str(tmp_path / "host.json")])
    finally:
        torch.set_num_threads(threads)
    layers = out["layers"]
    assert layers["nn.Linear (full)"]["x full"] == 1.0
    assert {"LoRA (PEFT-style)", "RosaLinear merged", "RosaLinear warm-up (no mask)"} <= set(layers)
    assert all(row["us"] > 0 and row["ops"] > 0 for row in layers.values())
    assert set(out["scatter"]) == {"changed", "unchanged"}
    assert "sddmm" in out["ops"]
    assert out["selection"]["layers"] == 2 and out["selection"]["ops per layer"] > 0
    assert "| RosaLinear merged |" in capsys.readouterr().out
    assert (tmp_path / "host.json").exists()
