"""``ngdiff readme``: the README's demo results from the committed report (docs/results/demo)."""

from __future__ import annotations

import argparse
import sys

HELP = "Regenerate the README's demo-results block from docs/results/demo (or copy a finished demo there first)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source", default=None,
                        help="a finished `ngdiff demo --out` directory: copy its report into --results first.")
    parser.add_argument("--results", default="docs/results/demo", help="the committed report (default: %(default)s).")
    parser.add_argument("--readme", default="README.md", help="the README to rewrite (default: %(default)s).")
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if the README's block differs from what the report gives.")


def run(args: argparse.Namespace) -> int:
    from ngdiff_jax.sweep.readme import copy_results, sync_readme

    try:
        if args.source:
            if args.check:
                print("error: --from copies a report; it cannot be combined with --check.", file=sys.stderr)
                return 2
            copy_results(args.source, args.results)
        ok = sync_readme(args.readme, args.results, check=args.check)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check and not ok:
        print(f"error: {args.readme}'s demo results differ from {args.results}/report.json; run `ngdiff readme`.",
              file=sys.stderr)
        return 1
    print(f"{args.readme}: demo results {'up to date' if ok else 'rewritten'} from {args.results}")
    return 0
