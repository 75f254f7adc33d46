"""`ngdiff device-check --dry-run`: the accelerator check's parts end to end on CPU (micro step, a
one-row TOFU evaluation against transformers, one test file), its JSON, and its exit codes."""

import json

import pytest

from ngdiff_jax.bench import device_check
from ngdiff_jax.cli import main


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path, capsys):
    assert main(["device-check", "--out", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "device check (dry run)" in out and "step:" in out and "device_check.json" in out
    r = json.loads((tmp_path / "device_check.json").read_text())
    assert {"dry_run", "options", "environment", "step", "scan", "eval", "tests", "total_s", "failed"} <= set(r)
    assert r["dry_run"] is True and r["failed"] == [] and r["total_s"] > 0
    env = r["environment"]
    assert env["backend"] == "cpu" and env["device_count"] >= 1 and env["child_jax_platforms"] == "cpu"
    assert env["packages"]["jax"] and env["packages"]["flax"] and env["packages"]["optax"]

    s = r["step"]
    assert s["status"] == "ok" and s["size"] == "micro" and s["timed_steps"] == 2 == len(s["step_s_all"])
    assert s["tokens_per_step"] == 2 * s["batch_per_task"] * s["seq_len"]
    assert s["tokens_per_s"] > 0 and s["model_flops_per_step"] > 0 and s["xla_flops_per_step"] > 0
    assert (s["params_dtype"], s["compute_dtype"], s["moments_dtype"]) == ("float32", "bfloat16", "float32")
    assert s["mfu"] is None and "cpu" in s["mfu_reason"] and s["peak_bf16_flops"] is None
    assert s["peak_device_bytes"] is None and "memory_stats" in s["peak_device_bytes_reason"]
    assert s["plan"]["peak_bytes"] > 0 and s["plan"]["estimate_bytes"] > 0 and s["compile_s"] > 0
    assert s["measured_matmul_flops"]["flops"] > 0 and s["median_step_s"] > 0
    assert all(abs(v) < 1e6 for v in s["last_metrics"].values())

    c = r["scan"]  # the same step, the blocks scanned: the same losses (one layout's float order or the other's)
    assert c["status"] == "ok" and c["layout"].startswith("scanned") and len(c["step_s_all"]) == 2
    assert c["step_time_vs_unrolled"] == pytest.approx(c["mean_step_s"] / s["mean_step_s"])
    assert c["compiled_memory_vs_unrolled"]["temp_size_in_bytes"] > 0 and "scan:" in out
    for k, v in s["last_metrics"].items():
        assert c["last_metrics"][k] == pytest.approx(v, rel=1e-2, abs=1e-3), k

    t = r["tests"]
    assert t["status"] == "ok" and t["exit_code"] == 0 and t["passed"] >= 1 and t["failed"] == t["errors"] == 0
    assert t["jax_platforms"] == "cpu" and "addopts=" in t["command"] and t["seconds"] > 0

    e = r["eval"]
    if e["status"] == "skipped":  # no TOFU data or rouge-score here: a reason, not a failure
        assert e["reason"]
    else:
        assert e["status"] == "ok" and e["rows_per_split"] == 1 and e["torch_device"] == "cpu"
        assert e["ngdiff_wall_s"] > 0 and e["transformers_wall_s"] > 0 and e["speedup"] > 0
        assert e["max_metric_diff"] < 1e-4 and e["generations_differing"] == 0


def test_bad_skip_exits_2_with_one_line(tmp_path, capsys):
    assert main(["device-check", "--out", str(tmp_path / "o"), "--dry-run", "--skip", "steps,eval"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --skip steps") and "step, scan, eval, tests" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_a_failing_part_exits_1(tmp_path, monkeypatch, capsys):
    def boom(opts, log):
        raise RuntimeError("out of luck")

    monkeypatch.setattr(device_check, "run_step", boom)
    assert main(["device-check", "--out", str(tmp_path), "--dry-run", "--skip", "scan,eval,tests"]) == 1
    r = json.loads((tmp_path / "device_check.json").read_text())
    assert r["failed"] == [{"part": "step", "error": "RuntimeError: out of luck"}]
    assert r["step"]["status"] == "failed"
    assert r["scan"] == r["eval"] == r["tests"] == {"status": "skipped", "reason": "--skip"}
    assert "step: FAILED: RuntimeError: out of luck" in capsys.readouterr().out


@pytest.mark.slow
def test_step_on_an_accelerator_like_device(tmp_path, monkeypatch):
    # what only a GPU reports: memory statistics (here a limit the plan cannot fit: remat full
    # instead) and a known peak (an MFU)
    stats = {"bytes_limit": 1000, "bytes_in_use": 10, "peak_bytes_in_use": 20}
    monkeypatch.setattr(device_check, "_memory_stats", lambda device: stats)
    monkeypatch.setattr(device_check, "peak_flops", lambda kind: 1e12)
    res = device_check.run_step(device_check.CheckOptions.for_run(tmp_path, dry_run=True), lambda msg: None)
    assert "error" not in res and res["remat"] == "full" and "remat full" in res["remat_fallback"]
    assert res["peak_device_bytes"] == 20 and res["device_bytes_limit"] == 1000
    assert "peak_device_bytes_reason" not in res
    assert res["mfu"] == pytest.approx(res["model_flops_per_step"] / res["mean_step_s"] / 1e12)
    assert res["xla_flops_utilization"] > 0 and "mfu_reason" not in res


@pytest.mark.parametrize("kind, flops", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                         ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                         ("NVIDIA L40S", 362e12), ("cpu", None), ("TPU v5 lite", None)])  # fmt: skip
def test_peak_flops_table(kind, flops):
    assert device_check.peak_flops(kind) == flops
