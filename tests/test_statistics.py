"""Statistics over seeds against scipy's own intervals, the selection rule, and the sweep's verdicts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from ngdiff_jax.evaluation.statistics import (
    mean_interval,
    paired_difference,
    select_setting,
    spread_difference,
    spread_interval,
)
from ngdiff_jax.sweep.analysis import analyze
from ngdiff_jax.sweep.config import SweepSection


def test_mean_interval_equals_scipys_t_interval():
    rng = np.random.default_rng(0)
    for n in (2, 5, 12):
        x = rng.normal(0.4, 0.1, n)
        iv = mean_interval(list(x))
        lo, hi = stats.t.interval(0.95, n - 1, loc=x.mean(), scale=stats.sem(x))
        assert (iv.mean, iv.low, iv.high, iv.n) == pytest.approx((x.mean(), lo, hi, n), rel=1e-12)
    iv = mean_interval([0.5, None, float("nan"), 0.7])  # missing runs are left out, and counted out
    assert iv.n == 2 and iv.mean == pytest.approx(0.6)
    one = mean_interval([0.3])
    assert one.mean == 0.3 and one.low is None and not one.excludes(0.0)
    assert mean_interval([]).mean is None


def test_paired_difference_equals_scipys_paired_t_interval():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.6, 0.05, 7), rng.normal(0.5, 0.05, 7)
    d = paired_difference(list(a), list(b))
    ci = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert (d.low, d.high) == pytest.approx((ci.low, ci.high), rel=1e-12)
    assert d.wins + d.losses + d.ties == 7 and d.wins == int((a > b).sum())
    d = paired_difference([1.0, None, 3.0], [0.5, 2.0, 3.0])  # a pair with a missing side is dropped
    assert d.n == 2 and d.ties == 1 and d.wins == 1
    with pytest.raises(ValueError, match="equally many"):
        paired_difference([1.0], [1.0, 2.0])


def test_spread_interval_is_the_range_of_means_with_a_seed_bootstrap():
    runs = {1e-4: [0.50, 0.52, 0.48, 0.51], 1e-3: [0.70, 0.69, 0.72, 0.71], 1e-2: [0.60, 0.61, 0.58, 0.62]}
    iv = spread_interval(runs)
    assert iv.mean == pytest.approx(np.mean(runs[1e-3]) - np.mean(runs[1e-4]))
    assert iv.low <= iv.mean <= iv.high and iv.n == 4
    flat = spread_interval({1: [0.5, 0.6], 2: [0.5, 0.6]})
    assert flat.mean == 0.0 and flat.high == 0.0
    d = spread_difference({1: [0.5, 0.5, 0.5], 2: [0.5, 0.5, 0.5]}, {1: [0.1, 0.2, 0.1], 2: [0.9, 0.8, 0.9]})
    assert d.high < 0  # the flat method's spread is certainly the smaller one
    with pytest.raises(ValueError, match="two settings"):
        spread_interval({1: [0.5]})


def test_select_setting_follows_the_rule():
    from ngdiff_jax.training.selection import Criterion

    crit = Criterion(maximize="model_utility", constraints=("forget_quality>=0.05",))
    settings = {
        "a": [{"model_utility": 0.9, "forget_quality": 0.01}, {"model_utility": 0.9, "forget_quality": 0.02}],
        "b": [{"model_utility": 0.6, "forget_quality": 0.5}, {"model_utility": 0.7, "forget_quality": 0.4}],
        "c": [{"model_utility": 0.8, "forget_quality": 0.9}, None],  # a diverged run: infeasible
        "d": [{"model_utility": 0.64, "forget_quality": 0.2}, {"model_utility": 0.64, "forget_quality": 0.2}],
    }
    best, table = select_setting(settings, crit.score)
    assert best == "b" and table["b"]["score"] == pytest.approx(0.65)
    assert not table["a"]["feasible"] and not table["c"]["feasible"]
    assert select_setting({"a": settings["a"]}, crit.score)[0] is None


def _rec(seed, lr, mu, fq, diverged=False):
    return {"index": 0, "key": "m", "seed": seed, "values": {"optim.lr": lr}, "name": "", "diverged": diverged,
            "stopped_at": None, "steps": 10, "aggregates": None if diverged else {"model_utility": mu,
                                                                                    "forget_quality": fq}}  # fmt: skip


def test_sweep_verdicts():
    sweep = SweepSection(methods={"ng": {}, "gd": {}, "ga": {}}, lr=(1e-4, 1e-3), selection_seeds=(0, 1, 2),
                         report_seeds=(3, 4, 5), rule={"maximize": "model_utility",
                                                       "constraints": ["forget_quality>=0.05"]},
                         compare={"method": "ng", "against": ["gd", "ga"]},
                         robustness={"methods": ["ng", "gd"], "metrics": ["model_utility"]})  # fmt: skip
    sel = {
        "ng": [_rec(s, lr, 0.8 + 0.01 * s, 0.3) for lr in (1e-4, 1e-3) for s in (0, 1, 2)],
        "gd": [_rec(s, lr, (0.3 if lr == 1e-3 else 0.7) + 0.01 * s, 0.3) for lr in (1e-4, 1e-3) for s in (0, 1, 2)],
        "ga": [_rec(s, lr, 0.0, 0.01, diverged=lr == 1e-3) for lr in (1e-4, 1e-3) for s in (0, 1, 2)],
    }
    rep = {"ng": [_rec(s, 1e-4, 0.8 + 0.02 * s, 0.3) for s in (3, 4, 5)],
           "gd": [_rec(s, 1e-4, 0.7 + 0.01 * (s % 2), 0.3) for s in (3, 4, 5)]}  # fmt: skip
    runs = {"runs": {"selection": sel, "report": rep}, "selected": {"ng": {"optim.lr": 1e-4},
            "gd": {"optim.lr": 1e-4}, "ga": None}, "selection_table": {}, "seconds": {}}  # fmt: skip
    out = analyze(runs, sweep, metrics=("model_utility", "forget_quality"))
    t = out["claims"]["tradeoff"]
    assert [r["verdict"] for r in t["comparisons"]] == ["supported", "supported"] and t["verdict"] == "supported"
    assert "meets the rule at no setting" in t["comparisons"][1]["reason"]
    assert out["methods"]["ga"]["diverged"]["selection"] == 3 and out["methods"]["ga"]["runs"] == 0
    r = out["claims"]["robustness"]
    assert r["verdict"] == "supported" and r["range"] == pytest.approx(10.0)
    assert r["spreads"]["model_utility"]["gd"]["mean"] == pytest.approx(0.4)
    assert out["sensitivity"]["gd"]["lr"] == [1e-4, 1e-3]
    assert math.isclose(out["methods"]["ng"]["summary"]["model_utility"]["mean"], 0.88)
    # the other way round: a worse method is "not supported", an overlap "inconclusive"
    rep["ng"] = [_rec(s, 1e-4, 0.5 + 0.01 * s, 0.3) for s in (3, 4, 5)]
    assert analyze(runs, sweep)["claims"]["tradeoff"]["comparisons"][0]["verdict"] == "not supported"
    rep["ng"] = [_rec(s, 1e-4, v, 0.3) for s, v in zip((3, 4, 5), (0.75, 0.66, 0.72))]
    assert analyze(runs, sweep)["claims"]["tradeoff"]["comparisons"][0]["verdict"] == "inconclusive"


def test_a_selection_lifted_by_one_seed_is_not_a_supported_tradeoff():
    """The SmolLM2 sweep's case: ng's lr 1e-3 meets forget_quality >= 0.05 on the mean over its
    selection seeds only because one seed forgot (0.4, 0.003, 0.003); the other methods meet it
    nowhere. Each held-out run then misses the rule, so the trade-off is inconclusive, not
    supported (it read "supported" before), and a paired comparison of two methods whose held-out
    runs both miss it is inconclusive too."""
    sweep = SweepSection(methods={"ng": {}, "fx": {}, "gd": {}}, lr=(1e-4, 1e-3), selection_seeds=(0, 1, 2),
                         rule={"maximize": "model_utility", "constraints": ["forget_quality>=0.05"]},
                         compare={"method": "ng", "against": ["fx", "gd"]},
                         robustness={"methods": []})  # fmt: skip
    fq = {0: 0.4, 1: 0.003, 2: 0.003}
    sel = {"ng": [_rec(s, lr, 0.4, fq[s] if lr == 1e-3 else 0.001) for lr in (1e-4, 1e-3) for s in (0, 1, 2)],
           "fx": [_rec(s, lr, 0.39, fq[s] if lr == 1e-3 else 0.001) for lr in (1e-4, 1e-3) for s in (0, 1, 2)],
           "gd": [_rec(s, lr, 0.41, 0.002) for lr in (1e-4, 1e-3) for s in (0, 1, 2)]}  # fmt: skip
    runs = {"runs": {"selection": sel}, "selected": {"ng": {"optim.lr": 1e-3}, "fx": {"optim.lr": 1e-3}, "gd": None},
            "selection_table": {}, "seconds": {}}  # fmt: skip
    out = analyze(runs, sweep, metrics=("model_utility", "forget_quality"))
    t = out["claims"]["tradeoff"]
    assert [r["verdict"] for r in t["comparisons"]] == ["inconclusive", "inconclusive"]
    assert t["verdict"] == "inconclusive"
    assert "reported runs miss the rule's constraints (forget_quality>=0.05) on average: forget_quality 0.003" in (
        t["comparisons"][1]["reason"])
    assert "model_utility is not compared" in t["comparisons"][0]["reason"]
    # held-out runs that meet the rule keep the verdict
    sel["ng"] = [_rec(s, lr, 0.4, 0.3 if lr == 1e-3 else 0.001) for lr in (1e-4, 1e-3) for s in (0, 1, 2)]
    t = analyze(runs, sweep, metrics=("model_utility", "forget_quality"))["claims"]["tradeoff"]
    assert t["comparisons"][1]["verdict"] == "supported"


def test_sweep_section_checks():
    with pytest.raises(ValueError, match="seed appears twice"):
        SweepSection(methods={"ng": {}}, lr=(1e-3,), selection_seeds=(0, 1), report_seeds=(1,))
    with pytest.raises(ValueError, match="not one of sweep.methods"):
        SweepSection(methods={"ng": {}}, lr=(1e-3,), compare={"method": "ng", "against": ["gd"]})
    with pytest.raises(ValueError, match="sweep.rule"):
        SweepSection(methods={"ng": {}}, lr=(1e-3,), rule={"maximize": "a", "minimize": "b"})
    with pytest.raises(ValueError, match="positive numbers"):
        SweepSection(methods={"ng": {}}, lr=(0.0,))
    with pytest.raises(ValueError, match="unknown key"):
        SweepSection(methods={"ng": {"lrr": [1e-3]}}, lr=(1e-3,))


def test_cross_fitted_reporting_leaves_each_seed_out_of_its_own_selection():
    """Without report seeds, seed s is reported at the setting the other seeds select: a setting that
    wins only thanks to seed s is not the one reported for s."""
    sweep = SweepSection(methods={"ng": {}}, lr=(1e-4, 1e-3), selection_seeds=(0, 1, 2),
                         rule={"maximize": "model_utility"})  # fmt: skip
    mu = {(1e-4, 0): 0.5, (1e-4, 1): 0.5, (1e-4, 2): 0.5, (1e-3, 0): 0.9, (1e-3, 1): 0.45, (1e-3, 2): 0.4}
    sel = {"ng": [_rec(s, lr, mu[lr, s], 0.3) for lr in (1e-4, 1e-3) for s in (0, 1, 2)]}
    runs = {"runs": {"selection": sel}, "selected": {"ng": {"optim.lr": 1e-3}}, "selection_table": {}, "seconds": {}}
    out = analyze(runs, sweep, metrics=("model_utility",))
    m = out["methods"]["ng"]
    assert out["crossfit"] and out["reported_round"] == "selection"
    # without seed 0, lr 1e-4 wins (0.5 vs 0.425): seed 0 reports 0.5, not its lucky 0.9
    assert [f["setting"]["optim.lr"] for f in m["folds"]] == [1e-4, 1e-3, 1e-3]
    assert m["summary"]["model_utility"]["mean"] == pytest.approx((0.5 + 0.45 + 0.4) / 3)
    assert m["runs"] == 3
