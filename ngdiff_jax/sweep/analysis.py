"""From a sweep's runs to its findings: intervals per method, paired comparisons, spreads, verdicts.

:func:`analyze` returns the ``report.json`` content of a sweep (every number it states comes
with the runs it was computed from):

* ``methods[m]``: the selected setting, the selection table (mean metrics per setting), the
  reported runs' mean and interval of every metric, how many runs diverged;

The reported runs carry no selection bias: with ``report_seeds`` they are fresh runs at the
selected setting; without, they are *cross-fitted* (leave one seed out): seed ``s``'s reported run
is its run at the setting the rule picks from the other seeds alone (``folds`` says which setting
each fold picked), so no reported number took part in choosing its own setting.
* ``sensitivity[m][metric]``: mean and interval per initial rate (selection seeds);
* ``claims.tradeoff``: claim (i), ``compare.method`` against each baseline at their selected
  settings, paired by seed on the reported runs;
* ``claims.robustness``: claim (ii), the spread over the initial rates of each metric for the
  adaptive-rate method against the others (bootstrap over seeds).

A verdict is ``supported``, ``not supported`` or ``inconclusive`` (the interval includes no
difference), always with the interval that decided it; a claim that cannot be tested (a method
meets the rule at no rate) says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ngdiff_jax.evaluation.statistics import (
    mean_interval,
    paired_difference,
    select_setting,
    spread_difference,
    spread_interval,
)
from ngdiff_jax.sweep.config import SweepSection

__all__ = ["METRICS", "analyze"]

#: Metrics summarized for every method (TOFU's, open-unlearning names).
METRICS = ("forget_quality", "model_utility", "forget_Q_A_ROUGE", "forget_Q_A_Prob", "retain_Q_A_ROUGE",
           "forget_truth_ratio", "privleak")  # fmt: skip


def _value(rec, metric):
    if rec["diverged"] or rec["aggregates"] is None:
        return None
    v = rec["aggregates"].get(metric)
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v)


def _same(values: dict, setting: dict) -> bool:
    return all(values.get(k) == v for k, v in setting.items())


def _verdict(interval, better_if_positive: bool = True) -> str:
    if interval.low is None:
        return "inconclusive"
    if interval.low > 0:
        return "supported" if better_if_positive else "not supported"
    if interval.high < 0:
        return "not supported" if better_if_positive else "supported"
    return "inconclusive"


def analyze(runs, sweep: SweepSection, *, metrics: Sequence[str] = METRICS, references: dict | None = None) -> dict:
    """The findings of ``runs`` (:class:`~ngdiff_jax.sweep.runner.SweepRuns`, or its dict) for
    ``sweep``; ``references``: aggregates of reference models (``target``, ``retain``) to show
    beside the methods."""
    if not isinstance(runs, dict):
        import dataclasses

        runs = dataclasses.asdict(runs)
    level = sweep.level
    reported_round = "report" if sweep.report_seeds and "report" in runs["runs"] else "selection"
    crossfit = reported_round == "selection" and len(sweep.selection_seeds) > 1
    out = {
        "rule": sweep.describe_rule(),
        "level": level,
        "selection_seeds": list(sweep.selection_seeds),
        "report_seeds": list(sweep.report_seeds),
        "reported_round": reported_round,
        "crossfit": crossfit,
        "reported_note": (
            "reported runs use seeds the selection never saw" if reported_round == "report" else
            "reported runs are cross-fitted: each seed's run at the setting the rule picks from the other seeds"
            if crossfit else "one seed: the reported run is the one the rule selected on (optimistic, no interval)"
        ),
        "metrics": list(metrics),
        "references": references or {},
        "methods": {},
        "sensitivity": {},
        "claims": {},
        "seconds": runs.get("seconds", {}),
    }
    reported = {}
    for name in sweep.methods:
        sel = runs["selected"].get(name)
        recs_sel = runs["runs"]["selection"].get(name, [])
        folds = None
        if crossfit:
            rep, folds = _crossfit(recs_sel, sweep)
        elif sel is None:
            rep = []
        elif reported_round == "report":
            rep = runs["runs"]["report"].get(name, [])
        else:
            rep = [r for r in recs_sel if _same(r["values"], sel)]
        reported[name] = {r["seed"]: r for r in rep}
        out["methods"][name] = {
            "selected": sel,
            "folds": folds,
            "selection_table": runs["selection_table"].get(name, []),
            "runs": len(rep),
            "diverged": {"selection": sum(r["diverged"] for r in recs_sel),
                         "reported": sum(r["diverged"] for r in rep)},  # fmt: skip
            "summary": {m: mean_interval([_value(r, m) for r in rep], level=level).to_dict() for m in metrics},
            "seeds": sorted(reported[name]),
        }
        # sensitivity: every rate (other settings at the selected values, or the first listed)
        others = {k: v for k, v in (sel or (recs_sel[0]["values"] if recs_sel else {})).items() if k != "optim.lr"}
        rows = {}
        for r in recs_sel:
            if _same(r["values"], others):
                rows.setdefault(r["values"]["optim.lr"], []).append(r)
        out["sensitivity"][name] = {
            "settings": others,
            "lr": sorted(rows),
            "metrics": {m: [mean_interval([_value(r, m) for r in rows[lr]], level=level).to_dict()
                            for lr in sorted(rows)] for m in metrics},  # fmt: skip
            "diverged": [sum(r["diverged"] for r in rows[lr]) for lr in sorted(rows)],
        }
    if sweep.compare.method and sweep.compare.against:
        out["claims"]["tradeoff"] = _tradeoff(sweep, runs, reported, level)
    if sweep.robustness.methods:
        out["claims"]["robustness"] = _robustness(sweep, runs, level)
    return out


def _crossfit(recs, sweep: SweepSection):
    """Leave one seed out: for each seed, its run at the setting the rule picks from the other
    seeds' runs. Returns ``(reported runs, [{seed, setting}])``; a fold whose other seeds meet the
    rule at no setting reports nothing for that seed."""
    crit = sweep.criterion()

    def score(metrics):
        return _score(crit, metrics)

    by_setting: dict = {}
    for r in recs:
        by_setting.setdefault(tuple(sorted(r["values"].items())), {})[r["seed"]] = r
    reported, folds = [], []
    for s in sweep.selection_seeds:
        table = {key: [None if x["diverged"] else x["aggregates"] for seed, x in per.items() if seed != s]
                 for key, per in by_setting.items()}  # fmt: skip
        best, _ = select_setting(table, score)
        folds.append({"seed": s, "setting": None if best is None else dict(best)})
        if best is not None and s in by_setting[best]:
            reported.append(by_setting[best][s])
    return reported, folds


def _misses_rule(sweep: SweepSection, name: str, reported) -> str | None:
    """Why ``name``'s reported runs (each at the setting chosen without it, or fresh seeds) fail the
    rule's constraints on average, or None when they meet them (or there is none to check). A
    setting selected because other seeds met the rule is a finding only if the reported runs meet
    it too: a mean lifted by one seed can pass selection while the held-out runs do not forget."""
    recs = [r["aggregates"] for r in (reported.get(name) or {}).values() if r.get("aggregates")]
    crit = sweep.criterion()
    if not recs or not crit.constraints:
        return None
    best, table = select_setting({"reported": recs}, lambda m: _score(crit, m))
    if best is not None:
        return None
    mean = table["reported"]["mean"] or {}
    rule = ", ".join(f"{n}{op}{v:g}" for n, op, v in crit.constraints)
    got = ", ".join(f"{n} {mean[n]:.3g}" if mean.get(n) is not None else f"{n} missing" for n, _, _ in crit.constraints)
    return f"{name}'s {len(recs)} reported runs miss the rule's constraints ({rule}) on average: {got}"


def _score(crit, metrics):
    """The rule's score of ``metrics``; None when a constraint fails or a metric is missing."""
    try:
        return crit.score(metrics)
    except KeyError:
        return None


def _tradeoff(sweep: SweepSection, runs, reported, level) -> dict:
    c = sweep.compare
    me = c.method
    rows, verdicts = [], []
    for other in c.against:
        row = {"against": other, "metric": c.metric}
        misses = [m for m in (_misses_rule(sweep, me, reported), _misses_rule(sweep, other, reported)) if m]
        if runs["selected"].get(me) is None:
            row.update(verdict="not supported", reason=f"{me} meets the rule ({sweep.describe_rule()}) at no setting")
        elif misses and runs["selected"].get(other) is None:
            row.update(verdict="inconclusive", reason=f"{other} meets the rule at no setting of the grid, and "
                                                      f"{misses[0]}")  # fmt: skip
        elif runs["selected"].get(other) is None:
            row.update(verdict="supported", reason=f"{other} meets the rule at no setting of the grid; {me} does")
        elif misses:
            row.update(verdict="inconclusive", reason="; ".join(misses) + f": their {c.metric} is not compared")
        else:
            seeds = sorted(set(reported[me]) & set(reported[other]))
            d = paired_difference([_value(reported[me][s], c.metric) for s in seeds],
                                  [_value(reported[other][s], c.metric) for s in seeds], level=level)  # fmt: skip
            v = _verdict(d)
            row.update(difference=d.to_dict() | {"wins": d.wins, "losses": d.losses, "ties": d.ties}, verdict=v,
                       reason=f"{c.metric} {me} - {other} = {d.format()} over {d.n} paired seeds "
                              f"({d.wins} won, {d.losses} lost)")  # fmt: skip
        rows.append(row)
        verdicts.append(row["verdict"])
    overall = ("supported" if all(v == "supported" for v in verdicts) else
               "not supported" if any(v == "not supported" for v in verdicts) else "inconclusive")  # fmt: skip
    return {
        "claim": f"{me} gives a better forget/utility trade-off than {', '.join(c.against)}: at each method's "
                 f"setting selected by the rule, higher {c.metric}",
        "verdict": overall,
        "comparisons": rows,
    }


def _robustness(sweep: SweepSection, runs, level) -> dict:
    r = sweep.robustness
    adaptive, others = r.methods[0], r.methods[1:]

    def table(name, metric):
        recs = runs["runs"]["selection"].get(name, [])
        seeds = sorted({x["seed"] for x in recs})
        by_lr: dict = {}
        for x in recs:
            by_lr.setdefault(x["values"]["optim.lr"], {})[x["seed"]] = _value(x, metric)
        return {lr: [by_lr[lr].get(s) for s in seeds] for lr in sorted(by_lr)}

    spreads, rows, verdicts = {}, [], []
    for metric in r.metrics:
        spreads[metric] = {name: spread_interval(table(name, metric), level=level).to_dict() for name in r.methods}
        for other in others:
            d = spread_difference(table(adaptive, metric), table(other, metric), level=level)
            v = _verdict(d, better_if_positive=False)
            rows.append({"metric": metric, "against": other, "difference": d.to_dict(), "verdict": v,
                         "reason": f"spread of {metric} over the initial rates, {adaptive} - {other} = {d.format()}"})
            verdicts.append(v)
    rates = sorted({x["values"]["optim.lr"] for x in runs["runs"]["selection"].get(adaptive, [])})
    ratio = rates[-1] / rates[0] if len(rates) > 1 else 1.0
    overall = ("supported" if all(v == "supported" for v in verdicts) else
               "not supported" if any(v == "not supported" for v in verdicts) else "inconclusive")  # fmt: skip
    return {
        "claim": f"{adaptive}'s adaptive rate makes the outcome insensitive to the initial rate: over a "
                 f"{ratio:.0f}x range of initial rates, a smaller spread of {', '.join(r.metrics)} than "
                 f"{', '.join(others)}",
        "rates": rates,
        "range": ratio,
        "verdict": overall,
        "spreads": spreads,
        "comparisons": rows,
    }
