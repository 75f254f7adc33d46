"""`ngdiff demo`: the quick end-to-end run writes a well-formed report (structure, not thresholds)."""

import json
import subprocess
import sys

import pytest

from ngdiff_jax.demo import TRAJECTORY_KEYS, acceptance_checks, load_demo_config

MODELS = ("target", "retain", "ga", "gdiff", "npo", "ngdiff", "rmu", "idk_dpo")  # two opt-in methods too
# open-unlearning metric names every model's aggregates must carry
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
    "mia_loss",
    "mia_zlib",
    "mia_min_k_plus_plus",
    "mia_gradnorm",
    "mia_reference",
    "privleak_loss",
    "privleak_reference",
)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ngdiff_jax.cli",
            "demo",
            "--quick",
            "--no-progress",
            "--out",
            str(out),
            "--methods",
            "ga,gdiff,npo,ngdiff,rmu,idk_dpo",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_quick_demo_report_structure(quick_demo):
    out, stdout = quick_demo
    for name in (
        "report.json",
        "report.md",
        "tradeoff.png",
        "demo_summary.json",
        "demo_config.yaml",
    ):
        assert (out / name).is_file(), name
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "curves" / "model_utility.png").is_file() and (out / "curves" / "forget_quality.png").is_file()

    rep = json.loads((out / "report.json").read_text())
    assert set(rep["models"]) == set(MODELS)
    roles = {n: e["role"] for n, e in rep["models"].items()}
    assert roles["target"] == "target" and roles["retain"] == "retain"
    assert all(roles[m] == "method" for m in ("ga", "gdiff", "npo", "ngdiff"))
    for name, entry in rep["models"].items():
        agg = entry["aggregates"]
        missing = [k for k in METRICS if k not in agg]
        assert not missing, f"{name} lacks {missing}"
        assert agg["forget_quality"] is not None and 0.0 <= agg["forget_quality"] <= 1.0
        assert 0.0 <= agg["model_utility"] <= 1.0
        with open(entry["per_sample_file"]) as f:
            per = json.load(f)
        assert per["name"] == name
        assert (
            len(per["per_sample"]["forget_truth_ratio"])
            == len(per["per_sample"]["forget_Q_A_ROUGE"])
            > 0
        )
        assert len(per["generations"]["forget_Q_A_ROUGE"]) == len(
            per["per_sample"]["forget_Q_A_ROUGE"]
        )
    assert rep["models"]["retain"]["aggregates"]["forget_quality"] == pytest.approx(1.0)

    # trajectories: step 0 (the target) and every eval_every steps up to the last
    cfg = load_demo_config(quick=True)
    want_steps = list(range(0, cfg.unlearn.steps + 1, cfg.unlearn.eval_every))
    assert set(rep["trajectories"]) == set(MODELS) - {"target", "retain"}
    for m, pts in rep["trajectories"].items():
        assert [p["step"] for p in pts] == want_steps, m
        assert pts[0]["forget_quality"] == rep["models"]["target"]["aggregates"]["forget_quality"]
        last = rep["models"][m]["aggregates"]
        assert pts[-1]["model_utility"] == pytest.approx(last["model_utility"])
    eval_log = [
        json.loads(x) for x in (out / "runs" / "ngdiff" / "eval.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in eval_log] == want_steps
    assert set(TRAJECTORY_KEYS) <= set(eval_log[-1])

    md = (out / "report.md").read_text()
    for m in MODELS:
        assert f"| {m} |" in md
    assert "## Demo run" in md and "acceptance check" in md

    # exported models (HF layout) for every model
    summary = json.loads((out / "demo_summary.json").read_text())
    assert set(summary["models"]) == set(MODELS)
    for name in summary["models"]:
        files = {p.name for p in (out / "runs" / name / "model").iterdir()}
        assert {"config.json", "tokenizer.json"} <= files, (name, files)
        assert any(f.endswith(".safetensors") for f in files), (name, files)
    assert summary["total_s"] > 0 and "train target" in summary["phases_s"]
    assert {c["check"].split(":")[0] for c in summary["acceptance"]} >= {
        "target memorized its forget authors"
    }
    assert "total" in stdout


def test_demo_refuses_non_empty_out_and_bad_config(tmp_path):
    from ngdiff_jax.cli import main

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    assert main(["demo", "--quick", "--no-progress", "--out", str(tmp_path / "busy")]) == 1
    assert main(["demo", "--quick", "--out", str(tmp_path / "a"), "unlearn.stepz=3"]) == 2
    assert main(["demo", "--quick", "--out", str(tmp_path / "b"), "--methods", "ga,nosuch"]) == 2


def test_demo_config_quick_and_methods():
    full, quick = load_demo_config(), load_demo_config(quick=True)
    assert {"ga", "gdiff", "npo", "ngdiff"} <= set(full.unlearn.methods)
    assert quick.train.steps < full.train.steps and quick.unlearn.steps < full.unlearn.steps
    assert quick.unlearn.methods == ("ga", "gdiff", "npo", "ngdiff")
    cfg = load_demo_config(overrides=["unlearn.runs.ngdiff.lr=0.5", "unlearn.methods=[ngdiff, ga]"])
    assert cfg.unlearn.methods == ("ngdiff", "ga")
    assert cfg.unlearn.runs["ngdiff"].lr == 0.5 and cfg.unlearn.runs["ga"].lr is None


def test_acceptance_checks():
    good = {
        "target": {"forget_Q_A_ROUGE": 0.9, "model_utility": 0.5},
        "ngdiff": {"forget_Q_A_ROUGE": 0.3, "model_utility": 0.4},
    }
    assert [c["ok"] for c in acceptance_checks(good)] == [True, True, True]
    bad = {
        "target": {"forget_Q_A_ROUGE": 0.5, "model_utility": 0.5},
        "ngdiff": {"forget_Q_A_ROUGE": 0.3, "model_utility": 0.2},
    }
    assert [c["ok"] for c in acceptance_checks(bad)] == [False, False, False]
