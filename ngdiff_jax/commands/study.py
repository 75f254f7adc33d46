"""``ngdiff study``: the demo's runner on any study config (e.g. real TOFU on SmolLM2-135M-Instruct)."""

from __future__ import annotations

import argparse

from ngdiff_jax.commands import demo as _demo

HELP = (
    "Run a whole unlearning study from a config (configs/<name>.yaml, e.g. tofu_smollm2): fine-tune the "
    "target and retain models, unlearn with every method, evaluate (TOFU metrics), report; resumable."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _demo.add_arguments(parser)
    for a in parser._actions:
        if a.dest == "config":
            a.required = True
            a.help = "study YAML config: a name under configs/ (tofu_smollm2, demo) or a path."


def run(args: argparse.Namespace) -> int:
    return _demo.run(args)
