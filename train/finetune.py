"""`python train/finetune.py ...` == `ngdiff finetune ...` (see ngdiff_jax/commands/finetune.py)."""

import sys

from ngdiff_jax.cli import hide_torch, main

if __name__ == "__main__":
    hide_torch(["finetune", *sys.argv[1:]])
    sys.exit(main(["finetune", *sys.argv[1:]]))
