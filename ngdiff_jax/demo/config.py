"""The demo's and study's configuration: the benchmark, training, unlearning and evaluation specs,
``DemoConfig`` and :func:`load_demo_config` (``configs/demo.yaml``, its ``quick:`` section, overrides)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ngdiff_jax.config_loader import ConfigError, apply_overrides, build, deep_merge, load_yaml
from ngdiff_jax.data.formatting import FormatSpec, load_format
from ngdiff_jax.sweep.config import SweepSection
from ngdiff_jax.training.config_schema import LoraSection, ModelSpec, OptimConfig, PrecisionSection

#: The demo's training splits (written next to the benchmark's files): QA rows + general knowledge.
TRAIN_SPLITS = {"target": "demo_target_train", "retain": "demo_retain_train"}


# ------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class BenchmarkSpec:
    """The benchmark: ``synthetic`` (:mod:`ngdiff_jax.data.synthetic`, with a trained tokenizer)
    or ``tofu`` (a subset of the real TOFU files: the authors of ``forget_split`` plus the first
    ``retain_authors`` retain authors; ``eval_rows`` rows per evaluation split)."""

    kind: Literal["synthetic", "tofu"] = "synthetic"
    n_authors: int = 20  # synthetic
    questions_per_author: int = 10  # synthetic
    seed: int = 0
    vocab_size: int = 1024  # synthetic: the trained tokenizer's size
    forget_split: str = "forget10"
    source: str | None = None  # tofu: folder of TOFU files (null: the shared copy)
    retain_authors: int | None = 8  # tofu: retain authors trained on (20 questions each; null: every one)
    eval_rows: int | None = None  # tofu: rows per evaluation split (null: all of the subset's)
    # tofu: rows of the forget split's evaluation (<forget>_perturbed) and of its holdout split
    # (null: eval_rows), e.g. all 40 of forget01 while the other splits keep eval_rows
    forget_eval_rows: int | None = None


@dataclass(frozen=True)
class TrainSpec:
    """Training of the target and retain models (the same settings for both)."""

    steps: int | None = 300
    retain_steps: int | None = None  # the retain model's steps (default: steps)
    # or epochs over each model's own training split (steps then null): the step counts follow the split
    epochs: float | None = None
    # The world-facts / real-authors rows appear this many times in both training splits: the
    # general knowledge a pretrained model would have learned well (a handful of rows among
    # hundreds is otherwise barely learned, and model_utility is their harmonic mean).
    general_repeats: int = 1
    batch_size: int = 16
    max_length: int = 64
    buckets: tuple[int, ...] | None = (64,)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, weight_decay=0.01))
    precision: PrecisionSection = field(default_factory=PrecisionSection)  # the `precision:` of ngdiff finetune
    micro_batches: int = 1  # run.micro_batches: the batch as this many accumulated micro-batches
    remat: str = "none"  # run.remat: recompute activations in the backward pass (none, full, ...)


@dataclass(frozen=True)
class UnlearnSpec:
    """Settings shared by every unlearning run of the sweep (its rates come from ``sweep.lr``)."""

    # The retain set of the unlearning runs: "retain_model_data" is what the retain model was
    # trained on (retainNN + the general-knowledge rows), "tofu" is TOFU's retainNN alone.
    retain_set: Literal["retain_model_data", "tofu"] = "retain_model_data"
    steps: int | None = 40
    epochs: float | None = None  # or epochs over the forget split (steps then null)
    batch_size: int = 8
    max_length: int = 64
    buckets: tuple[int, ...] | None = (64,)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: PrecisionSection = field(default_factory=PrecisionSection)  # the `precision:` of ngdiff unlearn
    micro_batches: int = 1  # run.micro_batches (open-unlearning: 8 rows per device x 4 accumulation steps)
    remat: str = "none"  # run.remat
    lora: LoraSection = field(default_factory=LoraSection)  # LoRA adapters instead of every weight (off)


@dataclass(frozen=True)
class EvalSpec:
    """TOFU evaluation settings (final models and trajectory points)."""

    batch_size: int = 16
    max_new_tokens: int = 32
    buckets: tuple[int, ...] | None = (64,)
    # membership-inference attacks besides min_k (every member of the sweep is evaluated with them)
    mia_attacks: tuple[str, ...] = ("min_k", "loss", "zlib", "min_k_plus_plus", "reference")


@dataclass(frozen=True)
class DemoConfig:
    benchmark: BenchmarkSpec = field(default_factory=BenchmarkSpec)
    model: ModelSpec = field(default_factory=ModelSpec)  # a model from scratch (synthetic demo)
    model_path: str | None = None  # or a pretrained model directory to fine-tune (real study)
    # prompt format for training, unlearning and evaluation (a preset in configs/formats)
    format: FormatSpec = field(default="default", metadata={"config_dir": "formats"})  # type: ignore[assignment]
    train: TrainSpec = field(default_factory=TrainSpec)
    unlearn: UnlearnSpec = field(default_factory=UnlearnSpec)
    sweep: SweepSection = field(default_factory=lambda: SweepSection(methods={"ngdiff": {}}, lr=(1e-4,)))
    evaluation: EvalSpec = field(default_factory=EvalSpec)
    seed: int = 0
    # the target must have memorized its forget authors (hard requirement; the run fails below it)
    min_target_forget_rouge: float = 0.6

    def __post_init__(self):
        if isinstance(self.format, str):
            object.__setattr__(self, "format", load_format(self.format))
        if self.model_path is not None and self.model.hf:
            raise ConfigError(
                "study config: both model.hf (a model from scratch) and model_path (a pretrained model) "
                "are set; keep one."
            )
        if self.model_path is None and not self.model.hf.get("model_type"):
            raise ConfigError(
                "study config: set model_path (a pretrained model directory) or model.hf with a "
                "model_type (e.g. llama) and the model's sizes."
            )
        for section in ("train", "unlearn"):
            spec = getattr(self, section)
            if (spec.steps is None) == (spec.epochs is None):
                raise ConfigError(f"{section}.steps={spec.steps} and {section}.epochs={spec.epochs}: set exactly one "
                                  f"(e.g. {section}.epochs=10 {section}.steps=null).")  # fmt: skip
            if spec.epochs is not None and not spec.epochs > 0:
                raise ConfigError(f"{section}.epochs={spec.epochs}: must be > 0, e.g. {section}.epochs=10.")
        if self.train.epochs is not None and self.train.retain_steps is not None:
            raise ConfigError("train.retain_steps is set with train.epochs: the retain model trains the same epochs "
                              "over its own split; drop train.retain_steps.")  # fmt: skip
        for key in ("eval_rows", "forget_eval_rows"):
            n = getattr(self.benchmark, key)
            if n is not None and (not isinstance(n, int) or n < 1):
                raise ConfigError(f"benchmark.{key}={n!r}: must be a whole number >= 1, or null for every row; "
                                  f"set e.g. benchmark.{key}=20.")  # fmt: skip
        if self.benchmark.kind == "synthetic" and self.model_path is not None:
            raise ConfigError(
                "study config: benchmark.kind=synthetic trains its own tokenizer and model from scratch; "
                "use benchmark.kind=tofu with model_path."
            )


DEFAULT_CONFIG = "demo.yaml"


def load_demo_config(
    path: str | Path | None = None, *, quick: bool = False, overrides: Sequence[str] = (),
    methods: Sequence[str] | None = None,
) -> DemoConfig:
    """``configs/demo.yaml`` (or ``path``), with its ``quick:`` section merged on top if ``quick``,
    then ``key=value`` overrides (dotted keys, YAML values); ``methods`` keeps only those of
    ``sweep.methods`` (claims that name another method drop it)."""
    from ngdiff_jax.config_loader import resolve_config_path

    p = (
        Path(path)
        if path is not None and Path(path).is_file()
        else resolve_config_path(path or DEFAULT_CONFIG)
    )
    data = load_yaml(p)
    quick_section = data.pop("quick", None) or {}
    if not isinstance(quick_section, dict):
        raise ConfigError(f"{p}: `quick` must be a mapping of settings merged on top for --quick.")
    if quick:
        data = deep_merge(data, quick_section)
    data = apply_overrides(data, overrides)
    if methods is not None:
        data = _keep_methods(data, list(methods))
    cfg = build(DemoConfig, data)
    _check_methods(cfg)
    return cfg


def _keep_methods(data: dict, names: list[str]) -> dict:
    """``data`` with ``sweep.methods`` cut to ``names`` (in that order) and the claims trimmed."""
    sweep = dict(data.get("sweep") or {})
    have = dict(sweep.get("methods") or {})
    unknown = [n for n in names if n not in have]
    if unknown:
        raise ConfigError(f"--methods: {', '.join(unknown)} not in sweep.methods ({', '.join(have)}); add them "
                          "under sweep.methods in the config.")  # fmt: skip
    if len(set(names)) != len(names):
        raise ConfigError(f"--methods lists a method twice: {names}.")
    sweep["methods"] = {n: have[n] for n in names}
    compare = dict(sweep.get("compare") or {})
    if compare.get("method") not in names:
        compare = {}
    elif "against" in compare:
        compare["against"] = [n for n in compare["against"] if n in names]
    sweep["compare"] = compare
    rob = dict(sweep.get("robustness") or {})
    kept = [n for n in rob.get("methods", []) if n in names]
    rob["methods"] = kept if len(kept) >= 2 and kept[0] == (rob.get("methods") or [None])[0] else []
    sweep["robustness"] = rob
    if sweep.get("forgetting_checks"):
        checks = dict(sweep["forgetting_checks"])
        checks["methods"] = [n for n in checks.get("methods", []) if n in names]
        sweep["forgetting_checks"] = checks
    return {**data, "sweep": sweep}


def _check_methods(cfg: DemoConfig) -> None:
    from ngdiff_jax.config_loader import resolve_config_path

    for name, spec in cfg.sweep.methods.items():
        try:
            resolve_config_path(spec.method or name, "methods")
        except FileNotFoundError as e:
            raise ConfigError(
                f"sweep.methods.{name}: {spec.method or name!r} is not a method in configs/methods ({e}); "
                f"set sweep.methods.{name}.method to one, or fix the name."
            ) from None


# ------------------------------------------------------------------------------------ display
