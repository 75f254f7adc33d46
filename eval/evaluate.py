"""`python eval/evaluate.py ...` == `ngdiff eval ...` (see ngdiff_jax/commands/evaluate.py)."""

import sys

from ngdiff_jax.cli import hide_torch, main

if __name__ == "__main__":
    hide_torch(["eval", *sys.argv[1:]])
    sys.exit(main(["eval", *sys.argv[1:]]))
