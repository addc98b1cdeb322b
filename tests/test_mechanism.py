"""RoSA's mechanism on a planted low-rank + sparse update (issue 12's targets), small enough for CI.

Setup (:func:`rosa_kernels.mechanism.planted_update_experiment` defaults): one residual MLP block
(Linear(128, 256) -> GELU -> Linear(256, 128)), inputs with per-channel scales exp(0.75 N(0, 1));
the teacher adds L* (rank 2, RMS entry 0.01) + S* (200 entries per layer, |S*| ~ 0.1 U(0.5, 1.5)) to
both layers; arms at 3072 trainable parameters (LoRA rank 4 = RoSA rank 2 + 2.3% density = SpA
4.7% density), 32 warm-up + 1 Fisher step, restart, 200 steps (LoRA: 233 steps), batch 256, Adam at
learning rates chosen per arm on a seed the test does not use. 3 seeds.
"""

import statistics

import pytest
import torch

from rosa_kernels.mechanism import planted_update_experiment, summarize


@pytest.fixture
def one_thread():
    # The matrices are small: one thread is faster than several fighting over a shared CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_rosa_finds_and_learns_the_planted_sparse_update(one_thread):
    results = planted_update_experiment(seeds=(0, 1, 2))
    print("\n" + summarize(results))
    lora, rosa, spa, random = (results[arm] for arm in ("lora", "rosa", "spa", "rosa_random"))
    assert len({r["trainable"] for r in results.values()}) == 1, "arms must have equal trainable parameters"
    for seed, (l, r, s, rr) in enumerate(zip(lora["loss"], rosa["loss"], spa["loss"], random["loss"])):
        assert r <= 0.5 * l, f"seed {seed}: RoSA's loss {r:.4f} is not <= 0.5x LoRA's {l:.4f}"
        assert r < s, f"seed {seed}: RoSA's loss {r:.4f} is not below SpA's {s:.4f}"
        assert r < rr, f"seed {seed}: the Fisher mask's loss {r:.4f} is not below the random mask's {rr:.4f}"
    for seed, (recall, density) in enumerate(zip(rosa["recall"], rosa["density"])):
        assert recall >= 10 * density, f"seed {seed}: Fisher mask recall {recall:.3f} < 10x density {density:.4f}"
    # A random mask finds S* at chance: its recall is about its density.
    assert statistics.mean(random["recall"]) <= 3 * statistics.mean(random["density"])


def test_the_demo_chooses_each_arms_learning_rate_on_a_seed_of_its_own():
    from rosa_kernels.demo import choose_mechanism_lrs
    from rosa_kernels.mechanism import DEFAULT_LRS

    calls = []

    def experiment(*, seeds, lrs):  # held-out loss: lowest at scale 0.25 for lora, at 1 for the others, NaN at 4
        calls.append(seeds)
        scale = lrs["rosa"][0] / DEFAULT_LRS["rosa"][0]
        loss = {"lora": abs(scale - 0.25)}
        return {arm: {"loss": [float("nan") if scale == 4 else loss.get(arm, abs(scale - 1))]} for arm in DEFAULT_LRS}

    lrs, choice = choose_mechanism_lrs(experiment, [4.0, 1.0, 0.25])
    assert calls == [(100,)] * 3, "the choice must run on seed 100 only"
    assert lrs["lora"] == tuple(0.25 * v for v in DEFAULT_LRS["lora"]) and choice["lora"][0] == 0.25
    for arm in ("rosa", "spa", "rosa_random"):
        assert lrs[arm] == DEFAULT_LRS[arm] and choice[arm][0] == 1.0, arm
    lrs, choice = choose_mechanism_lrs(experiment, [0.5])  # one scale: no choice, no runs
    assert choice == {} and lrs["rosa"] == tuple(0.5 * v for v in DEFAULT_LRS["rosa"]) and len(calls) == 3
