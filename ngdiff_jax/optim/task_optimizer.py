"""`nnx.Optimizer` for task gradients: :class:`TaskOptimizer`.

``nnx.Optimizer.update(model, grads)`` filters ``grads`` to the ``wrt`` variables as one
``nnx.State``; a :class:`~ngdiff_jax.optim.TaskGrads` holds one such state per task. This
subclass filters each task alike and otherwise does what ``nnx.Optimizer.update`` does
(flax 0.12).

Example:

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from ngdiff_jax.optim import TaskGrads, TaskOptimizer, unlearning_optimizer
  >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  >>> x = jnp.array([[1.0, 2.0]])
  >>> retain = lambda m: jnp.mean((m(x) - 1.0) ** 2)
  >>> forget = lambda m: -jnp.mean((m(x) + 1.0) ** 2)
  >>> opt = TaskOptimizer(model, unlearning_optimizer("ngdiff", 1e-2, gen=False), wrt=nnx.Param)
  >>> _ = opt.update(model, TaskGrads(retain=nnx.grad(retain)(model), forget=nnx.grad(forget)(model)))
  >>> int(opt.step[...])
  1
"""

from __future__ import annotations

import optax
from flax import nnx

from ngdiff_jax.optim.tasks import TaskGrads

__all__ = ["TaskOptimizer"]


class TaskOptimizer(nnx.Optimizer):
    """``nnx.Optimizer`` whose ``update`` takes a :class:`~ngdiff_jax.optim.TaskGrads` of
    ``nnx.grad`` results (each filtered to ``wrt``); other gradients go to ``nnx.Optimizer``."""

    def update(self, model, grads, /, **kwargs):
        if not isinstance(grads, TaskGrads):
            return super().update(model, grads, **kwargs)
        params = nnx.as_pure(nnx.state(model, self.wrt, graph=self.graph))
        tasks = TaskGrads(**{t: nnx.as_pure(nnx.state(g, self.wrt, graph=self.graph)) for t, g in grads.items()})
        updates, new_opt_state = self.tx.update(tasks, nnx.as_pure(self.opt_state), params, **nnx.as_pure(kwargs))
        nnx.update(model, optax.apply_updates(params, updates))
        nnx.update(self.opt_state, nnx.state(new_opt_state, graph=self.graph))
        self.step[...] += 1
        return updates
