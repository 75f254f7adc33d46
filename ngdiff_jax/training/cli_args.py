"""Argument handling shared by the `ngdiff finetune` and `ngdiff unlearn` subcommands."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ngdiff_jax.config_loader import ConfigError, load_config, to_dict


def add_config_arguments(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument(
        "--config",
        "-c",
        default=None,
        help="YAML config: a path, or a name under configs/experiments (e.g. tofu_ngdiff).",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help=f"overrides, dotted keys for nesting, values parsed as YAML (e.g. {example}).",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit.")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (same as run.progress=false).")


def resolve(cls, args):
    """Build the config, printing a one-line error (exit code 2) for config problems."""
    overrides = list(args.overrides)
    if {"model", "model_path"} <= {f.name for f in dataclasses.fields(cls)}:
        overrides = _model_source_wins(overrides)
    if args.no_progress:
        overrides.append("run.progress=false")
    try:
        cfg = load_config(cls, args.config, overrides, subdir="experiments")
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    out_dir = getattr(getattr(cfg, "run", None), "output_dir", None)
    if out_dir is None:
        return cfg
    from ngdiff_jax.training.ownership import resolve_path

    written = resolve_path(Path(out_dir).expanduser() / "config.yaml")
    if args.config and Path(args.config).is_file() and resolve_path(args.config) == written:
        print(f"error: --config {args.config} is the config.yaml this run writes into run.output_dir "
              f"({out_dir}) and would be overwritten: copy it elsewhere (e.g. configs/) and pass "
              "that copy.", file=sys.stderr)  # fmt: skip
        return None
    return cfg


def _model_source_wins(overrides: list[str]) -> list[str]:
    """``model_path=X`` on the command line replaces a config's ``model`` section (and
    ``model=Y`` a config's ``model_path``): the command line names the model source."""
    keys = [o.split("=", 1)[0].strip() for o in overrides if "=" in o]
    sets_path = any(k == "model_path" for k in keys) and not any(
        o.replace(" ", "") == "model_path=null" for o in overrides
    )
    sets_model = any(k == "model" or k.startswith("model.") for k in keys)
    if sets_path and not sets_model:
        return [*overrides, "model=null"]
    if sets_model and not any(k == "model_path" for k in keys):
        return [*overrides, "model_path=null"]
    return overrides


def run_command(args, cls, run_fn) -> int:
    """Resolve the config ``cls`` from ``args``, then ``run_fn(cfg) -> (result, summary)``.

    Exit codes: 0 done, 2 config or input error (found before any work), 1 failed run
    (missing model/data/split, I/O error, divergence); the CLI's error boundary
    (``ngdiff_jax.errors.describe``) turns the exceptions into one-line messages.
    """
    cfg = resolve(cls, args)
    if cfg is None:
        return 2
    if args.print_config:
        print_config(cfg)
        return 0
    _, summary = run_fn(cfg)
    print_summary(summary)
    return 0


def print_config(cfg) -> None:
    import yaml

    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")


def print_summary(summary: dict) -> None:
    if "population" in summary:  # one line per member
        pop = summary["population"]
        print(f"population: {pop['members']} members in {pop['chunks']} chunk(s) on {pop['devices']} device(s), "
              f"{pop['num_steps']} steps, {pop['wall_s']:.1f} s")  # fmt: skip
        for r in summary["members"]:
            m = r["last_metrics"]
            state = f"DIVERGED (stopped at step {r['stopped_at']})" if r["diverged"] else "ok"
            print(f"  {r['key']}  {r['name']:40s}  forget_loss {m.get('forget_loss', float('nan')):.4g}  "
                  f"retain_loss {m.get('retain_loss', float('nan')):.4g}  {state}  {r.get('model_dir', '')}")
        return
    keep = {k: v for k, v in summary.items() if k != "evals"}
    if summary.get("evals"):
        keep["first_eval"] = summary["evals"][0]
        keep["last_eval"] = summary["evals"][-1]
    print(json.dumps(keep, indent=2, default=str))
