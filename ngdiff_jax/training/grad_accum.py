"""Micro-batch gradient accumulation: one batch's gradient from ``k`` micro-batches, in the memory of one.

levanter's ``grad_accum.py`` shape: :func:`accumulate_gradients` takes a loss function of
``(params, micro_batch)``, the micro-batches (every entry with a leading ``[k]`` axis, from
:func:`split_micro_batches`) and one weight per micro-batch, and returns the weighted sum of the
losses and of their gradients, one micro-batch at a time (``lax.scan``: one micro-batch's
activations alive at once). Weights that are each micro-batch's share of the batch's scored tokens
(normalized to sum to 1) make the result equal to the whole batch's token-mean loss and gradient.

The running gradient sum is float32 (or wider) whatever the parameters' dtype: a bfloat16 sum
rounds every addition to 8 bits of mantissa, so a micro-batch's contribution below 1/256 of the
running sum would be lost. The sum is rounded to the parameters' dtypes once, at the end.

Example:

  >>> import jax, jax.numpy as jnp
  >>> from ngdiff_jax.training.grad_accum import accumulate_gradients, split_micro_batches
  >>> params = {"w": jnp.ones(2)}
  >>> batch = {"x": jnp.arange(8.0).reshape(4, 2)}
  >>> loss = lambda p, b: jnp.mean(b["x"] @ p["w"])
  >>> mbs = split_micro_batches(batch, 2)
  >>> total, grads = accumulate_gradients(loss, params, mbs, jnp.array([0.5, 0.5]))
  >>> bool(jnp.allclose(grads["w"], jax.grad(loss)(params, batch)["w"]))
  True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["accumulate_gradients", "accumulators", "split_micro_batches"]


def split_micro_batches(batch: dict, k: int) -> dict:
    """``[B, ...] -> [k, B // k, ...]`` for every entry of ``batch``."""
    out = {}
    for key, v in batch.items():
        if v.shape[0] % k:
            raise ValueError(
                f"run.micro_batches={k} does not divide the batch size {v.shape[0]} (batch entry {key!r}); "
                f"use a data.batch_size that is a multiple of {k}."
            )
        out[key] = v.reshape(k, v.shape[0] // k, *v.shape[1:])
    return out


def accumulators(params: Any) -> Any:
    """Zeros for a gradient sum over micro-batches: float32 (or wider) whatever ``params``' dtypes."""
    return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), params)


def accumulate(acc: Any, weight: jax.Array, grads: Any) -> Any:
    """``acc + weight * grads``, in the accumulators' dtype."""
    return jax.tree.map(lambda a, g: a + weight.astype(a.dtype) * g.astype(a.dtype), acc, grads)


def in_dtypes_of(grads: Any, params: Any) -> Any:
    """A summed gradient in ``params``' dtypes (one rounding, after the whole sum)."""
    return jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)


def accumulate_gradients(loss_fn: Callable, params: Any, micro_batches: dict, weights: jax.Array, *,
                         has_aux: bool = False, aux_weights: jax.Array | None = None,
                         constrain: Callable = lambda tree: tree):  # fmt: skip
    """``(loss, grads)`` of ``sum_i weights[i] * loss_fn(params, micro_batches[i])``, one micro-batch at a time.

    Args:
      loss_fn: ``loss_fn(params, micro_batch) -> loss`` (a scalar), or ``-> (loss, aux)`` with ``has_aux``.
      micro_batches: every entry with a leading ``[k]`` axis (:func:`split_micro_batches`).
      weights: ``[k]``, each micro-batch's weight in the loss and the gradient.
      aux_weights: ``[k]`` weights of ``aux`` (a pytree of arrays; default ``weights``).
      constrain: applied to each micro-batch's gradient and to the running sum (a sharding constraint).

    Returns:
      ``(loss, grads)``, or ``((loss, aux), grads)`` with ``has_aux``; ``grads`` in ``params``' dtypes.
    """
    aux_weights = weights if aux_weights is None else aux_weights
    grad_fn = jax.value_and_grad(loss_fn, has_aux=has_aux)

    def body(carry, xs):
        value_acc, g_acc = carry
        mb, w, wa = xs
        value, g = grad_fn(params, mb)
        g = constrain(g)
        if has_aux:
            loss, aux = value
            value_acc = (value_acc[0] + w * loss,
                         jax.tree.map(lambda a, x: a + wa * x.astype(jnp.float32), value_acc[1], aux))  # fmt: skip
        else:
            value_acc = value_acc + w * value
        return (value_acc, constrain(accumulate(g_acc, w, g))), None

    zero = jnp.zeros((), jnp.float32)
    if has_aux:
        first = jax.tree.map(lambda x: x[0], micro_batches)
        aux_shape = jax.eval_shape(lambda p, b: loss_fn(p, b)[1], params, first)
        init_value = (zero, jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), aux_shape))
    else:
        init_value = zero
    (value, grads), _ = jax.lax.scan(body, (init_value, accumulators(params)), (micro_batches, weights, aux_weights))
    return value, constrain(in_dtypes_of(grads, params))
