"""Unlearning objectives as pure functions of logits and labels (open-unlearning's definitions).

Every loss here is a differentiable ``jnp`` scalar built on
``ngdiff_jax.models.logprobs.token_logprobs``. Labels follow Hugging Face's
convention (aligned with ``input_ids``, ``-100`` where not scored). All of them are
losses to **minimize**.

Per-sample losses (``npo``, ``simnpo``) average over the rows that have at least one
scored token, so all-padding rows that fill a fixed-size batch change nothing; on
batches without such rows this is open-unlearning's plain ``.mean()``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ngdiff_jax.models.logprobs import IGNORE_INDEX, token_logprobs


def sequence_logprob_sum(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``[B]``: the sum of ``log p(label)`` over each sample's scored tokens (0 when none).

    The negative of open-unlearning's ``compute_batch_nll``.
    """
    logp, _ = token_logprobs(logits, labels)
    return logp.sum(-1)


def nll(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean NLL over every scored token of the batch (Hugging Face's causal-LM loss)."""
    logp, mask = token_logprobs(logits, labels)
    return -logp.sum() / jnp.maximum(mask.sum(), 1.0)


def gradient_ascent(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``-nll``: minimizing it raises the NLL of the forget set (open-unlearning's GradAscent)."""
    return -nll(logits, labels)


def _scored_rows(labels: jax.Array) -> jax.Array:
    return (labels[:, 1:] != IGNORE_INDEX).any(-1)


def _mean_rows(per_sample: jax.Array, rows: jax.Array) -> jax.Array:
    return jnp.where(rows, per_sample, 0.0).sum() / jnp.maximum(rows.sum(), 1)


def npo(
    logits: jax.Array, labels: jax.Array, ref_logp_sum: jax.Array, beta: float = 1.0
) -> jax.Array:
    """Negative Preference Optimization (open-unlearning's ``NPO`` via ``compute_dpo_loss``).

    ``-2/beta * mean(logsigmoid(-beta * (logp - ref_logp)))`` where ``logp`` and ``ref_logp``
    are per-sample *sums* of answer-token log-probs under the policy and the frozen
    reference (``ref_logp_sum = sequence_logprob_sum(ref_logits, labels)``; no gradient
    flows into it).
    """
    log_ratio = sequence_logprob_sum(logits, labels) - jax.lax.stop_gradient(ref_logp_sum)
    per_sample = -2.0 / beta * jax.nn.log_sigmoid(-beta * log_ratio)
    return _mean_rows(per_sample, _scored_rows(labels))


def simnpo(
    logits: jax.Array, labels: jax.Array, beta: float = 1.0, delta: float = 0.0
) -> jax.Array:
    """SimNPO (open-unlearning's ``SimNPO``): reference-free, length-normalized NPO.

    ``-2/beta * mean(logsigmoid(beta * (nll_sum / n_answer - delta)))``, where
    ``n_answer = (labels != -100).sum(-1)`` counts labelled positions as open-unlearning
    does (the first position is never labelled in QA or ``chunk_corpus`` examples, so
    this equals the number of scored tokens). ``delta`` is the reward margin (the
    paper's gamma); open-unlearning's ``gamma`` is the forget-loss weight, which belongs
    to the training method, not to this function.
    """
    nll_sum = -sequence_logprob_sum(logits, labels)
    n = (labels != IGNORE_INDEX).sum(-1).astype(jnp.float32)
    avg = nll_sum / jnp.maximum(n, 1.0) - delta
    per_sample = -2.0 / beta * jax.nn.log_sigmoid(beta * avg)
    return _mean_rows(per_sample, _scored_rows(labels))


def kl_to_reference(
    logits: jax.Array,
    ref_logits: jax.Array,
    labels: jax.Array | None = None,
    *,
    scope: str = "all",
    attention_mask: jax.Array | None = None,
) -> jax.Array:
    """``KL(reference || policy)`` of the next-token distributions, averaged over positions.

    ``scope="all"`` (default) is open-unlearning's ``compute_kl_divergence``
    (``kl_div(log_policy, log_ref, reduction="batchmean", log_target=True)`` over all
    ``B*T`` positions, prompt and padding included); with ``attention_mask`` the padding
    positions are left out of the sum and the count. ``scope="answer"`` averages over
    the positions that predict a scored label (``labels[:, t+1] != -100``) only.
    No gradient flows into ``ref_logits``.
    """
    if scope not in ("all", "answer"):
        raise ValueError(f"kl_to_reference scope must be 'all' or 'answer', got {scope!r}.")
    logq = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    logp = jax.nn.log_softmax(jax.lax.stop_gradient(ref_logits).astype(jnp.float32), axis=-1)
    per_position = (jnp.exp(logp) * (logp - logq)).sum(-1)  # [B, T]
    if scope == "answer":
        if labels is None:
            raise ValueError("kl_to_reference(scope='answer') needs labels.")
        per_position = per_position[:, :-1]
        weights = (labels[:, 1:] != IGNORE_INDEX).astype(jnp.float32)
    elif attention_mask is not None:
        weights = attention_mask.astype(jnp.float32)
    else:
        return per_position.mean()
    return (per_position * weights).sum() / jnp.maximum(weights.sum(), 1.0)


__all__ = [
    "gradient_ascent",
    "kl_to_reference",
    "nll",
    "npo",
    "sequence_logprob_sum",
    "simnpo",
]
