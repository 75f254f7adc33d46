"""PCGrad for two tasks (Yu et al., 2020, "Gradient Surgery for Multi-Task Learning").

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

Example:

  >>> import jax.numpy as jnp
  >>> from ngdiff_jax.optim import pcgrad
  >>> tx = pcgrad()
  >>> state = tx.init({"w": jnp.zeros(2)})
  >>> d, state = tx.update({"w": jnp.array([1.0, 0.0])}, state,
  ...                      forget_grads={"w": jnp.array([-1.0, 1.0])})
  >>> d["w"].tolist()
  [0.5, 1.5]
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from ngdiff_jax.optim._base import TwoTaskWeights, safe_scale, tree_scaled_vdot, two_task_combiner

__all__ = ["pcgrad"]


def pcgrad(*, clip_norm: float | None = None, axis_name=None) -> optax.GradientTransformationExtraArgs:
    """Two-task PCGrad (projecting conflicting gradients).

    Args:
      clip_norm: clip each task's gradient to this global L2 norm first
        (separately; see :func:`~ngdiff_jax.optim.two_task_combiner`).
      axis_name: the mapped axis the gradients are sharded over under
        ``shard_map``/``pmap``; norms and inner products are summed over it.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with the combiners'
      calling convention (see :func:`ngdiff_jax.optim.ngdiff`).
    """

    def weights(g_r, g_f, m_r, m_f, axis_name):
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
        return TwoTaskWeights(w_r, w_f, s_r * jnp.sqrt(rr), s_f * jnp.sqrt(ff))

    return two_task_combiner(weights, "pcgrad", clip_norm=clip_norm, axis_name=axis_name)
