"""Putting RosaLinear to work on a whole model, in PEFT's shape.

- :class:`RosaConfig`: rank, alpha, dropout, density, ``target_modules`` (names, suffixes, a regex or
  ``"all-linear"``), ``exclude_modules``, warm-up and collection steps, the Fisher/mean rule.
- :func:`apply_rosa` replaces the targeted ``nn.Linear`` modules in place and freezes the rest;
  :func:`get_rosa_model` wraps the model in a :class:`RosaModel` with ``save_pretrained`` /
  ``from_pretrained`` (``adapter_model.safetensors`` + ``adapter_config.json``, masks as int32
  CSR inside) and ``merge_and_unload``.
- :class:`RosaScheduler` drives warm-up -> collection -> mask selection -> sparse training from step
  counts in a plain loop; ``scheduler.trainer_callback()`` does the same inside a ``transformers``
  Trainer.

Nothing here needs ``transformers``; adapter files are read and written with ``safetensors``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import torch
from torch import nn

from . import linear as _linear
from . import masks as _masks
from .csr import CSR, validate_csr
from .linear import SPARSE_MODES, RosaLinear, _is_sharded, check_hyperparameters
from .qrosa import QUANTIZED_SPARSE_MODES, is_quantized_linear

__all__ = [
    "RosaConfig",
    "RosaModel",
    "RosaScheduler",
    "apply_rosa",
    "get_rosa_model",
    "merge_and_unload",
    "rosa_layers",
    "find_target_modules",
    "progress",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


@dataclasses.dataclass
class RosaConfig:
    """Hyper-parameters of a RoSA adapter (defaults: RoSA's published scripts)."""

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.05
    density: float = 0.006
    target_modules: str | list[str] | None = "all-linear"
    exclude_modules: str | list[str] | None = None
    warmup_steps: int = 64
    collect_steps: int = 1
    rule: str = "fisher"
    # Where collection keeps the gradient statistic (rosa_kernels.masks.COLLECT_BUFFERS): "auto"
    # (2 bytes per weight, exact with one backward pass), "one_pass", "float16", "bfloat16",
    # "float32" or "host" (docs/rosa_linear.md). The number of micro-batches need not be declared.
    collect_buffer: str = "auto"
    use_rslora: bool = False
    sparse_mode: str = "merged"
    # RoSA restarts training from step 0 once the mask is known: re-initialize LoRA (and S = 0).
    reset_adapters_after_mask: bool = False

    def validate(self) -> "RosaConfig":
        check_hyperparameters(self.rank, self.density, self.alpha, self.dropout)
        _masks.check_rule(self.rule)
        _masks.check_collect_buffer(self.collect_buffer)
        if self.sparse_mode not in SPARSE_MODES:
            raise ValueError(f"sparse_mode must be one of {SPARSE_MODES}, got {self.sparse_mode!r}")
        for name in ("warmup_steps", "collect_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.collect_steps < 1:
            raise ValueError(f"collect_steps must be >= 1, got {self.collect_steps}")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str) and not (
                isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value)
            ):
                raise TypeError(f"{name} must be None, a string (regex or 'all-linear') or a list of names")
        if self.target_modules is None:
            raise ValueError("target_modules must name the modules to adapt (or be 'all-linear')")
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for name in ("target_modules", "exclude_modules"):
            if isinstance(d[name], (set, tuple)):
                d[name] = sorted(d[name])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RosaConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})

    def layer_kwargs(self) -> dict:
        return {"rank": self.rank, "density": self.density, "alpha": self.alpha, "dropout": self.dropout,
                "use_rslora": self.use_rslora, "rule": self.rule, "sparse_mode": self.sparse_mode}


def _matches(name: str, spec) -> bool:
    """PEFT's rule: a string is a regex matched against the full name; a list matches a name
    exactly or as a suffix after a dot."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def find_target_modules(model: nn.Module, config: RosaConfig) -> list[str]:
    """The names of the ``nn.Linear`` modules ``config`` targets (in ``named_modules`` order), bitsandbytes'
    4-bit ``Linear4bit`` included (QRoSA), the bases inside RosaLinear modules excluded."""
    output_layer = None
    if config.target_modules == "all-linear":
        get_output = getattr(model, "get_output_embeddings", None)
        output_layer = get_output() if callable(get_output) else None
    names, adapted = [], ()
    for name, module in model.named_modules():
        if isinstance(module, RosaLinear):  # a QRosaLinear's base_layer is an nn.Linear inside it
            adapted += (f"{name}." if name else "",)
            continue
        if not name or not isinstance(module, nn.Linear) or name.startswith(adapted):
            continue
        if config.target_modules == "all-linear":
            # As PEFT: every linear layer except the output (language-model head) layer.
            if module is output_layer or name.split(".")[-1] == "lm_head":
                continue
        elif not _matches(name, config.target_modules):
            continue
        if _matches(name, config.exclude_modules):
            continue
        names.append(name)
    return names


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_rosa(model: nn.Module, config: RosaConfig | None = None, **overrides) -> dict[str, RosaLinear]:
    """Replaces the targeted ``nn.Linear`` modules of ``model`` by :class:`RosaLinear` (in place).

    bitsandbytes ``Linear4bit`` targets become :class:`rosa_kernels.qrosa.QRosaLinear` around them
    (QRoSA; the config's ``sparse_mode="merged"``, the default, means ``"csr_add"`` there).

    Every other parameter is frozen. Returns ``{name: RosaLinear}`` for the replaced modules.
    Keyword arguments override fields of ``config`` (or of the default config). The arguments are
    checked before anything changes: on an error the model is left as it was.
    """
    config = dataclasses.replace(config or RosaConfig(), **overrides).validate()
    names = find_target_modules(model, config)
    if not names:
        raise ValueError(f"target_modules={config.target_modules!r} matches no nn.Linear module of the model")
    kwargs = config.layer_kwargs()
    # A 4-bit base (QRoSA) cannot hold W + S: there the default "merged" means QRosaLinear's default.
    quantized_kwargs = {**kwargs, "sparse_mode": QUANTIZED_SPARSE_MODES[0]} if config.sparse_mode == "merged" else kwargs
    replaced = {}
    for name in names:
        module = model.get_submodule(name)
        replaced[name] = RosaLinear.from_linear(module, **(quantized_kwargs if is_quantized_linear(module) else kwargs))
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in replaced.items():
        _set_submodule(model, name, layer)
    return replaced


def rosa_layers(model: nn.Module) -> dict[str, RosaLinear]:
    """``{name: RosaLinear}`` of every RosaLinear inside ``model`` (``named_modules`` order)."""
    if isinstance(model, RosaLinear):
        return {"": model}
    if isinstance(model, RosaModel):
        return model.rosa_layers()
    return {name: m for name, m in model.named_modules() if isinstance(m, RosaLinear)}


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replaces every RosaLinear by a plain ``nn.Linear`` with W + S + scale·B·A; returns the model."""
    if isinstance(model, RosaModel):
        return model.merge_and_unload()
    for name, layer in rosa_layers(model).items():
        _set_submodule(model, name, layer.merge())
    return model


def progress(iterable, total: int | None = None, desc: str = "", enabled: bool | None = None):
    """A progress bar on stderr: tqdm's when it is installed, else a plain one-line counter.

    ``enabled=None`` shows it only when stderr is a terminal.
    """
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield from iterable
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        yield from tqdm(iterable, total=total, desc=desc)
        return
    total = total if total is not None else len(iterable)
    start = time.perf_counter()
    for i, item in enumerate(iterable):
        yield item
        width = 30
        done = int(width * (i + 1) / max(total, 1))
        sys.stderr.write(f"\r{desc} [{'#' * done}{'.' * (width - done)}] {i + 1}/{total} "
                         f"{time.perf_counter() - start:.1f}s")
        sys.stderr.flush()
    sys.stderr.write("\n")


def start_collection(model: nn.Module, rule: str | None = None, collect_buffer: str = "auto") -> None:
    """Puts every RosaLinear of ``model`` into the gradient-collection phase (nothing is allocated
    until each layer's first collecting backward; see ``RosaLinear.start_collection``)."""
    _masks.check_collect_buffer(collect_buffer)
    for layer in rosa_layers(model).values():
        layer.start_collection(rule, collect_buffer)


def select_masks(model: nn.Module, *, show_progress: bool | None = None, reset_adapters: bool = False) -> dict[str, CSR]:
    """Selects every layer's mask from its collected statistic (all ranks in the same order; the
    plans' host decisions take one host synchronization for all layers: ``linear.select_masks_of``)."""
    layers = rosa_layers(model)
    shown = progress(layers.values(), len(layers), "RoSA mask selection", show_progress)
    result = dict(zip(layers, _linear.select_masks_of(shown)))
    if reset_adapters:
        for layer in layers.values():
            layer.reset_adapters()
    return result


class RosaScheduler:
    """Drives the phases of every RosaLinear in ``model`` from optimizer-step counts.

    Call :meth:`step` after each optimizer step (and after your lr scheduler's step). Steps
    ``0 .. warmup_steps-1`` train LoRA only, the next ``collect_steps`` also collect the gradient
    statistic, then the masks are selected and the sparse adapter trains with LoRA. ``config``
    defaults to the model's (a :class:`RosaModel`) or to :class:`RosaConfig`'s defaults.

    With ``config.reset_adapters_after_mask`` the masks' selection restarts training from step 0 (RoSA's
    recipe): the adapters are re-initialized and, when given, ``optimizer`` and ``lr_scheduler`` are
    restarted too (:func:`rosa_kernels.restart_optimizer`). ``select_masks`` replaces the Fisher top-k:
    a function ``model -> {name: CSR}`` that sets the masks itself, e.g.
    ``functools.partial(rosa_kernels.random_masks, seed=0)`` for the random-mask ablation.
    """

    def __init__(self, model: nn.Module, config: RosaConfig | None = None, *, show_progress: bool | None = None,
                 optimizer: torch.optim.Optimizer | None = None, lr_scheduler=None, select_masks=None):
        if config is None:
            config = model.config if isinstance(model, RosaModel) else RosaConfig()
        if select_masks is not None and not callable(select_masks):
            raise TypeError(f"select_masks must be a function model -> masks, got {type(select_masks).__name__}")
        if lr_scheduler is not None and optimizer is None:
            raise ValueError("lr_scheduler is restarted with its optimizer: pass optimizer too")
        self.model, self.config, self.show_progress = model, config.validate(), show_progress
        self.optimizer, self.lr_scheduler, self._select_masks = optimizer, lr_scheduler, select_masks
        self.steps = 0
        self.masks: dict[str, CSR] | None = None
        if not rosa_layers(model):
            raise ValueError("model contains no RosaLinear module: apply_rosa first")
        if config.warmup_steps == 0:
            start_collection(model, config.rule, config.collect_buffer)

    @property
    def phase(self) -> str:
        phases = {layer.phase for layer in rosa_layers(self.model).values()}
        return phases.pop() if len(phases) == 1 else "mixed"

    def step(self, *, optimizer: torch.optim.Optimizer | None = None, lr_scheduler=None) -> bool:
        """Advances one optimizer step; returns True at the step where the masks were just selected
        (the place to restart an optimizer of your own). ``optimizer`` / ``lr_scheduler`` override the
        constructor's for this step."""
        self.steps += 1
        c = self.config
        if self.steps == c.warmup_steps:
            start_collection(self.model, c.rule, c.collect_buffer)
        if self.steps != c.warmup_steps + c.collect_steps:
            return False
        if self._select_masks is None:
            self.masks = select_masks(self.model, show_progress=self.show_progress)
        else:
            self._select_masks(self.model)
            self.masks = {n: layer.mask() for n, layer in rosa_layers(self.model).items()}
        if c.reset_adapters_after_mask:
            for layer in rosa_layers(self.model).values():
                layer.reset_adapters()
            optimizer = optimizer if optimizer is not None else self.optimizer
            if optimizer is not None:
                from .recipe import restart_optimizer

                restart_optimizer(optimizer, lr_scheduler if lr_scheduler is not None else self.lr_scheduler)
        return True

    def state_dict(self) -> dict:
        """The scheduler's position (as a PyTorch scheduler's ``state_dict``): the steps taken, and
        the phase lengths they count against."""
        return {"steps": self.steps, "warmup_steps": self.config.warmup_steps,
                "collect_steps": self.config.collect_steps}

    def load_state_dict(self, state: dict) -> None:
        """Restores the position only: the layers' phases, masks and collection state come back with
        the model (:meth:`RosaModel.load_checkpoint`). Phase lengths must match this scheduler's."""
        self._check_state(state)
        self.steps = state["steps"]
        c = self.config
        done = self.steps >= c.warmup_steps + c.collect_steps
        self.masks = {n: layer.mask() for n, layer in rosa_layers(self.model).items()} if done else None

    def _check_state(self, state) -> None:
        if not isinstance(state, dict) or set(state) != {"steps", "warmup_steps", "collect_steps"}:
            raise ValueError(f"a RosaScheduler state has the keys steps, warmup_steps, collect_steps; got {state!r}")
        steps = state["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"scheduler steps must be an int >= 0, got {steps!r}")
        for key in ("warmup_steps", "collect_steps"):
            if state[key] != getattr(self.config, key):
                raise ValueError(f"the saved scheduler ran with {key}={state[key]}, this one has "
                                 f"{getattr(self.config, key)}")

    def trainer_callback(self):
        """A ``transformers.TrainerCallback`` calling :meth:`step` at each step end."""
        from transformers import TrainerCallback

        scheduler = self

        class RosaTrainerCallback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                # The Trainer's optimizer and lr scheduler, restarted with the mask when the config says so.
                scheduler.step(optimizer=kwargs.get("optimizer"), lr_scheduler=kwargs.get("lr_scheduler"))
                return control

        return RosaTrainerCallback()


class RosaModel(nn.Module):
    """A model whose targeted linear layers are RosaLinear, with PEFT-style saving and merging."""

    def __init__(self, model: nn.Module, config: RosaConfig | None = None, **overrides):
        config = dataclasses.replace(config or RosaConfig(), **overrides).validate()
        replaced = apply_rosa(model, config)
        super().__init__()
        self.base_model = model
        self.config = config
        self.layer_names = list(replaced)

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_model"), name)

    # -- inspection -----------------------------------------------------------------------------
    def rosa_layers(self) -> dict[str, RosaLinear]:
        return {name: self.base_model.get_submodule(name) for name in self.layer_names}

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def print_trainable_parameters(self) -> None:
        total = sum(p.numel() for p in self.parameters())
        trainable = self.trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    # -- life cycle -----------------------------------------------------------------------------
    def scheduler(self, **kwargs) -> RosaScheduler:
        return RosaScheduler(self, self.config, **kwargs)

    def parameter_groups(self, **kwargs) -> list[dict]:
        """:func:`rosa_kernels.parameter_groups` of this model (LoRA and sparse learning rates)."""
        from .recipe import parameter_groups

        return parameter_groups(self, **kwargs)

    def random_masks(self, seed: int = 0, *, apply: bool = True) -> dict[str, CSR]:
        """:func:`rosa_kernels.random_masks` of this model (the random-mask ablation)."""
        from .recipe import random_masks

        return random_masks(self, seed, apply=apply)

    def start_collection(self) -> None:
        start_collection(self, self.config.rule, self.config.collect_buffer)

    def select_masks(self, *, show_progress: bool | None = None) -> dict[str, CSR]:
        return select_masks(self, show_progress=show_progress, reset_adapters=self.config.reset_adapters_after_mask)

    def masks(self) -> dict[str, CSR]:
        return {name: m for name, layer in self.rosa_layers().items() if (m := layer.mask()) is not None}

    def set_masks(self, masks: dict[str, CSR]) -> None:
        """Sets the masks of the named layers (all are checked before any is set)."""
        layers = self.rosa_layers()
        unknown = sorted(set(masks) - set(layers))
        if unknown:
            raise ValueError(f"masks name layers this model does not adapt: {unknown}")
        for name, mask in masks.items():
            layer = layers[name]
            if not isinstance(mask, CSR):
                raise TypeError(f"masks[{name!r}] must be a rosa_kernels.CSR, got {type(mask).__name__}")
            if tuple(mask.shape) != (layer.out_features, layer.in_features) or mask.nnz != layer.nnz:
                raise ValueError(f"mask for {name} has shape {tuple(mask.shape)} and {mask.nnz} nonzeros; the layer "
                                 f"needs ({layer.out_features}, {layer.in_features}) and {layer.nnz}")
            _check_structure(name, mask.row_offsets, mask.col_indices, mask.row_indices, layer.out_features,
                             layer.in_features, layer.nnz)
        for name, mask in masks.items():
            layers[name].set_mask(mask)

    def save_masks(self, path) -> None:
        _masks.save_masks(path, self.masks())

    def load_masks(self, path) -> None:
        self.set_masks(_masks.load_masks(path))

    def merge_and_unload(self) -> nn.Module:
        for name, layer in self.rosa_layers().items():
            _set_submodule(self.base_model, name, layer.merge())
        self.layer_names = []
        return self.base_model

    # -- checkpoint and resume --------------------------------------------------------------------
    def checkpoint_state(self, optimizer: torch.optim.Optimizer | None = None,
                         scheduler: RosaScheduler | None = None, *, rng: bool = True) -> dict:
        """Everything a run needs to resume where it stands, as a dict for ``torch.save``.

        The adapters and masks (as :meth:`save_pretrained` writes them), each collecting layer's
        collection state, any other trainable parameter, ``optimizer.state_dict()``,
        ``scheduler.state_dict()`` and (``rng=True``) torch's CPU and CUDA generator states, which
        drive the LoRA dropout. The frozen base weights are not included: rebuild the base model as
        the run did. Like ``state_dict()``, tensors on the CPU may be the live ones: serialize the
        result (:meth:`save_checkpoint` does) before training on.
        """
        layers = self.rosa_layers()
        rosa_parameters = {id(p) for layer in layers.values() for p in layer.parameters()}
        collection = {}
        for name, layer in layers.items():
            state = layer.collection_state_dict()
            if state:
                collection[name] = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "layers": {name: [layer.out_features, layer.in_features, layer.nnz] for name, layer in layers.items()},
            "phases": {name: layer.phase for name, layer in layers.items()},
            "adapter": {k: v.detach().cpu() for k, v in self.adapter_state().items()},
            "collection": collection,
            # A collection state is this rank's own (its gradients; under FSDP2 its rows): it resumes
            # only on the same rank of the same world size (load_checkpoint_state checks).
            "collection_rank": _rank_and_world() if collection else None,
            "trainable": {name: p.detach().cpu() for name, p in self.named_parameters()
                          if p.requires_grad and id(p) not in rosa_parameters},
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": _rng_state() if rng else None,
        }

    def load_checkpoint_state(self, state: dict, optimizer: torch.optim.Optimizer | None = None,
                              scheduler: RosaScheduler | None = None, *, rng: bool = True) -> None:
        """Resumes from :meth:`checkpoint_state` into this model (built as the run built it, before any
        training), ``optimizer`` and ``scheduler`` (built as the run built them).

        Everything is checked before anything changes: a checkpoint of another model, config,
        optimizer or schedule raises ``ValueError`` and leaves model, optimizer and scheduler as they were.
        """
        source = "the checkpoint"
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not a rosa_kernels checkpoint (format {state.get('format') if isinstance(state, dict) else None!r})")
        try:
            saved_config = RosaConfig.from_dict(state["config"]).validate()
        except (TypeError, ValueError) as error:
            raise ValueError(f"the checkpoint holds an invalid RosaConfig: {error}") from error
        ours = self.config.to_dict()
        differ = sorted(k for k, v in saved_config.to_dict().items() if k != "sparse_mode" and ours[k] != v)
        if differ:
            raise ValueError(f"the checkpoint's config differs from this model's in {differ}")
        layers = self.rosa_layers()
        checked = _check_adapter({n: tuple(v) for n, v in state["layers"].items()}, layers, saved_config,
                                 state["adapter"], source)
        phases = state["phases"]
        saved_rank = state.get("collection_rank")
        if state["collection"] and (saved_rank is not None or _rank_and_world() is not None) \
                and saved_rank != _rank_and_world():
            def where(rank_world):
                return "one process" if rank_world is None else f"rank {rank_world[0]} of {rank_world[1]}"

            raise ValueError(f"the checkpoint holds the collection state of {where(saved_rank)}, but this is "
                             f"{where(_rank_and_world())}: during the collection each rank's statistic is its own, "
                             f"so each rank saves and loads its own checkpoint file (docs/rosa_linear.md)")
        unknown = sorted(set(state["collection"]) - set(layers))
        if unknown:
            raise ValueError(f"the checkpoint holds collection states of layers this model does not adapt: {unknown}")
        for name, (_, _, mask) in checked.items():
            collecting = name in state["collection"]
            expected = "sparse" if mask is not None else "collect" if collecting else "warmup"
            if phases.get(name) != expected:
                raise ValueError(f"the checkpoint is inconsistent: layer {name} is in phase {phases.get(name)!r} "
                                 f"with{'' if mask is not None else 'out'} a mask and with"
                                 f"{'' if collecting else 'out'} a collection state")
        trainable = dict(state["trainable"])
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        for name, value in trainable.items():
            if name not in params or params[name].shape != value.shape:
                raise ValueError(f"the checkpoint's trainable parameter {name} ({tuple(value.shape)}) has no match here")
        if optimizer is not None:
            _check_optimizer_state(optimizer, state["optimizer"])
        if scheduler is not None:
            if state["scheduler"] is None:
                raise ValueError("the checkpoint holds no scheduler state")
            scheduler._check_state(state["scheduler"])
        # Collection states are checked by the layers themselves: undo them all if one is refused.
        previous = {name: layer.collection_state_dict() for name, layer in layers.items()}
        try:
            for name, layer in layers.items():
                layer.load_collection_state_dict(state["collection"].get(name, {}))
        except (TypeError, ValueError):
            for name, layer in layers.items():
                layer.load_collection_state_dict(previous[name])
            raise
        self._apply_adapter(checked)
        with torch.no_grad():
            for name, value in trainable.items():
                params[name].copy_(value)
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        if rng and state.get("rng") is not None:
            _set_rng_state(state["rng"])

    def save_checkpoint(self, path, optimizer: torch.optim.Optimizer | None = None,
                        scheduler: RosaScheduler | None = None, *, rng: bool = True) -> None:
        """Writes :meth:`checkpoint_state` to ``path`` with ``torch.save``, atomically: the file is
        written next to ``path`` and renamed into place when complete, so a failure mid-save leaves
        the previous checkpoint intact."""
        state = self.checkpoint_state(optimizer, scheduler, rng=rng)
        _masks.atomic_write({Path(path): lambda temporary: torch.save(state, temporary)})

    def load_checkpoint(self, path, optimizer: torch.optim.Optimizer | None = None,
                        scheduler: RosaScheduler | None = None, *, rng: bool = True) -> None:
        """Resumes from a file of :meth:`save_checkpoint` (see :meth:`load_checkpoint_state`)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch.load raises many kinds on a damaged file
            raise ValueError(f"{path} is not a readable checkpoint (truncated or corrupt?): {error}") from error
        try:
            self.load_checkpoint_state(state, optimizer, scheduler, rng=rng)
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{path} is not a complete rosa_kernels checkpoint: {error!r}") from error

    # -- saving and loading -------------------------------------------------------------------------
    def adapter_state(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, layer in self.rosa_layers().items():  # every rank in the same order: FSDP2 gathers
            tensors[f"{name}.lora_A"] = _full_tensor(layer.lora_A.detach())
            tensors[f"{name}.lora_B"] = _full_tensor(layer.lora_B.detach())
            if layer.phase == "sparse":
                tensors[f"{name}.sparse_values"] = _full_tensor(layer.sparse_values.detach())
                tensors[f"{name}.row_offsets"] = layer.row_offsets
                tensors[f"{name}.row_indices"] = layer.row_indices
                tensors[f"{name}.col_indices"] = layer.col_indices
        return tensors

    def save_pretrained(self, directory) -> None:
        """Writes ``adapter_config.json`` and ``adapter_model.safetensors`` into ``directory``.

        Atomic: both files are written to temporary files in ``directory`` and renamed into place
        only when both are complete, so an error (or a kill) mid-save leaves a previous adapter there
        intact.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        layers = {name: [layer.out_features, layer.in_features, layer.nnz] for name, layer in self.rosa_layers().items()}
        config = json.dumps({"peft_type": "ROSA", "format": "rosa_kernels", **self.config.to_dict(), "layers": layers},
                            indent=2) + "\n"
        tensors = self.adapter_state()
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return  # the adapter is the same on every rank (gathered under FSDP2): rank 0 writes it
        _masks.atomic_write({
            directory / WEIGHTS_NAME: lambda path: _masks.write_safetensors(tensors, path, {"format": "rosa_kernels"}),
            directory / CONFIG_NAME: lambda path: Path(path).write_text(config),
        })

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory) -> "RosaModel":
        """Applies a saved adapter to ``model`` (the same base architecture) and loads its weights.

        The whole adapter (layer names, shapes, rank, density, every tensor and mask) is checked
        against ``model`` first: a mismatch or a damaged file raises a ``ValueError`` (a missing file
        ``FileNotFoundError``) and leaves ``model`` unchanged.
        """
        config, saved_layers, tensors = _read_adapter(directory)
        names = find_target_modules(model, config)
        checked = _check_adapter(saved_layers, {n: model.get_submodule(n) for n in names}, config, tensors, directory)
        rosa = cls(model, config)
        rosa._apply_adapter(checked)
        return rosa

    def load_adapter(self, directory) -> None:
        """Loads a saved adapter's weights and masks into this (already wrapped) model.

        Everything is checked first, as in :meth:`from_pretrained`: on an error the model is unchanged.
        """
        config, saved_layers, tensors = _read_adapter(directory)
        self._apply_adapter(_check_adapter(saved_layers, self.rosa_layers(), config, tensors, directory))

    def _apply_adapter(self, checked: dict) -> None:
        """Loads adapter tensors that :func:`_check_adapter` accepted (nothing here can fail)."""
        layers = self.rosa_layers()
        for name, (lora_A, lora_B, mask) in checked.items():
            layer = layers[name]
            device = layer.weight.device
            if mask is not None:
                layer.set_mask(mask)
                with torch.no_grad():
                    layer.sparse_values.copy_(mask.values.to(device))
            with torch.no_grad():
                layer.lora_A.copy_(lora_A.to(device))
                layer.lora_B.copy_(lora_B.to(device))


CHECKPOINT_FORMAT = "rosa_kernels.checkpoint.v1"


def _rng_state() -> dict:
    """torch's generator states: the LoRA dropout draws its seeds from the CPU one
    (:func:`rosa_kernels.dropout.draw_seed`); CUDA's are kept for the user's own random ops."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_optimizer_state(optimizer: torch.optim.Optimizer, state) -> None:
    """What ``optimizer.load_state_dict`` checks, and the per-parameter tensor shapes it does not."""
    if not isinstance(state, dict) or "param_groups" not in state or "state" not in state:
        raise ValueError("the checkpoint holds no optimizer state")
    groups, saved_groups = optimizer.param_groups, state["param_groups"]
    if len(groups) != len(saved_groups) or any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)):
        raise ValueError(f"the checkpoint's optimizer has parameter groups of sizes "
                         f"{[len(s['params']) for s in saved_groups]}, this one {[len(g['params']) for g in groups]}")
    params = {saved: p for g, s in zip(groups, saved_groups) for saved, p in zip(s["params"], g["params"])}
    for index, entry in state["state"].items():
        if index not in params:
            raise ValueError(f"the checkpoint's optimizer has state for parameter {index!r}, which its groups lack")
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != params[index].shape:
                raise ValueError(f"the checkpoint's optimizer state {key} of parameter {index} has shape "
                                 f"{tuple(value.shape)}, the parameter {tuple(params[index].shape)}")


_ADAPTER_FIELDS = ("lora_A", "lora_B", "sparse_values", "row_offsets", "row_indices", "col_indices")
_MASK_FIELDS = _ADAPTER_FIELDS[2:]


def _read_adapter(directory) -> tuple[RosaConfig, dict, dict[str, torch.Tensor]]:
    """Reads a saved adapter: ``(config, {layer: (out, in, nnz)}, tensors)``; clear errors for missing,
    truncated or corrupt files."""
    directory = Path(directory)
    for file in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / file).is_file():
            raise FileNotFoundError(f"adapter directory {directory} has no {file}"
                                    + ("" if directory.is_dir() else " (the directory does not exist)"))
    path = directory / CONFIG_NAME
    try:
        saved = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{path} is not valid JSON (truncated or corrupt?): {error}") from error
    if not isinstance(saved, dict) or not isinstance(saved.get("layers"), dict):
        raise ValueError(f"{path} is not a rosa_kernels adapter config (it has no 'layers' table)")
    try:
        config = RosaConfig.from_dict(saved).validate()
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path} holds an invalid RosaConfig: {error}") from error
    layers = {}
    for name, entry in saved["layers"].items():
        if not (isinstance(entry, list) and len(entry) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in entry)):
            raise ValueError(f"{path}: layer {name!r} should be [out_features, in_features, nnz], got {entry!r}")
        layers[name] = tuple(entry)
    tensors, _ = _masks.load_safetensors(directory / WEIGHTS_NAME)
    return config, layers, tensors


def _check_structure(name, row_offsets, col_indices, row_indices, out_features, in_features, nnz) -> None:
    try:
        validate_csr(row_offsets, col_indices, out_features, in_features, nnz, row_indices)
    except (TypeError, ValueError) as error:
        raise ValueError(f"the mask of {name} is not a valid CSR structure: {error}") from error


def _check_adapter(saved_layers: dict, modules: dict[str, nn.Module], config: RosaConfig,
                   tensors: dict[str, torch.Tensor], source) -> dict:
    """Checks a whole adapter against the modules it is to load into, before anything changes.

    ``modules`` are the targeted ``nn.Linear`` (RosaLinear once wrapped). Returns
    ``{name: (lora_A, lora_B, mask CSR with the sparse values or None)}``; raises ``ValueError``
    naming the layer on any mismatch: layer names, shapes, rank, density, tensor shapes and dtypes,
    invalid mask structures, stray tensors.
    """
    if set(saved_layers) != set(modules):
        missing = sorted(set(saved_layers) - set(modules))
        extra = sorted(set(modules) - set(saved_layers))
        raise ValueError(f"the adapter in {source} does not fit this model: layers missing from the model {missing}, "
                         f"targeted layers the adapter lacks {extra}")
    expected_keys = {f"{name}.{field}" for name in saved_layers for field in _ADAPTER_FIELDS}
    stray = sorted(set(tensors) - expected_keys)
    if stray:
        raise ValueError(f"the adapter in {source} has tensors no layer of it owns: {stray[:5]}")
    checked = {}
    for name, (out_features, in_features, nnz) in saved_layers.items():
        module = modules[name]
        if (module.out_features, module.in_features) != (out_features, in_features):
            raise ValueError(f"the adapter does not fit this model: {name} is {module.out_features}x"
                             f"{module.in_features} here, {out_features}x{in_features} in the adapter")
        expected = _masks.mask_count(out_features, in_features, config.density)
        if nnz != expected:
            raise ValueError(f"adapter layer {name} has {nnz} sparse values, density {config.density} gives {expected}")
        rank = config.rank
        if isinstance(module, RosaLinear):
            if module.nnz != nnz:
                raise ValueError(f"the adapter does not fit this model: {name} has {module.nnz} sparse values "
                                 f"(density {module.density}) here, {nnz} (density {config.density}) in the adapter")
            if module.rank != rank:
                raise ValueError(f"the adapter does not fit this model: {name} has rank {module.rank} here, "
                                 f"{rank} in the adapter")
        shapes = {"lora_A": (rank, in_features), "lora_B": (out_features, rank), "sparse_values": (nnz,),
                  "row_offsets": (out_features + 1,), "row_indices": (out_features,), "col_indices": (nnz,)}
        present = {field for field in _MASK_FIELDS if f"{name}.{field}" in tensors}
        if present and present != set(_MASK_FIELDS):
            raise ValueError(f"adapter layer {name} has an incomplete mask: only {sorted(present)}")
        if not present and isinstance(module, RosaLinear) and module.phase == "sparse":
            raise ValueError(f"adapter layer {name} has no mask but the layer here has one (load into a model "
                             f"without masks)")
        for field in ("lora_A", "lora_B") + (_MASK_FIELDS if present else ()):
            t = tensors.get(f"{name}.{field}")
            if t is None:
                raise ValueError(f"the adapter lacks the tensor {name}.{field}")
            if tuple(t.shape) != shapes[field]:
                raise ValueError(f"adapter tensor {name}.{field} has shape {tuple(t.shape)}, the model needs "
                                 f"{shapes[field]}")
            floating = field in ("lora_A", "lora_B", "sparse_values")
            if t.is_floating_point() != floating:
                raise ValueError(f"adapter tensor {name}.{field} has dtype {t.dtype}, expected "
                                 f"{'a floating' if floating else 'an integer'} dtype")
        mask = None
        if present:
            row_offsets, row_indices, col_indices = (tensors[f"{name}.{f}"] for f in _MASK_FIELDS[1:])
            _check_structure(f"adapter layer {name} (in {source})", row_offsets, col_indices, row_indices,
                             out_features, in_features, nnz)
            mask = CSR(tensors[f"{name}.sparse_values"], row_offsets, row_indices, col_indices,
                       (out_features, in_features))
        checked[name] = (tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"], mask)
    return checked


def _rank_and_world():
    """``[rank, world size]`` under an initialized ``torch.distributed`` of more than one process, else None."""
    dist = _masks._distributed()
    if dist is not None and dist.get_world_size() > 1:
        return [dist.get_rank(), dist.get_world_size()]
    return None


def _full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2-sharded parameter (a collective: every rank calls it), else itself."""
    return tensor.full_tensor() if _is_sharded(tensor) else tensor


def get_rosa_model(model: nn.Module, config: RosaConfig | None = None, **overrides) -> RosaModel:
    """Wraps ``model`` in a :class:`RosaModel` (PEFT's ``get_peft_model`` for RoSA)."""
    return RosaModel(model, config, **overrides)
