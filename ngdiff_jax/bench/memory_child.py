"""One short training process for the memory section: ``python -m ngdiff_jax.bench.memory_child``.

Builds the model of a size preset, runs a few unlearning steps of one method in one
framework, and prints one JSON line: the process's peak resident memory (``VmHWM``, else ``ru_maxrss``),
its resident memory after imports (``baseline_rss_mb``, the libraries alone) and, for JAX,
the compiled step's memory analysis.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB.

    ``VmHWM`` from ``/proc/self/status`` where available: ``ru_maxrss`` survives ``execve``, so
    in a child started by a large parent it would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def run_jax(size, method: str, steps: int, dtype: str) -> dict:
    import jax

    from ngdiff_jax.bench import jax_side
    from ngdiff_jax.models import functional

    baseline = _rss_mb()
    model = jax_side.build_model(size, dtype)
    apply_fn, params = functional(model)
    del model
    fb, rb = (jax_side.device_batch(b) for b in jax_side.make_batches(size))
    cstep = jax_side.compile_step(apply_fn, params, fb, rb, method)
    # Fresh buffers: optax's init may share one buffer between state leaves, and a buffer
    # cannot be donated twice.
    params, opt_state = jax_side.copy_tree((params, cstep.opt_state))
    key = jax.random.key(0)
    for _ in range(steps):
        params, opt_state, metrics = cstep.compiled(params, opt_state, fb, rb, key)
    jax.block_until_ready((params, metrics))
    return {"baseline_rss_mb": baseline, "compiled": cstep.memory}


def run_torch(size, method: str, steps: int, dtype: str, device: str) -> dict:
    import torch
    import transformers

    from ngdiff_jax.bench import jax_side, torch_side

    if method != "ngdiff":
        raise ValueError(f"the PyTorch reference implements only the ngdiff step, not {method!r}.")
    baseline = _rss_mb()
    model = transformers.LlamaForCausalLM(size.hf_config()).to(device)
    fb, rb = (torch_side.torch_batch(b, device) for b in jax_side.make_batches(size))
    autocast = torch.bfloat16 if dtype == "bfloat16" else None
    step = torch_side.TorchNGDiffStep(model, fb, rb, autocast_dtype=autocast)
    for _ in range(steps):
        step.step()
    return {"baseline_rss_mb": baseline}


def main(argv: list[str] | None = None) -> int:
    from ngdiff_jax.bench.sizes import SIZES

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--framework", choices=("jax", "torch"), required=True)
    p.add_argument("--method", choices=("gdiff", "ngdiff", "ngdiff_gen"), required=True)
    p.add_argument("--size", choices=sorted(SIZES), required=True)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    size = SIZES[args.size]
    if args.framework == "jax":
        import jax

        jax.config.update("jax_platforms", "cuda,cpu" if args.device == "gpu" else "cpu")
        out = run_jax(size, args.method, args.steps, args.dtype)
    else:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        out = run_torch(size, args.method, args.steps, args.dtype,
                        "cuda" if args.device == "gpu" else "cpu")
    out.update(framework=args.framework, method=args.method, size=args.size, steps=args.steps,
               peak_rss_mb=peak_rss_mb())
    out["peak_above_baseline_mb"] = out["peak_rss_mb"] - out["baseline_rss_mb"]
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
