"""What keeps XLA:CPU's bfloat16 arrays narrow: bfloat16 carried as bits.

XLA:CPU converts a bfloat16 array to float32 wherever an operation on it has no bfloat16 kernel:
a loop that slices it, a ``lax.cond`` that takes it, a dynamic update of it. Carried as its bits
(`carry`, `ngdiff_jax.bits`), such an array is only moved, never widened; the computation turns
it back into bfloat16 where it is used. `opaque` keeps XLA from simplifying the round trip away;
`settled` keeps a twice-read weight's cotangent bfloat16.

docs/PERFORMANCE.md measures each (GeN's probes, the tied embedding, the layer scan).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ngdiff_jax.bits import from_bits, to_bits

__all__ = ["carry", "opaque", "settled"]


def opaque(x: jax.Array, dep: jax.Array) -> jax.Array:
    """``x`` (integer, e.g. bits), unchanged in value, through a division by one that XLA cannot
    fold (``dep < -inf`` is never true) and, a division being costly, does not copy into each
    consumer. ``from_bits(to_bits(u))`` would otherwise simplify to ``u``: a ``lax.cond`` reading
    the bits and an operation after it reading ``u`` would hold two materialized copies, and a
    bfloat16 result computed in float32 would be kept in float32 for its consumers."""
    return x // jnp.where(dep < -jnp.inf, 2, 1).astype(x.dtype)


def carry(x: jax.Array, dep: jax.Array | None = None) -> jax.Array:
    """A bfloat16 ``x`` as its bits (through `opaque` on ``dep`` where given: one buffer that the
    carrying operation and what follows it both read); any other as it is."""
    if x.dtype != jnp.bfloat16:
        return x
    return to_bits(x) if dep is None else opaque(to_bits(x), dep)


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
