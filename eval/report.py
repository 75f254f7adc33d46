"""`python eval/report.py ...` == `ngdiff report ...` (see ngdiff_jax/commands/report.py)."""

import sys

from ngdiff_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
