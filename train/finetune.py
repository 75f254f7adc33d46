"""`python train/finetune.py ...` == `ngdiff finetune ...` (see ngdiff_jax/commands/finetune.py)."""

import sys

from ngdiff_jax.cli import console

if __name__ == "__main__":
    sys.exit(console(["finetune", *sys.argv[1:]]))
