"""The unit users judge: one training step of a whole HF ``LlamaForCausalLM`` (DESIGN.md, "End to end").

A step is forward + causal-LM loss (random token ids as inputs and labels) + backward + AdamW step +
``zero_grad(set_to_none=True)`` (+ ``scheduler.step()`` for RoSA, as a training loop calls it). The
model is built from a ``LlamaConfig`` (random init, no download, ``attn_implementation="sdpa"``),
bf16 on CUDA, float32 on the CPU. Methods (``METHODS``):

- ``full``: full fine-tuning (every parameter trainable).
- ``lora``: PEFT LoRA, the real ``peft`` package (r 16, alpha 16, dropout 0.05, ``"all-linear"``).
- ``rosa``: ``rosa_kernels.get_rosa_model`` (r 16, alpha 16, dropout 0.05, density 0.6%,
  ``"all-linear"``) in the sparse phase, reached through RoSA's own life cycle (``model.scheduler()``).
- ``rosa-structured`` (``STRUCTURED``): RoSA in the sparse phase as ``rosa``, but with masks of
  DESIGN.md's synthetic ``rosa`` recipe (``rosa_kernels.testing.rosa_mask``: the column structure of
  real RoSA masks, most nonzeros in a few input columns) installed with ``set_masks``. A randomly
  initialized model has no outlier channels, so the masks ``rosa`` collects on it are near-uniform,
  and on those the mask plan's dS costs about a dense dW GEMM; this row shows the step a pretrained
  model's masks give.
- RoSA's way into the sparse phase, one row each (``PHASES``): ``rosa-warmup`` (LoRA-only warm-up
  steps), ``rosa-warmup-end`` (the last warm-up step, whose ``scheduler.step()`` starts the gradient
  collection), ``rosa-collect`` (the collection step with 1 micro-batch, ending with mask selection),
  ``rosa-collect-8`` (the same with 8 micro-batches of gradient accumulation: 8 forward + backward,
  then one optimizer step; on a model of its own), ``rosa-first-sparse`` (the first sparse steps).
- ``*+compile``: ``torch.compile(model, mode="reduce-overhead")`` (CUDA graphs) of full, LoRA and
  RoSA, after their eager rows, on the same model and optimizer.
- On a 4-bit base (``QUANTIZED``; every linear layer but ``lm_head`` a bitsandbytes ``Linear4bit``,
  NF4 with double quantization, computing in the model's dtype: :func:`quantize_linears`, what
  transformers' ``BitsAndBytesConfig(load_in_4bit=True, ...)`` loads): ``qlora`` (PEFT LoRA as
  above: QLoRA), ``qrosa`` (RoSA as above in the sparse phase: QRoSA, ``sparse_mode="csr_add"``) and
  ``qrosa-spmm`` (the same with ``sparse_mode="spmm"``). In the default methods only where
  bitsandbytes imports (the ``qrosa`` extra).

Per row: GPU time (CUDA events around each step, median; on the CPU the wall time), host time (CPU
wall time to enqueue the step, ``perf_counter`` around it without synchronizing, median; equal to
the GPU time when the step is host-bound), peak memory with the weights and above them (CUDA:
``max_memory_allocated`` after ``reset_peak_memory_stats`` minus the memory the wrapped model held
before training; CPU: the
bytes the model, its gradients and the optimizer hold at the step's start plus every storage the
step's ops create, until freed, counted by a dispatch mode, whose cost is in the CPU times of the
RoSA phase rows). Every method gets a freshly built model,
and memory is freed between methods, so each peak is the method's own. A method that fails becomes
a row with the error's first line as its status; the sweep goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import statistics
import time
import warnings
import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

import rosa_kernels
from rosa_kernels.testing import rosa_mask

BENCH_EXTRA = "pip install 'rosa_kernels[bench]' (transformers, peft, safetensors)"
QROSA_EXTRA = "pip install 'rosa_kernels[qrosa]' (bitsandbytes)"
PEFT_VERSION = "0.21.2"

METHODS = ("full", "lora", "rosa")
STRUCTURED = ("rosa-structured",)
PHASES = ("rosa-warmup", "rosa-warmup-end", "rosa-collect", "rosa-collect-8", "rosa-first-sparse")
COMPILED = ("full+compile", "lora+compile", "rosa+compile")
QUANTIZED = ("qlora", "qrosa", "qrosa-spmm")
ALL_METHODS = METHODS + STRUCTURED + PHASES + COMPILED + QUANTIZED
METHOD_NAMES = {
    "full": "full FT", "lora": "PEFT LoRA", "rosa": "RoSA (sparse phase)",
    "rosa-structured": "RoSA (sparse phase), masks of the rosa recipe",
    "rosa-warmup": "RoSA warm-up step (LoRA only)",
    "rosa-warmup-end": "RoSA last warm-up step (ends with start_collection)",
    "rosa-collect": "RoSA collection step, 1 micro-batch (ends with mask selection)",
    "rosa-collect-8": "RoSA collection step, 8 micro-batches (ends with mask selection)",
    "rosa-first-sparse": "RoSA first sparse steps",
    "full+compile": "full FT, compiled", "lora+compile": "PEFT LoRA, compiled", "rosa+compile": "RoSA, compiled",
    "qlora": "PEFT QLoRA (4-bit base)", "qrosa": "QRoSA (4-bit base, csr_add)", "qrosa-spmm": "QRoSA (4-bit base, spmm)",
}
QROSA_SPARSE_MODES = {"qrosa": "csr_add", "qrosa-spmm": "spmm"}

RANK, ALPHA, DROPOUT, DENSITY = 16, 16.0, 0.05, 0.006
LEARNING_RATE = 1e-5  # small: the random model must not diverge (NaNs would change the kernels' paths)


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A LlamaConfig's sizes. ``kv_heads`` = ``heads``: multi-head attention, LlamaConfig's default."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 32000

    def llama_config(self, seq: int):
        from transformers import LlamaConfig

        return LlamaConfig(hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv_heads, vocab_size=self.vocab,
                           max_position_embeddings=max(seq, 2048), use_cache=False, tie_word_embeddings=False)


# DESIGN.md's shapes. TinyLlama's own checkpoint has 4 key/value heads (grouped-query attention);
# DESIGN.md names 32 heads, and the numbers were taken with LlamaConfig's default of as
# many key/value heads as heads, so that is what is measured (ROSA_BENCH_KV_HEADS overrides it).
SHAPES = {
    "7b-slice": ModelShape("LLaMA-7B slice", 4096, 11008, 8, 32, 32),
    "tinyllama": ModelShape("TinyLlama shape", 2048, 5632, 22, 32, 32),
    "tiny": ModelShape("tiny (CPU)", 64, 128, 2, 4, 4, vocab=256),
}
GPU_SHAPES = ("7b-slice", "tinyllama")
GPU_SEQ, GPU_BATCHES = 2048, (1, 4)
CPU_SHAPE, CPU_SEQ, CPU_BATCH = "tiny", 32, 1


@dataclasses.dataclass(frozen=True)
class ModelCase:
    shape: str
    batch: int
    seq: int
    dtype: str
    device: str
    kv_heads: int | None = None  # None: the shape's

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def model_shape(self) -> ModelShape:
        shape = SHAPES[self.shape]
        return dataclasses.replace(shape, kv_heads=self.kv_heads) if self.kv_heads else shape

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def group(self) -> str:
        return f"model-step-{self.shape}-{self.tokens}"

    @property
    def id(self) -> str:
        return f"{self.group}-{self.dtype}"


def cpu_cases() -> list[ModelCase]:
    return [ModelCase(CPU_SHAPE, CPU_BATCH, CPU_SEQ, "float32", "cpu")]


def gpu_cases(shapes=GPU_SHAPES, batches=GPU_BATCHES, kv_heads=None) -> list[ModelCase]:
    return [ModelCase(s, b, GPU_SEQ, "bfloat16", "cuda", kv_heads) for s in shapes for b in batches]


@dataclasses.dataclass
class Options:
    """How many steps each row measures (the GPU script's defaults keep the sweep to minutes)."""

    warmup: int = 3            # untimed steps before a steady row's timed ones
    timed: int = 5             # timed steps of a steady row (median)
    phase_timed: int = 3       # timed LoRA-only warm-up steps of RoSA, and its "first sparse steps"
    micro_batches: int = 8     # gradient accumulation of the rosa-collect-8 row
    compile_warmup: int = 3    # steps that compile and record the CUDA graphs before the timed ones


def missing_requirements(methods=ALL_METHODS) -> str | None:
    """Why ``methods`` cannot run here (None: they can): every one needs transformers, LoRA's peft,
    the 4-bit bases bitsandbytes."""
    needed = ["transformers"] + (["peft"] if any(m.startswith(("lora", "qlora")) for m in methods) else [])
    needed += ["bitsandbytes"] if any(m in QUANTIZED for m in methods) else []
    missing = []
    for module in needed:
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        extras = [BENCH_EXTRA] * (set(missing) != {"bitsandbytes"}) + [QROSA_EXTRA] * ("bitsandbytes" in missing)
        return f"the model-level benchmark needs {' and '.join(missing)}: {'; '.join(extras)}"
    return None


def default_methods() -> tuple[str, ...]:
    """Every method, less the 4-bit ones where bitsandbytes does not import."""
    if missing_requirements(["qrosa"]) is None:
        return ALL_METHODS
    return tuple(m for m in ALL_METHODS if m not in QUANTIZED)


# ----------------------------------------------------------------------------------------------
# Models, methods and one training step
# ----------------------------------------------------------------------------------------------


def build_model(case: ModelCase) -> torch.nn.Module:
    """A randomly initialized LlamaForCausalLM on the case's device and dtype (no download)."""
    from transformers import LlamaForCausalLM

    config = case.model_shape.llama_config(case.seq)
    with torch.device(case.device), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=case.torch_dtype)
    return model.train()


def quantize_linears(model: torch.nn.Module) -> torch.nn.Module:
    """Replaces every ``nn.Linear`` of ``model`` but the output layer by a bitsandbytes ``Linear4bit``
    (NF4, double quantization, computing in the model's dtype; ``rosa_kernels.quantize_linear``), as
    transformers' ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=...)`` loads a checkpoint (from_pretrained
    cannot be used on a model built from a config), and marks the model as that loader does, so that
    PEFT takes its 4-bit path. Returns ``model``."""
    compute_dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    output_layer = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and module is not output_layer:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, rosa_kernels.quantize_linear(module, compute_dtype=compute_dtype))
    model.is_loaded_in_4bit = True
    return model


def rosa_config(**overrides) -> rosa_kernels.RosaConfig:
    kwargs = dict(rank=RANK, alpha=ALPHA, dropout=DROPOUT, density=DENSITY, target_modules="all-linear")
    kwargs.update(overrides)
    return rosa_kernels.RosaConfig(**kwargs)


def structured_masks(model) -> dict:
    """A mask of DESIGN.md's ``rosa`` recipe for every RosaLinear of ``model`` (one per layer shape,
    seed 0), on the layers' device."""
    return {name: rosa_mask(layer.out_features, layer.in_features, layer.density, device=layer.weight.device)
            for name, layer in model.rosa_layers().items()}


def wrap(model: torch.nn.Module, method: str, *, warmup_steps: int = 1, collect_steps: int = 1):
    """(model to train, RoSA scheduler or None) for ``method`` (``full``, ``lora``, ``rosa`` or one of
    ``QUANTIZED``, which quantize ``model`` first)."""
    if method == "qlora":
        return wrap(quantize_linears(model), "lora")
    if method in QROSA_SPARSE_MODES:
        wrapped = rosa_kernels.get_rosa_model(quantize_linears(model), rosa_config(
            warmup_steps=warmup_steps, collect_steps=collect_steps, sparse_mode=QROSA_SPARSE_MODES[method]))
        return wrapped, wrapped.scheduler(show_progress=False)
    if method == "full":
        return model, None
    if method == "lora":
        import peft

        config = peft.LoraConfig(r=RANK, lora_alpha=int(ALPHA), lora_dropout=DROPOUT, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
        return peft.get_peft_model(model, config), None
    if method == "rosa":
        wrapped = rosa_kernels.get_rosa_model(model, rosa_config(warmup_steps=warmup_steps,
                                                                 collect_steps=collect_steps))
        return wrapped, wrapped.scheduler(show_progress=False)
    raise ValueError(f"unknown method {method!r}")


class Trainer:
    """Holds a model, its AdamW, a batch of random token ids and the RoSA scheduler; ``step()`` is
    one training step of ``micro_batches`` forward + backward passes."""

    def __init__(self, model, case: ModelCase, scheduler=None, seed: int = 0):
        self.model = self.forward = model
        self.case, self.scheduler, self.micro_batches = case, scheduler, 1
        parameters = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(parameters, lr=LEARNING_RATE)
        generator = torch.Generator(device=case.device).manual_seed(seed)
        self.input_ids = torch.randint(0, case.model_shape.vocab, (case.batch, case.seq), device=case.device,
                                       generator=generator)
        self.compiled = False

    def compile(self) -> None:
        self.forward = torch.compile(self.model, mode="reduce-overhead")
        self.compiled = True

    def step(self) -> None:
        for _ in range(self.micro_batches):
            if self.compiled:
                torch.compiler.cudagraph_mark_step_begin()
            loss = self.forward(input_ids=self.input_ids, labels=self.input_ids).loss
            (loss / self.micro_batches if self.micro_batches > 1 else loss).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()


# ----------------------------------------------------------------------------------------------
# Measuring steps
# ----------------------------------------------------------------------------------------------


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        key = (storage.device, storage.data_ptr())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers (each storage once)."""
    return _storage_bytes([*model.parameters(), *model.buffers()])


def weights_bytes(model: torch.nn.Module, device: torch.device) -> int:
    """What the model holds before training: CUDA's allocated bytes, else its tensors' bytes."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.memory_allocated(device))
    return model_bytes(model)


def held_bytes(trainer: "Trainer") -> int:
    """Bytes a CPU training state holds between steps: the model's parameters, buffers, gradients
    and tensor attributes (a RoSA layer's collection statistic, say), and the optimizer's state."""
    tensors = [*trainer.model.parameters(), *trainer.model.buffers()]
    tensors += [p.grad for p in trainer.model.parameters() if p.grad is not None]
    for module in trainer.model.modules():
        tensors += [v for v in vars(module).values() if isinstance(v, torch.Tensor)]
    for state in trainer.optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return _storage_bytes([t for t in tensors if t.device.type == "cpu"])


class _CpuPeak(TorchDispatchMode):
    """Peak CPU bytes during a step: what the state holds at its start plus every storage an op
    creates, counted until it is freed (a weak reference per storage; no allocator statistics exist
    for the CPU)."""

    def __init__(self, start_bytes: int):
        super().__init__()
        self.live = self.peak = start_bytes
        self._seen = WeakIdKeyDictionary()

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.layout == torch.strided:
                storage = t.untyped_storage()
                if storage in self._seen:
                    continue
                self._seen[storage] = True
                nbytes = storage.nbytes()
                weakref.finalize(storage, self._release, nbytes)
                self.live += nbytes
                self.peak = max(self.peak, self.live)
        return out


def measure_steps(trainer: Trainer, steps: int, *, track_memory_on_cpu: bool = False) -> list[dict]:
    """Runs ``steps`` steps; per step: GPU seconds (events; CPU: wall), host seconds (enqueue), peak bytes.

    The device is synchronized before each step (so the host starts with an empty queue) and after
    it (to read the events and the peak), never inside it.
    """
    device = torch.device(trainer.case.device)
    cuda = device.type == "cuda"
    records = []
    for _ in range(steps):
        record = {}
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start = time.perf_counter()
            begin.record()
            trainer.step()
            end.record()
            record["host"] = time.perf_counter() - start
            torch.cuda.synchronize(device)
            record["gpu"] = begin.elapsed_time(end) / 1e3
            record["peak"] = int(torch.cuda.max_memory_allocated(device))
        else:
            tracker = _CpuPeak(held_bytes(trainer)) if track_memory_on_cpu else contextlib.nullcontext()
            with tracker:
                start = time.perf_counter()
                trainer.step()
                record["host"] = record["gpu"] = time.perf_counter() - start
            if track_memory_on_cpu:
                record["peak"] = tracker.peak
        records.append(record)
    return records


def summarize(case: ModelCase, method: str, records: list[dict], weights: int, *, note: str = "",
              **extra) -> dict:
    """One row: medians of the step times, the largest peak, and the peak above the weights."""
    peaks = [r["peak"] for r in records if "peak" in r]
    peak = max(peaks) if peaks else None
    row = {**_row_head(case, method), "status": "ok", "steps": len(records),
           "gpu_ms": statistics.median(r["gpu"] for r in records) * 1e3,
           "host_ms": statistics.median(r["host"] for r in records) * 1e3,
           "weights_bytes": weights, "peak_bytes": peak,
           "above_weights_bytes": None if peak is None else peak - weights, "note": note}
    if len(records) > 1:
        row["first_ms"] = records[0]["gpu"] * 1e3
    row.update(extra)
    return row


def _row_head(case: ModelCase, method: str) -> dict:
    shape = case.model_shape
    return {"shape": case.shape, "model": shape.name, "tokens": case.tokens, "batch": case.batch, "seq": case.seq,
            "dtype": case.dtype, "device": case.device, "kv_heads": shape.kv_heads, "method": method}


def failure_row(case: ModelCase, method: str, error: BaseException | str) -> dict:
    """A row whose status is the error's first line (the JSON keeps more: ``error_detail``)."""
    detail = None
    if isinstance(error, BaseException):
        message = str(error).strip()
        detail = f"{type(error).__name__}: {message[:2000]}"
        if error.__cause__ is not None:
            detail += f"\ncaused by {type(error.__cause__).__name__}: {str(error.__cause__).strip()[:1000]}"
        error = f"{type(error).__name__}: {message.splitlines()[0][:200] if message else ''}"
    row = {**_row_head(case, method), "status": error}
    if detail:
        row["error_detail"] = detail
    return row


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _steady(trainer: Trainer, case, method, weights, options: Options, cpu_memory: bool, **extra) -> dict:
    measure_steps(trainer, options.warmup)
    records = measure_steps(trainer, options.timed)
    if cpu_memory:  # one more step, with the memory tracker (its time is not counted)
        records[-1]["peak"] = measure_steps(trainer, 1, track_memory_on_cpu=True)[0]["peak"]
    return summarize(case, method, records, weights, **extra)


def _compiled(trainer: Trainer, case, method, weights, options: Options) -> dict:
    """``torch.compile(mode="reduce-overhead")`` of the trainer's model; compile time = the first steps' wall."""
    device = torch.device(case.device)
    if device.type != "cuda":
        return failure_row(case, method, "skipped: CUDA graphs need a GPU")
    try:
        trainer.compile()
        start = time.perf_counter()
        measure_steps(trainer, options.compile_warmup)
        compile_s = time.perf_counter() - start
        records = measure_steps(trainer, options.timed)
        return summarize(case, method, records, weights, compile_s=compile_s,
                         note=f"first {options.compile_warmup} steps (compile + graph capture) took {compile_s:.1f} s")
    except Exception as error:  # noqa: BLE001 - a failing compile is a row, not the end of the sweep
        return failure_row(case, method, error)
    finally:
        trainer.forward, trainer.compiled = trainer.model, False
        torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# One case: every requested method, in turn, each on a model of its own
# ----------------------------------------------------------------------------------------------


def run_case(case: ModelCase, methods=ALL_METHODS, options: Options | None = None,
             log: Callable[[str], None] = lambda message: None) -> list[dict]:
    """Rows for ``methods`` of ``case`` (in ``ALL_METHODS`` order; unknown names raise)."""
    options = options or Options()
    unknown = sorted(set(methods) - set(ALL_METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {ALL_METHODS}")
    skipped = {m: f"skipped: {reason}" for m in methods if (reason := missing_requirements([m]))}
    if skipped:  # without peft, full FT and RoSA still run
        methods = tuple(m for m in methods if m not in skipped)
        if not methods:
            return [failure_row(case, m, reason) for m, reason in skipped.items()]
    device = torch.device(case.device)
    cpu_memory = device.type == "cpu"
    rows: list[dict] = []

    def guarded(names, body):
        """Runs ``body()`` (which appends rows); on an error, the names without a row get failure rows."""
        names = [n for n in names if n in methods]
        if not names:
            return
        before = len(rows)
        try:
            body()
        except Exception as error:  # noqa: BLE001 - one failing method must not end the sweep
            done = {r["method"] for r in rows[before:]}
            rows.extend(failure_row(case, n, error) for n in names if n not in done)
        finally:
            _free(device)
        for row in rows[before:]:
            log(_row_text(row))

    def plain(method):
        def body():
            model, _ = wrap(build_model(case), method)
            weights = weights_bytes(model, device)
            trainer = Trainer(model, case)
            if method in methods:
                rows.append(_steady(trainer, case, method, weights, options, cpu_memory))
            if f"{method}+compile" in methods:
                rows.append(_compiled(trainer, case, f"{method}+compile", weights, options))
        return body

    guarded(["full", "full+compile"], plain("full"))
    guarded(["lora", "lora+compile"], plain("lora"))

    def rosa_structured():
        model, scheduler = wrap(build_model(case), "rosa", warmup_steps=10**9)  # not stepped: masks come from here
        weights = weights_bytes(model, device)  # before the masks, as for `rosa`, whose masks come in training
        model.set_masks(structured_masks(model))  # every layer enters the sparse phase
        rows.append(_steady(Trainer(model, case), case, "rosa-structured", weights, options, cpu_memory,
                            phase=scheduler.phase,
                            note="masks of the rosa recipe (rosa_kernels.testing.rosa_mask), set with set_masks"))

    guarded(["rosa-structured"], rosa_structured)

    def rosa_life_cycle():
        # warm-up: `warmup` untimed + `phase_timed` timed LoRA-only steps, then the last warm-up step
        # (its scheduler.step() starts the collection), the collection step (its scheduler.step()
        # selects the masks), the first sparse steps, and the steady sparse phase. Only the compiled
        # row wanted: the shortest way into the sparse phase (one warm-up and one collection step).
        phases = any(m in methods for m in (*PHASES, "rosa"))
        warmup_steps = options.warmup + options.phase_timed + 1 if phases else 1
        model, scheduler = wrap(build_model(case), "rosa", warmup_steps=warmup_steps, collect_steps=1)
        weights = weights_bytes(model, device)
        trainer = Trainer(model, case, scheduler)
        if phases:
            measure_steps(trainer, options.warmup)
            records = measure_steps(trainer, options.phase_timed, track_memory_on_cpu=cpu_memory)
            if "rosa-warmup" in methods:
                rows.append(summarize(case, "rosa-warmup", records, weights, phase=scheduler.phase))
        one_shot = "a single step (once per run)" + ("; CPU: its time includes the memory tracker" if cpu_memory else "")
        records = measure_steps(trainer, 1, track_memory_on_cpu=cpu_memory and phases)
        if "rosa-warmup-end" in methods:
            rows.append(summarize(case, "rosa-warmup-end", records, weights, phase=scheduler.phase, note=one_shot))
        records = measure_steps(trainer, 1, track_memory_on_cpu=cpu_memory and phases)
        if "rosa-collect" in methods:
            rows.append(summarize(case, "rosa-collect", records, weights, phase=scheduler.phase, note=one_shot))
        if scheduler.phase != "sparse":
            raise RuntimeError(f"RoSA is in phase {scheduler.phase!r} after its collection step, not 'sparse'")
        if phases:
            records = measure_steps(trainer, options.phase_timed, track_memory_on_cpu=cpu_memory)
            if "rosa-first-sparse" in methods:
                rows.append(summarize(case, "rosa-first-sparse", records, weights, phase=scheduler.phase,
                                      note=f"steps right after mask selection: {options.phase_timed}"))
        if "rosa" in methods:
            rows.append(_steady(trainer, case, "rosa", weights, options, cpu_memory, phase=scheduler.phase))
        if "rosa+compile" in methods:
            rows.append(_compiled(trainer, case, "rosa+compile", weights, options))

    guarded(["rosa-warmup", "rosa-warmup-end", "rosa-collect", "rosa-first-sparse", "rosa", "rosa+compile"],
            rosa_life_cycle)

    def rosa_collect_accumulated():
        model, scheduler = wrap(build_model(case), "rosa", warmup_steps=1, collect_steps=1)
        weights = weights_bytes(model, device)
        trainer = Trainer(model, case, scheduler)
        measure_steps(trainer, 1)  # the warm-up step, which starts the collection
        trainer.micro_batches = options.micro_batches
        records = measure_steps(trainer, 1, track_memory_on_cpu=cpu_memory)
        rows.append(summarize(case, "rosa-collect-8", records, weights, phase=scheduler.phase,
                              micro_batches=options.micro_batches,
                              note=f"{options.micro_batches} forward + backward, then one optimizer step; a single step"))
        if scheduler.phase != "sparse":
            raise RuntimeError(f"RoSA is in phase {scheduler.phase!r} after its collection step, not 'sparse'")

    guarded(["rosa-collect-8"], rosa_collect_accumulated)

    def quantized(method):
        def body():
            model, scheduler = wrap(build_model(case), method)
            weights = weights_bytes(model, device)
            trainer = Trainer(model, case, scheduler)
            extra = {}
            if scheduler is not None:  # QRoSA: its warm-up and collection steps, into the sparse phase
                measure_steps(trainer, 2)
                if scheduler.phase != "sparse":
                    raise RuntimeError(f"QRoSA is in phase {scheduler.phase!r} after its collection step, not 'sparse'")
                extra["phase"] = scheduler.phase
            rows.append(_steady(trainer, case, method, weights, options, cpu_memory, **extra))
        return body

    for method in QUANTIZED:
        guarded([method], quantized(method))
    rows += [failure_row(case, m, reason) for m, reason in skipped.items()]
    order = {m: i for i, m in enumerate(ALL_METHODS)}
    return sorted(rows, key=lambda r: order[r["method"]])


def _row_text(row: dict) -> str:
    head = f"{row['model']}, {row['tokens']} tokens, {row['method']}"
    if row["status"] != "ok":
        return f"{head}: {row['status']}"
    peak = row.get("above_weights_bytes")
    memory = "" if peak is None else f", {peak / 2**30:.3g} GiB above the weights"
    return f"{head}: {row['gpu_ms']:.4g} ms (host {row['host_ms']:.4g} ms){memory}"


def environment(device) -> dict:
    """Versions of what the model step depends on, and the CPU (host-bound rows depend on it)."""
    from bench import common

    info = dict(common.versions(device))
    info["cpu"] = common.device_name("cpu")
    for module in ("transformers", "peft", "accelerate", "bitsandbytes"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = None
    return info


def run_sweep(cases, methods=ALL_METHODS, options: Options | None = None,
              log: Callable[[str], None] = lambda message: None, time_limit: float | None = None) -> dict:
    """Every case's rows, plus the environment; cases left when ``time_limit`` seconds have passed
    become "skipped" rows."""
    started = time.perf_counter()
    options = options or Options()
    device = cases[0].device if cases else "cpu"
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "environment": environment(device),
               "options": dataclasses.asdict(options), "methods": list(methods),
               "step": "forward + causal-LM loss + backward + AdamW + zero_grad(set_to_none=True) "
                       "(+ RoSA's scheduler.step())",
               "timing": ("CUDA events around each step, median; host: perf_counter around the step, no sync"
                          if device == "cuda" else "perf_counter around each step, median"),
               "rows": []}
    for case in cases:
        if time_limit is not None and time.perf_counter() - started > time_limit:
            results["rows"] += [failure_row(case, m, f"skipped: the time limit ({time_limit:.0f} s) was reached")
                                for m in ALL_METHODS if m in methods]
            continue
        log(f"--- {case.model_shape.name}, {case.tokens} tokens ({case.batch} x {case.seq}), {case.dtype}")
        results["rows"] += run_case(case, methods, options, log)
    results["elapsed_s"] = time.perf_counter() - started
    return results
