"""Running a sweep: each method as one population per round, each member evaluated as it finishes.

Rounds: ``selection`` (every rate x setting x selection seed), then, with ``report_seeds``,
``report`` (each method's selected setting x report seeds). A method's round is one
``ngdiff unlearn`` population (:func:`ngdiff_jax.training.population_run.run_population`) in
``<out>/<round>/<method>``; when a chunk of members finishes training, ``evaluate`` scores them
together and each member's result is saved as ``results/<member>.json`` there. Everything
resumes: finished chunks and saved results are read back, an unfinished chunk continues from
its checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ngdiff_jax.data import jsonio
from ngdiff_jax.sweep.config import SweepSection, method_config

__all__ = ["SweepRuns", "run_forgetting_checks", "run_sweep"]

#: ``evaluate(params, names, metas) -> [EvalResult]``: the members' parameters (the full model's
#: per-block layout, leading member axis) evaluated together.
Evaluate = Callable[[Any, list[str], list[dict]], list]


@dataclasses.dataclass
class SweepRuns:
    """Every run of a sweep: ``runs[round][method]`` is a list of member records
    (``member`` fields, ``diverged``, ``aggregates`` or None) and ``selected[method]`` the
    setting the rule picked on the selection round (None: no setting met the rule)."""

    runs: dict
    selected: dict
    selection_table: dict
    seconds: dict


def _unlearn_config(base, name: str, spec, population, out: Path):
    from ngdiff_jax.training.config_schema import UnlearnConfig

    fields = {f.name for f in dataclasses.fields(UnlearnConfig)}
    kw = {k: v for k, v in base.items() if k in fields}
    run = dataclasses.replace(kw["run"], output_dir=str(out), eval_every=0)
    return UnlearnConfig(**{**kw, "method": method_config(name, spec), "run": run, "population": population})


def _round(base, sweep: SweepSection, round_name: str, members_of: dict, out: Path, evaluate: Evaluate,
           progress: Callable[[str], None]) -> dict:  # fmt: skip
    """One round: ``members_of[method] = PopulationSection``; returns ``{method: [record]}``."""
    import time

    from ngdiff_jax.evaluation.results import EvalResult
    from ngdiff_jax.training.population_run import run_population
    from ngdiff_jax.training.validation import validate_run

    cfgs = {name: _unlearn_config(base, name, sweep.methods[name], pop, out / round_name / name)
            for name, pop in members_of.items()}  # fmt: skip
    for cfg in cfgs.values():  # every method's config and inputs checked before any run starts
        validate_run(cfg, "unlearn")
    records, seconds = {}, {}
    for name, cfg in cfgs.items():
        t0 = time.perf_counter()
        rdir = Path(cfg.run.output_dir) / "results"
        rdir.mkdir(parents=True, exist_ok=True)

        def on_chunk(members, params, results, rdir=rdir, name=name):
            import jax

            todo = [i for i, (m, r) in enumerate(zip(members, results))
                    if not r["diverged"] and not (rdir / f"{m.key}.json").is_file()]  # fmt: skip
            if not todo:
                return
            sub = jax.tree.map(lambda x: x[np.asarray(todo)], params)
            names = [f"{name} {members[i].name}" for i in todo]
            metas = [{"role": "method", "method": name, "round": round_name, "member": members[i].to_dict(),
                      "steps": results[i]["steps"]} for i in todo]  # fmt: skip
            for i, res in zip(todo, evaluate(sub, names, metas)):
                res.save(rdir / f"{members[i].key}.json")

        progress(f"{round_name}: {name} ({len(cfg.population.members(seed=cfg.run.seed, lr=cfg.optim.lr))} members)")
        pop = run_population(cfg, on_chunk=on_chunk, export=False, all_diverged_fails=False)
        recs = []
        for r in pop.results:
            f = rdir / f"{r['key']}.json"
            agg = EvalResult.load(f).aggregates if (not r["diverged"] and f.is_file()) else None
            recs.append({**{k: r[k] for k in ("index", "key", "seed", "values", "name", "diverged", "stopped_at",
                                                "steps")}, "aggregates": agg})  # fmt: skip
        records[name] = recs
        seconds[name] = round(time.perf_counter() - t0, 2)
    return records, seconds


def run_sweep(base: dict, sweep: SweepSection, out: str | Path, evaluate: Evaluate,
              progress: Callable[[str], None] = lambda s: None) -> SweepRuns:  # fmt: skip
    """Run ``sweep`` (see the module doc). ``base`` holds the unlearning settings every run shares:
    ``model_path``, ``data``, ``format``, ``optim``, ``run`` (steps, batch sizes ...),
    ``precision``, ``lora``... as :class:`~ngdiff_jax.training.UnlearnConfig` fields."""
    from ngdiff_jax.evaluation.statistics import select_setting

    out = Path(out)
    crit = sweep.criterion()
    pop = _population(sweep)
    first = {name: pop(name, sweep.selection_seeds, sweep.rates(name), spec.settings)
             for name, spec in sweep.methods.items()}  # fmt: skip
    runs, seconds = {}, {}
    runs["selection"], seconds["selection"] = _round(base, sweep, "selection", first, out, evaluate, progress)

    def score(metrics):
        try:
            return crit.score(metrics)
        except KeyError:
            return None

    selected, tables = {}, {}
    for name, recs in runs["selection"].items():
        by_setting: dict = {}
        for r in recs:
            by_setting.setdefault(_setting_key(r["values"]), []).append(None if r["diverged"] else r["aggregates"])
        best, table = select_setting(by_setting, score)
        selected[name] = None if best is None else dict(best)
        tables[name] = [{"values": dict(k), **v} for k, v in table.items()]
    if sweep.report_seeds:
        second = {}
        for name, values in selected.items():
            if values is None:
                continue
            second[name] = pop(name, sweep.report_seeds, [values["optim.lr"]], _settings(values))
        runs["report"], seconds["report"] = _round(base, sweep, "report", second, out, evaluate, progress)
    result = SweepRuns(runs=runs, selected=selected, selection_table=tables, seconds=seconds)
    jsonio.write_json(out / "runs.json", dataclasses.asdict(result))
    return result


def run_forgetting_checks(base: dict, sweep: SweepSection, selected: dict, out: str | Path, evaluate: Evaluate,
                          progress: Callable[[str], None] = lambda s: None) -> dict:  # fmt: skip
    """``sweep.forgetting_checks``: each of its methods with a selected setting run once more there
    (one member, seed ``forgetting_checks.seed`` or the first selection seed) in
    ``<out>/checks/<method>``, its parameters handed to ``evaluate`` (as :func:`run_sweep`'s, whose
    results are saved and read back on resume). Returns ``{method: record}`` (the member's fields,
    ``aggregates``), a method whose setting nothing met left out."""
    fc = sweep.forgetting_checks
    seed = fc.seed if fc.seed is not None else sweep.selection_seeds[0]
    pop = _population(sweep)
    members_of = {name: pop(name, [seed], [selected[name]["optim.lr"]], _settings(selected[name]))
                  for name in fc.methods if selected.get(name) is not None}  # fmt: skip
    if not members_of:
        return {}
    records, _ = _round(base, sweep, "checks", members_of, Path(out), evaluate, progress)
    return {name: recs[0] for name, recs in records.items()}


def _population(sweep: SweepSection):
    from ngdiff_jax.population import PopulationSection

    def pop(name, seeds, rates, settings):
        return PopulationSection(seeds=tuple(seeds), lr=tuple(rates), settings=dict(settings),
                                 chunk_size=sweep.chunk_size, export=False)  # fmt: skip

    return pop


def _settings(values: dict) -> dict:
    """A selected setting (``{key: value}`` with ``optim.lr``) as population settings, the rate left out."""
    return {k: [v] for k, v in values.items() if k != "optim.lr"}


def _setting_key(values: dict) -> tuple:
    return tuple(sorted(values.items()))
