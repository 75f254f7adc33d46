"""bfloat16 arrays as their bits (``uint16``) and back: a bitcast, same buffer size.

XLA:CPU converts a bfloat16 array to float32 wherever an operation on it has no bfloat16
kernel: a loop that slices it, a ``lax.cond`` that takes it, a dynamic update of it. Carried as
bits, such an array is only moved, never widened; the computation turns it back into bfloat16
where it is used. See `ngdiff_jax.models.kernels.remat_scan` and docs/PERFORMANCE.md.

>>> import jax.numpy as jnp
>>> x = jnp.array([1.5, -2.0], jnp.bfloat16)
>>> to_bits(x).dtype, from_bits(to_bits(x)).tolist(), to_bits(jnp.ones(2)).dtype
(dtype('uint16'), [1.5, -2.0], dtype('float32'))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["from_bits", "to_bits"]


def to_bits(x: jax.Array) -> jax.Array:
    """A bfloat16 array as its bits (``uint16``); any other array as it is."""
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype == jnp.bfloat16 else x


def from_bits(x: jax.Array) -> jax.Array:
    """`to_bits`'s inverse: a ``uint16`` array as bfloat16; any other array as it is."""
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == jnp.uint16 else x
