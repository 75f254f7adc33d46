"""Losses against values computed by hand in numpy on tiny logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ngdiff_jax import losses

rng = np.random.default_rng(0)
B, T, V = 3, 5, 7
LOGITS = rng.normal(size=(B, T, V)).astype(np.float32)
REF = rng.normal(size=(B, T, V)).astype(np.float32)
LABELS = np.array(
    [
        [-100, -100, 3, 1, 2],
        [-100, 4, 4, 6, -100],
        [-100, -100, -100, -100, 0],
    ],
    dtype=np.int32,
)


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def token_lp(logits, labels):
    """[(b, logp)] of every scored next token, by explicit loops."""
    lsm = log_softmax(logits.astype(np.float64))
    out = []
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            y = labels[b, t + 1]
            if y != -100:
                out.append((b, lsm[b, t, y]))
    return out


def per_sample_sum(logits, labels):
    s = np.zeros(labels.shape[0])
    for b, lp in token_lp(logits, labels):
        s[b] += lp
    return s


def logsigmoid(x):
    return -np.log1p(np.exp(-x))


def test_sequence_logprob_sum_and_nll():
    sums = per_sample_sum(LOGITS, LABELS)
    np.testing.assert_allclose(losses.sequence_logprob_sum(LOGITS, LABELS), sums, rtol=1e-5)
    n_tokens = len(token_lp(LOGITS, LABELS))
    assert n_tokens == 3 + 3 + 1
    expected = -sums.sum() / n_tokens
    np.testing.assert_allclose(losses.nll(LOGITS, LABELS), expected, rtol=1e-5)
    np.testing.assert_allclose(losses.gradient_ascent(LOGITS, LABELS), -expected, rtol=1e-5)


def test_npo():
    beta = 0.1
    ref_sum = per_sample_sum(REF, LABELS)
    ratio = per_sample_sum(LOGITS, LABELS) - ref_sum
    expected = np.mean(-2 / beta * logsigmoid(-beta * ratio))
    got = losses.npo(LOGITS, LABELS, jnp.asarray(ref_sum, jnp.float32), beta)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_simnpo():
    beta, delta = 2.5, 0.3
    n = (LABELS != -100).sum(-1)
    avg_nll = -per_sample_sum(LOGITS, LABELS) / n - delta
    expected = np.mean(-2 / beta * logsigmoid(beta * avg_nll))
    np.testing.assert_allclose(losses.simnpo(LOGITS, LABELS, beta, delta), expected, rtol=1e-5)


def test_kl_to_reference():
    p, q = log_softmax(REF.astype(np.float64)), log_softmax(LOGITS.astype(np.float64))
    kl = (np.exp(p) * (p - q)).sum(-1)  # [B, T] KL(ref || policy)
    np.testing.assert_allclose(losses.kl_to_reference(LOGITS, REF, LABELS), kl.mean(), rtol=1e-5)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    np.testing.assert_allclose(
        losses.kl_to_reference(LOGITS, REF, LABELS, attention_mask=mask),
        (kl * mask).sum() / mask.sum(), rtol=1e-5,
    )  # fmt: skip
    scored = LABELS[:, 1:] != -100
    np.testing.assert_allclose(
        losses.kl_to_reference(LOGITS, REF, LABELS, scope="answer"),
        kl[:, :-1][scored].mean(),
        rtol=1e-5,
    )
    assert float(losses.kl_to_reference(REF, REF, LABELS)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="scope"):
        losses.kl_to_reference(LOGITS, REF, LABELS, scope="tokens")


def test_padding_rows_do_not_change_per_sample_losses():
    pad_logits = np.concatenate([LOGITS, rng.normal(size=(1, T, V)).astype(np.float32)])
    pad_labels = np.concatenate([LABELS, np.full((1, T), -100, np.int32)])
    ref_sum = np.concatenate([per_sample_sum(REF, LABELS), [0.0]]).astype(np.float32)
    np.testing.assert_allclose(
        losses.npo(pad_logits, pad_labels, ref_sum, 0.5),
        losses.npo(LOGITS, LABELS, ref_sum[:B], 0.5), rtol=1e-6,
    )  # fmt: skip
    np.testing.assert_allclose(
        losses.simnpo(pad_logits, pad_labels, 1.0), losses.simnpo(LOGITS, LABELS, 1.0), rtol=1e-6
    )
    np.testing.assert_allclose(
        losses.nll(pad_logits, pad_labels), losses.nll(LOGITS, LABELS), rtol=1e-6
    )


def test_gradients_finite_and_reference_frozen():
    fns = {
        "nll": lambda x, r: losses.nll(x, LABELS),
        "npo": lambda x, r: losses.npo(x, LABELS, losses.sequence_logprob_sum(r, LABELS), 0.1),
        "simnpo": lambda x, r: losses.simnpo(x, LABELS, 2.0),
        "kl": lambda x, r: losses.kl_to_reference(x, r, LABELS),
    }
    for name, fn in fns.items():
        g_policy, g_ref = jax.jit(jax.grad(fn, argnums=(0, 1)))(
            jnp.asarray(LOGITS), jnp.asarray(REF)
        )
        assert np.isfinite(g_policy).all() and np.abs(g_policy).sum() > 0, name
        assert np.abs(g_ref).sum() == 0, name  # no gradient into the reference
    # gradient ascent is the exact negative of the NLL gradient
    g_nll = jax.grad(losses.nll)(jnp.asarray(LOGITS), LABELS)
    np.testing.assert_allclose(
        jax.grad(losses.gradient_ascent)(jnp.asarray(LOGITS), LABELS), -g_nll
    )
