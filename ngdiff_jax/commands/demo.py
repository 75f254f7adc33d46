"""``ngdiff demo``: the offline end-to-end demo (synthetic TOFU, tiny Llama, ga/gdiff/npo/ngdiff, report)."""

from __future__ import annotations

import argparse
import sys

HELP = (
    "Offline end-to-end demo: train a tiny Llama on a synthetic TOFU benchmark, sweep ngdiff and the "
    "baselines over initial rates x seeds (one compiled population per method), select each method's "
    "setting by a stated rule, and report intervals and the paper's two claims' verdicts."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory (new or empty).")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a much smaller run (the config's `quick:` section), for tests.",
    )
    parser.add_argument(
        "--config", "-c", default=None, help="demo YAML config (default: configs/demo.yaml)."
    )
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated subset of the config's sweep.methods to run, e.g. ngdiff,gdiff.",
    )
    parser.add_argument(
        "--strict", action="store_true",
        help="exit with status 3 if a claim's verdict is not 'supported' (verdicts are findings of the report; "
             "a failed hard check always exits 1).",
    )
    parser.add_argument(
        "--resume", action="store_true",
        help="continue an interrupted run in --out (same config): finished phases are loaded, not redone.",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bars / spinners.")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides, dotted keys (e.g. unlearn.steps=60 unlearn.runs.ngdiff.lr=2e-3).",
    )


def run(args: argparse.Namespace) -> int:
    from ngdiff_jax.config_loader import ConfigError
    from ngdiff_jax.demo import load_demo_config, run_demo

    names = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    try:
        cfg = load_demo_config(args.config, quick=args.quick, overrides=list(args.overrides), methods=names)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # tokenizer-loading notices would break up the progress display
    from ngdiff_jax.demo import StudyCheckFailed

    try:
        summary = run_demo(cfg, args.out, progress=not args.no_progress, resume=args.resume)
    except (FileExistsError, FileNotFoundError, KeyError, ValueError, StudyCheckFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.strict and any(v != "supported" for v in summary["claims"].values()):
        return 3
    return 0
