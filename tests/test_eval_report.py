"""The report writer: report.json / report.md / tradeoff.png are written and well-formed."""

import json

import numpy as np
import pytest

from ngdiff_jax.evaluation import EvalResult, reference_stats, write_report


def _tofu(name, fq, mu, role=None, step=None):
    meta = {}
    if role:
        meta["role"] = role
    if step is not None:
        meta["step"] = step
    return EvalResult(
        name=name,
        benchmark="tofu",
        aggregates={"forget_quality": fq, "model_utility": mu, "forget_truth_ratio": 0.6, "privleak": -20.0},
        per_sample={"forget_truth_ratio": np.linspace(0.1, 1.0, 5)},
        meta=meta,
    )


def test_write_report_files(tmp_path):
    retain = _tofu("retain", 1.0, 0.62)
    results = {
        "target": _tofu("target", 1e-12, 0.63),
        "retain": retain,
        "ngdiff": _tofu("ngdiff", 0.3, 0.55),
        "gdiff": _tofu("gdiff", 2e-3, 0.40),
        "unscored": _tofu("unscored", None, 0.5),
    }
    traj = {"ngdiff": [(s, {"forget_quality": fq, "model_utility": mu})
                       for s, fq, mu in [(0, 1e-12, 0.63), (10, 1e-5, 0.6), (20, 0.01, 0.57), (30, 0.3, 0.55)]]}
    paths = write_report(tmp_path / "rep", results, traj)
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert set(rep["models"]) == set(results)
    assert rep["models"]["target"]["role"] == "target" and rep["models"]["retain"]["role"] == "retain"
    assert rep["models"]["ngdiff"]["aggregates"]["forget_quality"] == pytest.approx(0.3)
    # every model's per-sample file exists and loads back
    for name, entry in rep["models"].items():
        back = EvalResult.load(entry["per_sample_file"])
        assert back.name == name
        assert back.per_sample["forget_truth_ratio"] == pytest.approx(list(np.linspace(0.1, 1.0, 5)))
    assert [p["step"] for p in rep["trajectories"]["ngdiff"]] == [0, 10, 20, 30]
    md = (tmp_path / "rep" / "report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| model | role | forget_quality | model_utility")
    assert sum(line.split(" | ")[0] in {f"| {n}" for n in results} for line in table) == len(results)
    png = (tmp_path / "rep" / "tradeoff.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert paths["png"].endswith("tradeoff.png")


def test_reference_stats_reads_ours_and_open_unlearning(tmp_path):
    r = _tofu("retain", 1.0, 0.6)
    r.aggregates["mia_min_k"] = 0.55
    p = r.save(tmp_path / "retain.json")
    ours = reference_stats(p)
    np.testing.assert_allclose(ours["forget_truth_ratio"], np.linspace(0.1, 1.0, 5))
    assert ours["mia_min_k"] == 0.55
    ou = tmp_path / "TOFU_EVAL.json"
    ou.write_text(json.dumps({
        "forget_truth_ratio": {"agg_value": 0.6, "value_by_index": {"0": {"score": 0.5}, "1": {"score": 2.0}}},
        "mia_min_k": {"agg_value": 0.4},
    }))  # fmt: skip
    theirs = reference_stats(ou)
    np.testing.assert_allclose(theirs["forget_truth_ratio"], [0.5, 2.0])
    assert theirs["mia_min_k"] == 0.4
    with pytest.raises(FileNotFoundError, match="evaluate the retain model"):
        reference_stats(tmp_path / "missing.json")


def test_write_report_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        write_report(tmp_path, {})
    with pytest.raises(TypeError, match="EvalResult"):
        write_report(tmp_path, {"x": 3})


def test_curves_one_png_per_metric_every_method_on_the_same_axes(tmp_path):
    traj = {"ngdiff": [(s, {"forget_quality": fq, "model_utility": mu, "privleak": -5.0 * s})
                       for s, fq, mu in [(0, 1e-12, 0.63), (10, 1e-5, 0.6), (20, 0.3, 0.55)]],
            "gdiff": [(s, {"forget_quality": fq, "model_utility": mu})
                      for s, fq, mu in [(0, 1e-12, 0.63), (10, 0.01, 0.3)]]}  # fmt: skip
    paths = write_report(tmp_path / "rep", {"target": _tofu("target", 1e-12, 0.63)}, traj)
    curves = tmp_path / "rep" / "curves"
    assert paths["curves"] == str(curves)
    assert sorted(p.name for p in curves.iterdir()) == ["forget_quality.png", "model_utility.png", "privleak.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in curves.iterdir())
    assert "(curves/model_utility.png)" in (tmp_path / "rep" / "report.md").read_text()
    import matplotlib.image as mpimg

    # two methods drawn: the model_utility curve has pixels of both tab10 colours (C0 blue, C1 orange)
    img = mpimg.imread(curves / "model_utility.png")[..., :3]
    for rgb in ((0.12, 0.47, 0.71), (1.0, 0.5, 0.05)):
        assert (np.abs(img - np.array(rgb)).max(-1) < 0.05).sum() > 20, rgb
