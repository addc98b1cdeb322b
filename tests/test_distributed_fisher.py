"""The Fisher rule under torch.distributed (2 gloo CPU processes, DDP): with one collection step
(RoSA's recipe) every rank selects the mask of one process training on the whole global batch —
the square of the rank-averaged gradient, not the mean of per-rank squares."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from rosa_kernels import RosaConfig, RosaScheduler, apply_rosa
from test_model import Net, data, free_port, rosa_layers_of

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def fisher_config(collect_buffer):
    return RosaConfig(rank=2, density=0.1, warmup_steps=2, collect_steps=1, dropout=0.0, rule="fisher",
                      collect_buffer=collect_buffer)


def train(world, rank, model, net, collect_buffer, steps=4):
    x, y = data(7, n=64)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2, weight_decay=0.0)
    scheduler = RosaScheduler(net, fisher_config(collect_buffer), show_progress=False)
    for step in range(steps):
        i = (step * 32) % 64
        per = 32 // world
        xb, yb = x[i + rank * per:i + (rank + 1) * per], y[i + rank * per:i + (rank + 1) * per]
        loss = (model(xb) - yb).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def masks_of(net):
    return {f"{name}.{key}": getattr(layer, key).clone() for name, layer in rosa_layers_of(net).items()
            for key in ("row_offsets", "col_indices")}


def worker(rank, world, port, out, collect_buffer):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        net = Net()
        apply_rosa(net, fisher_config(collect_buffer))
        train(world, rank, nn.parallel.DistributedDataParallel(net), net, collect_buffer)
        torch.save(masks_of(net), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("collect_buffer", ["float32", "float16"])
def test_fisher_masks_under_ddp_equal_the_single_process_ones(tmp_path, collect_buffer):
    out = str(tmp_path / "masks")
    mp.start_processes(worker, args=(2, free_port(), out, collect_buffer), nprocs=2, join=True, start_method="spawn")
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    torch.manual_seed(0)
    net = Net()
    apply_rosa(net, fisher_config(collect_buffer))
    train(1, 0, net, net, collect_buffer)
    single = masks_of(net)
    for key, value in single.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        assert torch.equal(ranks[0][key], value), key
