"""Per-token log-probabilities of labels: the quantity every loss and metric is built on.

Labels follow Hugging Face's convention: ``labels`` is aligned with
``input_ids`` (not shifted) and ``IGNORE_INDEX`` (-100) marks positions that are
not scored (prompt, padding). The logits at position t predict the token at t+1.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100


class TokenLogprobs(NamedTuple):
    """`token_logprobs`'s result computed without the logits (``CausalLM.token_logprobs``, the
    chunked head): ``logp`` and ``mask``, both ``[batch, time - 1]`` float32. Every function that
    takes ``logits`` only to read the labels' log-probs (`token_logprobs`, `sequence_nll`, the
    log-prob losses of `ngdiff_jax.losses`) accepts one in their place; it must have been made
    with the same ``labels``."""

    logp: jax.Array
    mask: jax.Array


def token_logprobs(logits: jax.Array | TokenLogprobs, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Log-probability of each next-token label and the mask of scored positions.

    Args:
      logits: ``[batch, time, vocab]`` (any float dtype; computed in float32), or a
        `TokenLogprobs` made for ``labels`` (returned as is).
      labels: ``[batch, time]`` integer labels aligned with the inputs, ``-100`` where ignored.

    Returns:
      ``(logp, mask)``, both ``[batch, time - 1]``: ``logp[b, t] = log p(labels[b, t+1] | x_{<=t})``
      (0 where masked) and ``mask`` as float32 (1 where scored).
    """
    if isinstance(logits, TokenLogprobs):
        if logits.logp.shape != (labels.shape[0], labels.shape[1] - 1):
            raise ValueError(f"TokenLogprobs of shape {logits.logp.shape} do not belong to labels of shape "
                             f"{labels.shape}; compute them with these labels.")
        return logits.logp, logits.mask
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
