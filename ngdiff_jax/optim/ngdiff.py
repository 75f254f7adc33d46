"""NGDiff: the normalized gradient difference (Bu, Jin et al., 2024).

Unlearning is a multi-task problem: keep the retain loss :math:`L_r` low while
driving the forget objective :math:`L_f` down (for gradient ascent
:math:`L_f = -\\mathrm{NLL}_{forget}`, which is unbounded below). With
:math:`g_r = \\nabla L_r` and :math:`g_f = \\nabla L_f`, NGDiff steps along

.. math::

  d = \\frac{g_r}{\\lVert g_r \\rVert + \\epsilon} + \\frac{g_f}{\\lVert g_f \\rVert + \\epsilon},

global L2 norms over all leaves; with k tasks (several forget sets)
:math:`d = \\sum_i g_i / (\\lVert g_i \\rVert + \\epsilon)`. Each task gets the same say whatever the size
of its gradient, so a gradient-ascent forget gradient that grows without bound
cannot swamp the retain task (the failure of plain gradient difference). A
zero gradient contributes zero (never NaN). ``d`` is a *gradient-like*
direction: chain it in front of an optax optimizer, which subtracts it.

Norms are computed on ``g / max|g|`` and rescaled, so the result stays accurate
in float32 when the two norms are 10^6 or 10^20 apart.

Example:

  >>> import jax.numpy as jnp, optax
  >>> from ngdiff_jax.optim import TaskGrads, ngdiff
  >>> params = {"w": jnp.zeros(2)}
  >>> tx = optax.chain(ngdiff(), optax.sgd(0.1))
  >>> state = tx.init(params)
  >>> g_r, g_f = {"w": jnp.array([3.0, 4.0])}, {"w": jnp.array([0.0, -1e6])}
  >>> updates, state = tx.update(TaskGrads(retain=g_r, forget=g_f), state, params)
  >>> [round(float(x), 4) for x in updates["w"]]
  [-0.06, 0.02]
  >>> three = ngdiff(tasks=("retain", "books", "news"))   # two forget sets
  >>> d, _ = three.update(TaskGrads(retain=g_r, books=g_f, news={"w": jnp.array([2.0, 0.0])}),
  ...                     three.init(params))
  >>> [round(float(x), 4) for x in d["w"]]
  [1.6, -0.2]
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
from optax.experimental import aggregating

from ngdiff_jax.optim._base import TaskWeights, concrete, task_combiner, tree_scaled_norm
from ngdiff_jax.optim.tasks import TWO_TASKS

__all__ = ["ngdiff"]


def ngdiff(eps: float = 1e-12, *, tasks: Sequence[str] = TWO_TASKS, clip_norm: float | None = None,
           axis_name=None) -> aggregating.Aggregator:
    """Normalized gradient difference: ``d = sum_i g_i/(|g_i|+eps)`` (``g_r/(|g_r|+eps) + g_f/(|g_f|+eps)``).

    Args:
      eps: added to each global norm before dividing (>= 0). A gradient whose
        norm is exactly zero always contributes zero.
      tasks: the names of the tasks of the :class:`~ngdiff_jax.optim.TaskGrads` it receives,
        in order (default ``("retain", "forget")``).
      clip_norm: clip each task's gradient to this global L2 norm first
        (separately; see :func:`~ngdiff_jax.optim.task_combiner`).
      axis_name: the mapped axis the gradients are sharded over under
        ``shard_map``/``pmap``; norms and inner products are summed over it.

    Returns:
      An ``optax.experimental.aggregating.Aggregator``; ``update(task_grads, state,
      params=None, **extra_args)`` returns the direction (params' structure and dtypes)
      and a :class:`~ngdiff_jax.optim.CombinerState`. If any entry of any task gradient
      is NaN/Inf the direction is all zeros and ``state.skipped`` is incremented.
    """
    if concrete(eps) and not eps >= 0:
        raise ValueError(f"ngdiff: eps must be >= 0, got {eps!r}.")

    def weights(grads, maxes, axis_name):
        norms = tuple(tree_scaled_norm(g, m, axis_name) for g, m in zip(grads, maxes))
        return TaskWeights(tuple(jnp.where(n > 0, 1.0 / (n + eps), 0.0) for n in norms), norms)

    return task_combiner(weights, "ngdiff", tasks=tasks, clip_norm=clip_norm, axis_name=axis_name)
