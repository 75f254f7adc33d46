"""`python train/unlearn.py ...` == `ngdiff unlearn ...` (see ngdiff_jax/commands/unlearn.py)."""

import sys

from ngdiff_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["unlearn", *sys.argv[1:]]))
