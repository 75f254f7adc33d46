"""Statistics over seeds: intervals, paired comparisons, spreads, and a stated selection rule.

A result about methods is a comparison over seeds, so every function here takes the values
of several runs (one per seed) and returns an estimate *with* its uncertainty:

* :func:`mean_interval`: mean and two-sided Student-t interval (``level``, default 95%);
* :func:`paired_difference`: ``a - b`` over runs paired by seed (the same data order), with its
  t interval and how many seeds each side won;
* :func:`spread_interval`: the spread (max - min) of a metric's per-setting means, e.g. over
  initial learning rates, with a percentile bootstrap interval over seeds;
* :func:`select_setting`: the setting a stated rule picks (a feasible setting with the best
  mean score), from the runs of the selection seeds.

Example:

  >>> from ngdiff_jax.evaluation.statistics import mean_interval, paired_difference
  >>> m = mean_interval([0.50, 0.54, 0.52, 0.56, 0.48])
  >>> round(m.mean, 3), round(m.low, 3), round(m.high, 3), m.n
  (0.52, 0.481, 0.559, 5)
  >>> d = paired_difference([0.6, 0.7, 0.65], [0.5, 0.6, 0.66])
  >>> round(d.mean, 3), d.wins, d.losses
  (0.063, 2, 1)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "Interval",
    "PairedDifference",
    "mean_interval",
    "paired_difference",
    "select_setting",
    "spread_difference",
    "spread_interval",
]


@dataclass(frozen=True)
class Interval:
    """An estimate with its interval: ``mean`` in ``[low, high]`` at ``level`` from ``n`` runs
    (``low``/``high`` are None with fewer than 2 finite values)."""

    mean: float | None
    low: float | None
    high: float | None
    n: int
    level: float = 0.95

    def to_dict(self) -> dict:
        return asdict(self)

    def excludes(self, value: float = 0.0) -> bool:
        """Whether the interval lies entirely above or below ``value``."""
        return self.low is not None and (self.low > value or self.high < value)

    def format(self, digits: int = 3) -> str:
        if self.mean is None:
            return "–"
        if self.low is None:
            return f"{self.mean:.{digits}f} (n={self.n})"
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


@dataclass(frozen=True)
class PairedDifference(Interval):
    """``a - b`` over paired runs: the interval of the mean difference, and the seeds on which
    ``a`` was larger (``wins``), smaller (``losses``) or equal (``ties``)."""

    wins: int = 0
    losses: int = 0
    ties: int = 0


def _finite(values: Sequence) -> np.ndarray:
    a = np.asarray([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    return a[np.isfinite(a)]


def _t_interval(a: np.ndarray, level: float) -> tuple[float | None, float | None, float | None]:
    from scipy import stats

    if a.size == 0:
        return None, None, None
    mean = float(a.mean())
    if a.size < 2:
        return mean, None, None
    half = float(stats.t.ppf(0.5 + level / 2, a.size - 1) * a.std(ddof=1) / math.sqrt(a.size))
    return mean, mean - half, mean + half


def mean_interval(values: Sequence, *, level: float = 0.95) -> Interval:
    """Mean of the finite ``values`` (None and NaN are left out; ``n`` counts the rest) with its
    Student-t interval: ``mean ± t_{n-1} s / sqrt(n)``."""
    a = _finite(values)
    mean, low, high = _t_interval(a, level)
    return Interval(mean, low, high, int(a.size), level)


def paired_difference(a: Sequence, b: Sequence, *, level: float = 0.95) -> PairedDifference:
    """``a[i] - b[i]`` over the pairs where both are finite: mean, t interval, wins/losses/ties."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference needs equally many runs on both sides, got {len(a)} and {len(b)}.")
    x = np.asarray([np.nan if v is None else float(v) for v in a], dtype=np.float64)
    y = np.asarray([np.nan if v is None else float(v) for v in b], dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    d = x[ok] - y[ok]
    mean, low, high = _t_interval(d, level)
    return PairedDifference(mean, low, high, int(d.size), level, wins=int((d > 0).sum()),
                            losses=int((d < 0).sum()), ties=int((d == 0).sum()))  # fmt: skip


def _table(runs: Mapping[Any, Sequence]) -> np.ndarray:
    """``{setting: [value per seed]}`` as a float array ``[settings, seeds]`` (None -> NaN)."""
    return np.asarray([[np.nan if v is None else float(v) for v in runs[k]] for k in runs], dtype=np.float64)


def _spread(table: np.ndarray) -> float:
    """``max - min`` of the per-setting means (NaN runs left out; NaN with fewer than two settings)."""
    with np.errstate(all="ignore"):
        means = np.nanmean(table, axis=1)
    return float(np.nanmax(means) - np.nanmin(means)) if np.isfinite(means).sum() >= 2 else np.nan


def spread_interval(
    runs: Mapping[Any, Sequence], *, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> Interval:
    """The spread ``max_s mean(runs[s]) - min_s mean(runs[s])`` over settings ``s`` (e.g. initial
    learning rates; ``runs[s]`` one value per seed, NaN/None for a run that gave none), with a
    percentile bootstrap interval: seeds are resampled with replacement, the same draw for every
    setting (runs of one seed share its data order). ``n`` is the number of seeds."""
    table = _table(runs)
    if table.ndim != 2 or table.shape[0] < 2:
        raise ValueError("spread_interval needs at least two settings with one value per seed each.")
    n = table.shape[1]
    spread = _spread
    point = spread(table)
    if not math.isfinite(point):
        return Interval(None, None, None, n, level)
    rng = np.random.default_rng(seed)
    boots = np.asarray([spread(table[:, rng.integers(0, n, n)]) for _ in range(resamples)])
    boots = boots[np.isfinite(boots)]
    low, high = (np.quantile(boots, [(1 - level) / 2, (1 + level) / 2]) if boots.size else (None, None))
    return Interval(point, None if low is None else float(low), None if high is None else float(high), n, level)


def spread_difference(
    a: Mapping[Any, Sequence], b: Mapping[Any, Sequence], *, level: float = 0.95, resamples: int = 2000,
    seed: int = 0,
) -> Interval:
    """``spread(a) - spread(b)`` (see :func:`spread_interval`) with a paired percentile bootstrap
    interval: one draw of seeds serves both (their runs share each seed's data order)."""
    ta, tb = _table(a), _table(b)
    if ta.shape[1] != tb.shape[1]:
        raise ValueError("spread_difference needs the same seeds on both sides.")
    n = ta.shape[1]
    spread = _spread
    point = spread(ta) - spread(tb)
    if not math.isfinite(point):
        return Interval(None, None, None, n, level)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        boots.append(spread(ta[:, idx]) - spread(tb[:, idx]))
    boots = np.asarray(boots)
    boots = boots[np.isfinite(boots)]
    if not boots.size:
        return Interval(point, None, None, n, level)
    low, high = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return Interval(point, float(low), float(high), n, level)


def select_setting(
    settings: Mapping[Any, Sequence[Mapping[str, Any]]], score: Callable[[Mapping[str, Any]], float | None]
) -> tuple[Any | None, dict]:
    """The setting a rule picks: ``settings`` maps each candidate to its runs' metrics (one dict
    per selection seed); a setting's metrics are averaged over its runs (a diverged run, None,
    makes the setting infeasible), ``score(mean metrics)`` is None when the rule's constraints
    fail, else the value to maximize. Returns the best feasible setting (ties: the first) and
    ``{setting: {"mean": ..., "score": ..., "feasible": ...}}`` for the report; None when no
    setting is feasible."""
    table, best, best_score = {}, None, -math.inf
    for key, runs in settings.items():
        if not runs or any(r is None for r in runs):
            table[key] = {"mean": None, "score": None, "feasible": False, "runs": len(runs)}
            continue
        names = sorted({k for r in runs for k, v in r.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})  # fmt: skip
        mean = {}
        for k in names:
            vals = _finite([r.get(k) for r in runs])
            mean[k] = float(vals.mean()) if vals.size == len(runs) else None
        s = score(mean)
        feasible = s is not None and math.isfinite(s)
        table[key] = {"mean": mean, "score": s if feasible else None, "feasible": feasible, "runs": len(runs)}
        if feasible and s > best_score:
            best, best_score = key, s
    return best, table
