"""pytest-benchmark: one training step of a whole HF LlamaForCausalLM (bench/model_step.py).

One group per model shape and tokens per step (``model-step-{shape}-{tokens}``), parametrized over
the method: full fine-tuning, PEFT LoRA, RoSA in the sparse phase (with the masks it collects, and
with masks of the ``rosa`` recipe: ``rosa-structured``) and RoSA's LoRA-only warm-up
steps (the one-shot steps of RoSA's life cycle and the compiled rows are in
``python bench/report.py --model``). CPU set: a tiny Llama (float32, 32 tokens); ``--gpu-sweep``:
the LLaMA-7B slice and the TinyLlama shape at 2048 and 8192 tokens, bf16. Needs the ``bench`` extra
(transformers, peft); without it every case skips and says so.
"""

import pytest
import torch

from bench import common, model_step

METHODS = ("full", "lora", "rosa", "rosa-structured", "rosa-warmup")


def pytest_generate_tests(metafunc):
    if "model_case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    gpu = config.getoption("--gpu-sweep") or (config.getoption("markexpr", "") or "").strip() == "gpu_sweep"
    cases = model_step.gpu_cases() if gpu else model_step.cpu_cases()
    marker = pytest.mark.gpu_sweep if gpu else pytest.mark.cpu_set
    metafunc.parametrize("model_case, method", [
        pytest.param(case, method, id=f"{case.id}-{method}", marks=[marker, pytest.mark.benchmark(group=case.group)])
        for case in cases for method in METHODS
    ])


def _trainer(case, method):
    model = model_step.build_model(case)
    if method == "rosa-warmup":
        model, scheduler = model_step.wrap(model, "rosa", warmup_steps=10**9)  # stays in the warm-up
    elif method == "rosa":
        model, scheduler = model_step.wrap(model, "rosa", warmup_steps=1, collect_steps=1)
    elif method == "rosa-structured":  # the sparse phase with masks of the rosa recipe
        model, _ = model_step.wrap(model, "rosa", warmup_steps=10**9)
        scheduler = None
    else:
        model, scheduler = model_step.wrap(model, method)
    weights = model_step.weights_bytes(model, torch.device(case.device))
    if method == "rosa-structured":
        model.set_masks(model_step.structured_masks(model))
        assert {layer.phase for layer in model.rosa_layers().values()} == {"sparse"}
    trainer = model_step.Trainer(model, case, scheduler)
    if method == "rosa":
        trainer.step()  # warm-up, which starts the collection
        trainer.step()  # collection, which selects the masks
        assert scheduler.phase == "sparse", scheduler.phase
    return trainer, weights


def test_model_step(benchmark, bench_device, model_case, method):
    reason = model_step.missing_requirements([method])
    if reason:
        pytest.skip(reason)
    if torch.device(model_case.device).type != bench_device.type:
        pytest.skip(f"{model_case.device} case in a {bench_device.type} run")
    trainer, weights = _trainer(model_case, method)
    try:
        record = model_step.measure_steps(trainer, 1, track_memory_on_cpu=True)[0]  # also the first warm-up step
        step = common.synchronized(trainer.step, model_case.device)
        rounds = 1
        if benchmark.enabled:
            step()
            rounds = 5 if bench_device.type == "cuda" else 10
        benchmark.pedantic(step, rounds=rounds, warmup_rounds=1 if benchmark.enabled else 0, iterations=1)
        info = benchmark.extra_info
        info.update(method=method, model=model_step.SHAPES[model_case.shape].name, tokens=model_case.tokens,
                    weights_bytes=weights, peak_bytes=record.get("peak"),
                    above_weights_bytes=None if record.get("peak") is None else record["peak"] - weights,
                    host_ms_first_step=record["host"] * 1e3)
        info.update(model_step.environment(bench_device))
    finally:
        del trainer
        if bench_device.type == "cuda":
            torch.cuda.empty_cache()
