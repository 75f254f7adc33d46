"""A point ``params + step * direction`` that its reader computes, leaf by leaf, where it needs it.

GeN (`ngdiff_jax.optim.gen`) evaluates the loss at two points along the update. Computed as a
tree, each point is one more parameter-sized array next to the parameters and the update
(SmolLM2 in bfloat16: 257 MiB of the step's temporaries). A loss function that sets the
attribute ``accepts_shifted = True`` receives a :class:`Shifted` instead and computes each
weight when it reads it: a scanned model's view (`ngdiff_jax.models.functional` of a
``scan_layers=True`` model) shifts one decoder block's weights at a time inside its layer scan.
Both ways compute every weight with `shift_leaf`, so the point is the same to the bit.

>>> import jax.numpy as jnp
>>> point = Shifted({"w": jnp.ones(2)}, {"w": jnp.array([1.0, -1.0])}, jnp.float32(0.5))
>>> point.materialize()["w"].tolist()
[1.5, 0.5]
>>> accepts_shifted(lambda p: p), accepts_shifted(takes_shifted(lambda p: p))
(False, True)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["Shifted", "accepts_shifted", "shift_leaf", "takes_shifted"]


def shift_leaf(p: jax.Array, u: jax.Array, step: jax.Array) -> jax.Array:
    """``p + step * u`` in ``u``'s dtype, returned in ``p``'s (GeN's probe point, one leaf)."""
    return (p + step.astype(jnp.result_type(u)) * u).astype(jnp.result_type(p))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Shifted:
    """``params + step * direction`` (two trees of one structure and a scalar), not computed yet.

    A pytree (its fields are its children): it crosses ``jit``, ``scan`` and closures like the
    trees it holds. Only a function that declares it (`takes_shifted`) is given one."""

    params: Any
    direction: Any
    step: jax.Array

    def materialize(self) -> Any:
        """The point as a tree like ``params``."""
        return jax.tree.map(lambda p, u: shift_leaf(p, u, self.step), self.params, self.direction)


def takes_shifted(fn: Callable) -> Callable:
    """Mark ``fn`` as accepting a :class:`Shifted` where it takes parameters; returns ``fn``."""
    fn.accepts_shifted = True
    return fn


def accepts_shifted(fn: Callable | None) -> bool:
    """Whether ``fn`` was marked by `takes_shifted`."""
    return bool(getattr(fn, "accepts_shifted", False))
