"""RoSA on several GPUs (issue 15): DDP and FSDP2 through the whole life cycle, against one GPU.

    # the 2-GPU runs (NCCL; one process per GPU): every wrapping x method, in one process group
    NCCL_NVLS_ENABLE=0 python -m torch.distributed.run --nproc-per-node 2 bench/multi_gpu.py \\
        --wrap ddp,fsdp2 --method rosa,lora --out DIR
    # the single-GPU reference: the same global batch, the same flags
    python bench/multi_gpu.py --wrap none --method rosa,lora --out DIR
    # the comparison: a Markdown table (last on stdout)
    python bench/multi_gpu.py --compare DIR
    # a CPU dry run (gloo): --device cpu --shape tiny (what tests/test_multi_gpu.py runs in-process)

``scripts/gpu_multi.sh`` runs all three on a 2-GPU machine in one go.

The model is bench/model_step.py's (an HF ``LlamaForCausalLM`` from a ``LlamaConfig``, random init,
sdpa attention; ``--shape 7b-slice``: 4096 / 11008, 8 layers, bf16 on CUDA), built with the same seed
on every rank, and trained with the same methods: RoSA (``rosa_kernels.get_rosa_model``, r 16,
alpha 16, dropout 0.05, density 0.6%, all-linear) through ``model.scheduler()``: ``--warmup-steps``
LoRA-only steps, 1 collection step (Fisher rule), mask selection, then sparse steps, ``--steps`` (20)
in all; and PEFT LoRA (r 16, alpha 16, dropout 0.05, all-linear) for reference. A step is forward +
causal-LM loss + backward + AdamW + ``zero_grad(set_to_none=True)`` (+ the RoSA scheduler's step).

Wrappings (``--wrap``): ``ddp`` is ``DistributedDataParallel`` (``broadcast_buffers=False``: the
model has no running statistics, and RoSA's mask buffers are the same on every rank by construction,
so broadcasting them at every forward would only add traffic); ``fsdp2`` is ``fully_shard`` on every
decoder layer and then on the ``...ForCausalLM`` root, as tests/test_fsdp2.py does (RoSA's merged
mode then becomes "spmm", since the frozen weights are sharded); ``none`` is the single-process
reference.

How the single-GPU reference stays comparable to rounding. Every step trains on one fixed global
batch of ``--global-batch`` random sequences (the same on every rank, from ``--seed``), split into
``--shares`` equal shares: rank r of W takes shares r*S/W .. (r+1)*S/W - 1 as S/W micro-batches
(gradient accumulation, loss / micro-batches). With ``--shares 2`` two ranks run one micro-batch each
and the reference (W = 1) runs the two shares as two micro-batches: every micro-batch then has the
shape of a rank's batch (the same kernels, so the same forward bit for bit), and the accumulated
gradient g0/2 + g1/2 rounds as the data-parallel average (g0 + g1)/2 does (halving is exact). RoSA's
collection statistic does the same: with ``--collect-buffer float32`` (the default here) the
reference sums the two halves' dW in float32 exactly as the all-reduce does, so the masks must be
equal. With ``auto`` (the package default: a 16-bit accumulator under DDP) each rank
rounds its dW before the sum and the reference rounds the sum, so a few entries at the top-k
threshold may differ; the comparison then gives the overlap (under FSDP2 the sharded collector sums
the float32 dW over the ranks before it rounds). The dropout masks: every rank draws
them from the same seeded generators (as any identically seeded data-parallel run does), so the
reference restores the generators' state before each micro-batch, and micro-batch r draws what
rank r draws. The step's loss is the mean over the shares (all-reduced over the ranks).

Recorded per step and rank: the loss, the GPU time (CUDA events around the step, after a barrier;
CPU: wall time), the peak memory (``max_memory_allocated`` after ``reset_peak_memory_stats``) and,
in the collection step, the bytes the layers' gradient statistic holds once the backward is done
(``collect_buffer``'s accumulator: under DDP a full copy per rank, the weights' count times 2 or 4
bytes; under FSDP2 each rank keeps its share of the rows, 1/world of that). At mask selection a SHA-256 of every
layer's mask (row offsets + column indices) on every rank; with ``--masks-dir`` rank 0 also saves
the masks, so that ``--compare`` can give the overlap of masks that differ. Rank 0 writes one JSON
per configuration into ``--out``: ``{method}[-{collect_buffer}]-{wrap}-x{world}.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import hashlib
import json
import os
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script (or by torchrun): bench/ from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import model_step  # noqa: E402

import rosa_kernels  # noqa: E402
from rosa_kernels import masks as rosa_masks  # noqa: E402
from rosa_kernels.model import rosa_layers  # noqa: E402

WRAPS = ("none", "ddp", "fsdp2")
METHODS = ("rosa", "lora")
DEFAULT_LR = 1e-4  # larger than model_step's 1e-5, so that the 20 losses move and their match means something
STEADY_SKIP = 2    # the first steps of the last phase (sparse; LoRA: all) that the step time leaves out
GiB = float(1 << 30)


@dataclasses.dataclass(frozen=True)
class Settings:
    """One configuration: wrapping, method, model and the global batch (the same on every rank)."""

    wrap: str = "none"
    method: str = "rosa"
    shape: str = "7b-slice"
    seq: int = 2048
    global_batch: int = 2
    shares: int = 2
    steps: int = 20
    warmup_steps: int = 4
    collect_buffer: str = "float32"
    lr: float = DEFAULT_LR
    device: str = "cuda"
    dtype: str = "bfloat16"
    seed: int = 0
    masks_dir: str | None = None

    @property
    def name(self) -> str:
        buffer = f"-{self.collect_buffer}" if self.method == "rosa" else ""
        return f"{self.method}{buffer}-{self.wrap}-x{_world()}"

    def validate(self, world: int) -> "Settings":
        if self.wrap not in WRAPS:
            raise ValueError(f"wrap must be one of {WRAPS}, got {self.wrap!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.shape not in model_step.SHAPES:
            raise ValueError(f"shape must be one of {tuple(model_step.SHAPES)}, got {self.shape!r}")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but torch sees no GPU (use --device cpu for a dry run)")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {self.dtype!r}")
        rosa_masks.check_collect_buffer(self.collect_buffer)
        for field in ("seq", "global_batch", "shares", "steps"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.warmup_steps < 1 or self.warmup_steps + 2 > self.steps:
            raise ValueError(f"warmup_steps must lie in [1, steps - 2] (warm-up, 1 collection step, sparse steps), "
                             f"got {self.warmup_steps} with steps={self.steps}")
        if self.global_batch % self.shares:
            raise ValueError(f"global_batch ({self.global_batch}) must be a multiple of shares ({self.shares})")
        if self.shares % world:
            raise ValueError(f"shares ({self.shares}) must be a multiple of the world size ({world}): every rank "
                             f"takes the same number of shares")
        if self.wrap == "none" and world > 1:
            raise ValueError(f"wrap 'none' is the single-process reference; under torch.distributed (world {world}) "
                             f"choose ddp or fsdp2")
        if self.wrap != "none" and _distributed() is None:
            raise ValueError(f"wrap {self.wrap!r} needs a process group: start the script with torchrun "
                             f"(python -m torch.distributed.run --nproc-per-node N bench/multi_gpu.py ...)")
        if self.wrap == "fsdp2" and _fully_shard() is None:
            raise ValueError("wrap 'fsdp2' needs torch.distributed.fsdp.fully_shard (torch >= 2.6)")
        return self


def _distributed():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _world() -> int:
    dist = _distributed()
    return dist.get_world_size() if dist is not None else 1


def _rank() -> int:
    dist = _distributed()
    return dist.get_rank() if dist is not None else 0


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        return None
    return fully_shard


def _device(settings: Settings) -> torch.device:
    if settings.device == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# Building and wrapping
# ----------------------------------------------------------------------------------------------


def build(settings: Settings, device: torch.device):
    """(model to call, unwrapped adapter model, RoSA scheduler or None), seeded the same on every rank."""
    torch.manual_seed(settings.seed)
    per_rank = settings.global_batch // _world()
    case = model_step.ModelCase(settings.shape, per_rank, settings.seq, settings.dtype, str(device))
    model = model_step.build_model(case)
    if settings.method == "rosa":
        config = model_step.rosa_config(warmup_steps=settings.warmup_steps, collect_steps=1,
                                        collect_buffer=settings.collect_buffer)
        adapted = rosa_kernels.get_rosa_model(model, config)
        scheduler = adapted.scheduler(show_progress=False)
    else:
        adapted, scheduler = model_step.wrap(model, "lora")
    return wrap(adapted, settings.wrap, device), adapted, scheduler


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The ``...ForCausalLM`` inside a RosaModel or a PeftModel (the module FSDP2 shards as the root)."""
    for module in model.modules():
        if type(module).__name__.endswith("ForCausalLM"):
            return module
    raise ValueError(f"{type(model).__name__} holds no ...ForCausalLM module")


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks (``LlamaDecoderLayer``), in order."""
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def wrap(model: torch.nn.Module, how: str, device: torch.device) -> torch.nn.Module:
    """``model`` under DDP, under FSDP2 (every decoder layer, then the causal-LM root), or as it is."""
    if how == "none":
        return model
    if how == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       broadcast_buffers=False)
    from torch.distributed.device_mesh import init_device_mesh

    fully_shard = _fully_shard()
    mesh = init_device_mesh(device.type, (_world(),))
    layers = decoder_layers(model)
    if not layers:
        raise ValueError("FSDP2 wraps every decoder layer, and this model has none")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(_causal_lm(model), mesh=mesh)
    return model  # the RosaModel / PeftModel wrapper calls the sharded root


# ----------------------------------------------------------------------------------------------
# Training, measuring, and the masks
# ----------------------------------------------------------------------------------------------


def global_batch(settings: Settings, device: torch.device) -> torch.Tensor:
    """The fixed global batch of token ids (global_batch x seq), the same on every rank."""
    generator = torch.Generator().manual_seed(settings.seed + 1)
    vocab = model_step.SHAPES[settings.shape].vocab
    return torch.randint(0, vocab, (settings.global_batch, settings.seq), generator=generator).to(device)


def my_micro_batches(settings: Settings, batch: torch.Tensor) -> list[torch.Tensor]:
    """This rank's shares of the global batch, one micro-batch each."""
    size = settings.global_batch // settings.shares
    per_rank = settings.shares // _world()
    first = _rank() * per_rank
    return [batch[(first + i) * size:(first + i + 1) * size] for i in range(per_rank)]


def _rng_state(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def statistic_bytes(adapted: torch.nn.Module) -> int:
    """Bytes the RoSA layers' gradient collectors hold now (on this rank)."""
    return sum(layer._collector.memory_bytes() for layer in rosa_layers(adapted).values()
               if layer._collector is not None)


def mask_digests(adapted: torch.nn.Module) -> dict[str, str]:
    """SHA-256 (16 hex digits) of every RoSA layer's mask: its row offsets and column indices."""
    digests = {}
    for name, layer in rosa_layers(adapted).items():
        h = hashlib.sha256()
        for t in (layer.row_offsets, layer.col_indices):
            h.update(t.detach().to("cpu", torch.int32).contiguous().numpy().tobytes())
        digests[name] = h.hexdigest()[:16]
    return digests


def mask_positions(adapted: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every RoSA layer's mask as sorted row-major flat positions (int64, CPU)."""
    positions = {}
    for name, layer in rosa_layers(adapted).items():
        offsets = layer.row_offsets.detach().to("cpu", torch.int64)
        rows = torch.repeat_interleave(torch.arange(layer.out_features), offsets[1:] - offsets[:-1])
        positions[name] = rows * layer.in_features + layer.col_indices.detach().to("cpu", torch.int64)
    return positions


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def run_config(settings: Settings, log=print) -> dict:
    """Trains one configuration for ``settings.steps`` steps (a collective: every rank calls it).

    Returns the result on every rank: per-step losses (mean over the global batch), phases, and per
    rank the step times, peaks, the collection's statistic bytes and the mask digests."""
    dist = _distributed()
    world, rank = _world(), _rank()
    settings.validate(world)
    device = _device(settings)
    cuda = device.type == "cuda"
    _free(device)
    before_bytes = int(torch.cuda.memory_allocated(device)) if cuda else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        forward, adapted, scheduler = build(settings, device)
        parameters = [p for p in forward.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=settings.lr)
        micro_batches = my_micro_batches(settings, global_batch(settings, device))
        weights_bytes = int(torch.cuda.memory_allocated(device)) if cuda else None
        losses, phases, records = [], [], []
        digests, mask_step, collected = None, None, None
        for step in range(settings.steps):
            phase = scheduler.phase if scheduler is not None else "lora"
            if dist is not None:
                dist.barrier()
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
            start = time.perf_counter()
            state = _rng_state(device) if len(micro_batches) > 1 else None
            step_loss = None
            for i, ids in enumerate(micro_batches):
                if state is not None and i > 0:
                    _set_rng_state(state, device)  # micro-batch i draws the dropout of rank i's batch
                loss = forward(input_ids=ids, labels=ids).loss
                (loss / len(micro_batches) if len(micro_batches) > 1 else loss).backward()
                step_loss = loss.detach().float() if step_loss is None else step_loss + loss.detach().float()
            if phase == "collect":
                collected = statistic_bytes(adapted)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            selected = scheduler.step() if scheduler is not None else False
            record = {}
            if cuda:
                end.record()
                torch.cuda.synchronize(device)
                record["gpu_ms"] = begin.elapsed_time(end)
                record["peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
            record["wall_ms"] = (time.perf_counter() - start) * 1e3
            if not cuda:
                record["gpu_ms"] = record["wall_ms"]
            records.append(record)
            losses.append(step_loss / len(micro_batches))
            phases.append(phase)
            if selected:
                mask_step = step
                digests = mask_digests(adapted)
                if settings.masks_dir and rank == 0:
                    directory = Path(settings.masks_dir)
                    directory.mkdir(parents=True, exist_ok=True)
                    torch.save(mask_positions(adapted), directory / f"{settings.name}.pt")
            log(f"[{settings.name}] step {step} ({phase}): {record['gpu_ms']:.1f} ms"
                + (f", peak {record['peak_bytes'] / GiB:.2f} GiB" if cuda else ""))
    loss_tensor = torch.stack(losses)
    if dist is not None:
        dist.all_reduce(loss_tensor)
        loss_tensor /= world
    sparse_modes = sorted({layer.sparse_mode for layer in rosa_layers(adapted).values()}) \
        if settings.method == "rosa" else []
    mine = {"rank": rank, "records": records, "weights_bytes": weights_bytes, "before_bytes": before_bytes,
            "statistic_bytes": collected, "mask_digests": digests, "device": _device_name(device)}
    ranks = [None] * world
    if dist is not None:
        dist.all_gather_object(ranks, mine)
    else:
        ranks = [mine]
    result = {"name": settings.name, "status": "ok", "settings": dataclasses.asdict(settings), "world": world,
              "micro_batches_per_rank": len(micro_batches),
              "tokens_per_step": settings.global_batch * settings.seq,
              "losses": loss_tensor.tolist(), "phases": phases, "mask_step": mask_step, "sparse_modes": sparse_modes,
              "notices": sorted({str(w.message)[:300] for w in caught})[:20],
              "ranks": ranks, "weights_elements": _adapted_elements(adapted)}
    del forward, adapted, scheduler, optimizer, parameters, micro_batches
    _free(device)
    return result


def _device_name(device: torch.device) -> str:
    from bench import common

    return common.device_name(device)


def _adapted_elements(adapted: torch.nn.Module) -> int | None:
    """How many weights the RoSA layers adapt (the size of a full, unsharded statistic)."""
    layers = rosa_layers(adapted) if isinstance(adapted, rosa_kernels.RosaModel) else {}
    return sum(layer.out_features * layer.in_features for layer in layers.values()) or None


def environment(device: torch.device) -> dict:
    info = model_step.environment(device)
    info["world"] = _world()
    dist = _distributed()
    info["backend"] = dist.get_backend() if dist is not None else None
    if device.type == "cuda":
        with contextlib.suppress(Exception):
            info["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
    info["NCCL_NVLS_ENABLE"] = os.environ.get("NCCL_NVLS_ENABLE")
    return info


def run_all(base: Settings, wraps, methods, collect_buffers, out: Path | None, log=print) -> list[dict]:
    """Every wrap x method with the first collect buffer, then RoSA under every wrap with each further
    buffer (so a run cut short has the main rows); rank 0 writes one JSON each into ``out``.

    A configuration that raises becomes a result whose status is the error (the next one still runs)."""
    collect_buffers = list(collect_buffers)
    configurations = [(how, method, collect_buffers[0]) for how in wraps for method in methods]
    if "rosa" in methods:
        configurations += [(how, "rosa", buffer) for buffer in collect_buffers[1:] for how in wraps]
    results = []
    env = None
    for how, method, buffer in configurations:
        settings = dataclasses.replace(base, wrap=how, method=method, collect_buffer=buffer)
        try:
            result = run_config(settings, log)
        except Exception as error:  # noqa: BLE001 - one failing configuration must not end the run
            traceback.print_exc()
            result = {"name": settings.name, "status": f"{type(error).__name__}: {str(error)[:300]}",
                      "settings": dataclasses.asdict(settings), "world": _world()}
            _free(_device(settings))
        if env is None:
            env = environment(_device(settings))
        result["environment"] = env
        result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        results.append(result)
        if out is not None and _rank() == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{result['name']}.json").write_text(json.dumps(result, indent=1) + "\n")
    return results


# ----------------------------------------------------------------------------------------------
# The comparison
# ----------------------------------------------------------------------------------------------


def summarize(result: dict) -> dict:
    """Step time (median over the steady steps of the slowest rank), peaks per GPU (largest rank)."""
    if result.get("status") != "ok":
        return {}
    phases, ranks = result["phases"], result["ranks"]
    last = phases[-1]
    steady = [i for i, p in enumerate(phases) if p == last][STEADY_SKIP:] or [len(phases) - 1]
    per_step = [max(r["records"][i]["gpu_ms"] for r in ranks) for i in range(len(phases))]

    def peak(indices):
        values = [r["records"][i].get("peak_bytes") for r in ranks for i in indices]
        return max(values) if values and None not in values else None

    collect = [i for i, p in enumerate(phases) if p == "collect"]
    statistics_bytes = [r["statistic_bytes"] for r in ranks if r.get("statistic_bytes") is not None]
    return {"step_ms": statistics.median(per_step[i] for i in steady),
            "warmup_ms": statistics.median(per_step[i] for i, p in enumerate(phases) if p == "warmup")
            if "warmup" in phases else None,
            "collect_ms": per_step[collect[0]] if collect else None,
            "peak_bytes": peak(steady), "collect_peak_bytes": peak(collect) if collect else None,
            "weights_bytes": max((r["weights_bytes"] for r in ranks if r["weights_bytes"] is not None), default=None),
            "statistic_bytes": max(statistics_bytes) if statistics_bytes else None,
            "masks_equal_across_ranks": (None if ranks[0]["mask_digests"] is None else
                                         all(r["mask_digests"] == ranks[0]["mask_digests"] for r in ranks))}


def load_results(directory) -> list[dict]:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory of multi_gpu.py results")
    results = [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))]
    if not results:
        raise FileNotFoundError(f"{directory} holds no multi_gpu.py result (*.json)")
    return results


def mask_overlap(a: Path, b: Path) -> float | None:
    """The fraction of mask positions two saved runs share (over all layers), None if a file is missing."""
    if not (a.is_file() and b.is_file()):
        return None
    first, second = torch.load(a), torch.load(b)
    common = total = 0
    for name, positions in first.items():
        common += int(torch.isin(positions, second[name]).sum())
        total += positions.numel()
    return common / max(total, 1)


def _gib(value) -> str:
    return "n/a" if value is None else f"{value / GiB:.2f}"


def _key(result: dict) -> tuple:
    s = result["settings"]
    return s["method"], s["collect_buffer"] if s["method"] == "rosa" else None


def compare(results: list[dict], masks_dir=None) -> tuple[str, list[dict]]:
    """(Markdown table, rows): every configuration against the single-process run of the same method
    (and collect buffer), and RoSA against PEFT LoRA under the same wrapping."""
    references = {_key(r): r for r in results if r["settings"]["wrap"] == "none" and r.get("status") == "ok"}
    lora = {(r["settings"]["wrap"], r["world"]): summarize(r) for r in results
            if r["settings"]["method"] == "lora" and r.get("status") == "ok"}
    order = {w: i for i, w in enumerate(WRAPS)}
    rows = []
    for result in sorted(results, key=lambda r: (order.get(r["settings"]["wrap"], 9), r["world"], _key(r))):
        s = result["settings"]
        method = "PEFT LoRA" if s["method"] == "lora" else f"RoSA ({s['collect_buffer']})"
        row = {"name": result["name"], "wrap": s["wrap"], "gpus": result["world"], "method": method,
               "status": result.get("status")}
        rows.append(row)
        if result.get("status") != "ok":
            continue
        summary = summarize(result)
        row.update(summary)
        reference = references.get(_key(result))
        ref_summary = summarize(reference) if reference is not None else {}
        if reference is not None and ref_summary.get("step_ms"):
            row["scaling"] = ref_summary["step_ms"] / summary["step_ms"]
            n = min(len(reference["losses"]), len(result["losses"]))
            row["max_loss_diff"] = max(abs(a - b) for a, b in zip(reference["losses"][:n], result["losses"][:n]))
        baseline = lora.get((s["wrap"], result["world"]))
        if s["method"] == "rosa" and baseline:
            row["vs_lora_time"] = summary["step_ms"] / baseline["step_ms"]
            if summary["peak_bytes"] and baseline.get("peak_bytes"):
                row["vs_lora_peak"] = summary["peak_bytes"] / baseline["peak_bytes"]
        if s["method"] == "rosa" and reference is not None and reference.get("mask_step") is not None:
            mine, theirs = result["ranks"][0]["mask_digests"], reference["ranks"][0]["mask_digests"]
            row["masks_equal_single"] = mine == theirs
            if mine != theirs and masks_dir is not None:
                row["mask_overlap"] = mask_overlap(Path(masks_dir) / f"{result['name']}.pt",
                                                   Path(masks_dir) / f"{reference['name']}.pt")
        if s["method"] == "rosa" and result.get("weights_elements") and summary.get("statistic_bytes") is not None:
            row["statistic_bytes_per_weight"] = summary["statistic_bytes"] / result["weights_elements"]
    return _table(rows, results), rows


def _yes_no(value) -> str:
    return "n/a" if value is None else ("yes" if value else "no")


def _table(rows: list[dict], results: list[dict]) -> str:
    ok = next((r for r in results if r.get("status") == "ok"), results[0])
    env, s = ok.get("environment", {}), ok["settings"]
    head = (f"{env.get('device')} | torch {env.get('torch')} | {env.get('backend') or 'no process group'} "
            f"(NCCL {env.get('nccl', 'n/a')}, NCCL_NVLS_ENABLE={env.get('NCCL_NVLS_ENABLE')}) | shape {s['shape']}, "
            f"{s['dtype']}, global batch {s['global_batch']} x {s['seq']} tokens, {s['steps']} steps "
            f"({s['warmup_steps']} warm-up, 1 collection, then sparse), lr {s['lr']}")
    lines = [head, "",
             "| wrap | GPUs | method | step ms | × LoRA time | scaling vs 1 GPU | peak GiB/GPU | × LoRA peak "
             "| collection step ms | collection-step peak GiB/GPU | statistic GiB/GPU (B/weight) "
             "| max abs loss diff vs 1 GPU | masks equal across ranks | masks equal to 1 GPU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {row['wrap']} | {row['gpus']} | {row['method']} | {row['status']} |" + " |" * 10)
            continue

        def number(key, fmt):
            return "n/a" if row.get(key) is None else format(row[key], fmt)

        statistic = _gib(row.get("statistic_bytes"))
        if row.get("statistic_bytes_per_weight") is not None:
            statistic += f" ({row['statistic_bytes_per_weight']:.2f})"
        masks_single = _yes_no(row.get("masks_equal_single"))
        if row.get("mask_overlap") is not None:
            masks_single += f" ({100 * row['mask_overlap']:.3f}% overlap)"
        is_rosa = row["method"] != "PEFT LoRA"
        reference = row["wrap"] == "none"
        lines.append(" | ".join([
            f"| {row['wrap']}", str(row["gpus"]), row["method"], number("step_ms", ".1f"),
            number("vs_lora_time", ".2f"), "1 (reference)" if reference else number("scaling", ".2f"),
            _gib(row.get("peak_bytes")), number("vs_lora_peak", ".2f"),
            number("collect_ms", ".1f") if is_rosa else "n/a",
            _gib(row.get("collect_peak_bytes")) if is_rosa else "n/a", statistic if is_rosa else "n/a",
            "reference" if reference else number("max_loss_diff", ".2e"),
            _yes_no(row.get("masks_equal_across_ranks")),
            "n/a" if not is_rosa else "reference" if reference else masks_single]) + " |")
    leftovers = [r["name"] for r in results if r.get("status") == "ok"
                 and any((rank.get("before_bytes") or 0) > 256 * 2**20 for rank in r["ranks"])]
    if leftovers:
        lines += ["", f"Warning: more than 256 MiB were still allocated before {leftovers} started (a previous "
                      "configuration's tensors): their peaks include it."]
    lines += ["", "step ms: median over the steady steps (the sparse phase, or all LoRA steps, less their first "
              f"{STEADY_SKIP}) of the slowest rank; scaling: the 1-GPU step time of the same global batch / this "
              "one (ideal: the number of GPUs); peaks: max_memory_allocated of the largest rank, weights included; "
              "statistic: what the layers' gradient collectors hold after the collection step's backward."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _names(text: str, allowed, option: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if not names or unknown:
        raise SystemExit(f"{option}: choose from {', '.join(allowed)} (comma-separated), got {text!r}")
    return names


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wrap", default="none", help=f"comma-separated, of {', '.join(WRAPS)} (default none)")
    parser.add_argument("--method", default="rosa,lora", help="comma-separated, of rosa, lora (default both)")
    parser.add_argument("--collect-buffers", default="float32",
                        help="RoSA's collect_buffer(s), comma-separated (default float32: masks comparable exactly)")
    parser.add_argument("--shape", default=None, help="7b-slice (default on cuda), tinyllama or tiny (default on cpu)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048 on cuda, 32 on cpu)")
    parser.add_argument("--global-batch", type=int, default=2, help="sequences per step over all ranks (default 2)")
    parser.add_argument("--shares", type=int, default=2,
                        help="equal shares of the global batch; each rank runs shares / world micro-batches (default 2)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup-steps", type=int, default=4, help="RoSA's LoRA-only steps before the collection step")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR)
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    parser.add_argument("--dtype", default=None, help="bfloat16 (default on cuda) or float32 (default on cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    parser.add_argument("--out", default=None, help="directory for the per-configuration JSON files")
    parser.add_argument("--masks-dir", default=None, help="rank 0 saves every run's masks here (for --compare's overlap)")
    parser.add_argument("--compare", default=None, metavar="DIR", help="print the Markdown table of the results in DIR")
    parser.add_argument("--quiet", action="store_true", help="no per-step lines")
    args = parser.parse_args(argv)
    if args.compare is None and args.out is None:
        parser.error("--out DIR is required (or --compare DIR)")
    return args


@contextlib.contextmanager
def process_group(device: str):
    """torchrun's process group (NCCL on GPUs, gloo on the CPU) when its environment is set, else nothing."""
    if "WORLD_SIZE" not in os.environ:
        yield
        return
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.compare is not None:
        table, rows = compare(load_results(args.compare), args.masks_dir)
        print(table)
        return 0 if all(r["status"] == "ok" for r in rows) else 1
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    base = Settings(shape=args.shape or ("7b-slice" if cuda else "tiny"), seq=args.seq or (2048 if cuda else 32),
                    global_batch=args.global_batch, shares=args.shares, steps=args.steps,
                    warmup_steps=args.warmup_steps, lr=args.lr, device=device,
                    dtype=args.dtype or ("bfloat16" if cuda else "float32"), seed=args.seed, masks_dir=args.masks_dir)
    wraps = _names(args.wrap, WRAPS, "--wrap")
    methods = _names(args.method, METHODS, "--method")
    buffers = _names(args.collect_buffers, rosa_masks.COLLECT_BUFFERS, "--collect-buffers")
    with process_group(device):
        try:  # the arguments are checked before anything is built
            for how in wraps:
                for method in methods:
                    dataclasses.replace(base, wrap=how, method=method, collect_buffer=buffers[0]).validate(_world())
        except ValueError as error:
            print(f"multi_gpu.py: {error}", file=sys.stderr)
            return 2
        log = (lambda message: None) if args.quiet or _rank() != 0 else (lambda message: print(message, flush=True))
        results = run_all(base, wraps, methods, buffers, Path(args.out), log)
    failed = [r["name"] for r in results if r["status"] != "ok"]
    if failed and _rank() == 0:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
