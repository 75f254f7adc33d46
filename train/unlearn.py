"""`python train/unlearn.py ...` == `ngdiff unlearn ...` (see ngdiff_jax/commands/unlearn.py)."""

import sys

from ngdiff_jax.cli import console

if __name__ == "__main__":
    sys.exit(console(["unlearn", *sys.argv[1:]]))
