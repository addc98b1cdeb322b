"""The benchmark harness still runs: every alternative computes what our op computes, and the
report runs end to end on a tiny CPU configuration (bench/report.py, bench/common.py)."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

import rosa_kernels

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
pytest.importorskip("scipy")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common, report  # noqa: E402


@pytest.fixture(autouse=True)
def keep_torch_threads():
    # The report and its tools set torch's thread count (--threads, one thread for tiny ops on a busy
    # 2-core machine); every test here leaves it as it found it.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


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
    # One thread: on a busy 2-core CI machine, tiny multi-threaded ops wait for descheduled workers.
    results = report.main(["--device", "cpu", "--quick", "--out", str(tmp_path), "--shapes", "96x80x24",
                           "--densities", "0.05", "--budget", "0.001", "--threads", "1", "--no-plot"])
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


class _ContractRosaLinear(torch.nn.Module):
    """A stand-in with RosaLinear's constructor and set_mask (API_CONTRACTS.md), so the layer-step
    harness is exercised before (or without) the real class: y = base(x) + LoRA(x) + x S^T."""

    def __init__(self, in_features, out_features, bias=True, *, rank=16, density=0.006, alpha=16.0,
                 dropout=0.05, device=None, dtype=None):
        super().__init__()
        self.lora = common.LoraLinear(in_features, out_features, rank=rank, alpha=alpha, dropout=dropout,
                                      bias=bias, device=device, dtype=dtype)
        self.out_features = out_features
        self.phase = "warmup"

    def set_mask(self, mask):
        assert isinstance(mask, rosa_kernels.CSR) and mask.shape == (self.out_features, self.lora.base.in_features)
        self.register_buffer("row_offsets", mask.row_offsets)
        self.register_buffer("row_indices", mask.row_indices)
        self.register_buffer("col_indices", mask.col_indices)
        self.sparse_values = torch.nn.Parameter(torch.zeros(mask.nnz, dtype=self.lora.base.weight.dtype))
        self.phase = "sparse"

    def forward(self, x):
        sparse = rosa_kernels.spmm(self.sparse_values, self.row_offsets, self.row_indices, self.col_indices,
                                   x.t().contiguous(), self.out_features)
        return self.lora(x) + sparse.t()


def test_layer_step_harness_with_a_contract_layer(monkeypatch):
    monkeypatch.setattr(rosa_kernels, "RosaLinear", _ContractRosaLinear, raising=False)
    case = common.LayerCase(48, 40, 16, 0.05, "rosa", "float32", "cpu")
    prepared = common.prepare_layer(case)
    assert set(prepared.calls) == set(common.LAYER_IMPLEMENTATIONS), prepared.unavailable
    layer = common.make_layer(common.OURS, case)
    assert layer.phase == "sparse" and bool(layer.sparse_values.abs().sum() > 0)
    for call in prepared.calls.values():
        call()


# ----------------------------------------------------------------------------------------------
# The model training step (bench/model_step.py, report.py --model)
# ----------------------------------------------------------------------------------------------

from bench import model_step  # noqa: E402


def _fake_row(model, tokens, method, ms, peak, status="ok"):
    if status != "ok":
        return {"model": model, "tokens": tokens, "method": method, "status": status}
    return {"model": model, "tokens": tokens, "method": method, "status": "ok", "gpu_ms": ms, "host_ms": ms / 2,
            "peak_bytes": peak + (1 << 30), "above_weights_bytes": peak, "weights_bytes": 1 << 30, "note": ""}


def test_model_tables_have_every_row():
    rows = []
    for tokens in (2048, 8192):
        for i, method in enumerate(model_step.ALL_METHODS):
            status = "RuntimeError: These storage data ptrs are not allocated in pool" if method == "rosa+compile" else "ok"
            rows.append(_fake_row("LLaMA-7B slice", tokens, method, 10.0 + i, (i + 1) << 28, status))
    results = {"date": "now", "environment": {"device": "H100", "cpu": "some CPU"}, "step": "a step",
               "timing": "events", "options": {"warmup": 3, "timed": 5, "phase_timed": 3}, "rows": rows}
    table = report.model_tables(results)
    # issue 11's row: full 10, LoRA 11, RoSA 12 ms -> RoSA / LoRA 1.09, RoSA / full 1.20; memory 3/2 GiB/4
    assert "| LLaMA-7B slice, 2048 | 10 | 11 | 12 | 1.09 | 1.20 |" in table
    assert "| LLaMA-7B slice, 8192 | 10 | 11 | 12 | 1.09 | 1.20 |" in table
    assert "0.25 / 0.5 / 0.75" in table and "| 1.50 |" in table  # GiB above the weights, RoSA / LoRA memory
    # RoSA with the rosa recipe's masks: 13 ms, / LoRA 1.18, / full 1.30
    assert "| 13 (1.18, 1.30) |" in table
    for method in (*model_step.PHASES, "rosa"):
        assert table.count(f"| {model_step.METHOD_NAMES[method]} |") == 2, method
    assert "failed: RuntimeError: These storage data ptrs are not allocated in pool" in table
    assert "CPU: some CPU" in table
    # the 4-bit base: QLoRA 22, QRoSA 23 (csr_add) and 24 ms (spmm)
    assert "| LLaMA-7B slice, 2048 | 22 | 23 | 24 | 1.05 / 1.09 |" in table
    summary = report.model_summary(results)
    assert "not ok: LLaMA-7B slice, 2048, rosa+compile" in summary and summary.count("\n") == 6
    assert summary.splitlines()[1].endswith("| 13 (1.30)")
    assert "LLaMA-7B slice, 8192, 4-bit base | QLoRA 22 | QRoSA csr_add / spmm 23 / 24 | QRoSA/QLoRA 1.05 / 1.09" in summary


def test_model_step_skips_without_the_bench_extra(monkeypatch):
    monkeypatch.setattr(model_step, "missing_requirements", lambda methods: "needs peft: " + model_step.BENCH_EXTRA)
    rows = model_step.run_case(model_step.cpu_cases()[0], ("full", "lora"))
    assert [r["method"] for r in rows] == ["full", "lora"]
    assert all(r["status"].startswith("skipped") and "rosa_kernels[bench]" in r["status"] for r in rows)


def test_model_step_4bit_methods_skip_without_bitsandbytes(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now fails
    assert not set(model_step.QUANTIZED) & set(model_step.default_methods())
    rows = model_step.run_case(model_step.cpu_cases()[0], model_step.QUANTIZED)
    assert [r["method"] for r in rows] == list(model_step.QUANTIZED)
    assert all(r["status"].startswith("skipped") and "rosa_kernels[qrosa]" in r["status"] for r in rows)


def test_model_step_without_peft_still_runs_full_and_rosa(monkeypatch):
    pytest.importorskip("transformers", reason=f"the model benchmark needs transformers: {model_step.BENCH_EXTRA}")
    real = model_step.missing_requirements
    monkeypatch.setattr(model_step, "missing_requirements",
                        lambda methods: "no peft" if any(m.startswith("lora") for m in methods) else real(methods))
    options = model_step.Options(warmup=1, timed=1, phase_timed=1)
    rows = model_step.run_case(model_step.cpu_cases()[0], ("full", "lora", "rosa"), options)
    assert {r["method"]: r["status"] for r in rows} == {"full": "ok", "lora": "skipped: no peft", "rosa": "ok"}


def test_model_step_report_runs_every_method_on_cpu(tmp_path, capsys):
    pytest.importorskip("transformers", reason=f"the model benchmark needs transformers: {model_step.BENCH_EXTRA}")
    pytest.importorskip("peft", reason=f"the model benchmark needs peft: {model_step.BENCH_EXTRA}")
    report.main(["--model", "--device", "cpu", "--out", str(tmp_path), "--threads", "1",
                 "--model-steps", "1,2,1"])
    saved = json.loads((tmp_path / "model_step.json").read_text())
    rows = {r["method"]: r for r in saved["rows"]}
    # no CUDA graphs on the CPU; QLoRA and QRoSA where bitsandbytes imports
    assert set(rows) == set(model_step.METHODS + model_step.STRUCTURED + model_step.PHASES) | (
        set(model_step.QUANTIZED) & set(model_step.default_methods()))
    for method, row in rows.items():
        assert row["status"] == "ok", (method, row["status"])
        assert row["gpu_ms"] > 0 and row["host_ms"] > 0
        assert row["peak_bytes"] > row["weights_bytes"] > 0 and row["above_weights_bytes"] > 0, method
    assert rows["rosa"]["phase"] == "sparse" and rows["rosa-warmup"]["phase"] == "warmup"
    assert rows["rosa-structured"]["phase"] == "sparse"
    assert all(rows[m]["phase"] == "sparse" for m in ("qrosa", "qrosa-spmm") if m in rows)
    assert rows["rosa-collect-8"]["micro_batches"] == 8
    # full fine-tuning keeps gradients and AdamW state of every weight: above LoRA's and RoSA's
    assert rows["full"]["above_weights_bytes"] > rows["lora"]["above_weights_bytes"]
    assert rows["full"]["above_weights_bytes"] > rows["rosa"]["above_weights_bytes"]
    table = capsys.readouterr().out
    assert "| tiny (CPU), 32 |" in table and (tmp_path / "model_step.md").read_text() in table
    for method in (*model_step.PHASES, "rosa"):
        assert f"| {model_step.METHOD_NAMES[method]} |" in table


def test_report_runs_the_in_depth_tools(capsys):
    # The former scripts/profile_layer_step.py and scripts/time_host_overhead.py, now options of the report.
    report.main(["--profile-layer", "--shape", "48x40x16", "--density", "0.05", "--device", "cpu",
                 "--reps", "2"])
    # (its mask-selection rows: tests/test_bench_host_overhead.py)
    report.main(["--host-overhead", "--shape", "16,4", "--rounds", "3", "--layers", "2", "--select-layers", "0"])
    out = capsys.readouterr().out
    assert "48x40x16" in out and "lora" in out and "full" in out
    assert "| RosaLinear merged |" in out and "| nn.Linear (full) |" in out


def test_profile_collect_runs_on_the_tiny_model(capsys):
    pytest.importorskip("transformers", reason="the collection profile builds the benchmark's HF Llama model")
    result = report.main(["--profile-collect", "--device", "cpu", "--models", "1", "--top", "3"])
    out = capsys.readouterr().out
    collection = result["results"][0]["collection"]
    assert set(collection) == {"forward+backward", "optimizer", "scheduler.step", "step"}
    assert "model 1:" in out and "stage select: select_masks_of (all)" in out
    assert "stage collect: GradientCollector.add" in out


def test_profile_step_runs_on_the_tiny_model(capsys):
    pytest.importorskip("transformers", reason="the step profile builds the benchmark's HF Llama model")
    from bench import profile_step

    result = report.main(["--profile-step", "--device", "cpu", "--methods", "full,rosa-warmup,rosa", "--top", "2"])
    out = capsys.readouterr().out
    assert set(result["classes"]) == {"full", "rosa-warmup", "rosa"}
    for classes in result["classes"].values():
        assert classes["matrix products"] > 0
    assert "| matrix products |" in out and "## rosa:" in out
    assert profile_step.kernel_class("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matrix products"
    assert profile_step.kernel_class("void rosa_kernels::sddmm_kernel<bf16>") == "rosa_kernels"
    assert profile_step.kernel_class("flash_bwd_kernel") == "attention"
    assert profile_step.kernel_class("void at::native::multi_tensor_apply_kernel<Adam>") == "optimizer"
    assert profile_step.kernel_class("void at::native::vectorized_elementwise_kernel<4, add>") == profile_step.OTHER


def test_profile_dropout_runs_and_compares_both_forms(capsys):
    rows = report.main(["--profile-dropout", "--device", "cpu", "--shapes", "40x24,0x8", "--rank", "4",
                        "--dtype", "float32", "--repeats", "2"])
    out = capsys.readouterr().out
    assert [row["op"] for row in rows] == ["project", "addmm_", "grad_A"] * 2
    assert all(row["relative_difference"] < 1e-5 for row in rows)  # the same math on the CPU
    assert "| grad_A | 40 x 24 |" in out and os.environ.get("ROSA_KERNELS_FUSED_DROPOUT") is None


def test_collect_memory_runs_on_a_tiny_configuration(capsys):
    from bench import collect_memory

    torch.set_num_threads(1)
    rows = collect_memory.main(["--tiny", "--device", "cpu", "--model", "stack", "--micro-batches", "1", "2",
                                "--buffers", "auto", "one_pass", "float32"])
    labels = [row[0] for row in rows]
    assert any(label.startswith("collection 'one_pass', 1 micro") for label in labels)
    assert not any(label.startswith("collection 'one_pass', 2 micro") for label in labels)
    # One backward pass: auto and one_pass take the same exact top-k, the float32 path's mask up to
    # ties of its float32 squares (these layers keep ~25 entries: one swap is 4%).
    one_pass = {row[0].split(",")[0]: row[3] for row in rows if row[0].startswith("collection") and "1 micro" in row[0]}
    assert one_pass["collection 'auto'"] == one_pass["collection 'one_pass'"]
    assert min(one_pass["collection 'auto'"]) >= 0.95
    assert "| sparse step, 2 micro |" in capsys.readouterr().out
