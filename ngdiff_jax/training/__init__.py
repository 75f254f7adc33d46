"""Training: methods (config -> objectives + optax chain), jitted steps, loop, orbax checkpoints.

The core is functional: :func:`make_unlearn_step` returns a pure, jittable
``step(params, opt_state, forget_batch, retain_batch, rng, ref_params=None)``;
:func:`run_loop` drives any such step with checkpoints, logging and resume;
:func:`run_unlearn` / :func:`run_finetune` are the pipelines behind the CLI.
"""

from ngdiff_jax.training.checkpoint import Checkpointer
from ngdiff_jax.training.config_schema import (
    DataConfig,
    DistributedSection,
    FinetuneConfig,
    MeshSection,
    MethodConfig,
    ModelSpec,
    OptimConfig,
    RunConfig,
    UnlearnConfig,
)
from ngdiff_jax.training.loop import LoopResult, run_loop, steps_for_epochs
from ngdiff_jax.training.methods import (
    available_methods,
    forget_objective,
    learning_rate_schedule,
    load_method,
    make_finetune_optimizer,
    make_optimizer,
    retain_objective,
)
from ngdiff_jax.training.step import make_finetune_step, make_unlearn_step, reference_logp_sum


def run_unlearn(*args, **kwargs):
    """See :func:`ngdiff_jax.training.unlearn.run_unlearn`."""
    from ngdiff_jax.training.unlearn import run_unlearn as f

    return f(*args, **kwargs)


def run_finetune(*args, **kwargs):
    """See :func:`ngdiff_jax.training.finetune.run_finetune`."""
    from ngdiff_jax.training.finetune import run_finetune as f

    return f(*args, **kwargs)


__all__ = [
    "Checkpointer",
    "DataConfig",
    "DistributedSection",
    "FinetuneConfig",
    "LoopResult",
    "MeshSection",
    "MethodConfig",
    "ModelSpec",
    "OptimConfig",
    "RunConfig",
    "UnlearnConfig",
    "available_methods",
    "forget_objective",
    "learning_rate_schedule",
    "load_method",
    "make_finetune_optimizer",
    "make_finetune_step",
    "make_optimizer",
    "make_unlearn_step",
    "reference_logp_sum",
    "retain_objective",
    "run_finetune",
    "run_loop",
    "run_unlearn",
    "steps_for_epochs",
]
