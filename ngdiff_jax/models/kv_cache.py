"""Operations on a KV cache of either layout (`CausalLM.init_cache`): a list of ``(k, v)`` per block, or
one ``(k, v)`` pair stacked on a leading layer axis (``scan_layers``). Every leaf has its slots on axis
``-3`` and its batch on axis ``-4``, so each function maps over the leaves.

  >>> import jax.numpy as jnp
  >>> cache = [(jnp.zeros((2, 4, 1, 8)),) * 2] * 3          # 3 blocks, batch 2, 4 slots
  >>> slots(cache, 3)[0][0].shape
  (2, 3, 1, 8)
  >>> concat(cache, cache)[0][0].shape
  (2, 8, 1, 8)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["broadcast", "concat", "padded", "slots", "write"]


def slots(cache, end: int):
    """The first ``end`` slots."""
    return jax.tree.map(lambda a: a[..., :end, :, :], cache)


def concat(cache, more):
    """``more``'s slots after ``cache``'s."""
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=-3), cache, more)


def padded(cache, end: int, extra: int):
    """The first ``end`` slots followed by ``extra`` empty ones."""
    return jax.tree.map(lambda a: jnp.concatenate(
        [a[..., :end, :, :], jnp.zeros(a.shape[:-3] + (extra,) + a.shape[-2:], a.dtype)], axis=-3), cache)


def write(cache, part, start=0):
    """``cache`` with ``part``'s slots written from slot ``start`` on."""
    def one(a, p):
        idx = (0,) * (a.ndim - 3) + (start, 0, 0)
        return jax.lax.dynamic_update_slice(a, p.astype(a.dtype), idx)

    return jax.tree.map(one, cache, part)


def broadcast(cache, batch: int):
    """A batch-1 cache repeated ``batch`` times."""
    return jax.tree.map(lambda a: jnp.broadcast_to(a, a.shape[:-4] + (batch,) + a.shape[-3:]), cache)
