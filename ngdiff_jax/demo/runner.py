"""The study's phases: evaluation of the target and retain models, the sweep, the robustness
checks, the report (:func:`run_demo`)."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Mapping
from contextlib import nullcontext
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from ngdiff_jax.config_loader import to_dict
from ngdiff_jax.demo.config import TRAIN_SPLITS, DemoConfig
from ngdiff_jax.demo.inputs import (
    data_config,
    resolve_epochs,
    train_model,
    train_steps,
    write_tofu_subset,
    write_training_splits,
)
from ngdiff_jax.demo.summary import append_markdown, number_text, print_summary, yaml_text


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
        "data": data_config(u, source=str(tofu_dir), forget_split=cfg.benchmark.forget_split,
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


def _cpu() -> dict:
    """The CPU model and its vector extensions (Linux's /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), None)
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    vector = sorted({f for f in flags if f.startswith(("avx", "amx", "fma", "sse4"))})
    return {"cpu_model": model, "cpu_vector_extensions": vector}


def _machine() -> dict:
    """Where the study ran. XLA:CPU compiles for the host's instruction set, so the same code and
    seeds round differently on another CPU (AVX-512 or not) or another jaxlib: the CPU model, its
    vector extensions and the library versions say whether a rerun can be bit-equal."""
    info = {"cpus": os.cpu_count(), "platform": platform.platform(), **_cpu()}
    info["versions"] = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "numpy"):
        try:
            info["versions"][pkg] = version(pkg)
        except PackageNotFoundError:
            info["versions"][pkg] = None
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
    cfg_text = yaml_text(to_dict(cfg))
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
        train_splits = write_training_splits(tofu_dir, b.forget_split, cfg.train.general_repeats)
        (out / "data" / ".done").write_text("")
        ph.end("data", t0, f"vocab {len(tok)}, files in {tofu_dir}")
    else:
        t0 = ph.start(
            f"TOFU subset ({b.forget_split} authors + {b.retain_authors} retain authors; "
            f"{b.eval_rows or 'all'} rows per evaluation split)"
        )
        tofu_dir = out / "data" / "tofu"
        train_splits = write_tofu_subset(cfg, tofu_dir)
        tok_dir = None
        tok = model_io.load_tokenizer(cfg.model_path)
        ph.end("data", t0, f"files in {tofu_dir}")
    cfg = resolve_epochs(cfg, tofu_dir, train_splits)

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
        t0 = ph.start(f"train the {role} model ({arch}, {size}; {what}, {train_steps(cfg, role)} steps)")
        done = out / "runs" / role / "summary.json"
        if resume and done.is_file() and (out / "runs" / role / "model" / "config.json").is_file():
            summaries[role] = _read_json(done)
            ph.end(f"train {role}", t0, "done before (resumed)")
            continue
        summaries[role] = train_model(cfg, role, train_splits[role], tofu_dir, tok_dir, out, progress)
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
        f"forget quality {number_text(ta['forget_quality'])}",
    )
    checks = hard_checks(cfg, {n: results[n].aggregates for n in ("target", "retain")})
    failed = [c for c in checks if not c["ok"]]
    if failed:  # before the sweep: nothing it would measure could show forgetting
        raise StudyCheckFailed(
            "; ".join(f"{c['check']}: got {number_text(c['value'])}" for c in failed)
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
    append_markdown(Path(paths["md"]), summary)
    print_summary(console, report, checks, summary)
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
