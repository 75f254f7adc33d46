"""PCGrad (Yu et al., 2020, "Gradient Surgery for Multi-Task Learning").

When the two gradients conflict (:math:`c = g_r \\cdot g_f < 0`), each is
projected onto the normal plane of the *original* other one and the results
are summed; otherwise they are simply summed:

.. math::

  d = \\Big(g_r - \\frac{c}{\\lVert g_f\\rVert^2} g_f\\Big)
    + \\Big(g_f - \\frac{c}{\\lVert g_r\\rVert^2} g_r\\Big)
    = \\Big(1 - \\frac{c}{\\lVert g_r\\rVert^2}\\Big) g_r
    + \\Big(1 - \\frac{c}{\\lVert g_f\\rVert^2}\\Big) g_f .

With two tasks the result does not depend on the projection order, so no
random shuffling is needed. Each weight is computed directly; with ``c < 0``
both are ``1 + |c|/|g|^2``, a sum of positives. The ratios
``c/|g_r|^2 = (|g_f|/|g_r|) cos`` are formed from per-gradient rescaled
inner products, so they are accurate in float32 for norms 10^6 (or 10^20)
apart.

With k > 2 tasks each gradient is projected in turn on the normal plane of every other
original gradient it conflicts with, in the tasks' order (the paper shuffles the order at
random each step; a fixed order keeps the step a deterministic function of its inputs), and
the projected gradients are summed. Every projected gradient is a combination of the original
ones, so only the k x k Gram matrix of the rescaled gradients is needed.

Example:

  >>> import jax.numpy as jnp
  >>> from ngdiff_jax.optim import TaskGrads, pcgrad
  >>> tx = pcgrad()
  >>> state = tx.init({"w": jnp.zeros(2)})
  >>> d, state = tx.update(TaskGrads(retain={"w": jnp.array([1.0, 0.0])},
  ...                                forget={"w": jnp.array([-1.0, 1.0])}), state)
  >>> d["w"].tolist()
  [0.5, 1.5]
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
from optax.experimental import aggregating

from ngdiff_jax.optim._base import TaskWeights, gram, safe_scale, task_combiner, tree_scaled_vdot
from ngdiff_jax.optim.tasks import TWO_TASKS, task_names

__all__ = ["pcgrad"]


def pcgrad(*, tasks: Sequence[str] = TWO_TASKS, clip_norm: float | None = None,
           axis_name=None) -> aggregating.Aggregator:
    """PCGrad (projecting conflicting gradients).

    Args:
      tasks: the names of the tasks of the :class:`~ngdiff_jax.optim.TaskGrads` it receives,
        in order, which is also the projection order for k > 2 (default ``("retain", "forget")``).
      clip_norm: clip each task's gradient to this global L2 norm first
        (separately; see :func:`~ngdiff_jax.optim.task_combiner`).
      axis_name: the mapped axis the gradients are sharded over under
        ``shard_map``/``pmap``; norms and inner products are summed over it.

    Returns:
      An ``optax.experimental.aggregating.Aggregator`` with the combiners'
      calling convention (see :func:`ngdiff_jax.optim.ngdiff`).
    """

    def two(grads, maxes, axis_name):
        (g_r, g_f), (m_r, m_f) = grads, maxes
        s_r, s_f = safe_scale(m_r), safe_scale(m_f)
        rr = tree_scaled_vdot(g_r, g_r, s_r, s_r, axis_name)
        ff = tree_scaled_vdot(g_f, g_f, s_f, s_f, axis_name)
        rf = tree_scaled_vdot(g_r, g_f, s_r, s_f, axis_name)
        conflict = (rf < 0) & (rr > 0) & (ff > 0)
        # c / |g_r|^2 = (s_f / s_r) rf / rr  and  c / |g_f|^2 = (s_r / s_f) rf / ff.
        c_over_rr = (s_f / s_r) * rf / jnp.where(rr > 0, rr, 1.0)
        c_over_ff = (s_r / s_f) * rf / jnp.where(ff > 0, ff, 1.0)
        w_r = jnp.where(conflict, 1.0 - c_over_rr, 1.0)
        w_f = jnp.where(conflict, 1.0 - c_over_ff, 1.0)
        return TaskWeights((w_r, w_f), (s_r * jnp.sqrt(rr), s_f * jnp.sqrt(ff)))

    def several(grads, maxes, axis_name):
        # g_i = s_i h_i with h_i = g_i / s_i and G = [h_i . h_j]; a projected gradient is
        # sum_j a_j h_j and projecting it off g_j subtracts ((a . G[:, j]) / G_jj) h_j.
        scales, g = gram(grads, maxes, axis_name)
        k = len(grads)
        total = jnp.zeros((k,), jnp.float32)
        for i in range(k):
            a = jnp.zeros((k,), jnp.float32).at[i].set(scales[i])
            for j in range(k):
                if j == i:
                    continue
                c = a @ g[:, j]
                project = (c < 0) & (g[j, j] > 0)
                a = a.at[j].add(jnp.where(project, -c / jnp.where(g[j, j] > 0, g[j, j], 1.0), 0.0))
            total = total + a
        weights = tuple(total[j] / scales[j] for j in range(k))
        return TaskWeights(weights, tuple(scales[i] * jnp.sqrt(g[i, i]) for i in range(k)))

    tasks = task_names(tasks, "pcgrad")
    return task_combiner(two if len(tasks) == 2 else several, "pcgrad", tasks=tasks, clip_norm=clip_norm,
                         axis_name=axis_name)  # fmt: skip
