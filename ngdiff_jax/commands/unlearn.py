"""``ngdiff unlearn``: run an unlearning method (forget split + retain split) from a model."""

from __future__ import annotations

from ngdiff_jax.training.cli_args import add_config_arguments, run_command

HELP = "Unlearn a forget split from a trained model with a method from configs/methods (ngdiff, npo, ...)."


def add_arguments(parser) -> None:
    add_config_arguments(parser, "method=ngdiff run.steps=50 optim.lr=1e-4")


def run(args) -> int:
    from ngdiff_jax.training.config_schema import UnlearnConfig
    from ngdiff_jax.training.unlearn import run_unlearn

    return run_command(args, UnlearnConfig, run_unlearn)
