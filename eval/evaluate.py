"""`python eval/evaluate.py ...` == `ngdiff eval ...` (see ngdiff_jax/commands/evaluate.py)."""

import sys

from ngdiff_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
