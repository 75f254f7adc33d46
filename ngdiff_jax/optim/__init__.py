"""Task-gradient combiners, the GeN learning rate and the paper's optimizer.

The gradients of an unlearning step travel through optax as one value,
``TaskGrads(retain=g_r, forget=g_f)`` (or k named tasks), gradients of losses being
*minimized* (for gradient ascent the forget objective is ``-NLL``). Combiners are
``optax.experimental.aggregating.Aggregator``s from it to one direction:
``update(task_grads, state, params=None, **extra_args)``. :func:`unlearning_optimizer`
chains a combiner, Adam and GeN into the optimizer of Bu, Jin et al. (2024).
docs/optim.md gives the composition rules (what goes before and after a
combiner, accumulation, masking, sharding, meta-gradients).
"""

from ngdiff_jax.optim._base import CombinerState, TaskWeights, task_combiner
from ngdiff_jax.optim.gdiff import gdiff
from ngdiff_jax.optim.gen import GeNState, GivenRateGeNState, gen_rate_estimate, scale_by_gen
from ngdiff_jax.optim.guarded_adam import scale_by_guarded_adam
from ngdiff_jax.optim.mgda import mgda
from ngdiff_jax.optim.ngdiff import ngdiff
from ngdiff_jax.optim.pcgrad import pcgrad
from ngdiff_jax.optim.stats import inject_stats
from ngdiff_jax.optim.task_optimizer import TaskOptimizer
from ngdiff_jax.optim.tasks import PerTaskState, TaskGrads, per_task
from ngdiff_jax.optim.unlearning import (
    COMBINERS,
    RateState,
    SkipNonFiniteState,
    clip_by_total_norm,
    scale_by_rate,
    skip_if_nonfinite,
    unlearning_optimizer,
)

__all__ = [
    "COMBINERS",
    "CombinerState",
    "GeNState",
    "GivenRateGeNState",
    "RateState",
    "SkipNonFiniteState",
    "PerTaskState",
    "TaskGrads",
    "TaskOptimizer",
    "TaskWeights",
    "clip_by_total_norm",
    "gdiff",
    "gen_rate_estimate",
    "inject_stats",
    "mgda",
    "ngdiff",
    "pcgrad",
    "scale_by_gen",
    "scale_by_rate",
    "scale_by_guarded_adam",
    "skip_if_nonfinite",
    "per_task",
    "task_combiner",
    "unlearning_optimizer",
]
