"""`python train/finetune.py ...` == `ngdiff finetune ...` (see ngdiff_jax/commands/finetune.py)."""

import sys

from ngdiff_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
