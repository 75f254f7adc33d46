"""The toy two-task problem: GDiff's known failure vs NGDiff + GeN, and `ngdiff toy`."""

import math

import pytest

from ngdiff_jax.cli import main
from ngdiff_jax.toy import format_table, make_problem, run_method


@pytest.fixture(scope="module")
def results():
    problem = make_problem(seed=0)
    return {m: run_method(problem, m, steps=100) for m in ("gdiff", "ngdiff+gen", "mgda", "pcgrad")}


def test_gdiff_destroys_retain_as_forget_explodes(results):
    r = results["gdiff"]
    assert r.forget_end > 20.0 > 100 * r.forget_start  # forget NLL explodes
    assert r.retain_end > 50 * r.retain_start and r.retain_end > 5.0  # retain destroyed
    assert r.retain_acc_end < 0.7


def test_ngdiff_gen_forgets_and_keeps_retain(results):
    r = results["ngdiff+gen"]
    assert r.forget_end > 10 * r.forget_start and r.forget_end > 0.7  # forgets
    assert r.retain_max < r.retain_start + 0.1  # retain stays near start
    assert r.retain_acc_end > 0.9
    assert r.learning_rate_end != pytest.approx(0.05)  # GeN moved the rate


def test_other_combiners_stay_finite(results):
    for m in ("mgda", "pcgrad"):
        r = results[m]
        assert all(math.isfinite(v) for v in (r.retain_end, r.forget_end))
        assert r.retain_end < results["gdiff"].retain_end
    table = format_table(list(results.values()))
    assert "ngdiff+gen" in table and "->" in table


def test_cli_toy(capsys):
    assert main(["toy", "--steps", "5", "--methods", "gdiff,ngdiff+gen"]) == 0
    out = capsys.readouterr().out
    assert "gdiff" in out and "ngdiff+gen" in out and "retain NLL" in out
    with pytest.raises(SystemExit):
        main(["toy", "--methods", "adamw"])
