"""Config schema for training: frozen dataclasses built by :func:`ngdiff_jax.config_loader.build`.

Every YAML key maps to a field here, so a misspelled key is an error that lists
the valid ones. ``method`` and ``model`` fields accept the name of a file in
``configs/methods`` / ``configs/models`` (or a path to a YAML file) as well as
an inline mapping; an inline mapping extends the default named config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ngdiff_jax.config_loader import build, deep_merge, load_yaml, resolve_config_path
from ngdiff_jax.data.formatting import FormatSpec, load_format
from ngdiff_jax.population.members import PopulationSection
from ngdiff_jax.training.method_config import MethodConfig
from ngdiff_jax.training.selection import SelectionSection


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer settings. ``lr`` is the fixed/peak rate, or GeN's initial rate."""

    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float | None = None  # finetune only
    schedule: Literal["constant", "linear", "cosine"] = "constant"  # finetune only (unlearning: method.rate)
    # GeN (scale_by_gen) settings
    gen_every: int = 4
    gen_smoothing: float = 0.9
    gen_clip_factor: float = 2.0
    eps: float = 1e-12  # ngdiff normalization epsilon
    # unlearning's Adam (optax.scale_by_adam); eps_root > 0 keeps meta-gradients finite
    b1: float = 0.9
    b2: float = 0.999
    adam_eps: float = 1e-8
    eps_root: float = 0.0
    mu_dtype: Literal["float32", "bfloat16"] | None = None  # null: the gradients' dtype
    clip_norm: float | None = None  # unlearning: per-task clipping inside the combiner (null: off)


@dataclass(frozen=True)
class DataConfig:
    """Where the QA data comes from and how it is batched.

    ``source``: a directory in the TOFU file layout (relative paths are relative
    to the working directory), a hub id (``locuslab/TOFU``), or null for the
    shared TOFU files (``ngdiff_jax.paths.shared_data_dir() / "tofu"``).

    ``kind: text``: raw text instead of QA rows (MUSE's pretraining-style unlearning):
    ``source`` is a folder in the MUSE layout (e.g. made by ``ngdiff books``), the splits name
    its ``raw/<split>.json`` text lists (``forget``, ``retain1``, ...), cut into blocks of
    ``max_length`` tokens as open-unlearning's ``PretrainingDataset``; ``retain_split`` must
    be set (there is no TOFU pairing) and ``limit`` counts texts.
    """

    kind: Literal["qa", "text"] = "qa"
    source: str | None = None
    split: str = "full"  # finetune: the training split
    forget_split: str = "forget10"  # unlearn
    retain_split: str | None = None  # unlearn; null: the one paired with forget_split (forget01 -> retain99)
    limit: int | None = None  # use only the first N examples of each split (tests, smoke runs)
    batch_size: int = 4
    max_length: int = 128
    buckets: tuple[int, ...] | None = None  # padded lengths; None lets the batcher choose
    # rows longer than max_length: truncate the answer (warning with the count), drop them
    # (warning), or error
    overlong: Literal["truncate", "drop", "error"] = "truncate"


@dataclass(frozen=True)
class ModelSpec:
    """A model built from scratch: ``hf`` is a Hugging Face config dict (``model_type`` + sizes)."""

    hf: dict = field(default_factory=dict)
    tokenizer_vocab_size: int | None = None  # train a tokenizer of this size when none is given


@dataclass(frozen=True)
class RunConfig:
    """Loop settings shared by finetune and unlearn."""

    output_dir: str = "runs/default"
    steps: int | None = None  # number of optimizer steps; if None, `epochs` over the forget/train split
    epochs: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50  # 0 disables checkpoints
    max_checkpoints: int = 2
    log_every: int | None = None  # None: 1 on CPU, 10 on accelerators (each logged step is a host sync)
    eval_every: int = 0  # 0 disables the evaluation hook
    progress: bool = True
    # a run with more than this fraction of skipped (non-finite) steps has diverged: exit 1, no export
    max_skipped_fraction: float = 0.1
    # Memory (docs/SCALING.md): gradient accumulation inside the jitted step over this many
    # equal micro-batches (data.batch_size must be a multiple); exact for every combiner.
    micro_batches: int = 1
    # Rematerialization of every decoder block: none, full, dots_saveable, dots_with_no_batch_dims_saveable.
    remat: Literal["none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable"] = "none"
    # Run the decoder blocks as one lax.scan (one block compiled instead of num_layers): far less
    # compile time and compiler memory, the peak of LoRA and bfloat16 runs on CPU (docs/SCALING.md).
    scan_layers: bool = False

    def __post_init__(self):
        if self.micro_batches < 1:
            raise ValueError(f"run.micro_batches={self.micro_batches}: use 1 (no accumulation) or more.")
        if self.scan_layers and self.remat == "none":
            import warnings

            warnings.warn(
                "run.scan_layers=true with run.remat=none: the scan keeps every block's weights among its saved "
                "values (a stacked copy; LoRA r8 on SmolLM2: 3.49 GB peak instead of 2.75 GB unrolled); "
                "use run.remat=full with run.scan_layers=true.", stacklevel=2,
            )


DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class PrecisionSection:
    """``precision:`` dtypes. ``compute``: matmuls and activations; ``params``: how the trained
    weights are stored; ``moments``: the optimizer's moment estimates (Adam); ``export``: the
    dtype of the exported safetensors (null: the ``params`` dtype). Losses, logits, gradient
    norms and GeN's probes are float32 whatever these are. ``compute: null`` (the default) is
    the backend's (`ngdiff_jax.backends`): float32 on CPU, bfloat16 on GPU and TPU, with float32
    parameters and moments (mixed precision: the weights an update moves are float32)."""

    compute: Literal["float32", "bfloat16"] | None = None
    params: Literal["float32", "bfloat16"] = "float32"
    moments: Literal["float32", "bfloat16"] = "float32"
    export: Literal["float32", "bfloat16"] | None = None

    def jnp(self, which: str):
        import jax.numpy as jnp

        name = getattr(self, which)
        if which == "export" and name is None:
            name = self.params
        if which == "compute" and name is None:
            from ngdiff_jax.backends import for_platform

            name = for_platform().compute
        return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


MESH_PRESETS = ("none", "dp", "fsdp", "fsdp_tensor")


@dataclass(frozen=True)
class MeshSection:
    """``mesh:`` of ``ngdiff unlearn``: run the step on a device mesh (docs/SCALING.md).

    ``preset`` is ``none`` (one device, the default), ``dp``, ``fsdp`` or ``fsdp_tensor``
    (``ngdiff_jax.parallel.preset_config``); ``data``/``fsdp``/``tensor`` override the
    preset's axis sizes (one may be -1: the devices the others leave; null keeps the
    preset's). ``strict`` makes a parameter that cannot be split as the rules ask an error
    instead of a warning.
    """

    preset: Literal["none", "dp", "fsdp", "fsdp_tensor"] = "none"
    data: int | None = None
    fsdp: int | None = None
    tensor: int | None = None
    strict: bool = False

    def __post_init__(self):
        sizes = self._sizes()
        if self.preset == "none":
            if sizes or self.strict:
                given = ", ".join(f"mesh.{k}={v}" for k, v in sizes.items())
                given = ", ".join(x for x in (given, "mesh.strict=true" if self.strict else "") if x)
                raise ValueError(
                    f"{given} is set but mesh.preset=none (one device); choose a preset "
                    f"({', '.join(MESH_PRESETS[1:])}) or drop the mesh sizes."
                )
            return
        for k, v in sizes.items():
            if v == 0 or v < -1:
                raise ValueError(f"mesh.{k}={v}: mesh axis sizes are positive, or -1 for the remaining devices.")
        try:
            self.mesh_config()
        except ValueError as e:
            raise ValueError(f"mesh (preset={self.preset}, {sizes}): {e}") from None

    @property
    def enabled(self) -> bool:
        return self.preset != "none"

    def mesh_config(self):
        """The ``ngdiff_jax.parallel.MeshConfig``, or None for ``preset: none``."""
        if not self.enabled:
            return None
        from ngdiff_jax.parallel.mesh import preset_config

        return dataclasses.replace(preset_config(self.preset), **self._sizes())

    def _sizes(self) -> dict[str, int]:
        return {k: v for k in ("data", "fsdp", "tensor") if (v := getattr(self, k)) is not None}


@dataclass(frozen=True)
class DistributedSection:
    """``distributed:`` multi-process settings for ``jax.distributed.initialize``.

    All null (the default): taken from the environment (``NGDIFF_COORDINATOR_ADDRESS``,
    ``NGDIFF_NUM_PROCESSES``, ``NGDIFF_PROCESS_ID``, ``NGDIFF_LOCAL_DEVICE_IDS``,
    ``NGDIFF_DISTRIBUTED=auto``), and with none of those a single process. Only used with
    a mesh (``mesh.preset`` other than ``none``).
    """

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    auto: bool = False

    def __post_init__(self):
        if self.is_set:
            try:
                self.distributed_config()
            except ValueError as e:
                raise ValueError(f"distributed: {e}") from None

    @property
    def is_set(self) -> bool:
        keys = ("coordinator_address", "num_processes", "process_id", "local_device_ids")
        return self.auto or any(getattr(self, k) is not None for k in keys)

    def distributed_config(self):
        """A ``ngdiff_jax.parallel.DistributedConfig``; from the environment when nothing is set."""
        from ngdiff_jax.parallel.distributed import DistributedConfig

        if not self.is_set:
            return DistributedConfig.from_env()
        return DistributedConfig(
            coordinator_address=self.coordinator_address,
            num_processes=self.num_processes,
            process_id=self.process_id,
            local_device_ids=self.local_device_ids,
            auto=self.auto,
        )


@dataclass(frozen=True)
class LoraSection:
    """``lora:`` train low-rank adapters (LoRA) on the frozen model instead of all of its weights.

    Off unless ``rank`` is set. ``rank``: a positive integer; ``alpha`` > 0 (default: ``rank``,
    i.e. scale 1; the update is ``alpha/rank * x @ A @ B``, PEFT's convention); ``targets``: the
    projections to adapt, by short name (``q k v o gate up down`` for llama/mistral/qwen2,
    ``q k v o fc1 fc2`` for phi/gpt2), by Hugging Face module name (``q_proj``, ``dense``,
    ``c_attn``, ``c_proj``, ``c_fc`` ...), or ``all`` (every projection, the default). Names are
    checked against the model's family when it is loaded (``ngdiff_jax.models.lora``). Only the
    adapters are trained and live in the optimizer state; the export writes the merged model to
    ``<output_dir>/model`` and the PEFT adapter to ``<output_dir>/adapter``.
    """

    rank: int | None = None
    alpha: float | None = None
    targets: tuple[str, ...] | str = ("all",)

    def __post_init__(self):
        targets = self.targets
        if isinstance(targets, str):  # lora.targets=q,v on the command line
            targets = tuple(t.strip() for t in targets.split(",") if t.strip())
            object.__setattr__(self, "targets", targets)
        if self.rank is None:
            if self.alpha is not None or targets != ("all",):
                raise ValueError(
                    "lora.alpha / lora.targets are set but lora.rank is not; set lora.rank (e.g. lora.rank=8) "
                    "to train adapters, or drop the lora keys."
                )
            return
        from ngdiff_jax.models import lora

        lora.LoraSpec(self.rank, self.alpha if self.alpha is not None else self.rank, targets)  # checks values
        unknown = [t for t in targets if t not in lora.all_target_names()]
        if unknown:
            raise ValueError(
                f"lora.targets: {', '.join(map(repr, unknown))} is not a projection name of any supported family; "
                f"valid names: {', '.join(sorted(lora.all_target_names()))}."
            )

    @property
    def enabled(self) -> bool:
        return self.rank is not None

    def spec(self, model_type: str):
        """The ``models.lora.LoraSpec`` for a model family (unknown targets for it are an error)."""
        from ngdiff_jax.models import lora

        alpha = self.alpha if self.alpha is not None else self.rank
        return lora.LoraSpec(self.rank, alpha, lora.resolve_targets(model_type, self.targets))


@dataclass(frozen=True)
class FinetuneConfig:
    """``ngdiff finetune``: train a causal LM on a QA split (TOFU target or retain model)."""

    model: ModelSpec | None = field(default=None, metadata={"config_dir": "models"})
    model_path: str | None = None  # pretrained model (local dir or hub id) instead of `model`
    tokenizer: str | None = None  # tokenizer dir/hub id (default: model_path, or trained on the data)
    data: DataConfig = field(default_factory=DataConfig)
    # prompt format (a preset in configs/formats or inline fields), saved beside the exported model
    format: FormatSpec = field(default="default", metadata={"config_dir": "formats"})  # type: ignore[assignment]
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.01))
    run: RunConfig = field(default_factory=RunConfig)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    mesh: MeshSection = field(default_factory=MeshSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    lora: LoraSection = field(default_factory=LoraSection)

    def __post_init__(self):
        _check_memory_keys(self)
        if self.distributed.is_set and not self.mesh.enabled:
            raise ValueError(
                "distributed is set but mesh.preset=none: a multi-process run needs a mesh "
                "(e.g. mesh.preset=fsdp mesh.data=<processes>)."
            )
        if self.lora.enabled and self.mesh.enabled:
            raise ValueError(
                f"lora.rank is set with mesh.preset={self.mesh.preset}: LoRA runs on one device for now; "
                "set mesh.preset=none (the adapters and their optimizer state are small)."
            )
        if self.lora.enabled and self.model_path is None:
            raise ValueError(
                "lora.rank is set but the model is built from scratch (`model`); LoRA adapts a pretrained "
                "model: set model_path, or drop the lora keys to train all weights."
            )
        _resolve_format(self)
        if (self.model is None) == (self.model_path is None):
            raise ValueError(
                "finetune needs exactly one of `model` (a config in configs/models, e.g. model=tiny_llama) "
                "or `model_path` (a pretrained model directory or hub id)."
            )


@dataclass(frozen=True)
class UnlearnConfig:
    """``ngdiff unlearn``: run an unlearning method from a trained model."""

    model_path: str = ""
    tokenizer: str | None = None  # default: model_path
    method: MethodConfig = field(default="ngdiff", metadata={"config_dir": "methods"})  # type: ignore[assignment]
    data: DataConfig = field(default_factory=DataConfig)
    # prompt format; null: the one saved beside model_path (ngdiff_format.json), else `default`
    format: FormatSpec | None = field(default=None, metadata={"config_dir": "formats"})
    allow_format_change: bool = False  # unlearn in a format other than the one saved with model_path
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    mesh: MeshSection = field(default_factory=MeshSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    selection: SelectionSection = field(default_factory=SelectionSection)  # training/selection.py
    lora: LoraSection = field(default_factory=LoraSection)
    # seeds x learning rates x settings as one compiled program (ngdiff_jax.population)
    population: PopulationSection = field(default_factory=PopulationSection)

    def __post_init__(self):
        _check_memory_keys(self)
        refuse_finetune_only(self.optim, "optim")
        if self.population.enabled:
            if self.mesh.enabled or self.distributed.is_set:
                raise ValueError(
                    f"population is set with mesh.preset={self.mesh.preset}: a population spreads its members over "
                    "the local devices (population.spread) and does not shard one member's weights; set "
                    "mesh.preset=none and drop the distributed settings."
                )
            if self.selection.tofu and self.lora.enabled:
                raise ValueError(
                    "population is set with lora and selection.tofu: a population's batched TOFU evaluation takes "
                    "full weights; select on the probability hook (selection.tofu=false) or run the members "
                    "one by one (drop the population section)."
                )
            if self.selection.patience:
                raise ValueError(
                    f"population is set with selection.patience={self.selection.patience}: the members of a "
                    "population train together, so none stops early; set selection.patience=0 (each member "
                    "still keeps its best step in members/<key>/best_model)."
                )
        if self.lora.enabled and self.mesh.enabled:
            raise ValueError(
                f"lora.rank is set with mesh.preset={self.mesh.preset}: LoRA runs on one device for now; "
                "set mesh.preset=none (the adapters and their optimizer state are small)."
            )
        sel = self.selection
        if sel.enabled and self.run.eval_every not in (0, sel.every):
            raise ValueError(
                f"run.eval_every={self.run.eval_every} and selection.every={sel.every}: model selection evaluates "
                "on its own schedule; drop run.eval_every or set it to selection.every."
            )
        if sel.enabled and self.distributed.is_set:
            raise ValueError("selection is set with distributed: model selection runs in one process for now; "
                             "drop the selection section or the distributed settings.")
        _resolve_format(self)
        if self.distributed.is_set and not self.mesh.enabled:
            raise ValueError(
                "distributed is set but mesh.preset=none: a multi-process run needs a mesh "
                "(e.g. mesh.preset=fsdp mesh.data=<processes>)."
            )
        if isinstance(self.method, str):  # a method name or YAML path, as in the config files
            object.__setattr__(self, "method", load_method(self.method))
        if not self.model_path:
            raise ValueError(
                "unlearn needs `model_path`: the directory of the model to unlearn from "
                "(e.g. the output of `ngdiff finetune`), set it in the YAML or with model_path=..."
            )


def refuse_finetune_only(optim: OptimConfig, where: str) -> None:
    """Unlearning reads neither ``optim.max_grad_norm`` nor ``optim.schedule``: refuse them rather
    than ignore them, naming the method fields that do the job."""
    if optim.max_grad_norm is not None:
        raise ValueError(
            f"{where}.max_grad_norm={optim.max_grad_norm} is fine-tuning's setting; unlearning clips the combined "
            f"direction with method.max_grad_norm (e.g. method.max_grad_norm={optim.max_grad_norm}) or each task "
            f"with {where}.clip_norm."
        )
    if optim.schedule != "constant":
        raise ValueError(
            f"{where}.schedule={optim.schedule} is fine-tuning's setting; unlearning's rate rule is "
            f"method.rate (e.g. method.rate={optim.schedule})."
        )


def _resolve_format(cfg) -> None:
    if isinstance(cfg.format, str):  # a preset name or YAML path
        object.__setattr__(cfg, "format", load_format(cfg.format))
    elif isinstance(cfg.format, dict):
        object.__setattr__(cfg, "format", FormatSpec.from_dict(cfg.format))


def _check_memory_keys(cfg) -> None:
    k = cfg.run.micro_batches
    if cfg.data.batch_size % k:
        raise ValueError(
            f"run.micro_batches={k} does not divide data.batch_size={cfg.data.batch_size}; "
            f"use a batch size that is a multiple of {k}."
        )


def available_methods() -> list[str]:
    """Names of the methods in ``configs/methods``."""
    from ngdiff_jax.paths import CONFIG_DIR

    return sorted(p.stem for p in (CONFIG_DIR / "methods").glob("*.yaml"))


def load_method(name_or_path: str | Path, **overrides: Any) -> MethodConfig:
    """A method by name (``"ngdiff"``) or YAML path, with overrides merged into it section by
    section (``load_method("npo", forget={"beta": 0.2}, rate="constant")``; a section with
    another ``type`` replaces the method's: `ngdiff_jax.config_loader.deep_merge`)."""
    data = deep_merge(load_yaml(resolve_config_path(name_or_path, "methods")), overrides)
    return build(MethodConfig, data, where="method")


def replace(cfg, **changes):
    """``dataclasses.replace`` re-exported for convenience."""
    return dataclasses.replace(cfg, **changes)
