"""Populations: many runs of one method (seeds x learning rates x settings) as one compiled program.

* :mod:`~ngdiff_jax.population.members`: the ``population:`` section, its members and the
  settings they may vary;
* :mod:`~ngdiff_jax.population.step`: the step ``vmap``-ed over the member axis, with
  members stopped where they diverge;
* :mod:`~ngdiff_jax.population.streams`: each member's own batches, stacked.

The pipeline that trains, evaluates and exports a population is
:func:`ngdiff_jax.training.population_run.run_population`.
"""

from ngdiff_jax.population.members import (
    SETTINGS,
    Member,
    PopulationSection,
    concrete_configs,
    member_values,
    traced_configs,
)
from ngdiff_jax.population.step import MEMBER_AXIS, MemberState, init_member_state, population_step
from ngdiff_jax.population.streams import MemberStreams, stack_batches

__all__ = [
    "MEMBER_AXIS",
    "SETTINGS",
    "Member",
    "MemberState",
    "MemberStreams",
    "PopulationSection",
    "concrete_configs",
    "init_member_state",
    "member_values",
    "population_step",
    "stack_batches",
    "traced_configs",
]
