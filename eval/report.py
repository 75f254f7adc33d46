"""`python eval/report.py ...` == `ngdiff report ...` (see ngdiff_jax/commands/report.py)."""

import sys

from ngdiff_jax.cli import console

if __name__ == "__main__":
    sys.exit(console(["report", *sys.argv[1:]]))
