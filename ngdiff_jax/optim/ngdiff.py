"""NGDiff: the normalized gradient difference (Bu, Jin et al., 2024).

Unlearning is a two-task problem: keep the retain loss :math:`L_r` low while
driving the forget objective :math:`L_f` down (for gradient ascent
:math:`L_f = -\\mathrm{NLL}_{forget}`, which is unbounded below). With
:math:`g_r = \\nabla L_r` and :math:`g_f = \\nabla L_f`, NGDiff steps along

.. math::

  d = \\frac{g_r}{\\lVert g_r \\rVert + \\epsilon} + \\frac{g_f}{\\lVert g_f \\rVert + \\epsilon},

global L2 norms over all leaves. Each task gets the same say whatever the size
of its gradient, so a gradient-ascent forget gradient that grows without bound
cannot swamp the retain task (the failure of plain gradient difference). A
zero gradient contributes zero (never NaN). ``d`` is a *gradient-like*
direction: chain it in front of an optax optimizer, which subtracts it.

Norms are computed on ``g / max|g|`` and rescaled, so the result stays accurate
in float32 when the two norms are 10^6 or 10^20 apart.

Example:

  >>> import jax.numpy as jnp, optax
  >>> from ngdiff_jax.optim import ngdiff
  >>> params = {"w": jnp.zeros(2)}
  >>> tx = optax.chain(ngdiff(), optax.sgd(0.1))
  >>> state = tx.init(params)
  >>> g_r, g_f = {"w": jnp.array([3.0, 4.0])}, {"w": jnp.array([0.0, -1e6])}
  >>> updates, state = tx.update(g_r, state, params, forget_grads=g_f)
  >>> [round(float(x), 4) for x in updates["w"]]
  [-0.06, 0.02]
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from ngdiff_jax.optim._base import TwoTaskWeights, concrete, tree_scaled_norm, two_task_combiner

__all__ = ["ngdiff"]


def ngdiff(eps: float = 1e-12, *, clip_norm: float | None = None,
           axis_name=None) -> optax.GradientTransformationExtraArgs:
    """Normalized gradient difference: ``d = g_r/(|g_r|+eps) + g_f/(|g_f|+eps)``.

    Args:
      eps: added to each global norm before dividing (>= 0). A gradient whose
        norm is exactly zero always contributes zero.
      clip_norm: clip each task's gradient to this global L2 norm first
        (separately; see :func:`~ngdiff_jax.optim.two_task_combiner`).
      axis_name: the mapped axis the gradients are sharded over under
        ``shard_map``/``pmap``; norms and inner products are summed over it.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`;
      ``update(retain_grads, state, params=None, *, forget_grads, **extra_args)``
      returns the direction (params' structure and dtypes) and a
      :class:`~ngdiff_jax.optim.CombinerState`. If any entry of either input is
      NaN/Inf the direction is all zeros and ``state.skipped`` is incremented.
    """
    if concrete(eps) and not eps >= 0:
        raise ValueError(f"ngdiff: eps must be >= 0, got {eps!r}.")

    def weights(g_r, g_f, m_r, m_f, axis_name):
        n_r = tree_scaled_norm(g_r, m_r, axis_name)
        n_f = tree_scaled_norm(g_f, m_f, axis_name)
        w_r = jnp.where(n_r > 0, 1.0 / (n_r + eps), 0.0)
        w_f = jnp.where(n_f > 0, 1.0 / (n_f + eps), 0.0)
        return TwoTaskWeights(w_r, w_f, n_r, n_f)

    return two_task_combiner(weights, "ngdiff", clip_norm=clip_norm, axis_name=axis_name)
