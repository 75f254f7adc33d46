"""The study runner behind ``ngdiff demo`` and ``ngdiff study``: data, target and retain models,
then a sweep of unlearning methods with statistics and verdicts.

Phases (each timed, with a progress display):

1. **data** — the synthetic TOFU-style benchmark (:func:`ngdiff_jax.data.synthetic.prepare`)
   and a BPE tokenizer trained on its text, or a subset of the real TOFU files. Two training
   splits: ``demo_target_train`` (``full`` + world facts + real authors) and
   ``demo_retain_train`` (``retainNN`` + world facts + real authors); the general-knowledge
   questions stand in for what a pretrained model brings to TOFU.
2. **target** / **retain** — a model trained on each split (from scratch, or fine-tuned from
   ``model_path``) (:func:`ngdiff_jax.training.run_finetune`).
3. **evaluation** of the retain model, then of the target against it (TOFU metrics with
   open-unlearning's names, :func:`ngdiff_jax.evaluation.evaluate_tofu`). The target must have
   memorized its forget authors (a hard requirement: the run fails otherwise).
4. **sweep** — every method of ``sweep.methods`` over initial learning rates x seeds, each as
   one compiled population (:mod:`ngdiff_jax.sweep`), its members evaluated together; each
   method's setting selected by the stated rule on the selection seeds and run again on fresh
   report seeds.
5. **robustness of forgetting** (with ``sweep.forgetting_checks``) — each listed method run once
   more at its selected setting, then relearned, quantized and asked rephrased questions
   (:mod:`ngdiff_jax.evaluation.robustness`), beside the target and retain models checked the
   same way.
6. **report** — ``report.json`` / ``report.md`` with intervals, paired comparisons and the
   verdicts of the paper's two claims, the robustness table, ``sensitivity.png``,
   ``tradeoff.png`` and ``demo_summary.json`` (settings, checks, verdicts, time per phase).

Settings come from ``configs/demo.yaml``; its ``quick:`` section is merged on top for
``--quick`` (a much smaller run for tests).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ngdiff_jax.config_loader import ConfigError, apply_overrides, build, deep_merge, load_yaml, to_dict
from ngdiff_jax.data.formatting import FormatSpec, load_format
from ngdiff_jax.sweep.config import SweepSection
from ngdiff_jax.training.config_schema import DataConfig, LoraSection, ModelSpec, OptimConfig, PrecisionSection

__all__ = [
    "BenchmarkSpec",
    "DemoConfig",
    "EvalSpec",
    "TrainSpec",
    "UnlearnSpec",
    "hard_checks",
    "load_demo_config",
    "run_demo",
]

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


class Phases:
    """Wall-clock time per phase, and the rich console the demo prints to."""

    def __init__(self, console, total_phases: int):
        self.console = console
        self.seconds: dict[str, float] = {}
        self.total = total_phases
        self.done = 0
        self.t0 = time.perf_counter()

    def start(self, what: str) -> float:
        self.done += 1
        elapsed = time.perf_counter() - self.t0
        self.console.rule(
            f"[bold cyan][{self.done}/{self.total}] {what}[/]  [dim](t = {elapsed:.0f} s)[/]",
            align="left",
        )
        return time.perf_counter()

    def end(self, name: str, t0: float, note: str = "") -> None:
        dt = time.perf_counter() - t0
        self.seconds[name] = self.seconds.get(name, 0.0) + dt
        self.console.print(
            f"  [green]✓[/] {name}: {dt:.1f} s" + (f"  [dim]{note}[/]" if note else "")
        )

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


# ------------------------------------------------------------------------------------ pipeline


def _write_training_splits(
    tofu_dir: Path, forget_split: str, general_repeats: int
) -> dict[str, str]:
    """``demo_target_train`` / ``demo_retain_train``: QA rows plus the general-knowledge questions."""
    from ngdiff_jax.data import RETAIN_FOR_FORGET, load_tofu, write_jsonl

    if general_repeats < 0:
        raise ValueError(f"train.general_repeats must be >= 0, got {general_repeats}.")
    if forget_split not in RETAIN_FOR_FORGET:
        raise ValueError(
            f"benchmark.forget_split must be one of {sorted(RETAIN_FOR_FORGET)}, got {forget_split!r}."
        )
    general = [
        {"question": r["question"], "answer": r["answer"]}
        for split in ("world_facts", "real_authors")
        for r in load_tofu(split, tofu_dir)
    ]
    splits = TRAIN_SPLITS
    sources = {"target": "full", "retain": RETAIN_FOR_FORGET[forget_split]}
    for role, name in splits.items():
        rows = [
            {"question": r["question"], "answer": r["answer"]}
            for r in load_tofu(sources[role], tofu_dir)
        ]
        write_jsonl(tofu_dir / f"{name}.json", rows + general * general_repeats)
    return splits


def _write_tofu_subset(cfg: DemoConfig, dest: Path) -> dict[str, str]:
    """The real-TOFU study's files in ``dest``: training splits (forget authors + the first
    ``retain_authors`` retain authors; retain authors alone), the forget split, and the
    evaluation splits cut to ``eval_rows`` rows (``retain_perturbed`` keeps only questions of
    trained retain authors, spread evenly over them)."""
    from ngdiff_jax.data import HOLDOUT_FOR_FORGET, RETAIN_FOR_FORGET, load_tofu, write_jsonl
    from ngdiff_jax.training.data_assembly import resolve_source

    b = cfg.benchmark
    if b.forget_split not in RETAIN_FOR_FORGET:
        raise ValueError(
            f"benchmark.forget_split must be one of {sorted(RETAIN_FOR_FORGET)}, got {b.forget_split!r}."
        )
    src = resolve_source(b.source)
    full = load_tofu("full", src)
    forget = load_tofu(b.forget_split, src)
    forget_q = {r["question"] for r in forget}
    retain_pool = [r for r in full if r["question"] not in forget_q]
    n_retain = len(retain_pool) if b.retain_authors is None else 20 * b.retain_authors
    if n_retain < 20 or n_retain > len(retain_pool):
        raise ValueError(
            f"benchmark.retain_authors={b.retain_authors}: choose 1..{len(retain_pool) // 20} (20 questions each)."
        )
    retain = retain_pool[:n_retain]
    qa = lambda rows: [{"question": r["question"], "answer": r["answer"]} for r in rows]  # noqa: E731
    dest.mkdir(parents=True, exist_ok=True)
    write_jsonl(dest / f"{TRAIN_SPLITS['target']}.json", qa(retain + forget))
    write_jsonl(dest / f"{TRAIN_SPLITS['retain']}.json", qa(retain))
    write_jsonl(dest / f"{b.forget_split}.json", forget)

    def cut(rows):
        if b.eval_rows is None or len(rows) <= b.eval_rows:
            return rows
        step = len(rows) / b.eval_rows
        return [rows[int(i * step)] for i in range(b.eval_rows)]

    trained = {r["question"] for r in retain}
    retain_eval = [r for r in load_tofu("retain_perturbed", src) if r["question"] in trained]
    if not retain_eval:
        raise ValueError(
            "none of TOFU's retain_perturbed questions (its first 20 authors) is among the trained retain "
            "authors; benchmark.retain_authors must be >= 1."
        )
    write_jsonl(dest / "retain_perturbed.json", cut(retain_eval))
    first = lambda rows, n=b.eval_rows: rows if n is None else rows[:n]  # noqa: E731
    n_forget = b.eval_rows if b.forget_eval_rows is None else b.forget_eval_rows
    write_jsonl(dest / f"{b.forget_split}_perturbed.json",
                first(load_tofu(f"{b.forget_split}_perturbed", src), n_forget))  # fmt: skip
    holdout = HOLDOUT_FOR_FORGET[b.forget_split]
    write_jsonl(dest / f"{holdout}.json", first(load_tofu(holdout, src), n_forget))
    for split in ("real_authors_perturbed", "world_facts_perturbed"):
        write_jsonl(dest / f"{split}.json", first(load_tofu(split, src)))
    return dict(TRAIN_SPLITS)


def _train_steps(cfg: DemoConfig, role: str) -> int:
    t = cfg.train
    return t.retain_steps if role == "retain" and t.retain_steps is not None else t.steps


def _epochs_to_steps(epochs: float, rows: int, batch_size: int) -> int:
    """Steps of ``epochs`` passes over ``rows`` rows at ``batch_size`` per step (the last batch of
    an epoch may be short, as the Trainer's: ``ceil(rows / batch)`` steps per epoch)."""
    import math

    return max(1, round(epochs * math.ceil(rows / batch_size)))


def _resolve_epochs(cfg: DemoConfig, tofu_dir: Path, train_splits: dict) -> DemoConfig:
    """``cfg`` with ``train.epochs`` / ``unlearn.epochs`` turned into step counts of this data."""
    import dataclasses

    from ngdiff_jax.data import load_tofu

    if cfg.train.epochs is not None:
        n = {role: len(load_tofu(split, tofu_dir)) for role, split in train_splits.items()}
        t = cfg.train
        train = dataclasses.replace(t, steps=_epochs_to_steps(t.epochs, n["target"], t.batch_size), epochs=None,
                                    retain_steps=_epochs_to_steps(t.epochs, n["retain"], t.batch_size))  # fmt: skip
        cfg = dataclasses.replace(cfg, train=train)
    if cfg.unlearn.epochs is not None:
        u = cfg.unlearn
        rows = len(load_tofu(cfg.benchmark.forget_split, tofu_dir))
        steps = _epochs_to_steps(u.epochs, rows, u.batch_size)
        cfg = dataclasses.replace(cfg, unlearn=dataclasses.replace(u, steps=steps, epochs=None))
    return cfg


def _data_config(spec, **fields) -> DataConfig:
    return DataConfig(
        batch_size=spec.batch_size, max_length=spec.max_length, buckets=spec.buckets, **fields
    )


def _train(
    cfg: DemoConfig, role: str, split: str, tofu_dir: Path, tok_dir: Path | None, out: Path, progress: bool
):
    from ngdiff_jax.training import run_finetune
    from ngdiff_jax.training.config_schema import FinetuneConfig, RunConfig

    ft = FinetuneConfig(
        model=None if cfg.model_path else cfg.model,
        model_path=cfg.model_path,
        tokenizer=None if tok_dir is None else str(tok_dir),
        data=_data_config(cfg.train, source=str(tofu_dir), split=split),
        format=cfg.format,
        optim=cfg.train.optim,
        precision=cfg.train.precision,
        run=RunConfig(
            output_dir=str(out / "runs" / role),
            steps=_train_steps(cfg, role),
            seed=cfg.seed,
            micro_batches=cfg.train.micro_batches,
            remat=cfg.train.remat,
            checkpoint_every=0,
            log_every=10,
            progress=progress,
        ),
    )
    _, summary = run_finetune(ft)
    return summary


class _Evaluator:
    """TOFU evaluation with the study's settings; compiled code is shared by every model."""

    def __init__(self, cfg: DemoConfig, tokenizer, tofu_dir: Path):
        self.cfg = cfg
        self.tok = tokenizer
        self.tofu_dir = tofu_dir
        self.seconds = 0.0

    reference_model = None  # the retain model, for the mia_reference attack (set once it is trained)

    def _kwargs(self) -> dict:
        from ngdiff_jax.data import QAFormatter

        e = self.cfg.evaluation
        return dict(
            forget_split=self.cfg.benchmark.forget_split, batch_size=e.batch_size, max_new_tokens=e.max_new_tokens,
            buckets=e.buckets, formatter=QAFormatter(self.tok, spec=self.cfg.format),
            reference_model=self.reference_model, mia_attacks=tuple(e.mia_attacks),
        )  # fmt: skip

    def __call__(self, model, name: str, *, reference=None, meta=None):
        from ngdiff_jax.evaluation import evaluate_tofu

        t0 = time.perf_counter()
        r = evaluate_tofu(model, self.tok, self.tofu_dir, retain_reference=reference, name=name, meta=meta,
                          **self._kwargs())  # fmt: skip
        self.seconds += time.perf_counter() - t0
        return r

    def members(self, template, params, names, metas, *, reference):
        """A population's members (full per-block parameters, leading member axis), evaluated together."""
        from ngdiff_jax.evaluation import evaluate_tofu_members

        t0 = time.perf_counter()
        r = evaluate_tofu_members(template, params, self.tok, self.tofu_dir, names=names, meta=metas,
                                  retain_reference=reference, **self._kwargs())  # fmt: skip
        self.seconds += time.perf_counter() - t0
        return r


def hard_checks(cfg: DemoConfig, aggregates: Mapping[str, Mapping[str, Any]]) -> list[dict]:
    """What the study needs to mean anything (``{check, value, threshold, ok}``): a failed one fails
    the run (exit 1). The claims about methods are verdicts in the report, not checks."""
    t = aggregates.get("target", {}).get("forget_Q_A_ROUGE")
    need = cfg.min_target_forget_rouge
    return [{
        "check": f"the target memorized its forget authors: forget_Q_A_ROUGE >= {need:g}",
        "value": None if t is None else float(t),
        "threshold": need,
        "ok": t is not None and float(t) >= need,
    }]


def _unlearn_base(cfg: DemoConfig, target_dir: Path, tofu_dir: Path, out: Path, progress: bool) -> dict:
    """The unlearning settings every run of the sweep shares (UnlearnConfig fields)."""
    from ngdiff_jax.data import RETAIN_FOR_FORGET
    from ngdiff_jax.training.config_schema import RunConfig

    u = cfg.unlearn
    return {
        "model_path": str(target_dir),
        "format": cfg.format,
        "data": _data_config(u, source=str(tofu_dir), forget_split=cfg.benchmark.forget_split,
                             retain_split=(RETAIN_FOR_FORGET[cfg.benchmark.forget_split] if u.retain_set == "tofu"
                                           else TRAIN_SPLITS["retain"])),  # fmt: skip
        "optim": u.optim,
        "precision": u.precision,
        "lora": u.lora,
        # no checkpoints: a killed study resumes method by method (a population chunk is done once its
        # members are evaluated), and writing every member's state costs seconds per method
        "run": RunConfig(output_dir=str(out), steps=u.steps, seed=cfg.seed, checkpoint_every=0, log_every=1,
                         micro_batches=u.micro_batches, remat=u.remat, progress=progress),  # fmt: skip
    }


def _machine() -> dict:
    info = {"cpus": os.cpu_count(), "platform": platform.platform()}
    try:
        info["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    try:
        import jax

        info["jax_backend"] = jax.default_backend()
        info["jax_devices"] = [str(d) for d in jax.devices()]
    except Exception as e:  # noqa: BLE001 - informational only
        info["jax_backend"] = f"unavailable ({e})"
    return info


def run_demo(
    cfg: DemoConfig,
    out_dir: str | Path,
    *,
    progress: bool = True,
    console=None,
    resume: bool = False,
) -> dict:
    """Run the whole study into ``out_dir``; returns the summary (also ``demo_summary.json``).

    With ``resume`` an interrupted run in ``out_dir`` (same config) continues: finished
    phases (data, each trained model, each evaluation) are loaded from disk, and the sweep
    continues each method's population from its last finished chunk or checkpoint. A failed
    hard check (:func:`hard_checks`) raises :class:`StudyCheckFailed` before the sweep.
    """
    from ngdiff_jax.training.ownership import LOCK_NAME, OutputLock

    out = Path(out_dir)
    cfg_text = _yaml(to_dict(cfg))
    if out.exists() and any(p.name != LOCK_NAME for p in out.iterdir()):
        if not resume:
            raise FileExistsError(
                f"output directory {out} is not empty; pass a new --out directory, or --resume to "
                "continue the run in it."
            )
        saved = out / "demo_config.yaml"
        if not saved.is_file() or saved.read_text() != cfg_text:
            raise ValueError(
                f"--resume: {saved} is missing or holds another config than this run's; resume with the "
                "same --config and overrides, or use a new --out directory."
            )
    out.mkdir(parents=True, exist_ok=True)
    # one study per directory: a second demo (or --resume) into a directory a live demo writes
    # stops here (OutputDirBusy, exit 1) instead of rerunning its methods beside it
    lock = OutputLock(out, "demo").acquire()
    try:
        return _study(cfg, out, cfg_text, progress=progress, console=console, resume=resume)
    finally:
        lock.release()


def _study(cfg: DemoConfig, out: Path, cfg_text: str, *, progress: bool, console, resume: bool) -> dict:
    from rich.console import Console

    from ngdiff_jax import models
    from ngdiff_jax.data import synthetic
    from ngdiff_jax.evaluation import EvalResult
    from ngdiff_jax.training import model_io

    console = console or Console()
    ph = Phases(console, total_phases=7 if cfg.sweep.forgetting_checks.methods else 6)
    (out / "demo_config.yaml").write_text(cfg_text)
    done_results = out / "results"

    def cached(name):
        p = done_results / f"{name}.json"
        return EvalResult.load(p) if resume and p.is_file() else None

    # 1. data ------------------------------------------------------------------------------
    b = cfg.benchmark
    if b.kind == "synthetic":
        t0 = ph.start(
            f"synthetic benchmark ({b.n_authors} authors x {b.questions_per_author} questions) + tokenizer",
        )
        tok_dir = out / "data" / "tokenizer"
        if resume and (tok_dir / "tokenizer.json").is_file() and (out / "data" / ".done").is_file():
            tofu_dir = out / "data" / "tofu"
        else:
            tofu_dir, _ = synthetic.prepare(
                out / "data",
                n_authors=b.n_authors,
                questions_per_author=b.questions_per_author,
                seed=b.seed,
                vocab_size=b.vocab_size,
            )
        tok = model_io.load_tokenizer(str(tok_dir))  # as every later phase loads it (pad token set)
        train_splits = _write_training_splits(tofu_dir, b.forget_split, cfg.train.general_repeats)
        (out / "data" / ".done").write_text("")
        ph.end("data", t0, f"vocab {len(tok)}, files in {tofu_dir}")
    else:
        t0 = ph.start(
            f"TOFU subset ({b.forget_split} authors + {b.retain_authors} retain authors; "
            f"{b.eval_rows or 'all'} rows per evaluation split)"
        )
        tofu_dir = out / "data" / "tofu"
        train_splits = _write_tofu_subset(cfg, tofu_dir)
        tok_dir = None
        tok = model_io.load_tokenizer(cfg.model_path)
        ph.end("data", t0, f"files in {tofu_dir}")
    cfg = _resolve_epochs(cfg, tofu_dir, train_splits)

    # 2. target and retain models ----------------------------------------------------------
    hf = cfg.model.hf
    if cfg.model_path:
        mcfg = models.ModelConfig.from_hf(_hf_config(cfg.model_path))
        size = f"{Path(cfg.model_path).name}, {mcfg.num_layers} layers x {mcfg.hidden_size}"
        arch = mcfg.model_type
    else:
        size = f"{hf.get('num_hidden_layers')} layers x {hf.get('hidden_size')}"
        arch = hf["model_type"]
    summaries = {}
    for role in ("target", "retain"):
        what = "all authors" if role == "target" else "retain authors only"
        t0 = ph.start(f"train the {role} model ({arch}, {size}; {what}, {_train_steps(cfg, role)} steps)")
        done = out / "runs" / role / "summary.json"
        if resume and done.is_file() and (out / "runs" / role / "model" / "config.json").is_file():
            summaries[role] = _read_json(done)
            ph.end(f"train {role}", t0, "done before (resumed)")
            continue
        summaries[role] = _train(cfg, role, train_splits[role], tofu_dir, tok_dir, out, progress)
        loss = summaries[role]["last_metrics"].get("loss")
        ph.end(f"train {role}", t0, f"final loss {loss:.3f}" if loss is not None else "")

    # 3. evaluate retain, then target against it -------------------------------------------
    evaluator = _Evaluator(cfg, tok, tofu_dir)
    t0 = ph.start("evaluate the retain and target models (TOFU metrics)")
    results: dict[str, Any] = {}
    model_dirs = {r: Path(summaries[r]["model_dir"]) for r in ("target", "retain")}
    results["retain"] = cached("retain")
    evaluator.reference_model = models.from_pretrained(model_dirs["retain"])  # mia_reference's reference
    if results["retain"] is None:
        with console.status("evaluating retain model", spinner="dots") if progress else nullcontext():
            results["retain"] = evaluator(
                models.from_pretrained(model_dirs["retain"]),
                "retain",
                meta={"role": "retain", "model_dir": str(model_dirs["retain"])},
            )
        _self_reference(results["retain"])
        results["retain"].save(done_results / "retain.json")
    template = models.from_pretrained(model_dirs["target"])
    results["target"] = cached("target")
    if results["target"] is None:
        with console.status("evaluating target model", spinner="dots") if progress else nullcontext():
            results["target"] = evaluator(
                template,
                "target",
                reference=results["retain"],
                meta={"role": "target", "model_dir": str(model_dirs["target"])},
            )
        results["target"].save(done_results / "target.json")
    ta = results["target"].aggregates
    ph.end(
        "evaluate target+retain",
        t0,
        f"target forget ROUGE {ta['forget_Q_A_ROUGE']:.3f}, utility {ta['model_utility']:.3f}, "
        f"forget quality {_g(ta['forget_quality'])}",
    )
    checks = hard_checks(cfg, {n: results[n].aggregates for n in ("target", "retain")})
    failed = [c for c in checks if not c["ok"]]
    if failed:  # before the sweep: nothing it would measure could show forgetting
        raise StudyCheckFailed(
            "; ".join(f"{c['check']}: got {_g(c['value'])}" for c in failed)
            + f" (evaluations in {done_results}); the benchmark setup cannot show forgetting: train the target "
            "longer (train.steps) or check the data."
        )

    # 4. the sweep -------------------------------------------------------------------------
    from ngdiff_jax.sweep.analysis import analyze
    from ngdiff_jax.sweep.report import write_sweep_report
    from ngdiff_jax.sweep.runner import run_sweep

    sw = cfg.sweep
    n_sel = sum(len(sw.rates(n)) * len(sw.selection_seeds) for n in sw.methods)
    then = (f", then {len(sw.report_seeds)} report seeds at each selected setting" if sw.report_seeds else
            ", reported cross-fitted (leave one seed out)")  # fmt: skip
    t0 = ph.start(f"sweep: {len(sw.methods)} methods x {len(sw.lr)} initial rates x {len(sw.selection_seeds)} "
                  f"seeds ({n_sel} runs){then}")  # fmt: skip
    reference = results["retain"]

    def evaluate(params, names, metas):
        return evaluator.members(template, params, names, metas, reference=reference)

    def note(msg):
        console.print(f"  [dim]{msg}[/]")

    runs = run_sweep(_unlearn_base(cfg, model_dirs["target"], tofu_dir, out / "sweep", progress), sw, out / "sweep",
                     evaluate, progress=note)  # fmt: skip
    ph.end("sweep", t0, f"evaluation {evaluator.seconds:.0f} s in all")

    # 5. robustness of forgetting at the selected settings ---------------------------------------
    forgetting = None
    if sw.forgetting_checks.methods:
        t0 = ph.start(f"robustness of forgetting ({sw.forgetting_checks.checks}) at the selected settings of "
                      f"{', '.join(sw.forgetting_checks.methods)}, and of the target and retain models")  # fmt: skip
        forgetting = _forgetting_checks(cfg, evaluator, template, {r: model_dirs[r] for r in ("target", "retain")},
                                        runs.selected, _unlearn_base(cfg, model_dirs["target"], tofu_dir,
                                                                     out / "sweep", progress), out, note)  # fmt: skip
        worst = {n: f"{r['aggregates'].get('robust_worst_forget_Q_A_ROUGE', float('nan')):.3f}"
                 for n, r in forgetting["models"].items()}  # fmt: skip
        ph.end("robustness", t0, "worst forget ROUGE " + ", ".join(f"{n} {v}" for n, v in worst.items()))

    # 5. report ----------------------------------------------------------------------------
    t0 = ph.start("write report.json, report.md, sensitivity.png, tradeoff.png")
    refs = {n: {k: results[n].aggregates.get(k) for k in ("forget_quality", "model_utility", "forget_Q_A_ROUGE",
                                                           "forget_Q_A_Prob", "retain_Q_A_ROUGE", "privleak")}
            for n in ("target", "retain")}  # fmt: skip
    report = analyze(runs, sw, references=refs)
    if b.kind == "synthetic":
        title = f"Synthetic TOFU ({b.n_authors} authors, {b.forget_split}), tiny {arch} ({size})"
    else:
        title = (f"TOFU subset ({b.forget_split} + {b.retain_authors} retain authors), {size}, "
                 f"format {cfg.format.name}")  # fmt: skip
    report["checks"] = checks
    if forgetting is not None:
        report["forgetting_checks"] = forgetting
    o = cfg.unlearn.optim
    per_probe = o.gen_smoothing + (1 - o.gen_smoothing) * o.gen_clip_factor
    probes = -(-cfg.unlearn.steps // o.gen_every)
    report["setup"] = {"unlearn_steps": cfg.unlearn.steps, "batch_size": cfg.unlearn.batch_size,
                       "max_length": cfg.unlearn.max_length, "eval_max_new_tokens": cfg.evaluation.max_new_tokens,
                       "gen": {"every": o.gen_every, "smoothing": o.gen_smoothing, "clip_factor": o.gen_clip_factor,
                               "max_change_per_probe": per_probe, "probes": probes,
                               "max_change": per_probe**probes}}  # fmt: skip
    paths = write_sweep_report(out, report, title=title)
    ph.end("report", t0)

    total = ph.elapsed()
    summary = {
        "out_dir": str(out.resolve()),
        "report": paths,
        "checks": checks,
        "claims": {k: v["verdict"] for k, v in report["claims"].items()},
        "selected": runs.selected,
        "total_s": round(total, 2),
        "phases_s": {k: round(v, 2) for k, v in ph.seconds.items()},
        "sweep_s": runs.seconds,
        "evaluation_s": round(evaluator.seconds, 2),
        "train": {
            r: {"steps": s["steps"], "step_time_s": s["step_time_s"], "wall_s": s["wall_s"]}
            for r, s in summaries.items()
        },
        "machine": _machine(),
    }
    from ngdiff_jax.data import jsonio

    jsonio.write_json(out / "demo_summary.json", summary)
    _append_markdown(Path(paths["md"]), summary)
    _print_summary(console, report, checks, summary)
    return summary


def _forgetting_checks(cfg: DemoConfig, evaluator: _Evaluator, template, reference_dirs: dict, selected: dict,
                       base: dict, out: Path, note) -> dict:  # fmt: skip
    """``sweep.forgetting_checks`` (see :func:`ngdiff_jax.sweep.runner.run_forgetting_checks`): the
    target and retain models and each listed method's run at its selected setting, each checked by
    :func:`ngdiff_jax.evaluation.robustness.robustness_checks` on the forget split's rows (with
    their paraphrased questions). Results are saved (``results/checks_<model>.json``,
    ``sweep/checks/<method>/results``) and read back on resume."""
    import jax

    from ngdiff_jax import models
    from ngdiff_jax.data import QAFormatter, load_tofu
    from ngdiff_jax.evaluation import EvalResult
    from ngdiff_jax.evaluation.robustness import parse_checks, robustness_aggregates, robustness_checks
    from ngdiff_jax.sweep.runner import run_forgetting_checks

    fc = cfg.sweep.forgetting_checks
    rows = load_tofu(f"{cfg.benchmark.forget_split}_perturbed", evaluator.tofu_dir)
    fmt = QAFormatter(evaluator.tok, spec=cfg.format)
    kw = {"checks": parse_checks(fc.checks), "relearn_steps": fc.relearn_steps, "relearn_lr": fc.relearn_lr,
          "max_new_tokens": cfg.evaluation.max_new_tokens, "batch_size": cfg.evaluation.batch_size}  # fmt: skip

    def check(model, name, meta):
        t0 = time.perf_counter()
        rec = robustness_checks(model, evaluator.tok, rows, fmt, **kw)
        evaluator.seconds += time.perf_counter() - t0
        return EvalResult(name=name, benchmark="tofu", aggregates=robustness_aggregates(rec),
                          meta={**meta, "robustness": rec})  # fmt: skip

    found: dict = {}
    for role, mdir in reference_dirs.items():
        path = out / "results" / f"checks_{role}.json"
        if path.is_file():
            found[role] = EvalResult.load(path)
            continue
        found[role] = check(models.from_pretrained(mdir), role, {"role": role})
        found[role].save(path)

    def evaluate(params, names, metas):
        return [check(models.with_params(template, jax.tree.map(lambda x, i=i: x[i], params)), n, m)
                for i, (n, m) in enumerate(zip(names, metas))]  # fmt: skip

    recs = run_forgetting_checks(base, cfg.sweep, selected, out / "sweep", evaluate, progress=note)
    seed = fc.seed if fc.seed is not None else cfg.sweep.selection_seeds[0]
    models_out = {r: {"setting": None, "aggregates": found[r].aggregates, "record": found[r].meta["robustness"]}
                  for r in found}  # fmt: skip
    for name, r in recs.items():
        if r["diverged"] or r["aggregates"] is None:
            models_out[name] = {"setting": selected[name], "seed": seed, "diverged": True, "aggregates": {},
                                "record": None}  # fmt: skip
            continue
        res = EvalResult.load(out / "sweep" / "checks" / name / "results" / f"{r['key']}.json")
        models_out[name] = {"setting": selected[name], "seed": seed, "aggregates": res.aggregates,
                            "record": res.meta["robustness"]}  # fmt: skip
    skipped = [n for n in fc.methods if n not in recs]
    return {"seed": seed, "settings": {k: v for k, v in kw.items() if k != "checks"} | {"checks": list(kw["checks"])},
            "models": models_out, "no_selected_setting": skipped}  # fmt: skip


class StudyCheckFailed(RuntimeError):
    """A hard requirement of the study failed (exit 1): see :func:`hard_checks`."""


def _read_json(path: Path):
    import json

    return json.loads(Path(path).read_text())


def _hf_config(path: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(Path(path).expanduser()))


def _self_reference(retain_result) -> None:
    """The retain model's own forget_quality / privleak: against itself (KS p-value 1, privleak 0)."""
    from ngdiff_jax.evaluation import metrics as M

    tr = retain_result.per_sample["forget_truth_ratio"]
    retain_result.aggregates["forget_quality"] = M.forget_quality(tr, tr)
    auc = retain_result.aggregates["mia_min_k"]
    retain_result.aggregates["privleak"] = M.privleak(auc, auc)
    for key in list(retain_result.aggregates):
        if key.startswith("privleak_") and retain_result.aggregates.get("mia_" + key[9:]) is not None:
            a = retain_result.aggregates["mia_" + key[9:]]
            retain_result.aggregates[key] = M.privleak(a, a)
    retain_result.meta["retain_reference"] = "itself"


def _g(v) -> str:
    return "–" if v is None else f"{v:.3g}"


def _yaml(d) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False)


def _append_markdown(md: Path, summary: dict) -> None:
    lines = ["", "## Run", "", "| check | value | threshold | ok |", "|---|---|---|---|"]
    for c in summary["checks"]:
        lines.append(f"| {c['check']} | {_g(c['value'])} | {_g(c['threshold'])} | {'yes' if c['ok'] else 'NO'} |")
    machine = summary["machine"]
    lines += [
        "",
        (f"Total time {summary['total_s']:.0f} s on {machine['cpus']} CPUs "
         f"(load average at the end: {machine.get('load_average_1_5_15')})."),  # fmt: skip
        "",
        "| phase | seconds |",
        "|---|---|",
    ]
    for k, v in summary["phases_s"].items():
        lines.append(f"| {k} | {v:.1f} |")
    for rnd, per in summary["sweep_s"].items():
        for name, v in per.items():
            lines.append(f"| sweep {rnd}: {name} | {v:.1f} |")
    lines.append("")
    md.write_text(md.read_text() + "\n".join(lines))


def _print_summary(console, report, checks, summary) -> None:
    from rich.table import Table

    cols = ("forget_quality", "model_utility", "forget_Q_A_ROUGE", "retain_Q_A_ROUGE")
    pct = round(report["level"] * 100)
    which = ("fresh report seeds" if report["reported_round"] == "report" else
             "cross-fitted runs" if report.get("crossfit") else "selection runs")  # fmt: skip
    t = Table(title=f"Selected settings, {which}: mean [{pct}% interval]")
    t.add_column("model")
    t.add_column("setting")
    for c in cols:
        t.add_column(c, justify="right")
    from ngdiff_jax.sweep.report import interval_text, setting_text

    for n, agg in report["references"].items():
        t.add_row(n, "reference", *(_g(agg.get(c)) for c in cols))
    for n, m in report["methods"].items():
        t.add_row(n, setting_text(m["selected"]), *(interval_text(m["summary"].get(c)) for c in cols))
    console.print(t)
    for c in checks:
        mark = "[green]✓[/]" if c["ok"] else "[red]✗[/]"
        console.print(f"{mark} {c['check']}: {_g(c['value'])} (threshold {_g(c['threshold'])})")
    for key, claim in report["claims"].items():
        color = {"supported": "green", "not supported": "red"}.get(claim["verdict"], "yellow")
        console.print(f"[bold]{key}[/]: [{color}]{claim['verdict']}[/] — {claim['claim']}")
        for row in claim["comparisons"]:
            console.print(f"    vs {row['against']}: {row['verdict']} ({row['reason']})")
    phases = ", ".join(f"{k} {v:.0f}s" for k, v in summary["phases_s"].items())
    console.print(f"[bold]total {summary['total_s']:.0f} s[/] ({phases})")
    r = summary["report"]
    console.print(f"report: {r['md']}, {r['tradeoff']}, {r['sensitivity']}")
