"""MGDA for two tasks: the min-norm point of the convex hull of the gradients.

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

Example:

  >>> import jax.numpy as jnp
  >>> from ngdiff_jax.optim import mgda
  >>> tx = mgda()
  >>> state = tx.init({"w": jnp.zeros(2)})
  >>> d, state = tx.update({"w": jnp.array([1.0, 0.0])}, state,
  ...                      forget_grads={"w": jnp.array([0.0, 1.0])})
  >>> d["w"].tolist()
  [0.5, 0.5]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ngdiff_jax.optim._base import (
    TwoTaskWeights,
    acc_dtype,
    safe_scale,
    shard_sum,
    tree_scaled_norm,
    two_task_combiner,
)

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


def mgda(*, clip_norm: float | None = None, axis_name=None) -> optax.GradientTransformationExtraArgs:
    """Two-task MGDA: the min-norm convex combination of ``g_r`` and ``g_f``.

    Args:
      clip_norm: clip each task's gradient to this global L2 norm first
        (separately; see :func:`~ngdiff_jax.optim.two_task_combiner`).
      axis_name: the mapped axis the gradients are sharded over under
        ``shard_map``/``pmap``; norms and inner products are summed over it.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with the combiners'
      calling convention (see :func:`ngdiff_jax.optim.ngdiff`); the state's
      ``retain_weight``/``forget_weight`` hold the convex weights.
    """

    def weights(g_r, g_f, m_r, m_f, axis_name):
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
        return TwoTaskWeights(w_r, w_f, tree_scaled_norm(g_r, m_r, axis_name), tree_scaled_norm(g_f, m_f, axis_name))

    return two_task_combiner(weights, "mgda", clip_norm=clip_norm, axis_name=axis_name)
