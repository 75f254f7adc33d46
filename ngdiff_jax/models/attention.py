"""Scaled dot-product attention with grouped-query heads: one function, three implementations.

`attend` computes, for queries ``q [B, T, H, D]``, keys and values ``k, v [B, S, K, D]`` (``H`` a
multiple of ``K``; query head ``h`` reads key/value head ``h // (H / K)``) and a boolean mask
``[B, T, S]``::

    scores = (q . k) * scale          # float32
    probs  = softmax(where(mask, scores, -inf), axis=S)
    out    = probs . v                # [B, T, H, D], in the compute dtype

The implementation is a static setting of the model (``CausalLM(..., attention=)``):

``"einsum"``
    The reference: two einsums with the float32 ``[B, K, G, T, S]`` scores materialized. Every
    transform works. The default on CPU, where every figure of docs/PERFORMANCE.md was measured
    with it.
``"xla"``
    ``jax.nn.dot_product_attention(implementation="xla")``: the same math, XLA's fusion of it.
    Every transform works. The default on TPU and for float32 compute on GPU.
``"cudnn"``
    ``jax.nn.dot_product_attention(implementation="cudnn")``: cuDNN's fused (flash) attention on
    NVIDIA GPUs, for bfloat16 / float16 compute; the scores are never stored. The default on GPU
    for 16-bit compute. cuDNN supports a subset of shapes and reverse-mode autodiff only: a call
    it cannot take (a shape, a dtype, no cuDNN, or forward-mode autodiff through ``q``, ``k`` or
    ``v``) runs ``"xla"`` instead, with a one-time warning that names the reason (none for
    forward mode, which always takes ``"xla"``).

>>> import jax.numpy as jnp
>>> q = k = v = jnp.ones((1, 3, 2, 4))
>>> mask = jnp.tril(jnp.ones((3, 3), bool))[None]
>>> bool(jnp.allclose(attend(q, k, v, mask, 0.5, "einsum"), attend(q, k, v, mask, 0.5, "xla")))
True
>>> resolve_attention("flash", jnp.float32)
Traceback (most recent call last):
...
ValueError: attention='flash' is not one of 'einsum', 'xla', 'cudnn' (or None for the backend default)
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from ngdiff_jax.backends import Backend, for_platform, forward_mode

__all__ = ["ATTENTION", "attend", "default_attention", "resolve_attention"]

Array = jax.Array
ATTENTION = ("einsum", "xla", "cudnn")
NEG_INF = -1e30
_warned: set[str] = set()


def default_attention(dtype, platform: str | None = None) -> str:
    """``"einsum"`` on CPU, ``"cudnn"`` on GPU for a 16-bit compute ``dtype``, ``"xla"`` otherwise
    (``platform``: ``jax.default_backend()`` when None; `ngdiff_jax.backends.Backend.attention`)."""
    return for_platform(platform).attention(dtype)


def resolve_attention(attention: str | None, dtype, backend: Backend | None = None) -> str:
    """``attention`` checked, or the ``backend``'s default (the platform's) for ``None``."""
    if attention is None:
        return backend.attention(dtype) if backend is not None else default_attention(dtype)
    if attention not in ATTENTION:
        raise ValueError(f"attention={attention!r} is not one of 'einsum', 'xla', 'cudnn' "
                         "(or None for the backend default)")  # fmt: skip
    return attention


def attend(q: Array, k: Array, v: Array, mask: Array, scale: float, implementation: str,
           dtype=None) -> Array:
    """Attention of ``q [B, T, H, D]`` over ``k, v [B, S, K, D]`` where ``mask [B, T, S]`` is true:
    ``[B, T, H, D]`` in ``dtype`` (default ``q.dtype``). See the module docstring."""
    dtype = q.dtype if dtype is None else dtype
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    if implementation == "einsum":
        return _einsum_attention(q, k, v, mask, scale)
    if implementation == "cudnn":
        if forward_mode(q, k, v):  # cuDNN's attention is a custom_vjp: no forward mode
            return _fused(q, k, v, mask, scale, "xla")
        try:
            return _fused(q, k, v, mask, scale, "cudnn")
        except (ValueError, NotImplementedError, RuntimeError, TypeError, AssertionError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            if reason not in _warned:
                _warned.add(reason)
                warnings.warn(f"attention='cudnn' cannot run this call ({reason}); it runs attention='xla' "
                              "(the same values). Build the model with attention='xla' to silence this.",
                              stacklevel=2)  # fmt: skip
            return _fused(q, k, v, mask, scale, "xla")
    if implementation == "xla":
        return _fused(q, k, v, mask, scale, "xla")
    raise ValueError(f"attention={implementation!r} is not one of {ATTENTION}")


def _einsum_attention(q, k, v, mask, scale):
    B, T, H, D = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, H // K, D)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None, :, :], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(B, T, H, D)


def _fused(q, k, v, mask, scale, implementation):
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :], scale=scale,
                                        implementation=implementation)
