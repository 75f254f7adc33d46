"""The ``kernels`` switch: plain XLA einsums (every JAX transform, forward mode included) versus
the XLA:CPU workarounds (reverse mode only), same values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ngdiff_jax import backends
from ngdiff_jax.backends.cpu import kernels as K
from ngdiff_jax.models import from_config, functional
from ngdiff_jax.models.testing import tiny_hf_config

FAMILIES = ("llama_tied", "phi")  # gated MLP + tied (transposed) head; plain MLP + head bias


def _model(family, kernels, dtype=jnp.float32):
    return from_config(tiny_hf_config(family), rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype,
                       backend=kernels)


def _batch(T=6):
    ids = np.array([[3, 7, 9, 11, 5, 4], [8, 2, 6, 1, 9, 12]], np.int32)[:, :T]
    mask = np.ones_like(ids)
    mask[1, -2:] = 0
    return jnp.asarray(ids), jnp.asarray(mask)


def _loss_fn(apply_fn, ids, mask):
    def loss(params):
        logits = apply_fn(params, ids, mask)
        lp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        nll = -jnp.take_along_axis(lp, ids[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(nll * mask[:, 1:]) / jnp.sum(mask[:, 1:])
    return loss


def test_switch_values_and_default():
    assert backends.resolve(None).name == ("cpu_fast" if jax.default_backend() == "cpu" else "xla")
    assert _model("llama", None).kernels == backends.resolve(None).name
    assert _model("llama", "xla").kernels == "xla"
    with pytest.raises(ValueError, match="backend='fast' is not one of"):
        _model("llama", "fast")


def test_env_var_sets_default(monkeypatch):
    monkeypatch.setenv("NGDIFF_KERNELS", "xla")
    assert _model("llama", None).kernels == "xla"
    monkeypatch.setenv("NGDIFF_KERNELS", "gpu")
    with pytest.raises(ValueError, match="NGDIFF_KERNELS='gpu'"):
        backends.for_platform()


@pytest.mark.parametrize("family", FAMILIES)
def test_cpu_fast_equals_xla_logits_and_grads(family):
    ids, mask = _batch()
    a_fn, params = functional(_model(family, "xla"))
    b_fn, params_b = functional(_model(family, "cpu_fast"))
    jax.tree.map(np.testing.assert_array_equal, params, params_b)
    la, ga = jax.jit(jax.value_and_grad(_loss_fn(a_fn, ids, mask)))(params)
    lb, gb = jax.jit(jax.value_and_grad(_loss_fn(b_fn, ids, mask)))(params)
    np.testing.assert_allclose(a_fn(params, ids, mask), b_fn(params, ids, mask), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(la, lb, rtol=1e-6)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        scale = float(jnp.max(jnp.abs(x))) + 1e-12
        assert float(jnp.max(jnp.abs(x - y))) / scale < 1e-5


def test_cpu_fast_forward_mode_takes_the_xla_path():
    """The ``custom_vjp`` kernels have no forward mode; a ``cpu_fast`` model traced under ``jax.jvp``
    takes the ``xla`` path (issue 26), so the tangents equal the ``xla`` model's."""
    ids, mask = _batch()
    out = []
    for kernels in ("cpu_fast", "xla"):
        fn, params = functional(_model("llama", kernels))
        out.append(jax.jvp(_loss_fn(fn, ids, mask), (params,), (params,))[1])
    np.testing.assert_allclose(out[0], out[1], rtol=1e-5)


@pytest.mark.slow
def test_xla_forward_mode_matches_finite_differences():
    """``jax.jvp`` and a forward-over-reverse Hessian-vector product on a tiny llama (GQA, gated
    MLP, llama3 rope) equal reverse mode (``grad . v``) and
    central differences along a unit direction to the precision the model allows (float64
    parameters, but norms, rotary angles and attention scores are float32 by design)."""
    with jax.enable_x64(True):
        ids, mask = _batch()
        fn, params = functional(_model("llama", "xla", dtype=jnp.float64))
        loss = _loss_fn(fn, ids, mask)
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        v = [jax.random.normal(k, x.shape, jnp.float64) for k, x in zip(keys, leaves)]
        norm = np.sqrt(sum(float(jnp.sum(x * x)) for x in v))
        v = jax.tree.unflatten(treedef, [x / norm for x in v])
        eps = 1e-2

        def shift(s):
            return jax.tree.map(lambda p, d: p + s * d, params, v)

        def flat(t):
            return np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])

        grad = jax.jit(jax.grad(loss))
        _, jvp = jax.jit(lambda p, t: jax.jvp(loss, (p,), (t,)))(params, v)
        np.testing.assert_allclose(float(jvp), flat(grad(params)) @ flat(v), rtol=1e-6)
        lossj = jax.jit(loss)
        fd = (lossj(shift(eps)) - lossj(shift(-eps))) / (2 * eps)
        np.testing.assert_allclose(float(jvp), float(fd), rtol=1e-2)

        _, hvp = jax.jit(lambda p, t: jax.jvp(jax.grad(loss), (p,), (t,)))(params, v)  # forward over reverse
        h = flat(hvp)
        assert np.linalg.norm(h) > 1e-2
        fd_h = (flat(grad(shift(eps))) - flat(grad(shift(-eps)))) / (2 * eps)
        assert np.linalg.norm(h - fd_h) < 1e-2 * np.linalg.norm(h)


def _head_reference(x, w, bias, targets, vocab_major):
    logits = x @ (w.T if vocab_major else w) + (0.0 if bias is None else bias)
    return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[:, None], axis=-1)[:, 0]


@pytest.mark.parametrize("vocab_major,with_bias", [(True, False), (False, True), (False, False)])
def test_head_logprobs_over_vocabulary_chunks_equal_log_softmax(vocab_major, with_bias):
    """`kernels.head_logprobs` (cpu_fast's LM head): 3 row blocks x 4 vocabulary chunks of 10 of
    37 columns, the last chunk overlapping the one before; values and gradients (x, weight,
    bias) equal a plain log-softmax's."""
    n, E, V = 48, 16, 37
    kx, kw, kb, kt = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(kx, (n, E))
    w = jax.random.normal(kw, (V, E) if vocab_major else (E, V))
    bias = jax.random.normal(kb, (V,)) if with_bias else None
    targets = jax.random.randint(kt, (n,), 0, V).at[:4].set(V - 1).at[4:8].set(28)  # in the overlap
    assert K._head_plan(n, V, 8, 5120) == (16, 10)
    cot = jnp.linspace(0.5, 1.5, n)

    def loss(fn):
        return lambda x, w, b: jnp.sum(cot * fn(x, w, b))

    fast = loss(lambda x, w, b: K.head_logprobs(x, w, b, targets, vocab_major=vocab_major, token_chunk=8,
                                                chunk_elements=5120))  # fmt: skip
    ref = loss(lambda x, w, b: _head_reference(x, w, b, targets, vocab_major))
    np.testing.assert_allclose(jax.jit(fast)(x, w, bias), ref(x, w, bias), rtol=1e-5)
    for a, b in zip(jax.grad(fast, argnums=(0, 1, 2))(x, w, bias), jax.grad(ref, argnums=(0, 1, 2))(x, w, bias)):
        if b is None:
            assert a is None
            continue
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


def test_head_logprobs_bfloat16_gradient_is_accumulated_in_float32():
    """A bfloat16 head's weight gradient is summed over the row blocks in float32 and rounded once:
    within bfloat16 rounding (2^-8) of the float32 gradient of the same values."""
    n, E, V = 64, 16, 40
    kx, kw, kt = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (n, E)).astype(jnp.bfloat16)
    w = jax.random.normal(kw, (V, E)).astype(jnp.bfloat16)
    targets = jax.random.randint(kt, (n,), 0, V)
    grad = jax.grad(lambda w: K.head_logprobs(x, w, None, targets, vocab_major=True, token_chunk=8,
                                              chunk_elements=2560).sum())(w)  # fmt: skip
    x32 = x.astype(jnp.float32)
    ref = jax.grad(lambda w: _head_reference(x32, w, None, targets, True).sum())(w.astype(jnp.float32))
    assert grad.dtype == jnp.bfloat16
    err = jnp.abs(grad.astype(jnp.float32) - ref)
    assert float(jnp.max(err / jnp.maximum(jnp.abs(ref), 1e-3))) <= 2.0**-8


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lookup_gradient_sums_repeated_ids(dtype):
    """cpu_fast's embedding lookup: the forward is ``jnp.take``; the gradient sums the cotangent
    rows of repeated ids (in float32) and leaves the other rows zero, in the table's dtype."""
    table = jax.random.normal(jax.random.key(2), (11, 5)).astype(dtype)
    ids = jnp.array([[3, 7, 3, 0], [10, 3, 7, 7]])
    cot = jax.random.normal(jax.random.key(3), (2, 4, 5))

    def loss(take):
        return lambda t: jnp.sum(take(t).astype(jnp.float32) * cot)

    np.testing.assert_array_equal(K.lookup(table, ids), jnp.take(table, ids, axis=0))
    g = jax.grad(loss(lambda t: K.lookup(t, ids)))(table)
    expected = jax.grad(loss(lambda t: jnp.take(t.astype(jnp.float32), ids, axis=0)))(table.astype(jnp.float32))
    assert g.dtype == dtype
    # (bfloat16: the cotangent reaches the lookup rounded to bfloat16, and the sum is rounded once more)
    np.testing.assert_allclose(g.astype(jnp.float32), expected, rtol=1e-6 if dtype == jnp.float32 else 2.0**-7)
    assert not np.any(np.asarray(g)[[1, 2, 4, 5, 6, 8, 9]])
