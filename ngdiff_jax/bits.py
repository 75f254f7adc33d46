"""bfloat16 arrays as their bits (``uint16``) and back: a bitcast, same buffer size.

XLA:CPU converts a bfloat16 array to float32 wherever an operation on it has no bfloat16
kernel: a loop that slices it, a ``lax.cond`` that takes it, a dynamic update of it. Carried as
bits, such an array is only moved, never widened; the computation turns it back into bfloat16
where it is used. See `ngdiff_jax.backends.cpu.kernels.remat_scan` and docs/PERFORMANCE.md.

>>> import jax.numpy as jnp
>>> x = jnp.array([1.5, -2.0], jnp.bfloat16)
>>> to_bits(x).dtype, from_bits(to_bits(x)).tolist(), to_bits(jnp.ones(2)).dtype
(dtype('uint16'), [1.5, -2.0], dtype('float32'))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["from_bits", "opaque", "settled", "to_bits"]


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
            "a bfloat16 array carried as its bits (ngdiff_jax.bits: GeN's probes, the stacked layer scan, "
            "the sharded step's boundary) was differentiated, which would give a zero derivative; "
            "differentiate a float32 step (precision.params=float32) instead."
        )
    return y, np.zeros(y.shape, jax.dtypes.float0)


to_bits.defjvp(_to_bits_jvp, symbolic_zeros=True)


def from_bits(x: jax.Array) -> jax.Array:
    """`to_bits`'s inverse: a ``uint16`` array as bfloat16; any other array as it is."""
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == jnp.uint16 else x


def opaque(x: jax.Array, dep: jax.Array) -> jax.Array:
    """``x`` (integer, e.g. bits), unchanged in value, through a division by one that XLA cannot
    fold (``dep < -inf`` is never true) and, a division being costly, does not copy into each
    consumer. ``from_bits(to_bits(u))`` would otherwise simplify to ``u``: a ``lax.cond`` reading
    the bits and an operation after it reading ``u`` would hold two materialized copies, and a
    bfloat16 result computed in float32 would be kept in float32 for its consumers."""
    return x // jnp.where(dep < -jnp.inf, 2, 1).astype(x.dtype)


@jax.custom_vjp
def settled(w: jax.Array) -> jax.Array:
    """``w``; its cotangent is materialized in ``w``'s dtype. For a bfloat16 weight read in two
    places (a tied embedding: the lookup and the LM head), XLA:CPU adds the two bfloat16
    cotangents in float32 and keeps that float32 sum for every consumer (the gradient's norm,
    the combiner): twice the gradient's memory for as long as it lives (SmolLM2: 108 MiB through
    the second task's backward pass). Other dtypes pass unchanged."""
    return w


def _settled_fwd(w):
    return w, None


def _settled_bwd(_, ct):
    if ct.dtype != jnp.bfloat16:
        return (ct,)
    return (from_bits(opaque(to_bits(ct), ct[(0,) * ct.ndim])),)


settled.defvjp(_settled_fwd, _settled_bwd)
