"""The end-to-end offline demo behind ``ngdiff demo``: synthetic TOFU, tiny Llama, four+ methods.

Phases (each timed, with a progress display):

1. **data** — the synthetic TOFU-style benchmark (:func:`ngdiff_jax.data.synthetic.prepare`)
   and a BPE tokenizer trained on its text. Two training splits are added for the demo:
   ``demo_target_train`` (``full`` + world facts + real authors) and ``demo_retain_train``
   (``retainNN`` + world facts + real authors). The world-facts / real-authors questions
   stand in for the general knowledge a pretrained model brings to TOFU; without them
   the utility splits would score zero and so would ``model_utility``.
2. **target** / **retain** — a tiny Llama trained from scratch on each split
   (:func:`ngdiff_jax.training.run_finetune`).
3. **evaluation** of the retain model, then of the target against it (TOFU metrics with
   open-unlearning's names, :func:`ngdiff_jax.evaluation.evaluate_tofu`).
4. **unlearning** — every method of ``unlearn.methods`` from the target model
   (:func:`ngdiff_jax.training.run_unlearn`; forget set ``forgetNN``, retain set the retain
   model's training data by default), evaluated every ``unlearn.eval_every`` steps (its
   trajectory); the last point is the method's final evaluation.
5. **report** — ``report.json``, ``report.md``, ``tradeoff.png`` and one per-sample JSON
   per model (:func:`ngdiff_jax.evaluation.write_report`), plus ``demo_summary.json``
   (settings, acceptance checks, time per phase).

Settings come from ``configs/demo.yaml``; its ``quick:`` section is merged on top for
``--quick`` (a much smaller run for tests).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from ngdiff_jax.config_loader import ConfigError, _merge, apply_overrides, build, load_yaml, to_dict
from ngdiff_jax.data.formatting import FormatSpec, load_format
from ngdiff_jax.evaluation.report import TOFU_COLUMNS
from ngdiff_jax.training.config_schema import DataConfig, ModelSpec, OptimConfig

__all__ = [
    "BenchmarkSpec",
    "DemoConfig",
    "EvalSpec",
    "MethodRun",
    "TrainSpec",
    "UnlearnSpec",
    "acceptance_checks",
    "load_demo_config",
    "run_demo",
]

#: The demo's training splits (written next to the benchmark's files): QA rows + general knowledge.
TRAIN_SPLITS = {"target": "demo_target_train", "retain": "demo_retain_train"}

#: Aggregates kept for every trajectory point: the report's TOFU columns.
TRAJECTORY_KEYS = TOFU_COLUMNS


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
    retain_authors: int = 8  # tofu: retain authors trained on (20 questions each)
    eval_rows: int | None = None  # tofu: rows per evaluation split (null: all of the subset's)


@dataclass(frozen=True)
class TrainSpec:
    """Training of the target and retain models (the same settings for both)."""

    steps: int = 300
    retain_steps: int | None = None  # the retain model's steps (default: steps)
    # The world-facts / real-authors rows appear this many times in both training splits: the
    # general knowledge a pretrained model would have learned well (a handful of rows among
    # hundreds is otherwise barely learned, and model_utility is their harmonic mean).
    general_repeats: int = 1
    batch_size: int = 16
    max_length: int = 64
    buckets: tuple[int, ...] | None = (64,)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, weight_decay=0.01))


@dataclass(frozen=True)
class MethodRun:
    """Settings of one unlearning run (``unlearn.runs.<name>``), on top of the shared ones."""

    method: str | None = None  # the config in configs/methods, default: the run's name
    lr: float | None = None  # default: unlearn.optim.lr
    steps: int | None = None  # default: unlearn.steps
    overrides: dict = field(default_factory=dict)  # MethodConfig fields (e.g. beta)


@dataclass(frozen=True)
class UnlearnSpec:
    """Settings shared by every unlearning run; ``runs`` holds per-run settings (``name -> MethodRun``)."""

    methods: tuple[str, ...] = ("ga", "gdiff", "npo", "ngdiff")  # runs, in order
    runs: dict = field(default_factory=dict)
    # The retain set of the unlearning runs: "retain_model_data" is what the retain model was
    # trained on (retainNN + the general-knowledge rows), "tofu" is TOFU's retainNN alone.
    retain_set: Literal["retain_model_data", "tofu"] = "retain_model_data"
    steps: int = 40
    eval_every: int = 5
    batch_size: int = 8
    max_length: int = 64
    buckets: tuple[int, ...] | None = (64,)
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass(frozen=True)
class EvalSpec:
    """TOFU evaluation settings (final models and trajectory points)."""

    batch_size: int = 16
    max_new_tokens: int = 32
    buckets: tuple[int, ...] | None = (64,)
    # Rows per split for the trajectory points (null: all rows, and the last point is the
    # method's final evaluation, so it is not repeated).
    trajectory_limit: int | None = None


@dataclass(frozen=True)
class DemoConfig:
    benchmark: BenchmarkSpec = field(default_factory=BenchmarkSpec)
    model: ModelSpec = field(default_factory=ModelSpec)  # a model from scratch (synthetic demo)
    model_path: str | None = None  # or a pretrained model directory to fine-tune (real study)
    # prompt format for training, unlearning and evaluation (a preset in configs/formats)
    format: FormatSpec = field(default="default", metadata={"config_dir": "formats"})  # type: ignore[assignment]
    train: TrainSpec = field(default_factory=TrainSpec)
    unlearn: UnlearnSpec = field(default_factory=UnlearnSpec)
    evaluation: EvalSpec = field(default_factory=EvalSpec)
    seed: int = 0

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
        if self.benchmark.kind == "synthetic" and self.model_path is not None:
            raise ConfigError(
                "study config: benchmark.kind=synthetic trains its own tokenizer and model from scratch; "
                "use benchmark.kind=tofu with model_path."
            )
        if not self.unlearn.methods:
            raise ConfigError(
                "demo config: unlearn.methods is empty; name at least one method (e.g. ngdiff)."
            )
        if not isinstance(self.unlearn.runs, dict):
            raise ConfigError("demo config: unlearn.runs must map run names to their settings.")
        if self.unlearn.eval_every < 1:
            raise ConfigError(
                f"demo config: unlearn.eval_every must be >= 1, got {self.unlearn.eval_every}."
            )


DEFAULT_CONFIG = "demo.yaml"


def load_demo_config(
    path: str | Path | None = None, *, quick: bool = False, overrides: Sequence[str] = ()
) -> DemoConfig:
    """``configs/demo.yaml`` (or ``path``), with its ``quick:`` section merged on top if ``quick``,
    then ``key=value`` overrides (dotted keys, YAML values)."""
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
        data = _merge(data, quick_section)
    data = apply_overrides(data, overrides)
    cfg = build(DemoConfig, data)
    return resolve_runs(cfg)


def resolve_runs(cfg: DemoConfig) -> DemoConfig:
    """Check ``unlearn.methods`` and turn ``unlearn.runs`` into a ``MethodRun`` for every method."""
    from ngdiff_jax.config_loader import resolve_config_path

    u = cfg.unlearn
    if len(set(u.methods)) != len(u.methods):
        raise ConfigError(f"unlearn.methods lists a method twice: {list(u.methods)}.")
    runs = {}
    for name in u.methods:
        given = u.runs.get(name, MethodRun())
        run = (
            given
            if isinstance(given, MethodRun)
            else build(MethodRun, given or {}, where=f"unlearn.runs.{name}")
        )
        try:
            resolve_config_path(run.method or name, "methods")
        except FileNotFoundError as e:
            raise ConfigError(
                f"unlearn.methods: {run.method or name!r} is not a method in configs/methods ({e}); "
                "set unlearn.runs.<name>.method to one, or fix the name."
            ) from None
        runs[name] = run
    return replace(cfg, unlearn=replace(u, runs=runs))


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
    n_retain = 20 * b.retain_authors
    if b.retain_authors < 1 or n_retain > len(retain_pool):
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
    first = lambda rows: rows if b.eval_rows is None else rows[: b.eval_rows]  # noqa: E731
    write_jsonl(dest / f"{b.forget_split}_perturbed.json", first(load_tofu(f"{b.forget_split}_perturbed", src)))
    holdout = HOLDOUT_FOR_FORGET[b.forget_split]
    write_jsonl(dest / f"{holdout}.json", first(load_tofu(holdout, src)))
    for split in ("real_authors_perturbed", "world_facts_perturbed"):
        write_jsonl(dest / f"{split}.json", first(load_tofu(split, src)))
    return dict(TRAIN_SPLITS)


def _train_steps(cfg: DemoConfig, role: str) -> int:
    t = cfg.train
    return t.retain_steps if role == "retain" and t.retain_steps is not None else t.steps


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
        run=RunConfig(
            output_dir=str(out / "runs" / role),
            steps=_train_steps(cfg, role),
            seed=cfg.seed,
            checkpoint_every=0,
            log_every=10,
            progress=progress,
        ),
    )
    _, summary = run_finetune(ft)
    return summary


class _Evaluator:
    """TOFU evaluation with the demo's settings; compiled code is shared by every model."""

    def __init__(self, cfg: DemoConfig, tokenizer, tofu_dir: Path):
        self.cfg = cfg
        self.tok = tokenizer
        self.tofu_dir = tofu_dir
        self.seconds = 0.0

    reference_model = None  # the retain model, for the mia_reference attack (set once it is trained)

    def __call__(self, model, name: str, *, reference=None, limit=None, meta=None, mia_attacks=None):
        from ngdiff_jax.data import QAFormatter
        from ngdiff_jax.evaluation import evaluate_tofu
        from ngdiff_jax.evaluation.tofu import MIA_ATTACKS

        e = self.cfg.evaluation
        t0 = time.perf_counter()
        r = evaluate_tofu(
            model,
            self.tok,
            self.tofu_dir,
            forget_split=self.cfg.benchmark.forget_split,
            retain_reference=reference,
            batch_size=e.batch_size,
            max_new_tokens=e.max_new_tokens,
            buckets=e.buckets,
            limit=limit,
            name=name,
            meta=meta,
            formatter=QAFormatter(self.tok, spec=self.cfg.format),
            reference_model=self.reference_model,
            mia_attacks=MIA_ATTACKS if mia_attacks is None else mia_attacks,  # all six by default (tiny models)
        )
        self.seconds += time.perf_counter() - t0
        return r


def _unlearn(
    cfg: DemoConfig,
    name: str,
    run: MethodRun,
    *,
    target_dir: Path,
    tofu_dir: Path,
    out: Path,
    evaluator: _Evaluator,
    template,
    target_result,
    retain_result,
    progress: bool,
):
    """One method: returns (final EvalResult, trajectory [(step, aggregates)], summary, eval seconds)."""
    from ngdiff_jax import models
    from ngdiff_jax.data import RETAIN_FOR_FORGET
    from ngdiff_jax.training import load_method, run_unlearn
    from ngdiff_jax.training.config_schema import RunConfig, UnlearnConfig

    u = cfg.unlearn
    method = load_method(run.method or name, **{"name": name, **run.overrides})
    steps = run.steps if run.steps is not None else u.steps
    optim = replace(u.optim, lr=run.lr) if run.lr is not None else u.optim
    ucfg = UnlearnConfig(
        model_path=str(target_dir),
        method=method,
        format=cfg.format,
        data=_data_config(
            u,
            source=str(tofu_dir),
            forget_split=cfg.benchmark.forget_split,
            retain_split=(
                RETAIN_FOR_FORGET[cfg.benchmark.forget_split]
                if u.retain_set == "tofu"
                else TRAIN_SPLITS["retain"]
            ),
        ),
        optim=optim,
        run=RunConfig(
            output_dir=str(out / "runs" / name),
            steps=steps,
            seed=cfg.seed,
            checkpoint_every=0,
            log_every=1,
            eval_every=u.eval_every,
            progress=progress,
        ),
    )
    limit = cfg.evaluation.trajectory_limit
    trajectory: list[tuple[int, dict]] = []
    last: dict[int, Any] = {}
    eval_before = evaluator.seconds

    def eval_fn(step: int, params) -> dict:
        if step == 0 and limit is None:
            agg = dict(target_result.aggregates)  # step 0 is the target model itself
        else:
            model = models.with_params(template, params)
            r = evaluator(
                model,
                f"{name}@{step}",
                reference=retain_result,
                limit=limit,
                meta={"role": "method", "method": name, "step": step},
                # the trajectory keeps TRAJECTORY_KEYS only: the other attacks only for the final point
                mia_attacks=None if step == steps and limit is None else ("min_k",),
            )
            last.clear()
            last[step] = r
            agg = r.aggregates
        point = {k: agg.get(k) for k in TRAJECTORY_KEYS}
        trajectory.append((step, point))
        return point

    _, summary = run_unlearn(ucfg, eval_fn=eval_fn)
    final = last.get(steps) if limit is None else None
    if final is None:
        final = evaluator(
            models.from_pretrained(summary["model_dir"]),
            name,
            reference=retain_result,
            meta={"role": "method", "method": name, "step": steps},
        )
    final.name = name
    final.meta.update(
        {
            "role": "method",
            "method": name,
            "step": steps,
            "model_dir": summary["model_dir"],
            "method_config": to_dict(method),
            "lr": optim.lr,
        }
    )
    return final, trajectory, summary, evaluator.seconds - eval_before


def acceptance_checks(aggregates: Mapping[str, Mapping[str, Any]]) -> list[dict]:
    """The demo's criteria (issue 5) on ``{model: aggregates}``; each ``{name, value, threshold, ok}``."""
    checks = []

    def get(model, key):
        v = aggregates.get(model, {}).get(key)
        return None if v is None else float(v)

    t_rouge = get("target", "forget_Q_A_ROUGE")
    checks.append(
        {
            "check": "target memorized its forget authors: forget_Q_A_ROUGE >= 0.6",
            "value": t_rouge,
            "threshold": 0.6,
            "ok": t_rouge is not None and t_rouge >= 0.6,
        }
    )
    n_rouge, n_mu, t_mu = (
        get("ngdiff", "forget_Q_A_ROUGE"),
        get("ngdiff", "model_utility"),
        get("target", "model_utility"),
    )
    if n_rouge is not None and t_rouge is not None:
        checks.append(
            {
                "check": "ngdiff forgets: forget_Q_A_ROUGE <= 0.5 x target's",
                "value": n_rouge,
                "threshold": 0.5 * t_rouge,
                "ok": n_rouge <= 0.5 * t_rouge,
            }
        )
    if n_mu is not None and t_mu is not None:
        checks.append(
            {
                "check": "ngdiff keeps utility: model_utility >= 0.7 x target's",
                "value": n_mu,
                "threshold": 0.7 * t_mu,
                "ok": n_mu >= 0.7 * t_mu,
            }
        )
    return checks


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
    phases (data, each trained model, each evaluation, each unlearning method) are loaded
    from disk, an unfinished one is run again from its start.
    """
    from rich.console import Console

    from ngdiff_jax import models
    from ngdiff_jax.data import jsonio, synthetic
    from ngdiff_jax.evaluation import EvalResult, write_report
    from ngdiff_jax.training import model_io

    out = Path(out_dir)
    cfg_text = _yaml(to_dict(cfg))
    if out.exists() and any(out.iterdir()):
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
    console = console or Console()
    methods = list(cfg.unlearn.methods)
    ph = Phases(console, total_phases=4 + len(methods) + 1)
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

    # 4. unlearning ------------------------------------------------------------------------
    trajectories: dict[str, list] = {}
    unlearn_info: dict[str, dict] = {}
    for name in methods:
        run = cfg.unlearn.runs[name]
        steps = run.steps if run.steps is not None else cfg.unlearn.steps
        t0 = ph.start(
            f"unlearn with {name} ({steps} steps, evaluated every {cfg.unlearn.eval_every})",
        )
        state = out / "runs" / name / "study_state.json"
        final = cached(name)
        if final is not None and state.is_file():
            st = _read_json(state)
            results[name], trajectories[name], unlearn_info[name] = final, st["trajectory"], st["info"]
            ph.end(f"unlearn {name}", t0, "done before (resumed)")
            continue
        if (out / "runs" / name).exists():
            import shutil

            shutil.rmtree(out / "runs" / name)  # an interrupted run of this phase: start it again
        final, traj, summary, eval_s = _unlearn(
            cfg,
            name,
            run,
            target_dir=model_dirs["target"],
            tofu_dir=tofu_dir,
            out=out,
            evaluator=evaluator,
            template=template,
            target_result=results["target"],
            retain_result=results["retain"],
            progress=progress,
        )
        results[name] = final
        trajectories[name] = traj
        unlearn_info[name] = {
            "steps": summary["steps"],
            "step_time_s": summary["step_time_s"],
            "train_s": summary["wall_s"] - eval_s,
            "eval_s": eval_s,
            "model_dir": summary["model_dir"],
        }
        final.save(done_results / f"{name}.json")
        jsonio.write_json(state, {"trajectory": [list(p) for p in traj], "info": unlearn_info[name]})
        write_report(out / "partial_report", results, trajectories, title="(partial: methods done so far)")
        a = final.aggregates
        ph.end(
            f"unlearn {name}",
            t0,
            f"forget ROUGE {a['forget_Q_A_ROUGE']:.3f}, utility {a['model_utility']:.3f}, "
            f"forget quality {_g(a['forget_quality'])}; evaluation {eval_s:.1f} s",
        )

    # 5. report ----------------------------------------------------------------------------
    t0 = ph.start("write report.json, report.md, tradeoff.png")
    if b.kind == "synthetic":
        title = (
            f"Synthetic TOFU ({b.n_authors} authors, {b.forget_split}), tiny {arch} ({size})"
        )
    else:
        title = (
            f"TOFU subset ({b.forget_split} + {b.retain_authors} retain authors), {size}, "
            f"format {cfg.format.name}"
        )
    paths = write_report(out, results, trajectories, title=title)
    aggregates = {n: r.aggregates for n, r in results.items()}
    checks = acceptance_checks(aggregates)
    ph.end("report", t0)

    total = ph.elapsed()
    summary = {
        "out_dir": str(out.resolve()),
        "report": paths,
        "models": {n: r.meta.get("model_dir") for n, r in results.items()},
        "acceptance": checks,
        "total_s": round(total, 2),
        "phases_s": {k: round(v, 2) for k, v in ph.seconds.items()},
        "evaluation_s": round(evaluator.seconds, 2),
        "unlearn": unlearn_info,
        "train": {
            r: {"steps": s["steps"], "step_time_s": s["step_time_s"], "wall_s": s["wall_s"]}
            for r, s in summaries.items()
        },
        "machine": _machine(),
    }
    jsonio.write_json(out / "demo_summary.json", summary)
    _append_markdown(Path(paths["md"]), summary)
    _print_summary(console, results, checks, summary)
    return summary


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
    lines = [
        "",
        "## Demo run",
        "",
        "| acceptance check | value | threshold | ok |",
        "|---|---|---|---|",
    ]
    for c in summary["acceptance"]:
        lines.append(
            f"| {c['check']} | {_g(c['value'])} | {_g(c['threshold'])} | {'yes' if c['ok'] else 'NO'} |"
        )
    machine = summary["machine"]
    lines += [
        "",
        (
            f"Total time {summary['total_s']:.0f} s on {machine['cpus']} CPUs "
            f"(load average at the end: {machine.get('load_average_1_5_15')})."
        ),
        "",
        "| phase | seconds |",
        "|---|---|",
    ]
    for k, v in summary["phases_s"].items():
        lines.append(f"| {k} | {v:.1f} |")
    lines.append("")
    md.write_text(md.read_text() + "\n".join(lines))


def _print_summary(console, results, checks, summary) -> None:
    from rich.table import Table

    cols = (
        "forget_Q_A_ROUGE",
        "forget_quality",
        "model_utility",
        "forget_truth_ratio",
        "retain_Q_A_ROUGE",
        "privleak",
    )
    t = Table(title="TOFU metrics (open-unlearning names)")
    t.add_column("model")
    for c in cols:
        t.add_column(c, justify="right")
    for n, r in results.items():
        t.add_row(n, *(_g(r.aggregates.get(c)) for c in cols))
    console.print(t)
    for c in checks:
        mark = "[green]✓[/]" if c["ok"] else "[red]✗[/]"
        console.print(f"{mark} {c['check']}: {_g(c['value'])} (threshold {_g(c['threshold'])})")
    phases = ", ".join(f"{k} {v:.0f}s" for k, v in summary["phases_s"].items())
    console.print(f"[bold]total {summary['total_s']:.0f} s[/] ({phases})")
    console.print(f"report: {summary['report']['md']}, {summary['report']['png']}")
