"""``ngdiff device-check``: the unlearning step's speed, MFU and memory, ``ngdiff eval`` against
transformers and the numerics tests on the accelerator, in one JSON (``ngdiff_jax.bench.device_check``;
docs/PERFORMANCE.md). Exit code 1 when a part failed, 2 for bad input."""

from __future__ import annotations

import argparse
import os
import sys

HELP = "Check an accelerator: time the 1B unlearning step (MFU, memory), ngdiff eval vs transformers, GPU tests."


def _csv(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ngdiff_jax.commands.argtypes import positive_float, positive_int

    parser.add_argument("--out", required=True, help="folder for device_check.json")
    parser.add_argument("--dry-run", action="store_true",
                        help="the same parts on CPU at the micro size, 2 timed steps, a one-row evaluation and "
                             "one test file (well under a minute)")  # fmt: skip
    parser.add_argument("--skip", type=_csv, default=(), help="comma-separated parts to skip: step, scan, eval, tests")
    parser.add_argument("--batch", type=positive_int, default=None, help="rows per task (default 8; dry run 2)")
    parser.add_argument("--seq", type=positive_int, default=None, help="sequence length (default 512; dry run 16)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="timed steps (default 12: three GeN cycles; dry run 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 4; dry run 1)")
    parser.add_argument("--remat", default=None, help="remat policy of the step's model (default none)")
    parser.add_argument("--data", default=None, help="TOFU folder of the eval part (default: ../shared/data/tofu)")
    parser.add_argument("--eval-model", default=None,
                        help="HF model dir for the eval part (default: a random SmolLM2-135M-shaped Llama)")
    parser.add_argument("--eval-limit", type=positive_int, default=None, help="rows per split (default 8; dry run 1)")
    parser.add_argument("--eval-new-tokens", type=positive_int, default=None,
                        help="TOFU answer length (default 64; dry run 4)")
    parser.add_argument("--eval-dtype", choices=("float32", "bfloat16"), default=None,
                        help="both evaluations' dtype (default float32)")
    parser.add_argument("--budget", type=positive_float, default=None,
                        help="seconds the whole check should take; subprocess timeouts are cut to fit "
                             "(default 450; dry run 300)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ngdiff_jax.errors import InputError

    # Before JAX's backend starts: no preallocation (the eval and test processes share the device).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    from ngdiff_jax.bench.device_check import CheckOptions, format_summary, run_check

    if args.remat is not None:
        from ngdiff_jax.models.modeling import REMAT_POLICIES

        if args.remat not in REMAT_POLICIES:
            raise InputError(f"--remat {args.remat}: choose from {', '.join(REMAT_POLICIES)}.")
    opts = CheckOptions.for_run(
        args.out, dry_run=args.dry_run, skip=args.skip, batch=args.batch, seq_len=args.seq, steps=args.steps,
        warmup=args.warmup, remat=args.remat, data=Path(args.data) if args.data else None,
        eval_model=Path(args.eval_model) if args.eval_model else None, eval_limit=args.eval_limit,
        eval_new_tokens=args.eval_new_tokens, eval_dtype=args.eval_dtype, budget_s=args.budget,
    )  # fmt: skip
    opts.validate()
    if opts.dry_run:
        import jax

        jax.config.update("jax_platforms", "cpu")  # a no-op where the backend already started on CPU
    result = run_check(opts)
    print(format_summary(result, opts.out / "device_check.json"))
    sys.stdout.flush()
    return 1 if result["failed"] else 0
