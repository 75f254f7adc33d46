"""`ngdiff eval` against a plain transformers (PyTorch) evaluation: wall time end to end and metric differences.

For each benchmark (TOFU on a forget split, MUSE-News), in one run, on the same rows and the
same machine: ``ngdiff eval`` in a fresh process (imports, model load, every compile
included: a cold start) and :mod:`ngdiff_jax.bench.eval_torch` (one prompt at a time, the
same token ids, ``torch.set_num_threads(threads)``; XLA's CPU client uses the same usable
cores) in another. Prints both wall times, the speedup and the largest difference of every
aggregate and per-sample value, and how many generations differ. Load averages are taken
before and after each side: on a shared machine, compare only figures taken at similar load.

    python -m ngdiff_jax.bench.eval_speed --tofu-limit 5 --muse-limit 2 --out eval_speed.json
    python -m ngdiff_jax.bench.eval_speed --benchmarks muse --muse-limit 8 \
        --variant 'unrolled=--scan-layers false' --variant 'scanned=--scan-layers true'

Each ``--variant`` is one more ``ngdiff eval`` process against the same PyTorch run (PyTorch runs
first); the variants run in the order given.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_MODEL = Path.home() / ".cache" / "ngdiff-jax" / "SmolLM2-135M-Instruct-hf-ref"


def _flat(x):
    if isinstance(x, dict):
        return [z for k in sorted(x) for z in _flat(x[k])]
    if isinstance(x, (list, tuple)):
        return [z for y in x for z in _flat(y)]
    return [np.nan if x is None else float(x)]


def compare(a: dict, b: dict) -> dict:
    """Largest absolute difference of the aggregates and per-sample values two results share
    (keys only one side computes, e.g. extra MIA attacks, are listed in ``only_in_one``)."""
    agg = {}
    for k, v in a["aggregates"].items():
        w = b["aggregates"].get(k)
        if v is None or w is None:
            continue
        agg[k] = abs(float(v) - float(w))
    per = {}
    only = sorted((set(a["aggregates"]) ^ set(b["aggregates"])) | (set(a["per_sample"]) ^ set(b["per_sample"])))
    for k, v in a["per_sample"].items():
        if k not in b["per_sample"]:
            continue
        x, y = np.array(_flat(v)), np.array(_flat(b["per_sample"][k]))
        if x.shape != y.shape:
            per[k] = float("inf")
        elif x.size:
            per[k] = float(np.nanmax(np.abs(x - y))) if np.isfinite(x - y).any() else 0.0
    gen = sum(s != t for k in a["generations"] for s, t in zip(a["generations"][k], b["generations"].get(k, [])))
    return {
        "max_aggregate_diff": max(agg.values(), default=0.0),
        "worst_aggregate": max(agg, key=agg.get) if agg else None,
        "max_per_sample_diff": max(per.values(), default=0.0),
        "worst_per_sample": max(per, key=per.get) if per else None,
        "generations_differing": int(gen),
        "only_in_one": only,
        "aggregate_diffs": agg,
    }


def _run(cmd, env) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="HF model dir (default: the SmolLM2 reference)")
    p.add_argument("--data", default=None, help="shared data folder (default ../shared/data)")
    p.add_argument("--benchmarks", default="tofu,muse")
    p.add_argument("--forget-split", default="forget01")
    p.add_argument("--tofu-limit", type=int, default=5, help="rows of every TOFU split")
    p.add_argument("--muse-limit", type=int, default=2, help="rows of every MUSE file")
    p.add_argument("--max-new-tokens", type=int, default=200, help="TOFU answer length")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the usable cores)")
    p.add_argument("--variant", action="append", default=None, metavar="NAME=ARGS",
                   help="an `ngdiff eval` configuration to time, e.g. 'scanned=--scan-layers true' (repeatable; "
                        "each runs against the same PyTorch run; default: one, 'default', with no extra args)")
    p.add_argument("--out", default=None, help="write the JSON result here too")
    a = p.parse_args(argv)
    variants = {}
    for v in a.variant or ["default="]:
        name, sep, args = v.partition("=")
        if not sep or not name:
            p.error(f"--variant {v!r}: write NAME=ARGS, e.g. 'scanned=--scan-layers true'")
        variants[name] = args.split()
    from ngdiff_jax.paths import shared_data_dir

    data = Path(a.data) if a.data else shared_data_dir()
    threads = a.threads or len(os.sched_getaffinity(0))
    # cold start: no persistent compilation cache on the ngdiff side
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(sys.path), NGDIFF_COMPILATION_CACHE="0")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    py = sys.executable
    results = {"model": a.model, "threads": threads, "cores": len(os.sched_getaffinity(0)), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for bench in [b.strip() for b in a.benchmarks.split(",") if b.strip()]:
            limit = a.tofu_limit if bench == "tofu" else a.muse_limit
            sub = data / ("tofu" if bench == "tofu" else "muse_news")
            jax_out, torch_out = Path(tmp) / f"{bench}_jax.json", Path(tmp) / f"{bench}_torch.json"
            jax_cmd = [py, "-m", "ngdiff_jax.cli", "eval", "--model", a.model, "--benchmark", bench,
                       "--data", str(sub), "--limit", str(limit), "--out", str(jax_out)]  # fmt: skip
            torch_cmd = [py, "-m", "ngdiff_jax.bench.eval_torch", "--benchmark", bench, "--model", a.model,
                         "--data", str(sub), "--limit", str(limit), "--threads", str(threads),
                         "--out", str(torch_out)]  # fmt: skip
            if bench == "tofu":
                jax_cmd += ["--forget-split", a.forget_split, "--max-new-tokens", str(a.max_new_tokens)]
                torch_cmd += ["--forget-split", a.forget_split, "--max-new-tokens", str(a.max_new_tokens)]
            r = {"limit": limit, "load_before": [round(x, 2) for x in os.getloadavg()]}
            r["torch_wall_s"] = round(_run(torch_cmd, env), 1)
            r["load_after_torch"] = [round(x, 2) for x in os.getloadavg()]
            tr = json.loads(torch_out.read_text())
            r["torch_in_process_s"] = round(tr.get("seconds_in_process", float("nan")), 1)
            r["torch_timings"] = tr.get("timings", {})
            print(f"{bench:5s} rows/split={limit}: PyTorch {r['torch_wall_s']:.1f} s (in process "
                  f"{r['torch_in_process_s']:.1f} s: {r['torch_timings']}) | load {r['load_before']} -> "
                  f"{r['load_after_torch']}", flush=True)  # fmt: skip
            r["variants"] = {}
            for name, extra in variants.items():
                v = {"args": extra, "jax_wall_s": round(_run(jax_cmd + extra, env), 1)}
                v["load_after"] = [round(x, 2) for x in os.getloadavg()]
                v["speedup"] = round(r["torch_wall_s"] / v["jax_wall_s"], 2)
                jx = json.loads(jax_out.read_text())
                v["jax_timings"] = {k: x for k, x in jx.get("timings", {}).items() if k != "shapes"}
                v["compiled_shapes"] = {k: len(x) for k, x in jx.get("timings", {}).get("shapes", {}).items()}
                v["diff"] = d = compare(jx, tr)
                r["variants"][name] = v
                jt = v["jax_timings"]
                print(
                    f"      ngdiff eval [{name}] {v['jax_wall_s']:.1f} s, speedup {v['speedup']:.2f}x | "
                    f"max |diff| aggregates {d['max_aggregate_diff']:.2e} ({d['worst_aggregate']}), per-sample "
                    f"{d['max_per_sample_diff']:.2e} ({d['worst_per_sample']}), generations differing "
                    f"{d['generations_differing']} | compile {jt.get('total_compile_s', 0):.1f} s, run "
                    f"{jt.get('total_run_s', 0):.1f} s (compile per phase {jt.get('compile_s')}; run per phase "
                    f"{jt.get('run_s')}; shapes {v['compiled_shapes']}) | load after {v['load_after']}",
                    flush=True,
                )
            results["runs"][bench] = r
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
