"""``ngdiff finetune``: train a causal LM on a QA split (TOFU target or retain model)."""

from __future__ import annotations

import sys

from ngdiff_jax.training.cli_args import add_config_arguments, print_config, print_summary, resolve

HELP = "Train or fine-tune a causal LM on a TOFU-style QA split (from configs/models or a pretrained path)."


def add_arguments(parser) -> None:
    add_config_arguments(parser, "model=tiny_llama data.split=full run.steps=300 optim.lr=1e-3")


def run(args) -> int:
    from ngdiff_jax.training.configs import FinetuneConfig

    cfg = resolve(FinetuneConfig, args)
    if cfg is None:
        return 2
    if args.print_config:
        print_config(cfg)
        return 0
    from ngdiff_jax.training.finetune import run_finetune

    try:
        _, summary = run_finetune(cfg)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print_summary(summary)
    return 0
