"""``ngdiff unlearn``: run an unlearning method (forget split + retain split) from a model."""

from __future__ import annotations

import sys

from ngdiff_jax.training.cli_args import add_config_arguments, print_config, print_summary, resolve

HELP = "Unlearn a forget split from a trained model with a method from configs/methods (ngdiff, npo, ...)."


def add_arguments(parser) -> None:
    add_config_arguments(parser, "method=ngdiff run.steps=50 optim.lr=1e-4")


def run(args) -> int:
    from ngdiff_jax.training.configs import UnlearnConfig

    cfg = resolve(UnlearnConfig, args)
    if cfg is None:
        return 2
    if args.print_config:
        print_config(cfg)
        return 0
    from ngdiff_jax.training.unlearn import run_unlearn

    try:
        _, summary = run_unlearn(cfg)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print_summary(summary)
    return 0
