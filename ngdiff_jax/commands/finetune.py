"""``ngdiff finetune``: train a causal LM on a QA split (TOFU target or retain model)."""

from __future__ import annotations

from ngdiff_jax.training.cli_args import add_config_arguments, run_command

HELP = "Train or fine-tune a causal LM on a TOFU-style QA split (from configs/models or a pretrained path)."


def add_arguments(parser) -> None:
    add_config_arguments(parser, "model=tiny_llama data.split=full run.steps=300 optim.lr=1e-3")


def run(args) -> int:
    from ngdiff_jax.training.config_schema import FinetuneConfig
    from ngdiff_jax.training.finetune import run_finetune

    return run_command(args, FinetuneConfig, run_finetune)
