"""``ngdiff toy``: the two-task toy problem (GDiff vs NGDiff+GeN vs MGDA/PCGrad)."""

from __future__ import annotations

import argparse
import time

HELP = "Run the toy two-task unlearning problem and print forget/retain losses per method."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ngdiff_jax.commands.argtypes import positive_float, positive_int

    parser.add_argument(
        "--methods",
        default="gdiff,ngdiff+gen,mgda,pcgrad",
        help="comma-separated methods among gdiff, ngdiff, ngdiff+gen, mgda, pcgrad "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--steps", type=positive_int, default=100, help="unlearning steps (default: %(default)s)"
    )
    parser.add_argument(
        "--lr",
        type=positive_float,
        default=0.05,
        help="learning rate, initial rate for GeN (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="data seed (default: %(default)s)")
    parser.add_argument(
        "--no-adam", action="store_true", help="plain (normalized) gradient steps, no Adam"
    )


def run(args: argparse.Namespace) -> int:
    from ngdiff_jax.toy import METHODS, format_table, run_toy

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise SystemExit(f"ngdiff toy: unknown method(s) {unknown}; choose from {sorted(METHODS)}.")
    if args.steps < 1 or not args.lr > 0:
        raise SystemExit("ngdiff toy: --steps must be >= 1 and --lr > 0.")
    t0 = time.perf_counter()
    results = run_toy(
        methods, seed=args.seed, steps=args.steps, learning_rate=args.lr, adam=not args.no_adam
    )
    print(
        f"toy unlearning: softmax regression, forget set = 30 samples of retain class 0, "
        f"{args.steps} full-batch steps, Adam={'off' if args.no_adam else 'on'}, lr={args.lr}"
    )
    print(format_table(results))
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0
