"""Unlearning objectives as pure functions of logits and labels (open-unlearning's definitions).

Every loss here is a differentiable ``jnp`` scalar built on
``ngdiff_jax.models.logprobs.token_logprobs``; those that read only the labels' log-probs
(``nll``, ``gradient_ascent``, ``sequence_logprob_sum``, ``npo``, ``simnpo``, ``dpo``, ``wga``,
``satimp``) also take a ``TokenLogprobs`` (``CausalLM.token_logprobs``, no ``[B, T, V]``
logits) in place of the logits. Labels follow Hugging Face's
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


def batch_positions(attention_mask: jax.Array) -> jax.Array:
    """``[T]`` bool: the columns of a padded batch that open-unlearning's collator would keep.

    open-unlearning pads each batch to its *own* longest row (``src/data/collators.py``,
    ``DataCollatorForSupervisedDataset``); ours pads to a fixed bucket length. The columns
    it keeps run from the first to the last column that any row attends to: ``t < L_batch``
    under right padding (``L_batch`` = the largest ``last attended position + 1``), the last
    ``L_batch`` columns under left padding.
    """
    c = jnp.asarray(attention_mask).astype(bool).any(0).astype(jnp.int32)
    return (jnp.cumsum(c) > 0) & (jnp.cumsum(c[::-1])[::-1] > 0)


def kl_to_reference(
    logits: jax.Array,
    ref_logits: jax.Array,
    labels: jax.Array | None = None,
    *,
    scope: str = "all",
    attention_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
) -> jax.Array:
    """``KL(reference || policy)`` of the next-token distributions, averaged over positions.

    open-unlearning's ``compute_kl_divergence`` (``src/trainer/utils.py``) is
    ``kl_div(log_policy.view(-1, V), log_ref.view(-1, V), reduction="batchmean",
    log_target=True)``: the mean of the per-position KL over all ``B * L_batch`` positions of
    a batch padded to its own longest row, prompt and padding positions included.

    ``scope="batch"`` (what the ``kl`` retain loss uses; needs ``attention_mask``) is that
    value on our fixed-size batches: the mean over the rows that attend to any token (the
    all-padding rows that fill a batch are left out) and the columns of
    :func:`batch_positions` (``t < L_batch`` under right padding, padding positions of the
    shorter rows included). ``positions`` (``[T]`` bool) overrides those columns: the
    micro-batches of one batch pass the whole batch's, so that their weighted mean is the
    whole batch's value. ``scope="all"`` (default) averages over every ``B * T`` position, or
    with ``attention_mask`` over the attended positions only; it equals open-unlearning's
    only on a batch without filler rows or extra padding columns. ``scope="answer"``
    averages over the positions that predict a scored label (``labels[:, t+1] != -100``).
    No gradient flows into ``ref_logits``.
    """
    if scope not in ("all", "answer", "batch"):
        raise ValueError(f"kl_to_reference scope must be 'all', 'batch' or 'answer', got {scope!r}.")
    logq = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    logp = jax.nn.log_softmax(jax.lax.stop_gradient(ref_logits).astype(jnp.float32), axis=-1)
    per_position = (jnp.exp(logp) * (logp - logq)).sum(-1)  # [B, T]
    if scope == "answer":
        if labels is None:
            raise ValueError("kl_to_reference(scope='answer') needs labels.")
        per_position = per_position[:, :-1]
        weights = (labels[:, 1:] != IGNORE_INDEX).astype(jnp.float32)
    elif scope == "batch":
        if attention_mask is None:
            raise ValueError("kl_to_reference(scope='batch') needs attention_mask.")
        cols = batch_positions(attention_mask) if positions is None else jnp.asarray(positions).astype(bool)
        rows = jnp.asarray(attention_mask).astype(bool).any(-1)
        weights = (rows[:, None] & cols[None, :]).astype(jnp.float32)
    elif attention_mask is not None:
        weights = attention_mask.astype(jnp.float32)
    else:
        return per_position.mean()
    return (per_position * weights).sum() / jnp.maximum(weights.sum(), 1.0)


# ----------------------------------------------------------------------------- preference / refusal


def dpo(
    logits: jax.Array,
    labels: jax.Array,
    ref_logp_sum: jax.Array,
    alt_logits: jax.Array,
    alt_labels: jax.Array,
    alt_ref_logp_sum: jax.Array,
    beta: float = 0.1,
) -> jax.Array:
    """DPO with the forget answer as the *rejected* and the alternate answer as the *chosen* one.

    open-unlearning ``compute_dpo_loss(win_inputs=alternate, lose_inputs=forget)``
    (``src/trainer/utils.py``, used by ``src/trainer/unlearn/dpo.py``; IdkDPO when the
    alternate answers are refusals): ``-2/beta * mean(logsigmoid(beta * (win - lose)))``
    where ``win = logp(alt) - ref_logp(alt)`` and ``lose = logp(forget) - ref_logp(forget)``
    are per-sample sums of answer-token log-probs. Row ``i`` of the two batches is the same
    question. No gradient flows into the reference sums.
    """
    lose = sequence_logprob_sum(logits, labels) - jax.lax.stop_gradient(ref_logp_sum)
    win = sequence_logprob_sum(alt_logits, alt_labels) - jax.lax.stop_gradient(alt_ref_logp_sum)
    per_sample = -2.0 / beta * jax.nn.log_sigmoid(beta * (win - lose))
    return _mean_rows(per_sample, _scored_rows(labels) | _scored_rows(alt_labels))


# ----------------------------------------------------------------------------- token-weighted ascent


def _token_ce(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token cross entropy ``[B, T-1]`` (0 where not scored) and the scored mask."""
    logp, mask = token_logprobs(logits, labels)
    return -logp, mask


def wga(logits: jax.Array, labels: jax.Array, beta: float = 1.0) -> jax.Array:
    """Weighted gradient ascent (open-unlearning ``compute_wga_loss``, ``src/trainer/utils.py``).

    ``-mean_tokens(w * ce)`` over scored tokens with ``ce = -log p(token)`` and the
    detached weight ``w = p(token) ** beta``: confident (still memorized) tokens are
    pushed hardest, already forgotten ones hardly at all.
    """
    ce, mask = _token_ce(logits, labels)
    w = jax.lax.stop_gradient(jnp.exp(-ce)) ** beta
    return -(w * ce * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def satimp(logits: jax.Array, labels: jax.Array, beta1: float = 5.0, beta2: float = 1.0) -> jax.Array:
    """SatImp (open-unlearning ``compute_satimp_loss``, ``src/trainer/utils.py``).

    ``-mean_tokens(p**beta1 * (1 - p)**beta2 * ce)`` over scored tokens, weights detached:
    the saturation weight ``p**beta1`` and the importance weight ``(1-p)**beta2``.
    """
    ce, mask = _token_ce(logits, labels)
    p = jax.lax.stop_gradient(jnp.exp(-ce))
    w = p**beta1 * (1.0 - p) ** beta2
    return -(w * ce * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def ce_u(logits: jax.Array, labels: jax.Array, ignore_first_n_answer_tokens: int = 1) -> jax.Array:
    """Cross-Entropy Unlearning, CE-U (open-unlearning ``src/trainer/unlearn/ceu.py``).

    At every scored position the target distribution is the model's own (detached)
    softmax with the true token's logit set to ``-inf``; the loss is the cross entropy
    of the model against it, averaged over the scored positions. The first
    ``ignore_first_n_answer_tokens`` labelled tokens of each row are not scored
    (``compute_batch_ceu``'s trick from arXiv:2503.01224).
    """
    valid = labels != IGNORE_INDEX
    first = valid & (jnp.cumsum(valid.astype(jnp.int32), axis=-1) <= ignore_first_n_answer_tokens)
    labels = jnp.where(first, IGNORE_INDEX, labels)
    lg = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    mask = (targets != IGNORE_INDEX).astype(jnp.float32)
    onehot = jax.nn.one_hot(jnp.where(targets == IGNORE_INDEX, 0, targets), lg.shape[-1], dtype=bool)
    target_logits = jnp.where(onehot, -jnp.inf, jax.lax.stop_gradient(lg))
    q = jax.nn.softmax(target_logits, axis=-1)
    logp = jax.nn.log_softmax(lg, axis=-1)
    per_position = -(q * jnp.where(onehot, 0.0, logp)).sum(-1)  # q is exactly 0 on the true token
    return (per_position * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def undial(
    logits: jax.Array,
    ref_logits: jax.Array,
    labels: jax.Array,
    beta: float = 10.0,
    attention_mask: jax.Array | None = None,
) -> jax.Array:
    """UNDIAL self-distillation on adjusted logits (open-unlearning ``compute_undial_loss``,
    ``src/trainer/utils.py``).

    The teacher is the frozen reference model with ``beta`` subtracted from the logit of
    the true next token at every scored position; the loss is the cross entropy of the
    model against ``softmax(adjusted teacher logits)``, averaged over positions.

    Differences on purpose: open-unlearning averages over all ``B * (T-1)`` positions,
    padding included, and its advanced indexing with label ``-100`` subtracts ``beta``
    from token ``V - 100`` at unscored positions. Here only scored positions are
    adjusted and, with ``attention_mask``, padding positions (next token masked) are left
    out of the average.
    """
    lg = logits[:, :-1].astype(jnp.float32)
    teacher = jax.lax.stop_gradient(ref_logits[:, :-1]).astype(jnp.float32)
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    onehot = jax.nn.one_hot(jnp.where(scored, targets, 0), lg.shape[-1], dtype=jnp.float32)
    adjusted = teacher - beta * onehot * scored[..., None]
    soft = jax.nn.softmax(adjusted, axis=-1)
    per_position = -(soft * jax.nn.log_softmax(lg, axis=-1)).sum(-1)
    if attention_mask is None:
        return per_position.mean()
    w = attention_mask[:, 1:].astype(jnp.float32)
    return (per_position * w).sum() / jnp.maximum(w.sum(), 1.0)


# ----------------------------------------------------------------------------- representation (RMU)


def rmu_control_vector(key: jax.Array, dim: int, steering_coeff: float) -> jax.Array:
    """RMU's fixed random direction ``u / |u| * steering_coeff``, ``u ~ Uniform[0, 1)^dim``
    (open-unlearning ``RMU.get_control_vector``, ``src/trainer/unlearn/rmu.py``)."""
    u = jax.random.uniform(key, (dim,), jnp.float32)
    return u / jnp.linalg.norm(u) * steering_coeff


def activation_mse(
    hidden: jax.Array, target: jax.Array, labels: jax.Array, *, normalization: str = "open_unlearning"
) -> jax.Array:
    """RMU's activation loss (open-unlearning ``RMU.compute_activation_loss``,
    ``src/trainer/unlearn/rmu.py``), over the labelled positions (``labels != -100``,
    unshifted: the mask open-unlearning builds for both the forget and the EMBED_DIFF retain
    loss). Per row ``i``, ``s_i`` = the sum over those positions of the mean over the hidden
    dimension of the squared difference, and ``n_i`` = their number.

    ``normalization="open_unlearning"`` (default) is what its code computes:
    ``(squared_diff_sum / num_tokens).mean()`` with ``squared_diff_sum`` ``[B]`` and
    ``num_tokens`` ``[B, 1]`` broadcasts to ``[B, B]``, so the value is
    ``mean_i(s_i) * mean_j(1 / n_j)``. ``normalization="per_row"`` is the per-row mean
    ``mean_i(s_i / n_i)`` (the evident intent). The two agree when every row has the same
    number of labelled positions. Both run over the rows that have a labelled position, so
    the all-padding rows that fill a batch change nothing (open-unlearning would divide by
    zero for such a row).
    """
    if normalization not in ("open_unlearning", "per_row"):
        raise ValueError(
            f"activation_mse normalization must be 'open_unlearning' or 'per_row', got {normalization!r}."
        )
    mask = (labels != IGNORE_INDEX).astype(jnp.float32)
    sq = jnp.square(hidden.astype(jnp.float32) - jax.lax.stop_gradient(target).astype(jnp.float32)).mean(-1)
    sums, counts = (sq * mask).sum(-1), mask.sum(-1)
    rows = counts > 0
    if normalization == "per_row":
        return _mean_rows(sums / jnp.maximum(counts, 1.0), rows)
    return _mean_rows(sums, rows) * _mean_rows(1.0 / jnp.maximum(counts, 1.0), rows)


def rmu_forget(
    hidden: jax.Array, control_vec: jax.Array, labels: jax.Array, *, normalization: str = "open_unlearning"
) -> jax.Array:
    """RMU forget loss: :func:`activation_mse` of the layer's hidden state to the control vector."""
    target = jnp.broadcast_to(control_vec.astype(jnp.float32), hidden.shape)
    return activation_mse(hidden, target, labels, normalization=normalization)


__all__ = [
    "activation_mse",
    "batch_positions",
    "ce_u",
    "dpo",
    "gradient_ascent",
    "kl_to_reference",
    "nll",
    "npo",
    "rmu_control_vector",
    "rmu_forget",
    "satimp",
    "sequence_logprob_sum",
    "simnpo",
    "undial",
    "wga",
]
