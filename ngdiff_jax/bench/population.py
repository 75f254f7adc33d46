"""The population axis against the same runs one after another, and its memory with LoRA.

``python -m ngdiff_jax.bench.population speed`` — ``--members`` (8) runs of the demo's unlearning
(its tiny Llama architecture, NGDiff + GeN, ``--steps`` 40 steps of 8 forget + 8 retain rows,
the synthetic benchmark): as one population (:func:`ngdiff_jax.training.population_run.run_population`),
as the same ``ngdiff unlearn`` runs one after another in one process, and as the PyTorch step
(transformers + torch autograd, NGDiff arithmetic, Adam; fixed rate) run after run. Each side in
its own fresh process (one import of JAX/torch each), every run exporting its model; wall times
side by side with the load average. Target: population <= 0.4x the sequential runs.

``python -m ngdiff_jax.bench.population memory --model <SmolLM2 dir>`` — the peak RSS (``VmHWM``,
compile included) of ``ngdiff unlearn`` with LoRA r8 (``--config tofu_ngdiff``, TOFU forget10 /
retain90, batch 4 x 128; by default the memory-lean run of docs/LORA.md: bfloat16 base, remat,
scanned blocks) as a population of ``--members`` (4) against the single run. Target: <= 1.3x.
Each member computes on its own batch, so activations grow with the members; remat keeps them
to the blocks' inputs.

Wrap it in ``flock <lockfile>`` on a shared machine so that no other large job runs beside it.
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

from ngdiff_jax.bench.real_memory import peak_rss_mb

DEMO_MODEL = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
              "rms_norm_eps": 1e-6, "tie_word_embeddings": True}  # fmt: skip


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _members(n: int) -> tuple[list[int], list[float]]:
    """``n`` members as 2 rates x ``n // 2`` seeds."""
    if n < 2 or n % 2:
        raise SystemExit(f"--members={n}: use an even number >= 2 (2 rates x members/2 seeds).")
    return list(range(n // 2)), [1e-4, 3e-4]


def _prepare(root: Path) -> tuple[Path, Path]:
    """The synthetic benchmark and a demo-size Llama (random weights; the timing does not depend
    on them) with its trained tokenizer, saved like a finetune export."""
    from flax import nnx

    from ngdiff_jax import models
    from ngdiff_jax.data import load_tofu, synthetic, train_tokenizer

    data = synthetic.write_benchmark(root / "tofu", n_authors=20, questions_per_author=10, seed=0)
    rows = load_tofu("full", data)
    tok = train_tokenizer([r["question"] + " " + r["answer"] for r in rows], root / "tok", vocab_size=1024)
    model = models.from_config({**DEMO_MODEL, "vocab_size": len(tok)}, rngs=nnx.Rngs(0))
    models.save_pretrained(model, root / "model", tokenizer=tok)
    return data, root / "model"


def _unlearn_overrides(model: Path, data: Path, out: Path, steps: int) -> list[str]:
    return [f"model_path={model}", f"data.source={data}", f"run.output_dir={out}", f"run.steps={steps}",
            "run.checkpoint_every=0", "run.eval_every=0", "run.progress=false", "run.log_every=10",
            "data.batch_size=8", "data.max_length=56", "data.buckets=[56]", "data.forget_split=forget10",
            "data.retain_split=retain90"]  # fmt: skip


def child_speed(side: str, root: Path, members: int, steps: int) -> dict:
    seeds, rates = _members(members)
    data, model = root / "tofu", root / "model"
    runs_dir = Path(tempfile.mkdtemp(dir=root, prefix=f"{side}-"))  # every side writes its own runs
    t0 = time.perf_counter()
    if side == "jax_population":
        from ngdiff_jax.config_loader import load_config
        from ngdiff_jax.training import UnlearnConfig
        from ngdiff_jax.training.population_run import run_population

        overrides = _unlearn_overrides(model, data, runs_dir / "pop", steps)
        overrides += [f"population.seeds={seeds}", f"population.lr={rates}"]
        cfg = load_config(UnlearnConfig, "synthetic_ngdiff", overrides, subdir="experiments")
        res = run_population(cfg)
        runs = len(res.results)
    elif side == "jax_sequential":
        from ngdiff_jax.config_loader import load_config
        from ngdiff_jax.training import UnlearnConfig, run_unlearn

        runs = 0
        for lr in rates:
            for s in seeds:
                cfg = load_config(UnlearnConfig, "synthetic_ngdiff", _unlearn_overrides(
                    model, data, runs_dir / f"seq_{lr:g}_{s}", steps) + [f"run.seed={s}", f"optim.lr={lr}"],
                    subdir="experiments")  # fmt: skip
                run_unlearn(cfg)
                runs += 1
    elif side == "torch_sequential":
        runs = _torch_runs(model, data, seeds, rates, steps, runs_dir)
    else:
        raise SystemExit(f"unknown side {side!r}")
    wall = round(time.perf_counter() - t0, 2)
    return {"side": side, "runs": runs, "wall_s": wall, "peak_mb": round(peak_rss_mb(), 1)}


def _torch_runs(model: Path, data: Path, seeds, rates, steps: int, root: Path) -> int:
    """Each run: load the model, ``steps`` PyTorch NGDiff steps on its own seed's batches (the same
    batcher as ngdiff), save the model."""
    import torch

    from ngdiff_jax.bench.torch_side import TorchNGDiffStep, load_hf_model, torch_batch
    from ngdiff_jax.config_loader import load_config
    from ngdiff_jax.training import UnlearnConfig, data_assembly, model_io

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = load_config(UnlearnConfig, "synthetic_ngdiff", _unlearn_overrides(model, data, root / "t", steps),
                      subdir="experiments")  # fmt: skip
    tok = model_io.load_tokenizer(str(model))
    ex = {s: data_assembly.encode_split(data_assembly.load_split(cfg.data, s), tok, cfg.data)
          for s in ("forget10", "retain90")}  # fmt: skip
    runs = 0
    for lr in rates:
        for s in seeds:
            m = load_hf_model(model, "cpu", "float32")
            fb = data_assembly.make_batcher(ex["forget10"], tok, cfg.data, seed=s)
            rb = data_assembly.make_batcher(ex["retain90"], tok, cfg.data, seed=s + 1)
            st = TorchNGDiffStep(m, None, None, lr=lr)
            for _ in range(steps):
                st.fb = {k: v for k, v in torch_batch(next(fb), "cpu").items()}
                st.rb = {k: v for k, v in torch_batch(next(rb), "cpu").items()}
                st.step()
            m.save_pretrained(str(root / f"torch_{lr:g}_{s}"))
            runs += 1
    return runs


#: the memory-lean LoRA run of docs/LORA.md: a bfloat16 base, remat of every block, the blocks scanned
LEAN_LORA = ("lora.rank=8", "precision.params=bfloat16", "precision.compute=bfloat16", "precision.export=float32",
             "run.remat=full", "run.scan_layers=true")  # fmt: skip


def child_memory(model: str, data: str | None, members: int, steps: int, out: Path, extra: list[str],
                 at_once: int) -> dict:  # fmt: skip
    from ngdiff_jax.cli import console

    o = [f"model_path={model}", f"run.output_dir={out}", f"run.steps={steps}", "run.checkpoint_every=0",
         "run.eval_every=0", "run.progress=false", "data.batch_size=4", "data.max_length=128", "data.buckets=[128]",
         *extra, "population.export=false" if members > 1 else "run.log_every=1"]  # fmt: skip
    if data:
        o.append(f"data.source={data}")
    if members > 1:
        o += [f"population.seeds={list(range(members))}"] + ([f"population.at_once={at_once}"] if at_once else [])
    t0 = time.perf_counter()
    rc = console(["unlearn", "--config", "tofu_ngdiff", *o])
    wall = round(time.perf_counter() - t0, 2)
    return {"members": members, "rc": rc, "wall_s": wall, "peak_mb": round(peak_rss_mb(), 1)}


def _child(argv: list[str], env=None) -> dict:
    p = subprocess.run([sys.executable, "-m", "ngdiff_jax.bench.population", *argv], capture_output=True, text=True,
                       env=env)  # fmt: skip
    if p.returncode != 0:
        raise SystemExit(f"child {argv} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    sp = sub.add_parser("speed")
    sp.add_argument("--members", type=int, default=8)
    sp.add_argument("--steps", type=int, default=40)
    sp.add_argument("--no-torch", action="store_true", help="leave out the PyTorch side")
    sp.add_argument("--cpu-devices", type=int, default=0,
                    help="also run the population with the host's cores as this many simulated CPU devices "
                         "(--xla_force_host_platform_device_count; members spread over them)")
    sp.add_argument("--out", default=None, help="write the figures as JSON here")
    mp = sub.add_parser("memory")
    mp.add_argument("--model", required=True, help="SmolLM2-135M-Instruct HF directory (`ngdiff convert`)")
    mp.add_argument("--data", default=None, help="TOFU folder (default: the shared copy)")
    mp.add_argument("--members", type=int, default=4)
    mp.add_argument("--steps", type=int, default=4)
    mp.add_argument("--out", default=None)
    mp.add_argument("--at-once", type=int, default=1,
                    help="population.at_once: members computed together (0: all of them)")
    mp.add_argument("--lora", default=",".join(LEAN_LORA),
                    help="comma-separated overrides of the LoRA run (default: %(default)s)")
    ch = sub.add_parser("_child")
    ch.add_argument("args", nargs="+")
    args = ap.parse_args(argv)
    if args.what == "_child":
        kind, *rest = args.args
        if kind == "speed":
            res = child_speed(rest[0], Path(rest[1]), int(rest[2]), int(rest[3]))
        else:
            res = child_memory(rest[0], rest[1] or None, int(rest[2]), int(rest[3]), Path(rest[4]),
                               [x for x in rest[5].split(",") if x], int(rest[6]))  # fmt: skip
        print(json.dumps(res))
        return 0
    env = dict(os.environ, NGDIFF_COMPILATION_CACHE="0")  # every side compiles, as a first run does
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.what == "speed":
            _prepare(root)
            sides = [("jax_population", env)]
            if args.cpu_devices > 1:
                flags = env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.cpu_devices}"
                sides.append(("jax_population", {**env, "XLA_FLAGS": flags.strip()}))
            sides += [("jax_sequential", env)] + ([] if args.no_torch else [("torch_sequential", env)])
            for side, side_env in sides:
                before = _load()
                r = _child(["_child", "speed", side, str(root), str(args.members), str(args.steps)], side_env)
                if side_env is not env:
                    r["side"] += f" ({args.cpu_devices} CPU devices)"
                rows.append({**r, "load_before": before, "load_after": _load()})
            seq = next(r for r in rows if r["side"] == "jax_sequential")["wall_s"]
            print(f"{args.members} runs x {args.steps} steps (demo-size Llama, NGDiff + GeN; "
                  "PyTorch: NGDiff, fixed rate)")
            head = f"{'side':32s} {'runs':>4s} {'wall s':>8s} {'/ sequential':>12s} {'peak MB':>8s}"
            print(head + "  load before -> after")
            for r in rows:
                print(f"{r['side']:32s} {r['runs']:4d} {r['wall_s']:8.1f} {r['wall_s'] / seq:12.2f} {r['peak_mb']:8.0f}"
                      f"  {r['load_before']} -> {r['load_after']}")  # fmt: skip
        else:
            for k in (1, args.members):
                before = _load()
                r = _child(["_child", "memory", args.model, args.data or "", str(k), str(args.steps),
                            str(root / f"m{k}"), args.lora, str(args.at_once)], env)  # fmt: skip
                rows.append({**r, "load_before": before, "load_after": _load()})
            one = rows[0]["peak_mb"]
            print(f"ngdiff unlearn --config tofu_ngdiff {args.lora.replace(',', ' ')}: {Path(args.model).name}, "
                  f"TOFU forget10/retain90, batch 4 x 128, {args.steps} steps; population.at_once="
                  f"{args.at_once or 'all'}")  # fmt: skip
            print(f"{'members':>7s} {'peak MB':>8s} {'x one':>6s} {'wall s':>7s}  load before -> after")
            for r in rows:
                print(f"{r['members']:7d} {r['peak_mb']:8.0f} {r['peak_mb'] / one:6.2f} {r['wall_s']:7.1f}"
                      f"  {r['load_before']} -> {r['load_after']}")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps({"what": args.what, "rows": rows, "cpus": os.cpu_count()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
