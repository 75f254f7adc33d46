"""The added unlearning losses (DPO, WGA, SatImp, CE-U, UNDIAL, RMU) against numpy loops
written from open-unlearning's definitions (src/trainer/utils.py, src/trainer/unlearn/*.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ngdiff_jax import losses

rng = np.random.default_rng(1)
B, T, V = 3, 5, 7
LOGITS = rng.normal(size=(B, T, V)).astype(np.float32)
REF = rng.normal(size=(B, T, V)).astype(np.float32)
ALT = rng.normal(size=(B, T + 1, V)).astype(np.float32)
ALT_REF = rng.normal(size=(B, T + 1, V)).astype(np.float32)
LABELS = np.array([[-100, -100, 3, 1, 2], [-100, 4, 4, 6, -100], [-100, -100, -100, -100, 0]], np.int32)
ALT_LABELS = np.array([[-100, 1, 2, 3, 4, 5], [-100, -100, 0, 0, -100, -100], [-100, -100, -100, 6, 6, 2]], np.int32)
MASK = (np.arange(T)[None] < np.array([5, 4, 5])[:, None]).astype(np.int32)


def log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def scored(labels):
    """[(b, t, y)] for every scored next-token position t (predicting labels[b, t+1])."""
    return [(b, t, labels[b, t + 1]) for b in range(labels.shape[0]) for t in range(labels.shape[1] - 1)
            if labels[b, t + 1] != -100]  # fmt: skip


def seq_sum(logits, labels):
    lsm = log_softmax(logits)
    s = np.zeros(labels.shape[0])
    for b, t, y in scored(labels):
        s[b] += lsm[b, t, y]
    return s


def logsigmoid(x):
    return -np.log1p(np.exp(-x))


def test_dpo_forget_is_rejected_alternate_is_chosen():
    beta = 0.1
    ref_f, ref_a = seq_sum(REF, LABELS), seq_sum(ALT_REF, ALT_LABELS)
    win = seq_sum(ALT, ALT_LABELS) - ref_a
    lose = seq_sum(LOGITS, LABELS) - ref_f
    expected = np.mean(-2 / beta * logsigmoid(beta * (win - lose)))
    got = losses.dpo(LOGITS, LABELS, ref_f.astype(np.float32), ALT, ALT_LABELS, ref_a.astype(np.float32), beta)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # with the policy equal to the reference the loss is -2/beta * log(1/2)
    at_ref = losses.dpo(REF, LABELS, ref_f, ALT_REF, ALT_LABELS, ref_a, beta)
    np.testing.assert_allclose(at_ref, 2 / beta * np.log(2), rtol=1e-5)


def _weighted(logits, labels, weight):
    lsm = log_softmax(logits)
    vals = []
    for b, t, y in scored(labels):
        ce = -lsm[b, t, y]
        vals.append(weight(np.exp(-ce)) * ce)
    return -np.mean(vals)


def test_wga_and_satimp():
    np.testing.assert_allclose(losses.wga(LOGITS, LABELS, 1.0), _weighted(LOGITS, LABELS, lambda p: p), rtol=1e-5)
    np.testing.assert_allclose(losses.wga(LOGITS, LABELS, 2.5), _weighted(LOGITS, LABELS, lambda p: p**2.5), rtol=1e-5)
    np.testing.assert_allclose(
        losses.satimp(LOGITS, LABELS, 5.0, 1.0), _weighted(LOGITS, LABELS, lambda p: p**5 * (1 - p)), rtol=1e-5
    )
    np.testing.assert_allclose(
        losses.satimp(LOGITS, LABELS, 2.0, 3.0), _weighted(LOGITS, LABELS, lambda p: p**2 * (1 - p) ** 3), rtol=1e-5
    )


def test_wga_weight_is_detached():
    # d/dlogits of -(w * ce) with w held fixed: -w * (softmax - onehot) / n at scored positions
    beta = 1.5
    g = np.asarray(jax.grad(losses.wga)(jnp.asarray(LOGITS), LABELS, beta), np.float64)
    lsm = log_softmax(LOGITS)
    expected = np.zeros_like(g)
    pos = scored(LABELS)
    for b, t, y in pos:
        p = np.exp(lsm[b, t])
        w = p[y] ** beta
        onehot = np.eye(V)[y]
        expected[b, t] = -w * (p - onehot) / len(pos)
    np.testing.assert_allclose(g, expected, atol=1e-6)


def test_ce_u_value_gradient_and_first_token_skip():
    for n_skip in (0, 1, 2):
        lsm = log_softmax(LOGITS)
        # labels with each row's first n_skip labelled tokens removed (unshifted, as compute_batch_ceu)
        lab = LABELS.copy()
        for b in range(B):
            idx = np.flatnonzero(lab[b] != -100)[:n_skip]
            lab[b, idx] = -100
        pos = scored(lab)
        vals, grads = [], np.zeros((B, T, V))
        for b, t, y in pos:
            tl = LOGITS[b, t].astype(np.float64).copy()
            tl[y] = -np.inf
            q = np.exp(tl - tl.max())
            q /= q.sum()
            vals.append(-(q * np.where(np.isinf(tl), 0, lsm[b, t])).sum())
            grads[b, t] = (np.exp(lsm[b, t]) - q) / len(pos)
        np.testing.assert_allclose(losses.ce_u(LOGITS, LABELS, n_skip), np.mean(vals), rtol=1e-5)
        g = jax.grad(losses.ce_u)(jnp.asarray(LOGITS), LABELS, n_skip)
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(np.asarray(g), grads, atol=1e-6)


def test_undial():
    beta = 10.0
    lsm = log_softmax(LOGITS)
    per = np.zeros((B, T - 1))
    for b in range(B):
        for t in range(T - 1):
            teacher = REF[b, t].astype(np.float64).copy()
            y = LABELS[b, t + 1]
            if y != -100:
                teacher[y] -= beta
            soft = np.exp(log_softmax(teacher))
            per[b, t] = -(soft * lsm[b, t]).sum()
    np.testing.assert_allclose(losses.undial(LOGITS, REF, LABELS, beta), per.mean(), rtol=1e-5)
    w = MASK[:, 1:]
    np.testing.assert_allclose(
        losses.undial(LOGITS, REF, LABELS, beta, attention_mask=MASK), (per * w).sum() / w.sum(), rtol=1e-5
    )
    g_ref = jax.grad(lambda r: losses.undial(jnp.asarray(LOGITS), r, LABELS, beta))(jnp.asarray(REF))
    assert float(jnp.abs(g_ref).sum()) == 0.0


def test_rmu_activation_loss_and_control_vector():
    E = 4
    h = rng.normal(size=(B, T, E)).astype(np.float32)
    target = rng.normal(size=(B, T, E)).astype(np.float32)
    lab = LABELS.copy()
    lab[2] = -100  # a row with no labelled position is left out
    rows = []
    for b in range(2):
        m = lab[b] != -100
        rows.append(((h[b] - target[b]) ** 2).mean(-1)[m].sum() / m.sum())
    np.testing.assert_allclose(losses.activation_mse(h, target, lab), np.mean(rows), rtol=1e-5)
    u = losses.rmu_control_vector(jax.random.PRNGKey(3), E, 2.0)
    assert float(jnp.linalg.norm(u)) == pytest.approx(2.0, rel=1e-5) and bool((u >= 0).all())
    u = np.asarray(u)
    rows = [((h[b] - u) ** 2).mean(-1)[lab[b] != -100].mean() for b in range(2)]
    np.testing.assert_allclose(losses.rmu_forget(h, u, lab), np.mean(rows), rtol=1e-5)
