"""The attention implementations (`ngdiff_jax.models.attention`): ``jax.nn.dot_product_attention``
(XLA's kernel here, cuDNN's on a GPU) equals the einsum reference in values, gradients, forward
mode, with padding, grouped-query heads, a sliding window and a KV cache; the defaults by backend."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ngdiff_jax.models import attention as A
from ngdiff_jax.models import from_config, functional
from ngdiff_jax.models.testing import tiny_hf_config

# GQA + llama3 rope; sliding window 6 (shorter than the sequences); partial rotary + parallel block
FAMILIES = ("llama", "mistral", "phi")


def _model(family, attention, dtype=jnp.float32):
    return from_config(tiny_hf_config(family), rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype,
                       backend="xla", attention=attention)


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 128, size=(3, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, -3:] = 0  # right padding
    mask[2, :4] = 0  # left padding
    return jnp.asarray(ids), jnp.asarray(mask)


def _nll(apply_fn, ids, mask):
    def loss(params):
        lp = jax.nn.log_softmax(apply_fn(params, ids, mask)[:, :-1], axis=-1)
        nll = -jnp.take_along_axis(lp, ids[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(nll * mask[:, 1:]) / jnp.sum(mask[:, 1:])
    return loss


def _reference_attention(q, k, v, mask, scale):
    """float64 NumPy: softmax over the allowed keys of each query."""
    q, k, v, mask = (np.asarray(a, np.float64) for a in (q, k, v, mask))
    B, T, H, D = q.shape
    G = H // k.shape[2]
    k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) * scale
    s = np.where(mask[:, None].astype(bool), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


@pytest.mark.parametrize("impl", ("einsum", "xla"))
def test_attend_matches_float64_reference(impl):
    rng = np.random.default_rng(1)
    q = rng.normal(size=(2, 5, 6, 8)).astype(np.float32)
    k = rng.normal(size=(2, 7, 2, 8)).astype(np.float32)
    v = rng.normal(size=(2, 7, 2, 8)).astype(np.float32)
    mask = np.tril(np.ones((5, 7), bool), k=2)[None].repeat(2, 0)
    mask[1, :, :2] = False  # left-padded keys
    out = A.attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask), 0.3, impl)
    np.testing.assert_allclose(np.asarray(out), _reference_attention(q, k, v, mask, 0.3), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_xla_attention_equals_einsum_logits_and_grads(family):
    ids, mask = _batch()
    a_fn, params = functional(_model(family, "einsum"))
    b_fn, params_b = functional(_model(family, "xla"))
    jax.tree.map(np.testing.assert_array_equal, params, params_b)  # same weights
    valid = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(a_fn(params, ids, mask))[valid], np.asarray(b_fn(params, ids, mask))[valid],
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    ga = jax.grad(_nll(a_fn, ids, mask))(params)
    gb = jax.grad(_nll(b_fn, ids, mask))(params)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6), ga, gb)


@pytest.mark.slow  # over 4 s on 2 cores: the full suite (pyproject's markers)
def test_xla_attention_with_kv_cache_generates_as_einsum():
    ids, mask = _batch()
    outs = {}
    for impl in ("einsum", "xla"):
        m = _model("mistral", impl)
        cache = m.init_cache(ids.shape[0], 16)
        logits, cache = m.forward(ids, jnp.cumsum(mask, -1) - 1, jnp.pad(mask, ((0, 0), (0, 6))), cache, 0)
        nxt = jnp.argmax(logits[:, -1:], -1).astype(jnp.int32)
        kv = jnp.pad(mask, ((0, 0), (0, 6))).at[:, 10].set(1)
        step, _ = m.forward(nxt, jnp.sum(mask, -1, keepdims=True), kv, cache, 10)
        outs[impl] = (np.asarray(logits[:, -1]), np.asarray(step))
    for a, b in zip(outs["einsum"], outs["xla"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_forward_mode_through_fused_attention():
    """jvp (a Hessian-vector product's inner half) through the model with ``attention="xla"``."""
    ids, mask = _batch()
    fn, params = functional(_model("llama", "xla"))
    loss = _nll(fn, ids, mask)
    tangent = jax.tree.map(jnp.ones_like, params)
    _, jv = jax.jvp(loss, (params,), (tangent,))
    _, gv = jax.jvp(jax.grad(loss), (params,), (tangent,))  # forward over reverse
    fn_e, _ = functional(_model("llama", "einsum"))
    _, jv_e = jax.jvp(_nll(fn_e, ids, mask), (params,), (tangent,))
    np.testing.assert_allclose(float(jv), float(jv_e), rtol=1e-4)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(gv))


def test_defaults_by_backend_and_dtype():
    assert A.default_attention(jnp.float32, "cpu") == "einsum"
    assert A.default_attention(jnp.bfloat16, "cpu") == "einsum"
    assert A.default_attention(jnp.bfloat16, "gpu") == "cudnn"
    assert A.default_attention(jnp.float16, "gpu") == "cudnn"
    assert A.default_attention(jnp.float32, "gpu") == "xla"
    assert A.default_attention(jnp.bfloat16, "tpu") == "xla"
    assert _model("llama", None).attention == A.default_attention(jnp.float32)
    with pytest.raises(ValueError, match="attention='flash' is not one of"):
        _model("llama", "flash")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the fallback where cuDNN is absent")
def test_cudnn_off_gpu_falls_back_to_xla_with_one_warning():
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(1, 4, 4, 8)), jnp.bfloat16)
    k = v = jnp.asarray(rng.normal(size=(1, 4, 2, 8)), jnp.bfloat16)
    mask = jnp.tril(jnp.ones((4, 4), bool))[None]
    A._warned.clear()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = A.attend(q, k, v, mask, 0.35, "cudnn")
        A.attend(q, k, v, mask, 0.35, "cudnn")
    msgs = [str(x.message) for x in w if "attention='cudnn'" in str(x.message)]
    assert len(msgs) == 1 and "attention='xla'" in msgs[0], msgs
    np.testing.assert_array_equal(np.asarray(out, np.float32),
                                  np.asarray(A.attend(q, k, v, mask, 0.35, "xla"), np.float32))


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's fused attention needs an NVIDIA GPU")
def test_cudnn_attention_equals_einsum_on_gpu():
    """On the GPU: cuDNN's kernel (bfloat16) against the einsum reference, values and gradients."""
    rng = np.random.default_rng(3)
    B, T, H, K, D = 2, 128, 8, 2, 64
    q = jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.bfloat16)
    k = jnp.asarray(rng.normal(size=(B, T, K, D)), jnp.bfloat16)
    v = jnp.asarray(rng.normal(size=(B, T, K, D)), jnp.bfloat16)
    mask = jnp.tril(jnp.ones((T, T), bool))[None].repeat(B, 0).at[1, :, :5].set(False)

    def f(impl):
        return lambda q, k, v: A.attend(q, k, v, mask, D ** -0.5, impl).astype(jnp.float32).sum()

    A._warned.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback on a GPU
        out_c = A.attend(q, k, v, mask, D ** -0.5, "cudnn")
        g_c = jax.grad(f("cudnn"), argnums=(0, 1, 2))(q, k, v)
    out_e = A.attend(q, k, v, mask, D ** -0.5, "einsum")
    g_e = jax.grad(f("einsum"), argnums=(0, 1, 2))(q, k, v)
    rows = np.asarray(mask).any(-1)  # queries with at least one key
    np.testing.assert_allclose(np.asarray(out_c, np.float32)[rows], np.asarray(out_e, np.float32)[rows],
                               atol=2e-2, rtol=2e-2)  # fmt: skip
    for a, b in zip(g_c, g_e):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=5e-2, rtol=5e-2)
