"""Issue 23, loss details: three training losses against plain-NumPy transcriptions of the
reference code, each written line by line after the PyTorch it cites.

- the ``kl`` retain loss (``ga_klr``, ``npo_klr``) = open-unlearning ``compute_kl_divergence``
  (``src/trainer/utils.py``) on a batch collated by its ``DataCollatorForSupervisedDataset``
  (``src/data/collators.py``, padded to the batch's own longest row);
- RMU's activation loss = open-unlearning ``RMU.compute_activation_loss``
  (``src/trainer/unlearn/rmu.py``), broadcasting included;
- ``idk_nll`` against TOFU's original ``idk`` loss (``locuslab/tofu`` ``dataloader.py``,
  ``CustomTrainerForgetting.compute_loss``): a documented difference, with its exact relation.

The "model" is a toy causal LM (prefix mean of embeddings, then a linear head), written once in
``jnp`` for our objectives and once in NumPy for the transcriptions: its output at position ``t``
depends only on the tokens up to ``t``, so a batch padded further to the right gives the same
logits at the positions both batches have, as a real causal LM does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ngdiff_jax import losses
from ngdiff_jax.data.batching import collate
from ngdiff_jax.models import ModelView
from ngdiff_jax.training import load_method
from ngdiff_jax.training.methods import forget_objective, retain_objective

V, E, PAD = 11, 6, 0
IGNORE = -100


def _params(seed):
    r = np.random.default_rng(seed)
    return {"emb": r.normal(size=(V, E)).astype(np.float32), "head": r.normal(size=(E, V)).astype(np.float32)}


# ----------------------------------------------------------------------------- the toy model, twice


def _hidden_jnp(params, ids, mask=None, *, layer=0):
    x = jnp.asarray(params["emb"])[ids]
    return jnp.cumsum(x, axis=1) / jnp.arange(1, ids.shape[1] + 1, dtype=jnp.float32)[:, None]


def _logits_jnp(params, ids, mask=None):
    return _hidden_jnp(params, ids) @ jnp.asarray(params["head"])


MODEL = ModelView(_logits_jnp, _hidden_jnp)


def _hidden_np(params, ids):
    x = params["emb"].astype(np.float64)[ids]
    return np.cumsum(x, axis=1) / np.arange(1, ids.shape[1] + 1)[:, None]


def _logits_np(params, ids):
    return _hidden_np(params, ids) @ params["head"].astype(np.float64)


def _examples(lengths, seed, prompt=2):
    """QA-like examples ``(input_ids, labels)``: the first ``prompt`` tokens unlabelled."""
    r = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = r.integers(1, V, n).tolist()
        out.append((ids, [IGNORE] * prompt + ids[prompt:]))
    return out


# ----------------------------------------------------------------------------- NumPy transcriptions


def log_softmax(x):  # F.log_softmax(x, dim=-1)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def ou_collate(examples, padding_side="right"):
    """open-unlearning ``DataCollatorForSupervisedDataset.__call__`` (``src/data/collators.py``)."""
    def _pad_tokens(seqs, padding_value):
        longest = max(len(s) for s in seqs)  # pad_sequence pads to the longest in the batch
        if padding_side == "right":
            return np.array([list(s) + [padding_value] * (longest - len(s)) for s in seqs])
        return np.array([[padding_value] * (longest - len(s)) + list(s) for s in seqs])  # flip, pad, flip

    input_ids = _pad_tokens([ex[0] for ex in examples], PAD)
    attention_mask = input_ids != PAD  # input_ids.ne(self.tokenizer.pad_token_id)
    labels = _pad_tokens([ex[1] for ex in examples], IGNORE)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def ou_compute_kl_divergence(logits, ref_logits):
    """open-unlearning ``compute_kl_divergence`` (``src/trainer/utils.py``), given both models' logits."""
    ref_probs = log_softmax(ref_logits)  # F.log_softmax(ref_outputs.logits, dim=-1)
    ref_probs = ref_probs.reshape(-1, ref_logits.shape[-1])  # .view(-1, V)
    current_probs = log_softmax(logits)
    current_probs = current_probs.reshape(-1, logits.shape[-1])
    # nn.functional.kl_div(input, target, reduction="batchmean", log_target=True):
    # sum(exp(target) * (target - input)) / input.size(0)
    pointwise = np.exp(ref_probs) * (ref_probs - current_probs)
    return pointwise.sum() / current_probs.shape[0]


def ou_compute_activation_loss(activation1, activation2, mask):
    """open-unlearning ``RMU.compute_activation_loss`` (``src/trainer/unlearn/rmu.py``)."""
    squared_diff = (activation1 - activation2) ** 2  # mse_loss(..., reduction="none"), [b, s, d]
    expanded_mask = np.broadcast_to(mask[..., None], squared_diff.shape)  # mask.unsqueeze(-1).expand_as
    squared_diff_sum = (squared_diff * expanded_mask).mean(axis=2).sum(axis=1)  # [b]
    num_tokens = mask.sum(axis=-1, keepdims=True)  # [b, 1]
    return (squared_diff_sum / num_tokens).mean()  # [b] / [b, 1] broadcasts to [b, b]


def hf_causal_lm_loss(logits, labels):
    """``model(input_ids, labels=labels).loss`` of a Hugging Face causal LM (``ForCausalLMLoss``):
    shift, then ``CrossEntropyLoss(ignore_index=-100)``, mean over the scored tokens."""
    shift_logits = logits[..., :-1, :].reshape(-1, logits.shape[-1])
    shift_labels = labels[..., 1:].reshape(-1)
    keep = shift_labels != IGNORE
    lsm = log_softmax(shift_logits[keep])
    return -lsm[np.arange(keep.sum()), shift_labels[keep]].mean()


def tofu_idk_loss(params, idk_inputs, retain_inputs):
    """TOFU ``CustomTrainerForgetting.compute_loss``, ``loss_type == "idk"`` (``dataloader.py``)."""
    idk_input_ids, idk_labels, idk_attention_mask = idk_inputs
    retain_input_ids, retain_labels, retain_attention_mask = retain_inputs
    # concatenate the inputs. single forward pass is much more efficient
    input_ids = np.concatenate((idk_input_ids, retain_input_ids), axis=0)
    labels = np.concatenate((idk_labels, retain_labels), axis=0)
    attention_mask = np.concatenate((idk_attention_mask, retain_attention_mask), axis=0)  # noqa: F841 (toy model)
    outputs_logits = _logits_np(params, input_ids)  # outputs = model(input_ids, labels=labels, ...)
    return hf_causal_lm_loss(outputs_logits, labels)  # loss = outputs.loss


# ----------------------------------------------------------------------------- 1. KL retain term


def test_kl_retain_equals_open_unlearning_on_bucketed_batch_with_filler_rows():
    """ga_klr's retain objective on a bucket-padded batch (rows of 11, 7, 4 tokens in a 16-column
    bucket, 2 all-padding filler rows) = compute_kl_divergence on open-unlearning's collation of the
    same 3 examples (11 columns), padding positions of the shorter rows included."""
    exs = _examples([11, 7, 4], seed=0)
    batch = collate(exs, pad_id=PAD, batch_size=5, buckets=(16,))
    assert batch["input_ids"].shape == (5, 16) and not batch["attention_mask"][3:].any()
    p, p_ref = _params(1), _params(2)
    obj = retain_objective(load_method("ga_klr"))
    ref = obj.reference(MODEL, p_ref, batch)
    ours, _ = obj.loss(MODEL, p, batch, ref)

    ou = ou_collate(exs)
    assert ou["input_ids"].shape == (3, 11)
    expected = ou_compute_kl_divergence(_logits_np(p, ou["input_ids"]), _logits_np(p_ref, ou["input_ids"]))
    diff = abs(float(ours) - expected)
    print(f"kl retain (right padding, filler rows): ours={float(ours):.8f} ou={expected:.8f} |diff|={diff:.2e}")
    assert diff < 1e-5 * max(1.0, abs(expected))
    # the old average over the whole bucket and the filler rows is a different number
    old = losses.kl_to_reference(_logits_jnp(p, batch["input_ids"]), _logits_jnp(p_ref, batch["input_ids"]))
    assert abs(float(old) - expected) > 1e-3


def test_kl_batch_scope_left_padding_and_micro_batch_positions():
    """scope="batch" on a left-padded bucket batch counts the last L_batch columns of the real rows
    (open-unlearning's collator with padding_side="left"); micro-batches given the whole batch's
    positions and weighted by their real rows give the whole batch's value."""
    r = np.random.default_rng(3)
    B, T = 4, 12
    lengths = [5, 8, 3, 0]  # the last row is filler
    mask = np.zeros((B, T), np.int32)
    for i, n in enumerate(lengths):
        mask[i, T - n:] = 1
    logits = r.normal(size=(B, T, V)).astype(np.float32)
    ref_logits = r.normal(size=(B, T, V)).astype(np.float32)
    ours = losses.kl_to_reference(logits, ref_logits, scope="batch", attention_mask=mask)
    L = max(lengths)
    np.testing.assert_array_equal(np.asarray(losses.batch_positions(mask)), np.arange(T) >= T - L)
    real = [i for i, n in enumerate(lengths) if n]
    expected = ou_compute_kl_divergence(logits[real][:, T - L:].astype(np.float64),
                                        ref_logits[real][:, T - L:].astype(np.float64))  # fmt: skip
    diff = abs(float(ours) - expected)
    print(f"kl scope=batch (left padding): |diff|={diff:.2e}")
    assert diff < 1e-5 * max(1.0, abs(expected))
    # two micro-batches of two rows: the second (rows 2, 3) alone would have L_batch = 3
    pos = losses.batch_positions(mask)
    parts = [losses.kl_to_reference(logits[s], ref_logits[s], scope="batch", attention_mask=mask[s], positions=pos)
             for s in (slice(0, 2), slice(2, 4))]  # fmt: skip
    w = np.array([2.0, 1.0]) / 3.0  # real rows per micro-batch
    np.testing.assert_allclose(float(w @ np.asarray(parts)), float(ours), rtol=1e-6)
    # the existing scopes are unchanged; an unknown one or a missing mask is an error
    assert float(losses.kl_to_reference(logits, ref_logits)) != pytest.approx(float(ours))
    with pytest.raises(ValueError, match="attention_mask"):
        losses.kl_to_reference(logits, ref_logits, scope="batch")


# ----------------------------------------------------------------------------- 2. RMU activation loss


def test_rmu_activation_loss_equals_open_unlearning_broadcast_form():
    """activation_mse (default) = compute_activation_loss with its [b]/[b,1] broadcasting, i.e.
    mean_i(s_i) * mean_j(1/n_j), on rows with different labelled counts; filler rows change nothing;
    normalization="per_row" is mean_i(s_i/n_i) and agrees when the counts are equal."""
    r = np.random.default_rng(4)
    B, T = 3, 9
    h = r.normal(size=(B, T, E)).astype(np.float32)
    target = r.normal(size=(B, T, E)).astype(np.float32)
    labels = np.full((B, T), IGNORE, np.int32)
    for i, (a, b) in enumerate([(2, 9), (3, 5), (1, 8)]):  # 7, 2 and 7 labelled positions
        labels[i, a:b] = 1
    mask = labels != IGNORE  # the mask RMU builds: labels != -100, unshifted
    expected = ou_compute_activation_loss(h.astype(np.float64), target.astype(np.float64), mask)
    ours = float(losses.activation_mse(h, target, labels))
    print(f"rmu activation loss: |diff|={abs(ours - expected):.2e}")
    np.testing.assert_allclose(ours, expected, rtol=1e-6)
    s = (((h - target) ** 2).mean(-1) * mask).sum(-1)
    n = mask.sum(-1)
    np.testing.assert_allclose(ours, s.mean() * (1 / n).mean(), rtol=1e-6)
    per_row = float(losses.activation_mse(h, target, labels, normalization="per_row"))
    np.testing.assert_allclose(per_row, (s / n).mean(), rtol=1e-6)
    assert abs(per_row - ours) > 1e-3  # different counts: the two forms differ
    # all-padding filler rows are left out (open-unlearning has none: it would divide by zero)
    hp = np.concatenate([h, r.normal(size=(2, T, E)).astype(np.float32)])
    tp = np.concatenate([target, r.normal(size=(2, T, E)).astype(np.float32)])
    lp = np.concatenate([labels, np.full((2, T), IGNORE, np.int32)])
    np.testing.assert_allclose(float(losses.activation_mse(hp, tp, lp)), expected, rtol=1e-6)
    # equal counts: both forms are open-unlearning's
    eq = np.full((B, T), IGNORE, np.int32)
    eq[:, 4:8] = 1
    e_ou = ou_compute_activation_loss(h.astype(np.float64), target.astype(np.float64), eq != IGNORE)
    for norm in ("open_unlearning", "per_row"):
        np.testing.assert_allclose(float(losses.activation_mse(h, target, eq, normalization=norm)), e_ou, rtol=1e-6)
    with pytest.raises(ValueError, match="normalization"):
        losses.activation_mse(h, target, labels, normalization="tokens")


def test_rmu_objectives_equal_open_unlearning_compute_loss():
    """The rmu method's forget objective (hidden state vs the control vector) and its embed_diff
    retain objective (vs the reference model's hidden state) = RMU.compute_loss's two terms."""
    fexs, rexs = _examples([9, 4, 6], seed=5), _examples([3, 8], seed=6)
    fb = collate(fexs, pad_id=PAD, batch_size=4, buckets=(16,))
    rb = collate(rexs, pad_id=PAD, batch_size=4, buckets=(16,))
    p, p_ref = _params(7), _params(8)
    meth = load_method("rmu", forget={"layer": 0}, retain={"layer": 0})
    f_loss, _ = forget_objective(meth).loss(MODEL, p, fb, {})
    r_obj = retain_objective(meth)
    r_loss, _ = r_obj.loss(MODEL, p, rb, r_obj.reference(MODEL, p_ref, rb))

    u = np.asarray(losses.rmu_control_vector(jax.random.PRNGKey(meth.forget.seed), E, meth.forget.steering_coeff))
    fo, ro = ou_collate(fexs), ou_collate(rexs)
    model_forget_activations = _hidden_np(p, fo["input_ids"])
    control_vec = np.broadcast_to(u.astype(np.float64), model_forget_activations.shape)  # .expand_as
    f_expected = ou_compute_activation_loss(model_forget_activations, control_vec, fo["labels"] != IGNORE)
    r_expected = ou_compute_activation_loss(_hidden_np(p, ro["input_ids"]), _hidden_np(p_ref, ro["input_ids"]),
                                            ro["labels"] != IGNORE)  # fmt: skip
    print(f"rmu forget |diff|={abs(float(f_loss) - f_expected):.2e}, "
          f"embed_diff |diff|={abs(float(r_loss) - r_expected):.2e}")  # fmt: skip
    np.testing.assert_allclose(float(f_loss), f_expected, rtol=1e-5)
    np.testing.assert_allclose(float(r_loss), r_expected, rtol=1e-5)


# ----------------------------------------------------------------------------- 3. idk_nll vs TOFU


def _idk_batches(f_lengths, r_lengths, seed, T=16):
    """A forget batch carrying refusal answers as ``alt_*`` and a retain batch, both ``T`` wide
    (TOFU pads every example to ``max_length``, so its two batches concatenate)."""
    q = _examples(f_lengths, seed)
    alt = _examples(f_lengths, seed + 1)
    fb = collate(q, pad_id=PAD, buckets=(T,))
    fb.update({f"alt_{k}": v for k, v in collate(alt, pad_id=PAD, buckets=(T,)).items()})
    rb = collate(_examples(r_lengths, seed + 2), pad_id=PAD, buckets=(T,))
    return fb, rb


@pytest.mark.parametrize("f_lengths,r_lengths", [([7, 5], [4, 8]), ([9, 5], [4, 3])])
def test_idk_nll_against_tofu_idk_loss(f_lengths, r_lengths):
    """Ours (forget = refusal-answer token mean, retain = retain token mean, summed with
    gamma = alpha = 1) vs TOFU's one token mean over cat(idk, retain): TOFU = (N_f f + N_r r) /
    (N_f + N_r) exactly, so ours = 2 * TOFU iff N_f == N_r (first case), not otherwise (second)."""
    fb, rb = _idk_batches(f_lengths, r_lengths, seed=9)
    p = _params(10)
    meth = load_method("idk_nll")
    assert (meth.combiner.forget_weight, meth.combiner.retain_weight, meth.combiner.kind) == (1.0, 1.0, "gdiff")
    f, _ = forget_objective(meth).loss(MODEL, p, fb, {})
    r, _ = retain_objective(meth).loss(MODEL, p, rb, {})
    ours = meth.combiner.forget_weight * float(f) + meth.combiner.retain_weight * float(r)

    idk = (fb["alt_input_ids"], fb["alt_labels"], fb["alt_attention_mask"])
    ret = (rb["input_ids"], rb["labels"], rb["attention_mask"])
    tofu = tofu_idk_loss(p, idk, ret)
    n_f = int((fb["alt_labels"][:, 1:] != IGNORE).sum())
    n_r = int((rb["labels"][:, 1:] != IGNORE).sum())
    relation = (n_f * float(f) + n_r * float(r)) / (n_f + n_r)
    print(f"idk_nll N_f={n_f} N_r={n_r}: ours={ours:.8f} tofu={tofu:.8f} |tofu - relation|={abs(tofu - relation):.2e}"
          f" |ours - 2 tofu|={abs(ours - 2 * tofu):.2e}")  # fmt: skip
    np.testing.assert_allclose(relation, tofu, rtol=1e-6)
    if n_f == n_r:
        np.testing.assert_allclose(ours, 2 * tofu, rtol=1e-6)
    else:
        assert abs(ours - 2 * tofu) > 1e-3
