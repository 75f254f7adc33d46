"""The greedy decode loop on unrolled blocks against the same loop on a scanned model (`CausalLM(...,
scan_layers=True)`): compile time and time per decoded token, one process per variant.

    python -m ngdiff_jax.bench.decode_scan --model ~/.cache/ngdiff-jax/SmolLM2-135M-Instruct-hf-ref

Each variant decodes ``--new-tokens`` tokens for ``--batch`` rows after a KV cache of ``--prompt``
slots (the loop of `ngdiff_jax.models.generation.greedy_decode`, every row decoding to the end),
in a fresh process with no persistent compilation cache. Prints one line per variant and a JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from ngdiff_jax import models
from ngdiff_jax.models.generation import greedy_decode

VARIANTS = ("unrolled", "scanned")


def _child(a) -> dict:
    model = models.from_pretrained(a.model, scan_layers=a.variant == "scanned")
    B, P, N = a.batch, a.prompt, a.new_tokens
    graphdef, state = nnx.split(model)

    @partial(jax.jit, static_argnums=0)
    def decode(graphdef, state, logits, cache, kv_valid, last):
        m = nnx.merge(graphdef, state)
        return greedy_decode(m, logits, cache, kv_valid, last, P, jnp.ones(B, bool), N, 0, eos=(), n_buf=N)

    cache = model.init_cache(B, P + N)
    logits = jnp.zeros((B, model.config.vocab_size))
    kv_valid = jnp.concatenate([jnp.ones((B, P), jnp.int32), jnp.zeros((B, N), jnp.int32)], 1)
    last = jnp.full((B,), P - 1, jnp.int32)
    t = time.perf_counter()
    fn = decode.lower(graphdef, state, logits, cache, kv_valid, last).compile()
    compile_s = time.perf_counter() - t
    fn(state, logits, cache, kv_valid, last).block_until_ready()  # warm-up
    runs = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        tokens = fn(state, logits, cache, kv_valid, last).block_until_ready()
        runs.append(time.perf_counter() - t)
    return {"variant": a.variant, "compile_s": round(compile_s, 2), "decode_s": [round(r, 2) for r in runs],
            "ms_per_token": round(1000 * min(runs) / N, 1), "tokens": jax.device_get(tokens).tolist()}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=os.path.expanduser("~/.cache/ngdiff-jax/SmolLM2-135M-Instruct-hf-ref"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=1024, help="filled cache slots before decoding")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # the child process
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.variant:
        print(json.dumps(_child(a)))
        return 0
    env = dict(os.environ, NGDIFF_COMPILATION_CACHE="0", PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    results = {"batch": a.batch, "prompt": a.prompt, "new_tokens": a.new_tokens, "runs": []}
    for v in [x.strip() for x in a.variants.split(",") if x.strip()]:
        if v not in VARIANTS:
            p.error(f"--variants: {v!r} is not one of {', '.join(VARIANTS)}")
        load = [round(x, 2) for x in os.getloadavg()]
        cmd = [sys.executable, "-m", "ngdiff_jax.bench.decode_scan", *(argv or sys.argv[1:]), "--variant", v]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{v} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["load_before"] = load
        results["runs"].append(r)
        print(f"{v:9s} compile {r['compile_s']:.1f} s, {a.new_tokens} tokens x {a.batch} rows after {a.prompt} "
              f"slots: {r['decode_s']} s ({r['ms_per_token']} ms per token) | load {load}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=2)
    if len({json.dumps(r["tokens"]) for r in results["runs"]}) > 1:
        print("error: the variants decoded different tokens", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
