"""`python eval/report.py ...` == `ngdiff report ...` (see ngdiff_jax/commands/report.py)."""

import sys

from ngdiff_jax.cli import hide_torch, main

if __name__ == "__main__":
    hide_torch(["report", *sys.argv[1:]])
    sys.exit(main(["report", *sys.argv[1:]]))
