"""`python eval/evaluate.py ...` == `ngdiff eval ...` (see ngdiff_jax/commands/evaluate.py)."""

import sys

from ngdiff_jax.cli import console

if __name__ == "__main__":
    sys.exit(console(["eval", *sys.argv[1:]]))
