"""Per-token log-probabilities of labels: the quantity every loss and metric is built on.

Labels follow Hugging Face's convention: ``labels`` is aligned with
``input_ids`` (not shifted) and ``IGNORE_INDEX`` (-100) marks positions that are
not scored (prompt, padding). The logits at position t predict the token at t+1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100


def token_logprobs(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Log-probability of each next-token label and the mask of scored positions.

    Args:
      logits: ``[batch, time, vocab]`` (any float dtype; computed in float32).
      labels: ``[batch, time]`` integer labels aligned with the inputs, ``-100`` where ignored.

    Returns:
      ``(logp, mask)``, both ``[batch, time - 1]``: ``logp[b, t] = log p(labels[b, t+1] | x_{<=t})``
      (0 where masked) and ``mask`` as float32 (1 where scored).
    """
    logits = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    safe = jnp.where(mask, targets, 0)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    logp = jnp.where(mask, picked - logz, 0.0)
    return logp, mask.astype(jnp.float32)


def sequence_nll(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-sample mean NLL over scored tokens, ``[batch]`` (0 for a sample with none)."""
    logp, mask = token_logprobs(logits, labels)
    n = mask.sum(-1)
    return -logp.sum(-1) / jnp.maximum(n, 1.0)
