"""The benchmark harness still runs: every alternative computes what our op computes, and the
report runs end to end on a tiny CPU configuration (bench/report.py, bench/common.py)."""

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
pytest.importorskip("scipy")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common, report  # noqa: E402


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mask", ["uniform", "rosa"])
def test_alternatives_agree_with_ours(mask, dtype):
    tolerance = 1e-3 if dtype == "float32" else 5e-2
    for case in common.op_cases(common.OPS, [(67, 45, 19)], [0.08], [mask], [dtype], "cpu"):
        prepared = common.prepare(case)
        assert common.OURS in prepared.calls, prepared.unavailable
        differences = common.check_prepared(prepared, rtol=tolerance, atol=tolerance)
        assert {"torch.sparse", "dense"} <= set(differences), (case.id, prepared.unavailable)


def test_report_runs_on_a_tiny_configuration(tmp_path, capsys):
    results = report.main(["--device", "cpu", "--quick", "--out", str(tmp_path), "--shapes", "96x80x24",
                           "--densities", "0.05", "--budget", "0.001"])
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert len(saved["ops"]) == 2 * len(common.OPS)  # two mask kinds
    for record in saved["ops"]:
        assert common.OURS in record["times"], record
        assert record["floor_s"] > 0
    assert saved["ceilings"]["bandwidth"] > 0
    assert {"lora", "full"} <= set(saved["layers"][0]["times"])
    table = capsys.readouterr().out
    assert "| spmm | 96x80x24 | 0.05 | uniform | float32 |" in table
    assert "× best" in table and "floor frac" in table
    assert results["ops"][0]["op"] == "spmm"
