"""Layer scan or unrolled blocks: the measurement behind issue 11's "layer scan, decide by measurement".

``python -m ngdiff_jax.bench.layer_scan [--model <HF dir>] [--steps 3]`` compiles the same
two-task NGDiff step (GA forget + NLL retain, each gradient normalized by its global norm,
Adam, donated params and state) on a real model twice, one process each:

* ``unrolled``: the model's parameters as they are (one tree per block), the blocks called in
  a Python loop, so XLA sees every block's ops (what `ngdiff_jax.models.CausalLM` does);
* ``scan``: the blocks' parameters stacked on a leading layer axis and the same
  :class:`~ngdiff_jax.models.modeling.Block` run by ``jax.lax.scan`` over it (MaxText's
  ``scan_layers``, levanter's ``Stacked``): XLA compiles one block.

It prints, per variant, the compile time, the compiler's peak resident memory above what was
resident before it started (``VmHWM``), the resident memory the compiled program keeps
(RSS after compiling and ``malloc_trim``, minus RSS before, caches cleared), XLA's temporary
bytes and the step times (the first includes warm-up). Both variants compute the same step;
the script checks that their first-step losses agree.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_MODEL = Path.home() / ".cache" / "ngdiff-jax" / "SmolLM2-135M-Instruct-hf-ref"


def _rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(model_dir: str, scan: bool, steps: int, batch: int, seq: int) -> dict:
    import gc

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from ngdiff_jax import models
    from ngdiff_jax.backends.cpu.host_memory import release_freed_memory

    model = models.from_pretrained(model_dir)
    block_def, _ = nnx.split(model.layers[0])
    norm_def, _ = nnx.split(model.final_norm)
    blocks = [nnx.state(layer, nnx.Param) for layer in model.layers]
    if scan:
        blocks = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
    params = {"blocks": blocks, "embed": model.embed[...], "norm": nnx.state(model.final_norm, nnx.Param)}
    if not model.config.tie_embeddings:
        raise SystemExit("layer_scan: the script's head is the tied embedding; use a tied-embedding model")
    del model  # the blocks' graphdef carries the model's backend (its kernels)

    def nll(p, ids):
        B, T = ids.shape
        pos = jnp.broadcast_to(jnp.arange(T), (B, T))
        valid = jnp.ones((B, T), jnp.int32)
        x = jnp.take(p["embed"], ids, axis=0)

        def block(x, st):
            return nnx.merge(block_def, st)(x, pos, valid)[0], None

        if scan:
            x, _ = jax.lax.scan(block, x, p["blocks"])
        else:
            for st in p["blocks"]:
                x, _ = block(x, st)
        x = nnx.merge(norm_def, p["norm"])(x)
        logp = jax.nn.log_softmax(jnp.einsum("bte,ve->btv", x[:, :-1], p["embed"]))
        return -jnp.take_along_axis(logp, ids[:, 1:, None], -1).mean()

    tx = optax.adam(1e-5)

    def step(p, opt, forget, retain):
        lf, gf = jax.value_and_grad(lambda q: -nll(q, forget))(p)
        lr, gr = jax.value_and_grad(nll)(p, retain)
        nf, nr = optax.global_norm(gf), optax.global_norm(gr)
        d = jax.tree.map(lambda a, b: a / nf + b / nr, gf, gr)
        u, opt = tx.update(d, opt, p)
        return optax.apply_updates(p, u), opt, (lf, lr)

    rng = jax.random.key(0)
    forget = jax.random.randint(rng, (batch, seq), 0, 1000)
    retain = jax.random.randint(jax.random.fold_in(rng, 1), (batch, seq), 0, 1000)
    gc.collect()
    release_freed_memory()
    before = _rss_mb()
    t = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, jax.eval_shape(tx.init, params), forget,
                                                          retain).compile()  # fmt: skip
    compile_s = time.perf_counter() - t
    compile_peak_mb = _rss_mb("VmHWM") - before  # the compiler's own peak, above what was resident
    jax.clear_caches()
    gc.collect()
    release_freed_memory()
    program_mb = _rss_mb() - before
    temp_mb = compiled.memory_analysis().temp_size_in_bytes / 2**20
    opt = tx.init(params)
    times, losses = [], None
    for _ in range(steps):
        t = time.perf_counter()
        params, opt, out = compiled(params, opt, forget, retain)
        jax.block_until_ready(params)
        times.append(round(time.perf_counter() - t, 3))
        losses = losses or [float(x) for x in out]
    return {"compile_s": round(compile_s, 2), "compile_peak_mb": round(compile_peak_mb),
            "program_mb": round(program_mb), "temp_mb": round(temp_mb),
            "step_s": times, "first_losses": losses}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--child", choices=("scan", "unrolled"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.model, a.child == "scan", a.steps, a.batch, a.seq)))
        return 0
    rows = {}
    for name in ("unrolled", "scan"):
        load = os.getloadavg()
        proc = subprocess.run([sys.executable, "-m", "ngdiff_jax.bench.layer_scan", "--child", name,
                               "--model", a.model, "--steps", str(a.steps), "--batch", str(a.batch),
                               "--seq", str(a.seq)], capture_output=True, text=True)  # fmt: skip
        if proc.returncode != 0:
            raise SystemExit(f"layer_scan {name} failed:\n{proc.stderr[-3000:]}")
        rows[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        rows[name]["load"] = [round(x, 2) for x in load] + [round(x, 2) for x in os.getloadavg()]
    u, s = rows["unrolled"], rows["scan"]
    agree = max(abs(x - y) for x, y in zip(u["first_losses"], s["first_losses"]))
    print(f"model {a.model}, batch {a.batch} x {a.seq}, {a.steps} steps, {len(os.sched_getaffinity(0))} CPUs")
    head = f"{'variant':10s} {'compile s':>9s} {'compile peak MB':>15s} {'program MB':>10s} {'temps MB':>9s}"
    print(f"{head}  step s (first incl. warm-up)  load before + after")
    for name, r in rows.items():
        figures = f"{r['compile_s']:9.1f} {r['compile_peak_mb']:15.0f} {r['program_mb']:10.0f} {r['temp_mb']:9.0f}"
        print(f"{name:10s} {figures}  {r['step_s']}  {r['load']}")
    print(f"first-step losses agree to {agree:.2e}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
