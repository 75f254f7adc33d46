"""``ngdiff bench``: the unlearning step against PyTorch, the cost of NGDiff and GeN,
generation speed and memory (see docs/PERFORMANCE.md)."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "Benchmark the unlearning step, NGDiff/GeN overhead, generation and memory against PyTorch."


def _csv(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ngdiff_jax.commands.argtypes import positive_int

    parser.add_argument("--sizes", type=_csv, default=None,
                        help="comma-separated step sizes among micro, 6m, 30m, 1b "
                             "(default: 6m,30m on CPU, 1b on GPU)")
    parser.add_argument("--overhead-size", default=None, help="size of the overhead section (default: first size)")
    parser.add_argument("--generate-size", default=None, help="size of the generate section (default: first size)")
    parser.add_argument("--memory-size", default=None, help="size of the memory section (default: first size)")
    parser.add_argument("--sections", type=_csv, default=("step", "overhead", "generate", "memory"),
                        help="comma-separated among step, overhead, generate, memory (default: all)")
    parser.add_argument("--repeats", type=positive_int, default=5,
                        help="timed repeats; figures are medians (default: 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing (default: 2)")
    parser.add_argument("--gen-every", type=positive_int, default=4, help="GeN probes every N steps (default: 4)")
    parser.add_argument("--gen-batch", type=positive_int, default=8, help="generation batch (default: 8)")
    parser.add_argument("--gen-prompt-len", type=positive_int, default=32,
                        help="generation prompt length (default: 32)")
    parser.add_argument("--gen-new-tokens", type=positive_int, default=64,
                        help="generated tokens per row (default: 64)")
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                        help="run on cpu or gpu; auto picks a GPU when JAX sees one (default: auto)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="compute dtype; params and optimizer state stay float32 "
                             "(default: float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch threads (default: the usable cores; XLA's CPU client uses them all)")
    parser.add_argument("--matmul-n", type=positive_int, default=None,
                        help="size of the square matmul giving the MFU reference rate "
                             "(default: 1024 on CPU, 8192 on GPU)")
    parser.add_argument("--memory-steps", type=positive_int, default=3, help="steps per memory process (default: 3)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object on stdout (the table goes to stderr)")
    parser.add_argument("--out", default=None, help="also write the JSON result to this file")


def _resolve_device(device: str) -> str:
    import os

    # On a GPU both frameworks share the card: keep XLA from preallocating most of its memory.
    # (Read when JAX's backend starts, which has not happened yet in this process.)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    if device == "cpu":
        jax.config.update("jax_platforms", "cpu")
        return "cpu"
    if device == "gpu":
        jax.config.update("jax_platforms", "cuda")
        return "gpu"
    return "gpu" if jax.default_backend() == "gpu" else "cpu"


def run(args: argparse.Namespace) -> int:
    device = _resolve_device(args.device)

    from ngdiff_jax.bench import BenchOptions, format_report, run_benchmark

    gpu = device == "gpu"
    sizes = args.sizes or (("1b",) if gpu else ("6m", "30m"))
    opts = BenchOptions(
        sizes=sizes,
        overhead_size=args.overhead_size or sizes[0],
        generate_size=args.generate_size or sizes[0],
        memory_size=args.memory_size or sizes[0],
        sections=args.sections,
        repeats=args.repeats,
        warmup=args.warmup,
        gen_every=args.gen_every,
        gen_batch=args.gen_batch,
        gen_prompt_len=args.gen_prompt_len,
        gen_new_tokens=args.gen_new_tokens,
        device=device,
        dtype=args.dtype or ("bfloat16" if gpu else "float32"),
        threads=args.threads,
        matmul_n=args.matmul_n or (8192 if gpu else 1024),
        memory_steps=args.memory_steps,
    )
    try:
        opts.validate()
    except ValueError as e:
        raise SystemExit(f"ngdiff bench: {e}") from None
    result = run_benchmark(opts)
    report = format_report(result)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    if args.json:
        print(report, file=sys.stderr)
        print(json.dumps(result))
    else:
        print(report)
    return 0
