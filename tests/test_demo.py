"""`ngdiff demo`: the quick study runs its sweep (populations, selection, report seeds) and writes a
well-formed report with intervals and verdicts (structure, not thresholds); it resumes; a failed
hard check exits 1 before the sweep; the README's demo block is the committed report's."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ngdiff_jax.demo import hard_checks, load_demo_config

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("ngdiff", "gdiff")
# open-unlearning metric names every evaluated member carries
METRICS = (
    "forget_Q_A_Prob",
    "forget_Q_A_PARA_Prob",
    "forget_Q_A_ROUGE",
    "forget_truth_ratio",
    "forget_quality",
    "retain_Q_A_Prob",
    "retain_Q_A_ROUGE",
    "retain_Truth_Ratio",
    "ra_Q_A_Prob_normalised",
    "wf_Q_A_ROUGE",
    "model_utility",
    "privleak",
    "mia_min_k",
    "extraction_strength",
)


def _demo(out, *extra):
    cmd = [sys.executable, "-m", "ngdiff_jax.cli", "demo", "--quick", "--no-progress", "--out", str(out),
           "--methods", ",".join(METHODS), *extra]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=900)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    proc = _demo(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


@pytest.mark.slow
def test_quick_demo_report_structure(quick_demo):
    out, stdout = quick_demo
    for name in ("report.json", "report.md", "tradeoff.png", "sensitivity.png", "demo_summary.json",
                 "demo_config.yaml"):  # fmt: skip
        assert (out / name).is_file(), name
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = load_demo_config(quick=True, methods=METHODS)
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["methods"]) == set(METHODS) and set(rep["references"]) == {"target", "retain"}
    assert rep["reported_round"] == "report" and rep["report_seeds"] == list(cfg.sweep.report_seeds)
    for name, m in rep["methods"].items():
        assert m["selected"] is not None and m["selected"]["optim.lr"] in cfg.sweep.lr
        assert m["runs"] == len(cfg.sweep.report_seeds) and m["seeds"] == list(cfg.sweep.report_seeds)
        iv = m["summary"]["model_utility"]
        assert iv["n"] == 2 and iv["low"] <= iv["mean"] <= iv["high"]
        assert len(m["selection_table"]) == len(cfg.sweep.lr)
        assert rep["sensitivity"][name]["lr"] == sorted(cfg.sweep.lr)
        # every member of both rounds was evaluated with the full TOFU metrics
        for rnd, n in (("selection", len(cfg.sweep.lr) * len(cfg.sweep.selection_seeds)),
                       ("report", len(cfg.sweep.report_seeds))):  # fmt: skip
            files = sorted((out / "sweep" / rnd / name / "results").glob("m*.json"))
            assert len(files) == n, (rnd, name)
            res = json.loads(files[0].read_text())
            assert not [k for k in METRICS if k not in res["aggregates"]]
            assert res["meta"]["member"]["seed"] in cfg.sweep.selection_seeds + cfg.sweep.report_seeds
    claims = rep["claims"]
    assert claims["tradeoff"]["verdict"] in ("supported", "not supported", "inconclusive")
    assert [c["against"] for c in claims["tradeoff"]["comparisons"]] == ["gdiff"]
    assert claims["robustness"]["verdict"] in ("supported", "not supported", "inconclusive")
    md = (out / "report.md").read_text()
    assert "Claim (i)" in md and "Claim (ii)" in md and "## Sensitivity" in md and "| ngdiff |" in md
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["claims"] == {k: v["verdict"] for k, v in claims.items()}
    assert summary["total_s"] > 0 and "sweep" in summary["phases_s"]
    assert "tradeoff" in stdout and "total" in stdout
    # robustness of forgetting: the quick config's method rerun at its selected setting, and the references
    fc = rep["forgetting_checks"]
    assert set(fc["models"]) == {"target", "retain", "ngdiff"} and fc["seed"] == cfg.sweep.selection_seeds[0]
    ng = fc["models"]["ngdiff"]
    assert ng["setting"] == rep["methods"]["ngdiff"]["selected"]
    for m in fc["models"].values():
        rec = m["record"]
        assert set(rec) >= {"baseline", "relearn_baseline", "relearn", "int4", "paraphrase", "worst"}, set(rec)
        assert 0 <= m["aggregates"]["robust_worst_forget_Q_A_ROUGE"] <= 1
        assert rec["relearn"]["n"] == rec["relearn_baseline"]["n"] < rec["baseline"]["n"]
        assert rec["settings"]["relearn_steps"] == 2
    # the rerun is the selection run of that seed: same forget ROUGE, up to batched-evaluation rounding
    sel = [json.loads(p.read_text()) for p in (out / "sweep" / "selection" / "ngdiff" / "results").glob("m*.json")]
    same = [r for r in sel if r["meta"]["member"]["seed"] == fc["seed"]
            and r["meta"]["member"]["values"] == ng["setting"]]  # fmt: skip
    assert len(same) == 1
    assert abs(same[0]["aggregates"]["forget_Q_A_ROUGE"] - ng["record"]["baseline"]["forget_Q_A_ROUGE"]) < 0.05
    assert "## Robustness of forgetting at the selected settings" in md and "| ngdiff (lr " in md
    assert "robustness" in summary["phases_s"]


@pytest.mark.slow
def test_quick_demo_resumes_without_rerunning(quick_demo):
    out, _ = quick_demo
    before = (out / "report.json").read_text()
    proc = _demo(out, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = json.loads((out / "report.json").read_text())
    assert after["methods"] == json.loads(before)["methods"]
    assert after["forgetting_checks"] == json.loads(before)["forgetting_checks"]
    assert "done before (resumed)" in proc.stdout


@pytest.mark.slow
def test_a_failed_hard_check_stops_before_the_sweep(tmp_path):
    proc = _demo(tmp_path / "out", "min_target_forget_rouge=1.5", "train.steps=2")
    assert proc.returncode == 1 and "memorized its forget authors" in proc.stderr
    assert not (tmp_path / "out" / "sweep").exists()


def test_demo_refuses_non_empty_out_and_bad_config(tmp_path):
    from ngdiff_jax.cli import main

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    assert main(["demo", "--quick", "--no-progress", "--out", str(tmp_path / "busy")]) == 1
    assert main(["demo", "--quick", "--out", str(tmp_path / "a"), "unlearn.stepz=3"]) == 2
    assert main(["demo", "--quick", "--out", str(tmp_path / "b"), "--methods", "ga,nosuch"]) == 2
    assert main(["demo", "--quick", "--out", str(tmp_path / "c"), "sweep.report_seeds=[0]"]) == 2
    assert main(["demo", "--quick", "--out", str(tmp_path / "d"), "sweep.forgetting_checks.checks=relearn,nosuch"]) == 2
    assert main(["demo", "--quick", "--out", str(tmp_path / "e"), "sweep.forgetting_checks.relearn_lr=-1"]) == 2
    assert main(["demo", "--quick", "--out", str(tmp_path / "f"), "sweep.forgetting_checks.methods=[nosuch]"]) == 2


def test_demo_config_quick_and_methods():
    full, quick = load_demo_config(), load_demo_config(quick=True)
    assert {"ngdiff", "ngdiff_fixed", "gdiff", "ga", "npo", "simnpo"} == set(full.sweep.methods)
    assert len(full.sweep.selection_seeds) >= 5 and len(full.sweep.lr) >= 4
    assert max(full.sweep.lr) / min(full.sweep.lr) >= 30
    assert quick.train.steps < full.train.steps and quick.unlearn.steps < full.unlearn.steps
    cfg = load_demo_config(methods=["ngdiff", "ga"])
    assert list(cfg.sweep.methods) == ["ngdiff", "ga"] and cfg.sweep.compare.against == ("ga",)
    assert cfg.sweep.robustness.methods == ()  # ngdiff_fixed and gdiff left out: no robustness claim
    assert full.sweep.methods["ngdiff_fixed"].overrides == {"rate": "constant"}


def test_hard_checks():
    cfg = load_demo_config()
    assert [c["ok"] for c in hard_checks(cfg, {"target": {"forget_Q_A_ROUGE": 0.9}})] == [True]
    assert [c["ok"] for c in hard_checks(cfg, {"target": {"forget_Q_A_ROUGE": 0.5}})] == [False]
    assert [c["ok"] for c in hard_checks(cfg, {})] == [False]


def test_readme_demo_block_is_the_committed_reports():
    """The README's demo table and verdicts are what `ngdiff readme` makes of docs/results/demo."""
    from ngdiff_jax.cli import main

    assert (ROOT / "docs" / "results" / "demo" / "report.json").is_file()
    assert main(["readme", "--check", "--readme", str(ROOT / "README.md"),
                 "--results", str(ROOT / "docs" / "results" / "demo")]) == 0  # fmt: skip
