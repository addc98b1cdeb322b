"""bench/multi_gpu.py (issue 15) as a CPU dry run: the tiny Llama through RoSA's whole life cycle and
PEFT LoRA, under DDP and FSDP2 on 2 gloo processes and in one process on the same global batch; the
comparison must find the same masks on every rank and in the single process, and the same losses."""

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from test_model import free_port, gloo_group

pytest.importorskip("transformers")
pytest.importorskip("peft")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import multi_gpu  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available() or multi_gpu._fully_shard() is None,
                                reason="needs torch.distributed with gloo and FSDP2 (fully_shard)")

# Few steps, so that spawning two processes (each importing transformers and peft) dominates: 2
# warm-up steps, the collection step, then 5 sparse steps, on a learning rate that moves the loss.
SETTINGS = multi_gpu.Settings(shape="tiny", seq=8, global_batch=2, shares=2, steps=8, warmup_steps=2,
                              lr=1e-3, device="cpu", dtype="float32")


def worker(rank, world, port, out, masks):
    with gloo_group(rank, world, port):
        multi_gpu.run_all(dataclasses.replace(SETTINGS, masks_dir=masks), ["ddp", "fsdp2"],
                          ["rosa", "lora"], ["float32"], Path(out), log=lambda message: None)


def test_two_gloo_processes_match_one_process(tmp_path):
    out, masks = tmp_path / "results", tmp_path / "masks"
    mp.start_processes(worker, args=(2, free_port(), str(out), str(masks)), nprocs=2, join=True,
                       start_method="spawn")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers
    try:
        multi_gpu.run_all(dataclasses.replace(SETTINGS, masks_dir=str(masks)), ["none"], ["rosa", "lora"],
                          ["float32"], out, log=lambda message: None)
    finally:
        torch.set_num_threads(threads)
    results = multi_gpu.load_results(out)
    assert sorted(r["name"] for r in results) == sorted(
        f"{method}-{wrap}-x{world}" for method in ("rosa-float32", "lora")
        for wrap, world in (("none", 1), ("ddp", 2), ("fsdp2", 2)))
    table, rows = multi_gpu.compare(results, masks)
    assert all(row["status"] == "ok" for row in rows), table
    for row in rows:
        assert row["max_loss_diff"] < 1e-5, table
        if row["method"].startswith("RoSA"):
            assert row["masks_equal_across_ranks"] and row["masks_equal_single"], table
            # float32: 4 bytes per weight; FSDP2 shards the statistic's rows over the 2 ranks
            per_weight = 2.0 if row["wrap"] == "fsdp2" else 4.0
            assert row["collect_ms"] is not None and row["statistic_bytes_per_weight"] == pytest.approx(per_weight,
                                                                                                        rel=0.05)
    by_name = {r["name"]: r for r in results}
    reference = by_name["rosa-float32-none-x1"]
    assert reference["phases"] == ["warmup"] * 2 + ["collect"] + ["sparse"] * 5 and reference["mask_step"] == 2
    assert reference["losses"][-1] < reference["losses"][0] - 1e-3  # the match is of losses that move
    assert by_name["rosa-float32-fsdp2-x2"]["sparse_modes"] == ["spmm"]  # sharded W: S by SpMM
    assert by_name["rosa-float32-ddp-x2"]["sparse_modes"] == ["merged"]
    ranks = by_name["rosa-float32-fsdp2-x2"]["ranks"]
    assert len(ranks) == 2 and ranks[0]["mask_digests"] == reference["ranks"][0]["mask_digests"]
    assert table.splitlines()[-1].startswith("step ms:") and "| fsdp2 | 2 | RoSA (float32) |" in table


def test_bad_settings_raise_clear_errors():
    with pytest.raises(ValueError, match="multiple of shares"):
        dataclasses.replace(SETTINGS, global_batch=3).validate(1)
    with pytest.raises(ValueError, match="multiple of the world size"):
        dataclasses.replace(SETTINGS, shares=3, global_batch=3).validate(2)
    with pytest.raises(ValueError, match="needs a process group"):
        dataclasses.replace(SETTINGS, wrap="ddp").validate(1)
    with pytest.raises(ValueError, match="warmup_steps"):
        dataclasses.replace(SETTINGS, warmup_steps=9).validate(1)
    with pytest.raises(ValueError, match="collect_buffer"):
        dataclasses.replace(SETTINGS, collect_buffer="float8").validate(1)
    with pytest.raises(SystemExit):
        multi_gpu.main(["--wrap", "ddp,zero3", "--out", "x"])
    with pytest.raises(SystemExit):
        multi_gpu.main(["--wrap", "ddp"])  # no --out
