"""``ngdiff device-check``: one command that checks ngdiff-jax on an accelerator and writes one JSON.

Parts, in this order (each can be skipped; a failing part is recorded and the next one runs):

* ``step``: the unlearning step (NGDiff + GeN probing the retain loss, Adam, two tasks) on a
  randomly initialized Llama of a benchmark size (:mod:`~ngdiff_jax.bench.sizes`; ``1b`` is
  Llama-3.2-1B's shape) with float32 parameters and Adam moments and ``dtype`` compute, on
  random token batches (:func:`~ngdiff_jax.bench.jax_side.make_batches`). First ``ngdiff plan``'s
  figures for the same configuration (:func:`~ngdiff_jax.parallel.plan.plan_step`: compiled from
  abstract shapes, no weights), then the real step compiled ahead of time, ``warmup`` untimed and
  ``steps`` timed calls (whole GeN cycles by default, so probing steps count at their share).
  Tokens/s count both tasks' tokens; MFU is the model's matmul FLOPs
  (:meth:`~ngdiff_jax.bench.sizes.BenchSize.step_flops`) over the mean step time and the device's
  dense bf16 peak (:data:`PEAK_BF16_FLOPS`, by ``device_kind``; None, with the reason, where the
  kind is not in the table); XLA's own FLOP count of the compiled step is reported beside it.
  Peak device memory is ``memory_stats()["peak_bytes_in_use"]`` (None on CPU, which keeps no
  such statistics).
* ``scan``: the same step on the same model with its blocks scanned (``run.scan_layers=true``:
  `ngdiff_jax.models.stacked.scanned`, one ``lax.scan`` over the blocks, the step part's remat
  policy), so one run says whether scanning is the faster layout on this device (issue 24: the
  accelerator default is scan + remat only where measured better). Its figures sit beside the
  step part's, with ``step_time_vs_unrolled`` (mean step time over the step part's) and XLA's
  compiled memory of both programs; the device's peak counter is cumulative (it includes the step
  part), so it is reported as such.
* ``eval``: ``ngdiff eval`` (TOFU, a fresh process: imports, load and every compile included)
  against :mod:`~ngdiff_jax.bench.eval_torch` (transformers, one prompt at a time) on the same
  device, the same rows and the same model: wall seconds of both, the speedup and the largest
  metric differences (:func:`~ngdiff_jax.bench.eval_speed.compare`). The model is
  ``eval_model`` or a random Llama of SmolLM2-135M's shape with a tokenizer trained on the TOFU
  rows (it never emits EOS, so every answer runs ``eval_new_tokens`` on both sides). Skipped, with
  the reason, when the TOFU files or rouge-score (and nltk, which it imports) are missing.
* ``tests``: pytest in a subprocess on the test files that exercise the model, step and
  optimizer numerics (:data:`GPU_TESTS`), with ``JAX_PLATFORMS`` set to this process's platform
  (tests/conftest.py only defaults it to cpu), no preallocation and no xdist workers.

Every part writes ``device_check.json`` again when it ends, so a run cut short keeps what it
measured. ``dry_run`` runs the same code on CPU at the ``micro`` size, two timed steps, a
one-row evaluation and one test file, in well under a minute.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ngdiff_jax.bench.sizes import SIZES
from ngdiff_jax.errors import InputError, one_line
from ngdiff_jax.paths import REPO_ROOT

PARTS = ("step", "scan", "eval", "tests")

#: test files run on the accelerator: model parity with transformers, the two-task combiners,
#: GeN, the training step and the losses (small models, numerics that a GPU's kernels change)
GPU_TESTS = ("tests/test_models_parity.py", "tests/test_models_attention.py", "tests/test_losses.py",
             "tests/test_optim_combiners.py", "tests/test_optim_gen.py", "tests/test_training_step.py")  # fmt: skip
DRY_RUN_TESTS = ("tests/test_losses.py",)

#: dense bf16 peak FLOP/s by a substring of ``device_kind`` (first match wins), from the vendors' sheets
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
)

#: the evaluation model's shape when none is given: SmolLM2-135M's (vocabulary: the trained tokenizer's)
EVAL_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3)  # fmt: skip
DRY_EVAL_SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)  # fmt: skip

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "torch", "transformers",
            "rouge-score", "nltk")  # fmt: skip
GIB = 2**30


@dataclass
class CheckOptions:
    """What to run; :meth:`for_run` gives the accelerator defaults or the dry run's."""

    out: Path
    dry_run: bool = False
    skip: tuple[str, ...] = ()
    size: str = "1b"
    batch: int = 8  # rows per task
    seq_len: int = 512
    dtype: str = "bfloat16"  # compute; parameters and Adam moments stay float32
    remat: str = "none"
    gen_every: int = 4
    warmup: int = 4  # one GeN cycle
    steps: int = 12  # three GeN cycles
    tests: tuple[str, ...] = GPU_TESTS
    data: Path | None = None  # the TOFU folder (default: the shared data's)
    eval_model: Path | None = None
    eval_limit: int = 8
    eval_new_tokens: int = 64
    eval_dtype: str = "float32"
    budget_s: float = 450.0  # the subprocesses' timeouts are cut to fit it

    @classmethod
    def for_run(cls, out, *, dry_run: bool = False, **overrides) -> CheckOptions:
        base = dict(out=Path(out), dry_run=dry_run)
        if dry_run:
            base.update(size="micro", batch=2, seq_len=16, warmup=1, steps=2, tests=DRY_RUN_TESTS, eval_limit=1,
                        eval_new_tokens=4, budget_s=300.0)  # fmt: skip
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    def validate(self) -> None:
        bad = [s for s in self.skip if s not in PARTS]
        if bad:
            raise InputError(f"--skip {','.join(bad)}: not a part; choose among {', '.join(PARTS)}.")
        if self.size not in SIZES:
            raise InputError(f"size {self.size!r} is unknown; choose from {', '.join(SIZES)}.")
        for name in ("batch", "seq_len", "steps", "gen_every", "eval_limit", "eval_new_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise InputError(f"{name}={v!r}: give a whole number >= 1.")
        if self.warmup < 0:
            raise InputError(f"warmup={self.warmup}: give a whole number >= 0.")
        if self.dtype not in ("float32", "bfloat16") or self.eval_dtype not in ("float32", "bfloat16"):
            raise InputError("dtype and eval dtype are float32 or bfloat16.")


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def child_platform(device) -> str:
    """The ``JAX_PLATFORMS`` value that gives a child process ``device``'s platform."""
    if device.platform != "gpu":
        return device.platform
    version = str(getattr(getattr(device, "client", None), "platform_version", "")).lower()
    return "rocm" if "rocm" in version else "cuda"


def peak_flops(device_kind: str) -> float | None:
    """The dense bf16 peak of ``device_kind`` (:data:`PEAK_BF16_FLOPS`), or None when unknown."""
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in device_kind.lower():
            return flops
    return None


def environment() -> dict[str, Any]:
    import jax

    devs = jax.devices()
    d = devs[0]
    return {
        "packages": {p: _version(p) for p in PACKAGES},
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "platform_version": str(getattr(getattr(d, "client", None), "platform_version", "")),
        "device_kind": d.device_kind,
        "device_count": len(devs),
        "child_jax_platforms": child_platform(d),
        "host_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "env": {k: os.environ.get(k) for k in ("JAX_PLATFORMS", "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_FLAGS")},
        # the step's compile_s is a cold compile only without a warm persistent cache (NGDIFF_COMPILATION_CACHE=0)
        "compilation_cache_dir": jax.config.jax_compilation_cache_dir or None,
    }


def _child_env(jax_platforms: str) -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS=jax_platforms, XLA_PYTHON_CLIENT_PREALLOCATE="false",
               NGDIFF_COMPILATION_CACHE="0", PYTHONPATH=os.pathsep.join(p for p in sys.path if p))  # fmt: skip
    for k in ("USE_TORCH", "JAX_COMPILATION_CACHE_DIR"):  # the console script's torch hiding; a warm cache
        env.pop(k, None)
    return env


def _memory_stats(device) -> dict[str, int] | None:
    try:
        stats = device.memory_stats()
    except Exception:  # a backend without the call
        return None
    return dict(stats) if stats else None


def run_step(opts: CheckOptions, log: Callable[[str], None]) -> dict[str, Any]:
    """The ``step`` part (module doc)."""
    import jax

    from ngdiff_jax.parallel.plan import plan_step

    size = replace(SIZES[opts.size], batch=opts.batch, seq_len=opts.seq_len)
    tokens = 2 * size.batch * size.seq_len
    res: dict[str, Any] = {
        "size": size.name, "description": size.description, "params": size.param_count(),
        "tasks": 2, "batch_per_task": size.batch, "seq_len": size.seq_len, "tokens_per_step": tokens,
        "params_dtype": "float32", "compute_dtype": opts.dtype, "moments_dtype": "float32", "remat": opts.remat,
        "method": f"ngdiff + GeN (probing the retain loss every {opts.gen_every} steps), Adam",
        "warmup_steps": opts.warmup, "timed_steps": opts.steps,
    }  # fmt: skip
    device = jax.devices()[0]

    def plan(remat: str) -> dict[str, Any]:
        log(f"step: plan of {size.name} {size.batch}x{size.seq_len} per task ({opts.dtype} compute, remat {remat})")
        try:
            row = plan_step(size.hf_config().to_dict(), batch=size.batch, seq=size.seq_len, params_dtype="float32",
                            compute_dtype=opts.dtype, moments_dtype="float32", remat=remat)  # fmt: skip
        except Exception as e:  # the timing still runs
            return {"error": one_line(f"{type(e).__name__}: {e}", 300)}
        return {"peak_bytes": row.peak, "estimate_bytes": row.estimate, "argument_bytes": row.argument,
                "temp_bytes": row.temp, "xla_flops": row.flops, "how": row.how, "compile_s": row.compile_s}

    remat = opts.remat
    res["plan"] = plan(remat)
    limit = (_memory_stats(device) or {}).get("bytes_limit")
    if remat == "none" and limit and res["plan"].get("peak_bytes", 0) > 0.9 * limit:
        # one try on a lent machine: rather a step with remat than an out-of-memory error
        res["remat_fallback"] = (f"plan's peak {res['plan']['peak_bytes'] / GIB:.1f} GiB > 90% of the device's "
                                 f"{limit / GIB:.1f} GiB with remat none: remat full")  # fmt: skip
        remat = res["remat"] = "full"
        res["plan"] = plan(remat)
    res.update(_time_step(opts, size, remat, log))
    if "error" in res["plan"]:
        res["error"] = "; ".join(x for x in (res.get("error"), f"plan: {res['plan']['error']}") if x)
    return res


def _time_step(opts: CheckOptions, size, remat: str, log: Callable[[str], None], *,
               scan_layers: bool = False) -> dict[str, Any]:
    """Compile and time the step on a fresh random model of ``size`` (scanned with ``scan_layers``)."""
    import jax

    from ngdiff_jax.bench import jax_side
    from ngdiff_jax.models import functional, set_remat, stacked

    tokens = 2 * size.batch * size.seq_len
    device = jax.devices()[0]
    model = jax_side.build_model(size, opts.dtype)
    if scan_layers:
        model = stacked.scanned(model, release=True)
    if remat != "none":
        set_remat(model, remat)
    res: dict[str, Any] = {"kernels": getattr(model, "kernels", None)}
    apply_fn, params = functional(model)
    del model
    fb, rb = (jax_side.device_batch(b) for b in jax_side.make_batches(size))
    log(f"{'scan' if scan_layers else 'step'}: compiling")
    cstep = jax_side.compile_step(apply_fn, params, fb, rb, "ngdiff_gen", gen_every=opts.gen_every)
    res["compile_s"] = round(cstep.compile_s, 2)
    res["compiled_memory_bytes"] = cstep.memory
    before = _memory_stats(device)
    opt_state, key, times, metrics = cstep.opt_state, jax.random.key(0), [], None
    log(f"{'scan' if scan_layers else 'step'}: {opts.warmup} warm-up + {opts.steps} timed steps")
    for i in range(opts.warmup + opts.steps):
        t0 = time.perf_counter()
        params, opt_state, metrics = cstep.compiled(params, opt_state, fb, rb, key)
        jax.block_until_ready((params, metrics))
        if i >= opts.warmup:
            times.append(time.perf_counter() - t0)
    after = _memory_stats(device)
    mean, median = statistics.fmean(times), statistics.median(times)
    model_flops = size.step_flops()
    peak = peak_flops(device.device_kind)
    last = {k: float(np.asarray(v)) for k, v in metrics.items() if np.asarray(v).size == 1}
    if not scan_layers:
        n = 128 if opts.dry_run else 8192  # the achievable bf16 matmul rate, for reading the MFU
        res["measured_matmul_flops"] = {"n": n, "flops": jax_side.matmul_rate(n, "bfloat16", 5)}
    res.update({
        "step_s_all": [round(t, 5) for t in times],
        "median_step_s": median,
        "mean_step_s": mean,
        "tokens_per_s": tokens / mean,
        "model_flops_per_step": model_flops,
        "xla_flops_per_step": cstep.flops,
        "peak_bf16_flops": peak,
        "mfu": model_flops / mean / peak if peak else None,
        "xla_flops_utilization": cstep.flops / mean / peak if peak and cstep.flops else None,
        "mfu_basis": "model matmul FLOPs of both tasks' forward and backward (BenchSize.step_flops: GeN's probe "
                     "forwards and remat recompute not counted) / mean timed step / dense bf16 peak",
        "peak_device_bytes": after.get("peak_bytes_in_use") if after else None,
        "device_bytes_limit": after.get("bytes_limit") if after else None,
        "device_bytes_in_use_before_steps": before.get("bytes_in_use") if before else None,
        "last_metrics": last,
    })  # fmt: skip
    if peak is None:
        res["mfu_reason"] = f"no dense bf16 peak known for device kind {device.device_kind!r} (PEAK_BF16_FLOPS)"
    if after is None:
        res["peak_device_bytes_reason"] = (f"the {device.platform} backend keeps no device memory statistics "
                                           "(memory_stats() is None)")  # fmt: skip
    bad = sorted(k for k, v in last.items() if not np.isfinite(v))
    if bad:
        res["error"] = f"non-finite metrics after {len(times) + opts.warmup} steps: {', '.join(bad)}"
    return res


def run_scan(opts: CheckOptions, step: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """The ``scan`` part (module doc): ``step`` is the step part's result (its size, remat and times)."""

    size = replace(SIZES[opts.size], batch=opts.batch, seq_len=opts.seq_len)
    remat = step.get("remat", opts.remat)
    res: dict[str, Any] = {"size": size.name, "layout": "scanned (run.scan_layers=true)", "remat": remat,
                           "compute_dtype": opts.dtype, "warmup_steps": opts.warmup, "timed_steps": opts.steps}
    res.update(_time_step(opts, size, remat, log, scan_layers=True))
    res["peak_device_bytes_note"] = "the device's cumulative peak: it includes the step part"
    if step.get("mean_step_s"):
        res["step_time_vs_unrolled"] = res["mean_step_s"] / step["mean_step_s"]
        ours, theirs = res.get("compiled_memory_bytes"), step.get("compiled_memory_bytes")
        if isinstance(ours, dict) and isinstance(theirs, dict):
            res["compiled_memory_vs_unrolled"] = {k: ours[k] / theirs[k] for k in ours
                                                  if isinstance(ours[k], int | float) and theirs.get(k)}
    else:
        res["step_time_vs_unrolled"] = None
        res["step_time_vs_unrolled_reason"] = "the step part did not time the unrolled step"
    return res


def _random_eval_model(data: Path, path: Path, dry_run: bool) -> Path:
    """A random tied Llama (SmolLM2-135M's shape; tiny in a dry run) with a BPE tokenizer trained on
    the TOFU rows, saved to ``path`` for both sides."""
    from flax import nnx
    from transformers import LlamaConfig

    from ngdiff_jax.data import load_tofu, train_tokenizer
    from ngdiff_jax.models import from_config, save_pretrained

    rows = load_tofu("forget10_perturbed", data)[:40] if dry_run else load_tofu("full", data)
    tok = train_tokenizer([r["question"] + " " + r["answer"] for r in rows], path.parent / "tokenizer",
                          vocab_size=400 if dry_run else 8192)  # fmt: skip
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      **(DRY_EVAL_SHAPE if dry_run else EVAL_SHAPE))  # fmt: skip
    save_pretrained(from_config(cfg, rngs=nnx.Rngs(0)), path, tokenizer=tok)
    return path


def _timed(cmd: list[str], env: dict[str, str], timeout: float) -> float:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{' '.join(cmd[1:4])} timed out after {timeout:.0f} s") from None
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise RuntimeError(f"{' '.join(cmd[1:4])} exited {proc.returncode}: {tail[-1] if tail else ''}")
    return time.perf_counter() - t0


def run_eval(opts: CheckOptions, env_info: dict[str, Any], deadline: float,
             log: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    """The ``eval`` part (module doc); ``{"skip_reason": why}`` when its inputs are missing."""
    import importlib.util

    from ngdiff_jax.bench.eval_speed import compare
    from ngdiff_jax.paths import shared_data_dir

    data = Path(opts.data) if opts.data else shared_data_dir() / "tofu"
    if not (data / "forget01_perturbed.json").is_file():
        return {"skip_reason": f"TOFU data not found at {data} (forget01_perturbed.json): pass --data DIR"}
    try:
        import rouge_score.rouge_scorer  # noqa: F401  (imports nltk)
    except ImportError as e:
        return {"skip_reason": f"rouge-score not importable ({e}): carry its wheels (docs/PERFORMANCE.md)"}
    if importlib.util.find_spec("torch") is None:
        return {"skip_reason": "torch is not installed: no transformers side to compare with"}
    jax_platforms = env_info["child_jax_platforms"]
    torch_device = "cuda" if jax_platforms in ("cuda", "rocm") else "cpu"
    threads = min(16, env_info["host_cores"] or 1)
    res: dict[str, Any] = {"benchmark": "tofu", "forget_split": "forget01", "rows_per_split": opts.eval_limit,
                           "max_new_tokens": opts.eval_new_tokens, "dtype": opts.eval_dtype,
                           "torch_device": torch_device, "torch_threads": threads, "data": str(data)}  # fmt: skip
    env = _child_env(jax_platforms)
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="ngdiff_device_check_") as tmp:
        tmp = Path(tmp)
        if opts.eval_model:
            model = Path(opts.eval_model)
            res["model"] = str(model)
        else:
            t0 = time.perf_counter()
            model = _random_eval_model(data, tmp / "model", opts.dry_run)
            res["model"] = ("random tiny Llama" if opts.dry_run else "random Llama of SmolLM2-135M's shape") + \
                " with a BPE tokenizer trained on TOFU (no EOS: every answer runs max_new_tokens)"
            res["model_build_s"] = round(time.perf_counter() - t0, 2)
        common = ["--model", str(model), "--data", str(data), "--limit", str(opts.eval_limit),
                  "--forget-split", "forget01", "--max-new-tokens", str(opts.eval_new_tokens),
                  "--dtype", opts.eval_dtype]  # fmt: skip
        jax_cmd = [py, "-m", "ngdiff_jax.cli", "eval", "--benchmark", "tofu", *common, "--out", str(tmp / "j.json")]
        torch_cmd = [py, "-m", "ngdiff_jax.bench.eval_torch", "--benchmark", "tofu", *common, "--device",
                     torch_device, "--threads", str(threads), "--out", str(tmp / "t.json")]  # fmt: skip
        left = lambda reserve: max(20.0, deadline - time.perf_counter() - reserve)  # noqa: E731
        log(f"eval: ngdiff eval, {opts.eval_limit} rows per split, {opts.eval_new_tokens} new tokens")
        res["ngdiff_wall_s"] = round(_timed(jax_cmd, env, left(150.0)), 2)  # keep time for torch and the tests
        log("eval: transformers, one prompt at a time")
        res["transformers_wall_s"] = round(_timed(torch_cmd, env, left(60.0)), 2)
        jx, tr = json.loads((tmp / "j.json").read_text()), json.loads((tmp / "t.json").read_text())
    res["speedup"] = res["transformers_wall_s"] / res["ngdiff_wall_s"]
    d = compare(jx, tr)
    res["max_metric_diff"] = d["max_aggregate_diff"]
    res["worst_metric"] = d["worst_aggregate"]
    res["max_per_sample_diff"] = d["max_per_sample_diff"]
    res["generations_differing"] = d["generations_differing"]
    res["ngdiff_timings"] = {k: v for k, v in jx.get("timings", {}).items() if k != "shapes"}
    res["transformers_in_process_s"] = round(tr.get("seconds_in_process", float("nan")), 2)
    res["transformers_timings"] = tr.get("timings", {})
    return res


def run_tests(opts: CheckOptions, env_info: dict[str, Any], deadline: float,
              log: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    """The ``tests`` part (module doc)."""
    files = [f for f in opts.tests if (REPO_ROOT / f).is_file()]
    if not files:
        return {"skip_reason": f"none of {', '.join(opts.tests)} found under {REPO_ROOT} (an installed package has no "
                           "tests: run from a checkout)"}  # fmt: skip
    env = _child_env(env_info["child_jax_platforms"])
    with tempfile.TemporaryDirectory(prefix="ngdiff_device_check_") as tmp:
        junit = Path(tmp) / "junit.xml"
        # -o addopts=: pyproject's `-n 2 --dist loadfile` would start two workers fighting over one device
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-rf",
               f"--junitxml={junit}", *files]  # fmt: skip
        timeout = max(30.0, deadline - time.perf_counter())
        log(f"tests: {len(files)} file(s) with JAX_PLATFORMS={env['JAX_PLATFORMS']}")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"pytest timed out after {timeout:.0f} s") from None
        res: dict[str, Any] = {"command": " ".join(cmd[1:]).replace(str(junit), "JUNIT.xml"), "files": files,
                               "jax_platforms": env["JAX_PLATFORMS"], "exit_code": proc.returncode,
                               "seconds": round(time.perf_counter() - t0, 2)}  # fmt: skip
        if not junit.is_file():
            tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
            res["error"] = f"pytest exited {proc.returncode} without a report: {tail[-1] if tail else ''}"
            return res
        root = ET.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failing = [f"{c.get('classname', '')}::{c.get('name', '')}" for c in root.iter("testcase")
               if c.find("failure") is not None or c.find("error") is not None]  # fmt: skip
    res.update(passed=count["tests"] - count["failures"] - count["errors"] - count["skipped"],
               failed=count["failures"], errors=count["errors"], skipped=count["skipped"], failing=failing[:20])
    if proc.returncode != 0:
        res["error"] = (f"{res['failed']} failed, {res['errors']} errors (pytest exit {proc.returncode})"
                        + (f": {', '.join(failing[:3])}" if failing else ""))  # fmt: skip
    return res


def _write(result: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    tmp.replace(path)


def run_check(opts: CheckOptions, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Runs the parts and writes ``opts.out / "device_check.json"``; returns the result.

    ``result["failed"]`` lists ``{"part", "error"}`` for every part that failed."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t_start = time.perf_counter()
    deadline = t_start + opts.budget_s
    opts.out.mkdir(parents=True, exist_ok=True)
    path = opts.out / "device_check.json"
    result: dict[str, Any] = {"dry_run": opts.dry_run,
                              "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
                              "environment": environment(), "failed": []}  # fmt: skip
    env_info = result["environment"]
    log(f"device check on {env_info['device_kind']} x{env_info['device_count']} ({env_info['backend']})"
        + (", dry run" if opts.dry_run else ""))  # fmt: skip
    runners = {
        "step": lambda: run_step(opts, log),
        "scan": lambda: run_scan(opts, result.get("step", {}), log),
        "eval": lambda: run_eval(opts, env_info, deadline, log),
        "tests": lambda: run_tests(opts, env_info, deadline, log),
    }
    for part in PARTS:
        if part in opts.skip:
            result[part] = {"status": "skipped", "reason": "--skip"}
            continue
        t0 = time.perf_counter()
        try:
            res = runners[part]()
        except Exception as e:  # one part's failure is recorded; the others still run
            res = {"error": one_line(f"{type(e).__name__}: {e}", 500)}
        if "skip_reason" in res:
            res = {"status": "skipped", "reason": res.pop("skip_reason"), **res}
        elif "error" in res:
            res = {"status": "failed", **res}
            result["failed"].append({"part": part, "error": res["error"]})
        else:
            res = {"status": "ok", **res}
        res["part_s"] = round(time.perf_counter() - t0, 2)
        result[part] = res
        result["total_s"] = round(time.perf_counter() - t_start, 2)
        _write(result, path)
        if part in ("step", "scan"):  # free the step's device buffers before the next part starts
            import gc

            import jax

            gc.collect()
            jax.clear_caches()
    result["total_s"] = round(time.perf_counter() - t_start, 2)
    _write(result, path)
    return result


def _gib(b) -> str:
    return "n/a" if b is None else f"{b / GIB:.2f} GiB"


def format_summary(result: dict[str, Any], path: Path | None = None) -> str:
    """A few lines: each part's headline figures or why it failed or was skipped."""
    env = result["environment"]
    lines = [f"device check{' (dry run)' if result['dry_run'] else ''}: {env['device_kind']} x{env['device_count']} "
             f"({env['backend']}), jax {env['packages']['jax']}"]  # fmt: skip
    s = result.get("step", {})
    if "tokens_per_s" in s:  # also when only its plan or a metric check failed
        mfu = f"{100 * s['mfu']:.1f}%" if s["mfu"] is not None else f"n/a ({s.get('mfu_reason', '')})"
        plan = s.get("plan", {})
        lines.append(
            f"  step: {s['size']} ({s['params'] / 1e6:.0f}M params), 2 tasks x {s['batch_per_task']}x{s['seq_len']}, "
            f"{s['compute_dtype']} compute, remat {s['remat']}: compile {s['compile_s']:.1f} s, "
            f"step {s['mean_step_s'] * 1e3:.1f} ms "
            f"(median {s['median_step_s'] * 1e3:.1f}), {s['tokens_per_s']:,.0f} tokens/s, MFU {mfu} (bf16 matmul "
            f"measured {s['measured_matmul_flops']['flops'] / 1e12:.1f} TFLOP/s); "
            f"peak device memory {_gib(s['peak_device_bytes'])} (plan: peak {_gib(plan.get('peak_bytes'))}, "
            f"estimate {_gib(plan.get('estimate_bytes'))})")  # fmt: skip
    c = result.get("scan", {})
    if "tokens_per_s" in c:
        vs = c.get("step_time_vs_unrolled")
        mfu = f"{100 * c['mfu']:.1f}%" if c["mfu"] is not None else "n/a"
        lines.append(f"  scan: the step with the blocks scanned (remat {c['remat']}): compile {c['compile_s']:.1f} s, "
                     f"step {c['mean_step_s'] * 1e3:.1f} ms" + (f" ({vs:.2f}x the unrolled step's)" if vs else "")
                     + f", {c['tokens_per_s']:,.0f} tokens/s, MFU {mfu}")  # fmt: skip
    e = result.get("eval", {})
    if "speedup" in e:
        lines.append(f"  eval: ngdiff eval {e['ngdiff_wall_s']:.1f} s, transformers {e['transformers_wall_s']:.1f} s "
                     f"({e['torch_device']}), speedup {e['speedup']:.2f}x, max |metric diff| "
                     f"{e['max_metric_diff']:.2e}")  # fmt: skip
    t = result.get("tests", {})
    if "passed" in t:
        lines.append(f"  tests: {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, "
                     f"{t['skipped']} skipped in {t['seconds']:.1f} s ({len(t['files'])} files)")  # fmt: skip
    for part in PARTS:
        p = result.get(part, {})
        if p.get("status") == "skipped":
            lines.append(f"  {part}: skipped: {p['reason']}")
        elif p.get("status") == "failed":
            lines.append(f"  {part}: FAILED: {p['error']}")
    tail = f"; wrote {path}" if path else ""
    lines.append(f"  total {result.get('total_s', 0):.1f} s{tail}")
    return "\n".join(lines)
