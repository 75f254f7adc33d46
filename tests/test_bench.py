"""Smoke test of ``ngdiff bench`` on the micro size with one repeat (checks the JSON, times nothing)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ngdiff_jax.cli import main


@pytest.mark.slow
def test_bench_json_keys(capsys):
    rc = main([
        "bench", "--device", "cpu", "--sizes", "micro", "--sections", "step,overhead,generate",
        "--repeats", "1", "--warmup", "0", "--gen-batch", "2", "--gen-prompt-len", "8",
        "--gen-new-tokens", "4", "--matmul-n", "64", "--json",
    ])
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert {"machine", "matmul", "step", "overhead", "generate", "targets"} <= set(result)
    (step,) = result["step"]
    for key in ("jax_step_ms", "torch_step_ms", "ratio", "jax_tokens_per_s", "torch_tokens_per_s",
                "jax_mfu", "torch_mfu", "logits_max_abs_diff"):
        assert key in step
    assert step["size"] == "micro" and step["ratio"] > 0
    assert step["logits_max_abs_diff"] < 1e-3  # same weights in both frameworks
    for key in ("gdiff_step_ms", "ngdiff_step_ms", "ngdiff_gen_step_ms", "ngdiff_overhead", "gen_overhead"):
        assert key in result["overhead"]
    gen = result["generate"]
    for key in ("jax_tokens_per_s", "torch_tokens_per_s", "speedup"):
        assert gen[key] > 0
    assert gen["tokens_match"] == 1.0  # greedy decoding agrees token for token
    assert {t["name"] for t in result["targets"]} == {
        "ratio[micro]", "ngdiff_overhead", "gen_overhead[every=4]", "generate_speedup"}


@pytest.mark.xla_cpu
def test_memory_child_reports_peak_and_compiled_analysis(capsys):
    from ngdiff_jax.bench import memory_child

    assert memory_child.main(["--framework", "jax", "--method", "ngdiff_gen", "--size", "micro",
                              "--steps", "1"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["peak_rss_mb"] >= rec["baseline_rss_mb"] > 0
    assert {"argument_size_in_bytes", "temp_size_in_bytes"} <= set(rec["compiled"])


@pytest.mark.slow
def test_layer_scan_bench_computes_the_same_step(tmp_path):
    """`ngdiff_jax.bench.layer_scan`: the scanned and the unrolled variant run the same step
    (same losses on the first step, finite times) on a tiny tied Llama."""
    pytest.importorskip("torch")
    from ngdiff_jax.bench.layer_scan import child
    from ngdiff_jax.models.testing import tiny_hf_model

    tiny_hf_model("llama_tied", tmp_path / "hf")
    u = child(str(tmp_path / "hf"), False, 2, 2, 8)
    s = child(str(tmp_path / "hf"), True, 2, 2, 8)
    np.testing.assert_allclose(u["first_losses"], s["first_losses"], rtol=1e-5)
    assert len(u["step_s"]) == len(s["step_s"]) == 2 and u["temp_mb"] >= 0 and s["compile_s"] > 0


@pytest.mark.slow
def test_decode_scan_bench_decodes_the_same_tokens(tmp_path, capsys):
    from flax import nnx

    from ngdiff_jax.bench import decode_scan
    from ngdiff_jax.models import from_config, save_pretrained
    from ngdiff_jax.models.testing import tiny_hf_config

    save_pretrained(from_config(tiny_hf_config("llama"), rngs=nnx.Rngs(0)), tmp_path / "m")
    out = tmp_path / "decode.json"
    assert decode_scan.main(["--model", str(tmp_path / "m"), "--batch", "2", "--prompt", "8", "--new-tokens", "4",
                             "--repeats", "1", "--out", str(out)]) == 0  # fmt: skip
    runs = json.loads(out.read_text())["runs"]
    assert [r["variant"] for r in runs] == ["unrolled", "scanned"] and runs[0]["tokens"] == runs[1]["tokens"]
    assert "ms per token" in capsys.readouterr().out
