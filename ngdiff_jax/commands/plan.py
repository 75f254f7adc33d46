"""``ngdiff plan``: per-device memory of the unlearning step for a model size, compiled ahead of
time from abstract shapes (no weights allocated), for every combination of precision, remat,
LoRA and mesh; next to the analytic estimate. See ``ngdiff_jax.parallel.plan`` and docs/SCALING.md."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys

HELP = "Compile the unlearning step from abstract shapes and print XLA's per-device memory (no weights)."

PRECISIONS = {  # name -> (params, compute, moments)
    "f32": ("float32", "float32", "float32"),
    "bf16": ("bfloat16", "bfloat16", "float32"),  # bf16 weights and compute, float32 Adam moments
    "mixed": ("float32", "bfloat16", "float32"),  # float32 master weights and moments, bf16 compute
    "bf16-all": ("bfloat16", "bfloat16", "bfloat16"),
}


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ngdiff_jax.commands.argtypes import positive_int
    from ngdiff_jax.parallel.plan import MODEL_PRESETS

    parser.add_argument("--model", default="llama2-7b",
                        help=f"a preset ({', '.join(MODEL_PRESETS)}) or a config.json path (default: %(default)s)")
    parser.add_argument("--batch", type=positive_int, default=4,
                        help="global batch (rows per task) (default: %(default)s)")
    parser.add_argument("--seq", type=positive_int, default=512, help="sequence length (default: %(default)s)")
    parser.add_argument("--precision", default="f32,bf16",
                        help=f"comma-separated among {', '.join(PRECISIONS)} (default: %(default)s)")
    parser.add_argument("--remat", default="none,full", help="comma-separated remat policies (default: %(default)s)")
    parser.add_argument("--lora", default="0", help="comma-separated LoRA ranks, 0 = full finetuning (default: 0)")
    parser.add_argument("--mesh", default="none",
                        help="comma-separated meshes: none (one device) or PRESET=N, e.g. fsdp=8 (default: none)")
    parser.add_argument("--micro-batches", type=positive_int, default=1)
    parser.add_argument("--method", default="ngdiff",
                        help="the unlearning method compiled, a name in configs/methods (default: %(default)s)")
    parser.add_argument("--layers", default="extrapolate",
                        help="extrapolate (compile 2 and 4 blocks, scale to the depth), full, or a number of blocks")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")  # fmt: skip


def _meshes(spec: str) -> list[tuple[str, int]]:
    out = []
    for m in _csv(spec):
        if m == "none":
            out.append(("none", 1))
            continue
        name, _, n = m.partition("=")
        if name not in ("dp", "fsdp", "fsdp_tensor") or not n.isdigit() or int(n) < 1:
            raise ValueError(f"--mesh {m!r}: use none or PRESET=N with PRESET one of dp, fsdp, fsdp_tensor.")
        out.append((name, int(n)))
    return out


def run(args: argparse.Namespace) -> int:
    from ngdiff_jax.training.config_schema import available_methods

    if args.method not in available_methods():
        raise ValueError(f"--method {args.method!r}: not a method in configs/methods; choose from "
                         f"{', '.join(available_methods())}.")  # fmt: skip
    from ngdiff_jax.training.config_schema import load_method

    m = load_method(args.method)
    if m.needs_reference or m.needs_hidden:
        raise ValueError(f"--method {args.method}: its step reads a frozen reference model (or a hidden state), "
                         "which plan does not compile; use --method gdiff, the same step without the reference's "
                         "forward pass.")  # fmt: skip
    meshes = _meshes(args.mesh)
    for p in _csv(args.precision):
        if p not in PRECISIONS:
            raise ValueError(f"--precision {p!r}: choose from {', '.join(PRECISIONS)}.")
    need = max(n for _, n in meshes)
    if need > 1 and os.environ.get("NGDIFF_PLAN_CHILD") != "1":
        # simulated CPU devices must be configured before JAX starts: run the plan in a child process
        env = dict(os.environ, NGDIFF_PLAN_CHILD="1", JAX_PLATFORMS="cpu",
                   XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={need}"))
        argv = ["plan", "--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq),
                "--precision", args.precision, "--remat", args.remat, "--lora", args.lora, "--mesh", args.mesh,
                "--micro-batches", str(args.micro_batches), "--layers", str(args.layers),
                "--method", args.method]  # fmt: skip
        if args.json:
            argv += ["--json", args.json]
        return subprocess.call([sys.executable, "-m", "ngdiff_jax.cli", *argv], env=env)
    from ngdiff_jax.parallel.plan import format_rows, plan_step

    model = args.model
    if os.path.isfile(model):
        with open(model) as f:
            model = json.load(f)
    layers = args.layers if args.layers in ("extrapolate", "full") else int(args.layers)
    rows = []
    combos = itertools.product(_csv(args.precision), _csv(args.remat), [int(x) for x in _csv(args.lora)], meshes)
    for prec, remat, rank, (mesh, n) in combos:
        pd, cd, md = PRECISIONS[prec]
        row = plan_step(model, batch=args.batch, seq=args.seq, params_dtype=pd, compute_dtype=cd, moments_dtype=md,
                        remat=remat, lora_rank=rank, mesh_preset=mesh, devices=n, micro_batches=args.micro_batches,
                        layers=layers, method=args.method)  # fmt: skip
        rows.append(row)
        print(format_rows([row]).splitlines()[-1] if len(rows) > 1 else format_rows([row]), flush=True)
    print("\nGiB per device (memory_analysis of the program compiled for this host; peak = arguments + outputs"
          " - donated + temporaries;"
          " estimate = params + gradients + optimizer state [+ frozen base]); TFLOP/step: XLA's cost_analysis"
          f" of one {args.method} step per device (with --micro-batches k > 1 XLA counts the accumulation loop's"
          " body once: read FLOPs from --micro-batches 1)")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_dict() for r in rows], f, indent=1)
    return 0
