"""`python train/unlearn.py ...` == `ngdiff unlearn ...` (see ngdiff_jax/commands/unlearn.py)."""

import sys

from ngdiff_jax.cli import hide_torch, main

if __name__ == "__main__":
    hide_torch(["unlearn", *sys.argv[1:]])
    sys.exit(main(["unlearn", *sys.argv[1:]]))
