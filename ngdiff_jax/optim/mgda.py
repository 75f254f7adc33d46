"""MGDA: the min-norm point of the convex hull of the task gradients.

The multiple-gradient descent algorithm (Désidéri 2012; Sener & Koltun 2018)
steps along the element of minimal norm in :math:`\\mathrm{conv}\\{g_r, g_f\\}`,
a common descent direction of both tasks whenever one exists. For two tasks
it has a closed form: minimizing :math:`\\lVert w_r g_r + w_f g_f \\rVert` with
:math:`w_r + w_f = 1,\\ w \\ge 0` gives

.. math::

  w_r = \\frac{g_f \\cdot (g_f - g_r)}{\\lVert g_r - g_f \\rVert^2}, \\qquad
  w_f = \\frac{g_r \\cdot (g_r - g_f)}{\\lVert g_r - g_f \\rVert^2},

clipped to :math:`[0, 1]` (a non-positive numerator puts all weight on the
other gradient). Both numerators are computed directly from the difference
``g_r - g_f`` (never as one minus the other), and in the interior the
denominator is their sum, a sum of two positive numbers: no cancellation, so
the small weight stays accurate in float32 when the norms are 10^6 apart.
Inner products are taken on ``g / s`` with ``s = max(max|g_r|, max|g_f|)``.

With k > 2 tasks there is no closed form: the weights minimize
:math:`w^\\top G w` over the simplex (:math:`G` the Gram matrix of the gradients, each
rescaled by the largest max-abs) exactly, by solving the KKT system of every support
(2^k - 1 systems of size k + 1, so k <= 12) and keeping the feasible solution of least
norm; Sener & Koltun's (2018) Frank-Wolfe solver only approaches it.

Example:

  >>> import jax.numpy as jnp
  >>> from ngdiff_jax.optim import TaskGrads, mgda
  >>> tx = mgda()
  >>> state = tx.init({"w": jnp.zeros(2)})
  >>> d, state = tx.update(TaskGrads(retain={"w": jnp.array([1.0, 0.0])},
  ...                                forget={"w": jnp.array([0.0, 1.0])}), state)
  >>> d["w"].tolist()
  [0.5, 0.5]
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from optax.experimental import aggregating

from ngdiff_jax.optim._base import (
    TaskWeights,
    acc_dtype,
    gram,
    safe_scale,
    shard_sum,
    task_combiner,
    tree_scaled_norm,
)
from ngdiff_jax.optim.tasks import TWO_TASKS, task_names

__all__ = ["mgda"]


def _numerators(g_r, g_f, s, axis_name):
    """``(g_r.(g_r-g_f), g_f.(g_f-g_r)) / s^2`` in one pass over the leaves."""

    def leaf(r, f):
        dt = jnp.promote_types(acc_dtype(r), acc_dtype(f))
        r = r.astype(dt) / s.astype(dt)
        f = f.astype(dt) / s.astype(dt)
        diff = r - f
        return jnp.stack([jnp.sum(r * diff), -jnp.sum(f * diff)]).astype(jnp.float32)

    lr, lf = jax.tree.leaves(g_r), jax.tree.leaves(g_f)
    parts = [leaf(r, f) for r, f in zip(lr, lf)]
    total = shard_sum(parts, list(zip(lr, lf)), axis_name, jnp.zeros((2,), jnp.float32))
    return total[0], total[1]


#: The most tasks :func:`mgda` takes (it solves one small system per subset of tasks).
MAX_TASKS = 12


def _min_norm_weights(g: jax.Array) -> jax.Array:
    """The point of the simplex minimizing ``w^T g w`` (``g`` a k x k Gram matrix), exactly: for
    every support S the KKT system ``[[g_SS, 1], [1^T, 0]] [w_S; nu] = [0; 1]`` is solved and
    the feasible (``w >= 0``) solution of least ``w^T g w`` is kept (2^k - 1 systems of size
    k + 1, batched)."""
    k = g.shape[0]
    masks = np.array([[(m >> i) & 1 for i in range(k)] for m in range(1, 2**k)], bool)  # [M, k]
    n = masks.shape[0]
    a = np.zeros((n, k + 1, k + 1), np.float32)
    a[:, :k, k] = masks
    a[:, k, :k] = masks
    a[:, np.arange(k), np.arange(k)] = ~masks  # rows of tasks outside S: w_i = 0
    inside = jnp.asarray(masks[:, :, None] & masks[:, None, :])
    kkt = jnp.asarray(a).at[:, :k, :k].add(jnp.where(inside, g[None], 0.0))
    rhs = jnp.zeros((n, k + 1), g.dtype).at[:, k].set(1.0)
    w = jnp.linalg.solve(kkt, rhs[..., None])[..., :k, 0]
    value = jnp.einsum("mi,ij,mj->m", w, g, w)
    ok = jnp.all(jnp.isfinite(w), axis=1) & jnp.all(w >= -1e-6, axis=1)
    best = jnp.argmin(jnp.where(ok, value, jnp.inf))
    return jnp.clip(w[best], 0.0, None) / jnp.sum(jnp.clip(w[best], 0.0, None))


def mgda(*, tasks: Sequence[str] = TWO_TASKS, clip_norm: float | None = None,
         axis_name=None) -> aggregating.Aggregator:
    """MGDA: the min-norm convex combination of the task gradients.

    Args:
      tasks: the names of the tasks of the :class:`~ngdiff_jax.optim.TaskGrads` it receives,
        in order (default ``("retain", "forget")``: the closed form).
      clip_norm: clip each task's gradient to this global L2 norm first
        (separately; see :func:`~ngdiff_jax.optim.task_combiner`).
      axis_name: the mapped axis the gradients are sharded over under
        ``shard_map``/``pmap``; norms and inner products are summed over it.

    Returns:
      An ``optax.experimental.aggregating.Aggregator`` with the combiners'
      calling convention (see :func:`ngdiff_jax.optim.ngdiff`); the state's
      ``weights`` hold the convex weights.
    """

    tasks = task_names(tasks, "mgda")
    if len(tasks) > MAX_TASKS:
        raise ValueError(f"mgda: at most {MAX_TASKS} tasks (an exact solve per subset of tasks), got {len(tasks)}.")

    def two(grads, maxes, axis_name):
        (g_r, g_f), (m_r, m_f) = grads, maxes
        s = safe_scale(jnp.maximum(m_r, m_f))
        num_f, num_r = _numerators(g_r, g_f, s, axis_name)
        den = num_r + num_f
        interior = (num_r > 0) & (num_f > 0)
        safe_den = jnp.where(interior, den, 1.0)
        w_r = jnp.where(
            interior, num_r / safe_den, jnp.where(num_r > 0, 1.0, jnp.where(num_f > 0, 0.0, 0.5))
        )
        w_f = jnp.where(
            interior, num_f / safe_den, jnp.where(num_f > 0, 1.0, jnp.where(num_r > 0, 0.0, 0.5))
        )
        return TaskWeights((w_r, w_f), (tree_scaled_norm(g_r, m_r, axis_name), tree_scaled_norm(g_f, m_f, axis_name)))

    def several(grads, maxes, axis_name):
        scales, g = gram(grads, maxes, axis_name)
        # w^T G w with G_ij = s_i s_j g_ij; dividing by max(s)^2 keeps it finite for norms 1e30 apart
        rel = scales / jnp.max(scales)
        w = _min_norm_weights(rel[:, None] * rel[None, :] * g)
        norms = tuple(scales[i] * jnp.sqrt(g[i, i]) for i in range(len(grads)))
        return TaskWeights(tuple(w[i] for i in range(len(grads))), norms)

    return task_combiner(two if len(tasks) == 2 else several, "mgda", tasks=tasks, clip_norm=clip_norm,
                         axis_name=axis_name)  # fmt: skip
