"""``ngdiff sweep --config C``: a study config's sweep (methods x initial rates x seeds as one population
per method, the selection rule, the claims) run end to end; the same runner as ``ngdiff study``."""

from __future__ import annotations

from ngdiff_jax.commands import study as _study

HELP = (
    "Run a sweep config (configs/<name>.yaml with a sweep: section, e.g. tofu_smollm2): every method as one "
    "compiled population over its initial rates x seeds, each setting chosen by the stated rule, intervals and "
    "verdicts in the report; the same runner as `ngdiff study`."
)

add_arguments = _study.add_arguments
run = _study.run
