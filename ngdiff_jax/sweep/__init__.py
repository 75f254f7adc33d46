"""Sweeps: methods x initial rates x seeds, a stated selection rule, intervals and verdicts.

* :mod:`~ngdiff_jax.sweep.config`: the ``sweep:`` section of a study config;
* :mod:`~ngdiff_jax.sweep.runner`: each method's populations, evaluated member by member;
* :mod:`~ngdiff_jax.sweep.analysis`: selection, intervals, paired comparisons, spreads, verdicts;
* :mod:`~ngdiff_jax.sweep.report`: ``report.json`` / ``report.md`` / ``sensitivity.png`` / ``tradeoff.png``;
* :mod:`~ngdiff_jax.sweep.readme`: the README's demo block, generated from the committed report.

See docs/POPULATION.md.
"""
