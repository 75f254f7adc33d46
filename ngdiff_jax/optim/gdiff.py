"""GDiff: the classic (weighted) gradient difference.

With :math:`g_r = \\nabla L_r` (retain loss) and :math:`g_f = \\nabla L_f`
(forget objective as minimized, e.g. :math:`-\\mathrm{NLL}` for gradient
ascent), gradient difference minimizes :math:`w_r L_r + w_f L_f`:

.. math::

  d = w_r \\, g_r + w_f \\, g_f .

This is the baseline NGDiff improves on: as the gradient-ascent forget loss
diverges its gradient keeps its size (or grows), and a fixed scalarization
lets it dominate and destroy the retain task (see ``ngdiff toy``).

Example:

  >>> import jax.numpy as jnp
  >>> from ngdiff_jax.optim import TaskGrads, gdiff
  >>> tx = gdiff(retain_weight=1.0, forget_weight=0.5)
  >>> state = tx.init({"w": jnp.zeros(2)})
  >>> g = TaskGrads(retain={"w": jnp.array([1.0, 2.0])}, forget={"w": jnp.array([4.0, -2.0])})
  >>> d, state = tx.update(g, state)
  >>> d["w"].tolist()
  [3.0, 1.0]
  >>> three = gdiff(weights={"retain": 1.0, "a": 0.5, "b": 0.25})   # k tasks: a weight per task
  >>> d, _ = three.update(TaskGrads(retain=g.retain, a=g.forget, b={"w": jnp.array([4.0, 4.0])}),
  ...                     three.init({"w": jnp.zeros(2)}))
  >>> d["w"].tolist()
  [4.0, 2.0]
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
from optax.experimental import aggregating

from ngdiff_jax.optim._base import TaskWeights, task_combiner, tree_scaled_norm

__all__ = ["gdiff"]


def gdiff(
    retain_weight: float = 1.0, forget_weight: float = 1.0, *, weights: Mapping[str, float] | None = None,
    clip_norm: float | None = None, axis_name=None,
) -> aggregating.Aggregator:
    """Gradient difference ``d = retain_weight * g_r + forget_weight * g_f`` (``sum_i w_i g_i``).

    Args:
      retain_weight: weight of the retain gradient.
      forget_weight: weight of the forget gradient (of the forget objective as
        minimized; do not negate it here).
      weights: for k tasks, ``{task name: weight}`` in the order of the
        :class:`~ngdiff_jax.optim.TaskGrads` it receives (replaces the two weights).
      clip_norm: clip each task's gradient to this global L2 norm first
        (separately; see :func:`~ngdiff_jax.optim.task_combiner`).
      axis_name: the mapped axis the gradients are sharded over under
        ``shard_map``/``pmap``; norms and inner products are summed over it.

    Returns:
      An ``optax.experimental.aggregating.Aggregator`` with the combiners'
      calling convention (see :func:`ngdiff_jax.optim.ngdiff`).
    """
    if weights is not None and not isinstance(weights, Mapping):
        raise ValueError(f"gdiff: weights must map task names to weights, e.g. {{'retain': 1.0, 'forget': 0.5}}; "
                         f"got {type(weights).__name__}.")  # fmt: skip
    if weights is None:
        weights = {"retain": retain_weight, "forget": forget_weight}
    elif (retain_weight, forget_weight) != (1.0, 1.0):
        raise ValueError("gdiff: pass either weights= or retain_weight/forget_weight, not both.")
    ws = tuple(jnp.asarray(w, jnp.float32) for w in weights.values())

    def rule(grads, maxes, axis_name):
        return TaskWeights(ws, tuple(tree_scaled_norm(g, m, axis_name) for g, m in zip(grads, maxes)))

    return task_combiner(rule, "gdiff", tasks=tuple(weights), clip_norm=clip_norm, axis_name=axis_name)
