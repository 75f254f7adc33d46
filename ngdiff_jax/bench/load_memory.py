"""Peak host memory of `ngdiff_jax.models.from_pretrained` on a random checkpoint.

    python -m ngdiff_jax.bench.load_memory [--size-mb 500] [--dir DIR] [--mesh] [--keep]

Writes a random float32 llama checkpoint of about ``--size-mb`` (tensor by tensor, without
building a model), then loads it in a fresh process and reports, as JSON, the RSS after
imports and a config read (``baseline_mb``; transformers' config classes import torch when it
is installed), the peak RSS (``peak_mb``, from ``getrusage``), and the ratio of
the load's own peak (``peak - baseline``) to the checkpoint's size. The target is <= 1.3.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, resource, sys, time
import psutil
import jax, jax.numpy as jnp
from ngdiff_jax.models import from_pretrained
import transformers
# Reading a config through transformers imports torch when it is installed (~250 MB RSS):
# a library cost, not the load's, so it is paid before the baseline.
transformers.AutoConfig.from_pretrained(sys.argv[1])
jnp.zeros(1).block_until_ready()
proc = psutil.Process()
base = proc.memory_info().rss
mesh = None
if sys.argv[2] == "mesh":
    mesh = jax.make_mesh((1, len(jax.devices()), 1), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
t = time.time()
m = from_pretrained(sys.argv[1], mesh=mesh)
jax.block_until_ready(jax.tree.leaves(jax.tree.map(lambda x: x, __import__("flax").nnx.state(m))))
dt = time.time() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"baseline_bytes": base, "peak_bytes": peak, "after_bytes": proc.memory_info().rss,
                  "load_seconds": dt}))
"""


def write_random_checkpoint(out: Path, size_mb: float, seed: int = 0) -> int:
    """A random llama checkpoint of about ``size_mb`` MB (float32); returns its size in bytes."""
    import numpy as np
    import transformers
    from flax import nnx

    from ngdiff_jax.models.config import ModelConfig
    from ngdiff_jax.models.hf import flat_params, specs_for
    from ngdiff_jax.models.modeling import CausalLM
    from ngdiff_jax.models.safetensors_io import write_safetensors

    hidden, inter, vocab = 1024, 2816, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    fixed = 2 * vocab * hidden + hidden
    layers = max(1, round((size_mb * 1e6 / 4 - fixed) / per_layer))
    hf = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                  num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
                                  max_position_embeddings=2048, tie_word_embeddings=False)
    hf.architectures = ["LlamaForCausalLM"]
    cfg = ModelConfig.from_hf(hf)
    abstract = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))
    flat = flat_params(nnx.state(abstract, nnx.Param))
    specs = specs_for(cfg, {k: tuple(v.shape) for k, v in flat.items()})
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    entries = [(s.hf_name, s.hf_shape, np.float32,
                lambda s=s: rng.standard_normal(s.hf_shape, dtype=np.float32) * np.float32(0.02))
               for s in specs.values()]
    write_safetensors(out / "model.safetensors", entries, {"format": "pt"})
    return (out / "model.safetensors").stat().st_size


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=500.0)
    ap.add_argument("--dir", type=Path, default=None, help="where to write the checkpoint (default: a temp dir)")
    ap.add_argument("--mesh", action="store_true", help="load through the mesh (NamedSharding) path")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint")
    args = ap.parse_args(argv)
    tmp = None
    d = args.dir
    if d is None:
        tmp = tempfile.TemporaryDirectory()
        d = Path(tmp.name) / "ckpt"
    try:
        size = write_random_checkpoint(d, args.size_mb)
        env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
        r = subprocess.run([sys.executable, "-c", _CHILD, str(d), "mesh" if args.mesh else "single"],
                           capture_output=True, text=True, env=env)
        if r.returncode != 0:
            print(r.stderr, file=sys.stderr)
            return 1
        res = json.loads(r.stdout.strip().splitlines()[-1])
        mb = 1e6
        report = {
            "checkpoint_mb": round(size / mb, 1),
            "baseline_mb": round(res["baseline_bytes"] / mb, 1),
            "peak_mb": round(res["peak_bytes"] / mb, 1),
            "after_load_mb": round(res["after_bytes"] / mb, 1),
            "load_peak_over_checkpoint": round((res["peak_bytes"] - res["baseline_bytes"]) / size, 3),
            "load_seconds": round(res["load_seconds"], 2),
            "path": "mesh" if args.mesh else "single-device",
        }
        print(json.dumps(report, indent=2))
        return 0
    finally:
        if tmp is not None and not args.keep:
            tmp.cleanup()


if __name__ == "__main__":
    raise SystemExit(main())
