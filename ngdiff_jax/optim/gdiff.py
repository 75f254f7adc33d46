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
  >>> from ngdiff_jax.optim import gdiff
  >>> tx = gdiff(retain_weight=1.0, forget_weight=0.5)
  >>> state = tx.init({"w": jnp.zeros(2)})
  >>> d, state = tx.update({"w": jnp.array([1.0, 2.0])}, state,
  ...                      forget_grads={"w": jnp.array([4.0, -2.0])})
  >>> d["w"].tolist()
  [3.0, 1.0]
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from ngdiff_jax.optim._base import TwoTaskWeights, tree_scaled_norm, two_task_combiner

__all__ = ["gdiff"]


def gdiff(
    retain_weight: float = 1.0, forget_weight: float = 1.0, *, clip_norm: float | None = None, axis_name=None
) -> optax.GradientTransformationExtraArgs:
    """Gradient difference ``d = retain_weight * g_r + forget_weight * g_f``.

    Args:
      retain_weight: weight of the retain gradient.
      forget_weight: weight of the forget gradient (of the forget objective as
        minimized; do not negate it here).
      clip_norm: clip each task's gradient to this global L2 norm first
        (separately; see :func:`~ngdiff_jax.optim.two_task_combiner`).
      axis_name: the mapped axis the gradients are sharded over under
        ``shard_map``/``pmap``; norms and inner products are summed over it.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with the combiners'
      calling convention (see :func:`ngdiff_jax.optim.ngdiff`).
    """
    w_r = jnp.asarray(retain_weight, jnp.float32)
    w_f = jnp.asarray(forget_weight, jnp.float32)

    def weights(g_r, g_f, m_r, m_f, axis_name):
        return TwoTaskWeights(w_r, w_f, tree_scaled_norm(g_r, m_r, axis_name), tree_scaled_norm(g_f, m_f, axis_name))

    return two_task_combiner(weights, "gdiff", clip_norm=clip_norm, axis_name=axis_name)
