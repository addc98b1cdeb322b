"""FSDP2 (``fully_shard``) with 2 CPU processes (gloo) through RoSA's whole life cycle: warm-up,
collection (the statistic reduced over the ranks as under DDP), mask broadcast, sparse phase (the
merged mode switches to "spmm", since FSDP2 shards the frozen weight), and save_pretrained of the
sharded model, whose adapter loads into an unsharded model and gives the same outputs."""

import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rosa_kernels import RosaConfig, RosaModel, apply_rosa
from test_model import Net, data, ddp_config, free_port, gloo_group, mask_tensors, rosa_layers_of, run_training

try:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
except ImportError:  # older torch
    fully_shard = None

pytestmark = pytest.mark.skipif(fully_shard is None or not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo and FSDP2 (fully_shard)")


def shard(net):
    """FSDP2 as users apply it: every RosaLinear, then the whole model. The mesh is named a CPU one:
    without it, fully_shard takes the CUDA device where a GPU is visible, and these gloo processes
    keep their model and data on the CPU."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in rosa_layers_of(net).values():
        fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)


def fsdp2_worker(rank, world, port, out):
    with gloo_group(rank, world, port):
        torch.manual_seed(0)
        model = RosaModel(Net(), ddp_config())
        net = model.base_model
        shard(net)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            losses = run_training(world, rank, net)
        mean_losses = torch.stack(losses)
        dist.all_reduce(mean_losses)
        modes = {name: layer.sparse_mode for name, layer in rosa_layers_of(net).items()}
        masks = mask_tensors(net)
        model.save_pretrained(out + ".adapter")  # gathers the shards; rank 0 writes
        x, _ = data(11, n=8)
        outputs = net(x).detach()
        if rank == 0:
            torch.save({"losses": (mean_losses / world).tolist(), "modes": modes, "masks": masks,
                        "outputs": outputs, "x": x,
                        "notices": [str(w.message) for w in caught if "sharded" in str(w.message)]}, out)
        else:
            torch.save({"masks": masks}, f"{out}.{rank}")


def test_fsdp2_two_cpu_processes_match_single_process(tmp_path):
    out = str(tmp_path / "fsdp2.pt")
    mp.start_processes(fsdp2_worker, args=(2, free_port(), out), nprocs=2, join=True, start_method="spawn")
    result, other = torch.load(out), torch.load(f"{out}.1")
    torch.manual_seed(0)
    net = Net()
    apply_rosa(net, ddp_config())
    losses = [loss.item() for loss in run_training(1, 0, net)]
    assert result["losses"][-1] < 0.7 * result["losses"][0]
    assert losses == pytest.approx(result["losses"], rel=1e-4, abs=1e-5)
    # every rank holds the single-process masks
    single = net.state_dict()
    for key, value in result["masks"].items():
        assert torch.equal(value, single[key]) and torch.equal(value, other["masks"][key]), key
    assert set(result["modes"].values()) == {"spmm"} and len(result["notices"]) >= 1
    # the adapter saved from the sharded model loads into a fresh, unsharded one: the same outputs
    torch.manual_seed(0)
    fresh = Net()
    loaded = RosaModel.from_pretrained(fresh, out + ".adapter")
    assert all(layer.phase == "sparse" for layer in rosa_layers_of(fresh).values())
    torch.testing.assert_close(loaded(result["x"]).detach(), result["outputs"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net(result["x"]).detach(), result["outputs"], rtol=1e-4, atol=1e-5)


def merged_then_sharded_worker(rank, world, port, out):
    """Masks set (and merged into W) before fully_shard: the first optimizer step puts W back in each
    rank's shard and switches to spmm; training then matches one process that keeps merging."""
    with gloo_group(rank, world, port):
        net = sparse_net()
        shard(net)
        losses = sparse_training(world, rank, net)
        mean_losses = torch.stack(losses)
        dist.all_reduce(mean_losses)
        modes = {name: layer.sparse_mode for name, layer in rosa_layers_of(net).items()}
        weights = {name: layer.weight.full_tensor().detach() for name, layer in rosa_layers_of(net).items()}
        x, _ = data(11, n=8)
        outputs = net(x).detach()
        if rank == 0:
            torch.save({"losses": (mean_losses / world).tolist(), "modes": modes, "weights": weights,
                        "outputs": outputs, "x": x}, out)


def sparse_net():
    torch.manual_seed(0)
    net = Net()
    apply_rosa(net, ddp_config())
    gen = torch.Generator().manual_seed(5)
    for layer in rosa_layers_of(net).values():
        flat = torch.zeros(layer.out_features * layer.in_features, dtype=torch.bool)
        flat[torch.randperm(flat.numel(), generator=gen)[:layer.nnz]] = True
        layer.set_mask(flat.view(layer.out_features, layer.in_features))  # merged: W + S in weight
    return net


def sparse_training(world, rank, net, steps=4):
    x, y = data(7, n=64)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=2e-2, weight_decay=0.0)
    losses = []
    for step in range(steps):
        per = 32 // world
        xb, yb = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        loss = (net(xb) - yb).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses


def test_fsdp2_after_the_merge_restores_w_and_matches_single_process(tmp_path):
    out = str(tmp_path / "merged.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.start_processes(merged_then_sharded_worker, args=(2, free_port(), out), nprocs=2, join=True,
                           start_method="spawn")
    result = torch.load(out)
    net = sparse_net()
    losses = [loss.item() for loss in sparse_training(1, 0, net)]
    assert losses == pytest.approx(result["losses"], rel=1e-4, abs=1e-5)
    assert set(result["modes"].values()) == {"spmm"}
    for name, layer in rosa_layers_of(net).items():
        # the sharded weight holds the original W again (S lives in sparse_values only)
        torch.testing.assert_close(result["weights"][name], layer.base_weight(), rtol=0, atol=0)
    torch.testing.assert_close(net(result["x"]).detach(), result["outputs"], rtol=1e-4, atol=1e-5)


def fisher_config(collect_buffer, collect_steps):
    return RosaConfig(rank=2, density=0.1, warmup_steps=2, collect_steps=collect_steps, dropout=0.0, rule="fisher",
                      collect_buffer=collect_buffer)


def fisher_training(world, rank, net, config):
    """Warm-up, collection and the first sparse step on this rank's share of a global batch of 32;
    returns the collectors' (storage shape, bytes) per layer, read after the last collecting backward."""
    last_collecting = config.warmup_steps + config.collect_steps - 1
    storage = {}

    def capture(step):
        if step == last_collecting:
            storage.update({name: (layer._collector.storage_shape, accumulator_bytes(layer._collector))
                            for name, layer in rosa_layers_of(net).items()})

    run_training(world, rank, net, config=config, steps=last_collecting + 2, before_scheduler_step=capture)
    return storage


def accumulator_bytes(collector):
    return sum(t.numel() * t.element_size() for t in (collector.pending, collector.statistic) if t is not None)


def sharded_fisher_worker(rank, world, port, out, collect_buffer, collect_steps):
    with gloo_group(rank, world, port):
        torch.manual_seed(0)
        net = Net(hidden=15)  # 15 output rows: shards of 8 and 7 rows
        apply_rosa(net, fisher_config(collect_buffer, collect_steps))
        shard(net)
        storage = fisher_training(world, rank, net, fisher_config(collect_buffer, collect_steps))
        torch.save({"masks": mask_tensors(net), "storage": storage}, f"{out}.{rank}")


@pytest.mark.parametrize("collect_buffer, collect_steps",
                         [("auto", 1), ("one_pass", 1), ("float16", 2), ("float32", 2)])
def test_fsdp2_shards_the_fisher_statistic_and_selects_the_single_process_masks(tmp_path, collect_buffer,
                                                                                collect_steps):
    """Under FSDP2 each rank keeps only its rows of the statistic (about half of it on 2 ranks), of
    the gradient summed over the ranks at each backward, so the Fisher rule squares the whole global
    batch's gradient at every step: the masks are those of one process with the global batch."""
    out = str(tmp_path / "sharded.pt")
    mp.start_processes(sharded_fisher_worker, args=(2, free_port(), out, collect_buffer, collect_steps), nprocs=2,
                       join=True, start_method="spawn")
    ranks = [torch.load(f"{out}.{rank}") for rank in range(2)]
    torch.manual_seed(0)
    net = Net(hidden=15)
    apply_rosa(net, fisher_config(collect_buffer, collect_steps))
    single_storage = fisher_training(1, 0, net, fisher_config(collect_buffer, collect_steps))
    single = net.state_dict()
    for rank, result in enumerate(ranks):
        for key, value in result["masks"].items():
            assert torch.equal(value, single[key]), (rank, key)
        for name, (shape, nbytes) in result["storage"].items():
            full_shape, full_bytes = single_storage[name]
            assert shape == ((8 if rank == 0 else 7), full_shape[1]), (rank, name, shape)
            assert nbytes <= 0.6 * full_bytes, (rank, name, nbytes, full_bytes)
