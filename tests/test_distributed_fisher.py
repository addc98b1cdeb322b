"""The Fisher rule under torch.distributed (2 gloo CPU processes, DDP): with one collection step
(RoSA's recipe) every rank selects the mask of one process training on the whole global batch —
the square of the rank-averaged gradient, not the mean of per-rank squares."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from rosa_kernels import RosaConfig, apply_rosa
from test_model import Net, free_port, gloo_group, mask_tensors, run_training

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def fisher_config(collect_buffer):
    return RosaConfig(rank=2, density=0.1, warmup_steps=2, collect_steps=1, dropout=0.0, rule="fisher",
                      collect_buffer=collect_buffer)


def worker(rank, world, port, out, collect_buffer):
    with gloo_group(rank, world, port):
        torch.manual_seed(0)
        net = Net()
        apply_rosa(net, fisher_config(collect_buffer))
        run_training(world, rank, nn.parallel.DistributedDataParallel(net), config=fisher_config(collect_buffer),
                     steps=4)
        torch.save(mask_tensors(net), f"{out}.{rank}")


@pytest.mark.parametrize("collect_buffer", ["float32", "float16"])
def test_fisher_masks_under_ddp_equal_the_single_process_ones(tmp_path, collect_buffer):
    out = str(tmp_path / "masks")
    mp.start_processes(worker, args=(2, free_port(), out, collect_buffer), nprocs=2, join=True, start_method="spawn")
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    torch.manual_seed(0)
    net = Net()
    apply_rosa(net, fisher_config(collect_buffer))
    run_training(1, 0, net, config=fisher_config(collect_buffer), steps=4)
    single = mask_tensors(net)
    for key, value in single.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        assert torch.equal(ranks[0][key], value), key
