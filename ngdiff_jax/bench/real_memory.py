"""Peak memory and step time of ``ngdiff unlearn`` on a real model against the PyTorch step.

``python -m ngdiff_jax.bench.real_memory --model <HF dir> [--data <TOFU dir>]`` runs, one
process each (peak RSS is per process, ``VmHWM``):

* ``ngdiff unlearn`` (the real pipeline, ``--config tofu_ngdiff``: GA + NLL, NGDiff, Adam, GeN)
  on TOFU forget10/retain90, batch 4 x 128, for each JAX variant (``f32``: float32, no remat;
  ``bf16_remat``: bfloat16 parameters and compute, float32 moments, remat ``full``;
  ``lora8``: LoRA rank 8 on all projections; ``lora8_bf16_remat``: the same on a bfloat16 base
  with remat ``full``; ``f32_const``: float32 with a fixed rate, the
  arithmetic of the PyTorch step, for the step time; ``f32_remat``: float32 with remat ``full``;
  ``bf16_all_remat``: parameters, compute and moments in bfloat16 with remat ``full``; a
  ``_scan`` suffix: the same with ``run.scan_layers=true``, the blocks' weights stacked and run as
  one ``lax.scan``);
* the PyTorch step (transformers ``LlamaForCausalLM``, one ``autograd.grad`` per task, NGDiff
  arithmetic, ``torch.optim.Adam``; :class:`~ngdiff_jax.bench.torch_side.TorchNGDiffStep`) on
  the same batches (same tokenizer, formatting and batcher as the JAX run),

and prints the figures side by side with the load average before and after each run. Wrap
it in ``flock <lockfile>`` on a shared machine so no other large job runs beside it.
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

VARIANTS = {
    "f32": [],
    "f32_const": ["method.rate=constant"],
    "f32_remat": ["run.remat=full"],
    "bf16_remat": ["precision.params=bfloat16", "precision.compute=bfloat16", "precision.moments=float32",
                   "run.remat=full"],
    "bf16_all_remat": ["precision.params=bfloat16", "precision.compute=bfloat16", "precision.moments=bfloat16",
                       "run.remat=full"],
    "lora8": ["lora.rank=8"],
    # LoRA on a bfloat16 base with remat: the single-device configuration for large models
    "lora8_bf16_remat": ["lora.rank=8", "precision.params=bfloat16", "precision.compute=bfloat16",
                         "precision.export=float32", "run.remat=full"],
    # with the decoder blocks scanned (run.scan_layers): one block compiled instead of 30
    "lora8_scan": ["lora.rank=8", "run.scan_layers=true"],
    "f32_remat_scan": ["run.remat=full", "run.scan_layers=true"],
    "lora8_bf16_remat_scan": ["lora.rank=8", "precision.params=bfloat16", "precision.compute=bfloat16",
                              "precision.export=float32", "run.remat=full", "run.scan_layers=true"],
    "bf16_all_remat_scan": ["precision.params=bfloat16", "precision.compute=bfloat16", "precision.moments=bfloat16",
                            "run.remat=full", "run.scan_layers=true"],
}  # fmt: skip


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmHWM in /proc/self/status")


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _overrides(model: str, data: str | None, out: str, steps: int, batch: int, seq: int) -> list[str]:
    o = [f"model_path={model}", f"run.output_dir={out}", f"run.steps={steps}", "run.checkpoint_every=0",
         "run.eval_every=0", "run.progress=false", f"data.batch_size={batch}", f"data.max_length={seq}",
         f"data.buckets=[{seq}]"]  # fmt: skip
    if data:
        o.append(f"data.source={data}")
    return o


def child_jax(args, extra: list[str]) -> dict:
    from ngdiff_jax.cli import console

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        argv = ["unlearn", "--config", "tofu_ngdiff",
                *_overrides(args.model, args.data, str(out), args.steps, args.batch, args.seq), *extra]  # fmt: skip
        rc = console(argv)  # as the `ngdiff` console script runs it (no torch; the cache is off here)
        if rc != 0:
            raise SystemExit(f"ngdiff unlearn failed with exit code {rc}")
        summary = json.loads((out / "summary.json").read_text())
    log = summary.get("last_metrics", {})
    return {"peak_rss_mb": peak_rss_mb(), "step_time_s": summary["step_time_s"],
            "forget_loss": log.get("forget_loss"), "retain_loss": log.get("retain_loss")}  # fmt: skip


def child_torch(args) -> dict:
    import numpy as np
    import torch
    import transformers

    from ngdiff_jax.bench import torch_side
    from ngdiff_jax.config_loader import load_config
    from ngdiff_jax.training import UnlearnConfig, data_assembly, model_io
    from ngdiff_jax.training.data_assembly import resolve_format, resolve_retain_split

    cfg = load_config(UnlearnConfig, "tofu_ngdiff",
                      _overrides(args.model, args.data, "/tmp/unused", args.steps, args.batch, args.seq),
                      subdir="experiments")  # fmt: skip
    tok = model_io.load_tokenizer(cfg.model_path)
    spec = resolve_format(cfg.format, cfg.model_path)
    streams = []
    for i, split in enumerate((cfg.data.forget_split, resolve_retain_split(cfg.data))):
        rows = data_assembly.load_split(cfg.data, split)
        ex = data_assembly.encode_split(rows, tok, cfg.data, spec, where=split)
        streams.append(data_assembly.make_batcher(ex, tok, cfg.data, seed=cfg.run.seed + i))
    model = transformers.LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    times = []
    step = None
    for _ in range(args.steps):
        fb, rb = (torch_side.torch_batch({k: np.asarray(v) for k, v in next(s).items()}, "cpu") for s in streams)
        fb = {k: fb[k] for k in ("input_ids", "attention_mask", "labels")}
        rb = {k: rb[k] for k in ("input_ids", "attention_mask", "labels")}
        if step is None:
            step = torch_side.TorchNGDiffStep(model, fb, rb, lr=cfg.optim.lr)
        step.fb, step.rb = fb, rb
        t0 = time.perf_counter()
        m = step.step()
        times.append(time.perf_counter() - t0)
    return {"peak_rss_mb": peak_rss_mb(), "step_time_s": float(np.median(times[1:])), **m,
            "threads": torch.get_num_threads()}  # fmt: skip


def _run_child(kind: str, args, variant: str | None = None) -> dict:
    cmd = [sys.executable, "-m", "ngdiff_jax.bench.real_memory", "--child", kind, "--model", args.model,
           "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)]  # fmt: skip
    if args.data:
        cmd += ["--data", args.data]
    if variant:
        cmd += ["--variant", variant]
    before = _load()
    t0 = time.perf_counter()
    # a cold compile in every run: a cached executable would make the figures depend on earlier runs
    env = dict(os.environ, NGDIFF_COMPILATION_CACHE="0")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} {variant or ''} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res.update(load_before=before, load_after=_load(), wall_s=round(time.perf_counter() - t0, 1))
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(Path("~/.cache/ngdiff-jax/SmolLM2-135M-Instruct-hf-ref").expanduser()))
    p.add_argument("--data", default=None, help="TOFU folder (default: the shared data)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--variants", default="f32,f32_const,f32_remat,bf16_remat,bf16_all_remat,bf16_all_remat_scan,"
                   "lora8,lora8_scan,lora8_bf16_remat,lora8_bf16_remat_scan",
                   help=f"JAX variants among {', '.join(VARIANTS)}")
    p.add_argument("--json", default=None)
    p.add_argument("--torch-json", default=None, help="reuse a PyTorch result (a JSON object) instead of running it")
    p.add_argument("--child", choices=("jax", "torch"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child == "jax":
        print(json.dumps(child_jax(args, VARIANTS[args.variant])))
        return 0
    if args.child == "torch":
        print(json.dumps(child_torch(args)))
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}.")
    if args.torch_json:
        results = {"torch": json.loads(Path(args.torch_json).read_text())}
    else:
        results = {"torch": _run_child("torch", args)}
    print(f"torch: {results['torch']}", flush=True)
    for v in variants:
        results[v] = _run_child("jax", args, v)
        print(f"jax {v}: {results[v]}", flush=True)
    t = results["torch"]
    print(f"\nSmolLM2-class model {args.model}, batch {args.batch} x {args.seq}, {args.steps} steps, "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    print(f"{'run':<22} {'peak RSS MB':>12} {'x torch':>8} {'/ f32':>6} {'step s':>8} {'x torch':>8}  "
          "load before/after")
    f32 = results.get("f32", {}).get("peak_rss_mb")
    for name, r in results.items():
        rel = f"{r['peak_rss_mb'] / f32:>6.2f}" if f32 and name != "torch" else f"{'':>6}"
        print(f"{name:<22} {r['peak_rss_mb']:>12.0f} {r['peak_rss_mb'] / t['peak_rss_mb']:>8.2f} {rel} "
              f"{r['step_time_s']:>8.3f} {r['step_time_s'] / t['step_time_s']:>8.2f}  "
              f"{r.get('load_before', '?')} / {r.get('load_after', '?')}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
