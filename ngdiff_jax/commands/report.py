"""``ngdiff report``: combine saved evaluation results into report.json / report.md / tradeoff.png."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "Write report.json, report.md and tradeoff.png from saved evaluation results."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "results", nargs="+", metavar="[NAME=]RESULT.json",
        help="saved results (from `ngdiff eval`); NAME defaults to the name stored in the file.",
    )  # fmt: skip
    parser.add_argument(
        "--trajectory", action="append", default=[], metavar="METHOD=R1.json,R2.json,...",
        help="checkpoint results of one run (steps from each file's meta.step, else their order); repeatable.",
    )  # fmt: skip
    parser.add_argument("--out", default="report", help="output folder (default: %(default)s).")
    parser.add_argument("--target", default="target", help="name of the target model (default: %(default)s).")
    parser.add_argument("--retain", default="retain", help="name of the retain model (default: %(default)s).")
    parser.add_argument("--title", default=None)


def _parse_results(items: list[str]) -> dict:
    from ngdiff_jax.evaluation import EvalResult

    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = None, item
        r = EvalResult.load(path)
        name = name or r.name
        if name in out:
            raise ValueError(f"Two results are named {name!r}; give one of them NAME=path.")
        out[name] = r
    return out


def _parse_trajectories(items: list[str]) -> dict:
    from ngdiff_jax.evaluation import EvalResult

    out = {}
    for item in items:
        method, sep, paths = item.partition("=")
        if not sep or not paths:
            raise ValueError(f"--trajectory expects METHOD=R1.json,R2.json, got {item!r}.")
        results = [EvalResult.load(p) for p in paths.split(",") if p]
        points = []
        for i, r in enumerate(results):
            step = r.meta.get("step", i) if isinstance(r.meta, dict) else i
            if isinstance(step, bool) or not isinstance(step, int):
                raise ValueError(f"{r.path}: meta.step={step!r} is not a whole number; set it to the training "
                                 "step of that checkpoint (ngdiff eval --step N) or remove it.")  # fmt: skip
            points.append((step, r))
        out[method] = points
    return out


def run(args) -> int:
    from ngdiff_jax.evaluation import write_report

    try:
        results = _parse_results(args.results)
        trajectories = _parse_trajectories(args.trajectory)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from ngdiff_jax.training.validation import validate_report

    validate_report(results, trajectories, args.out)  # before anything is written (exit code 2)
    paths = write_report(Path(args.out), results, trajectories or None,
                         target=args.target, retain=args.retain, title=args.title)  # fmt: skip
    for p in paths.values():
        print(f"wrote {p}")
    return 0
