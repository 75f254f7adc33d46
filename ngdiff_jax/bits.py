"""bfloat16 arrays as their bits (``uint16``) and back: a bitcast, same buffer size.

A backend may carry bfloat16 arrays through conditionals, loops and the jit boundary as their
bits (`ngdiff_jax.backends.Backend.carry`; the CPU backend does, see
`ngdiff_jax.backends.cpu.ordering`); `from_bits` reads such an array back wherever it arrives.

>>> import jax.numpy as jnp
>>> x = jnp.array([1.5, -2.0], jnp.bfloat16)
>>> to_bits(x).dtype, from_bits(to_bits(x)).tolist(), to_bits(jnp.ones(2)).dtype
(dtype('uint16'), [1.5, -2.0], dtype('float32'))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["from_bits", "to_bits"]


@jax.custom_jvp
def to_bits(x: jax.Array) -> jax.Array:
    """A bfloat16 array as its bits (``uint16``); any other array as it is.

    Bits carry no derivative: differentiating through the bits of a bfloat16 array (e.g. a
    meta-gradient through GeN's probes in a bfloat16 step) raises instead of giving a silent
    zero; other dtypes pass their derivative unchanged."""
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype == jnp.bfloat16 else x


def _to_bits_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    y = to_bits(x)
    zero = isinstance(t, jax.custom_derivatives.SymbolicZero)
    if y.dtype != jnp.uint16:
        return y, jnp.zeros_like(y) if zero else t
    if not zero:
        raise ValueError(
            "a bfloat16 array carried as its bits (the CPU backend's GeN probes, stacked layer scan or "
            "sharded step boundary) was differentiated, which would give a zero derivative; "
            "differentiate a float32 step (precision.params=float32) instead."
        )
    return y, np.zeros(y.shape, jax.dtypes.float0)


to_bits.defjvp(_to_bits_jvp, symbolic_zeros=True)


def from_bits(x: jax.Array) -> jax.Array:
    """`to_bits`'s inverse: a ``uint16`` array as bfloat16; any other array as it is."""
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == jnp.uint16 else x
