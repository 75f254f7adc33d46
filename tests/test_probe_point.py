"""GeN's probe point made where it is read (`ngdiff_jax.shifted`): the stacked layout shifts one
block's weights at a time inside its layer scan and gives the same losses, bit for bit, as the
point made as a tree; a GeN step that probes that way gives the same parameters; the bfloat16
pieces around it (the update scaled after the probes from its bits, the tied embedding's
gradient settled in bfloat16) keep their values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ngdiff_jax import models as M
from ngdiff_jax.backends.cpu.ordering import settled
from ngdiff_jax.models import stacked
from ngdiff_jax.models.config import ModelConfig
from ngdiff_jax.models.testing import tiny_hf_config
from ngdiff_jax.optim import scale_by_gen
from ngdiff_jax.shifted import Shifted, accepts_shifted


def _model(kernels, dtype, layers=3):
    cfg = ModelConfig.from_hf(tiny_hf_config("llama", num_hidden_layers=layers))
    return M.CausalLM(cfg, rngs=nnx.Rngs(0), backend=kernels, dtype=dtype, param_dtype=dtype)


def _ids(vocab, B=2, T=12):
    return jax.random.randint(jax.random.key(1), (B, T), 0, vocab)


def _bits(x):
    return np.asarray(jnp.asarray(x, jnp.float32)).view(np.uint32)


@pytest.mark.parametrize("kernels", ["xla", "cpu_fast"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("remat", ["none", "full"])
def test_the_point_shifted_in_the_scan_is_the_made_point(kernels, dtype, remat):
    model = _model(kernels, dtype)
    M.set_remat(model, remat)
    fn, params = M.functional(stacked.scanned(model))
    assert accepts_shifted(fn) and accepts_shifted(fn.token_logprobs) and accepts_shifted(fn.hidden_state)
    ids = _ids(model.config.vocab_size)
    labels = ids.at[:, :3].set(-100)
    direction = jax.tree.map(lambda a: jax.random.normal(jax.random.key(3), a.shape, a.dtype), params)
    point = Shifted(params, direction, jnp.float32(-0.01))

    def loss(p):
        return fn.token_logprobs(p, ids, labels).logp.sum()

    lazy, made = jax.jit(loss)(point), jax.jit(lambda pt: loss(pt.materialize()))(point)
    assert _bits(lazy) == _bits(made)
    assert float(made) != float(jax.jit(loss)(params))  # the point moved
    h_lazy = jax.jit(lambda pt: fn.hidden_state(pt, ids, layer=1))(point)
    h_made = jax.jit(lambda pt: fn.hidden_state(pt.materialize(), ids, layer=1))(point)
    np.testing.assert_array_equal(_bits(h_lazy), _bits(h_made))


def _unmarked(fn):
    """``fn`` without the `takes_shifted` mark: GeN then makes its probe point as a tree."""

    def apply_fn(p, *a, **k):
        return fn(p, *a, **k)

    apply_fn.token_logprobs = lambda p, *a, **k: fn.token_logprobs(p, *a, **k)
    apply_fn.hidden_state = lambda p, *a, **k: fn.hidden_state(p, *a, **k)
    return apply_fn


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_a_gen_step_probing_lazily_equals_one_probing_a_made_point(dtype):
    from ngdiff_jax.training import OptimConfig, load_method, make_optimizer, make_unlearn_step

    model = _model("cpu_fast", dtype)
    M.set_remat(model, "full")
    fn, params = M.functional(stacked.scanned(model))
    ids = _ids(model.config.vocab_size)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "labels": ids}
    method = load_method("ngdiff")
    tx = make_optimizer(method, OptimConfig(), 10)  # moments in the gradients' dtype
    out = {}
    for name, f in (("lazy", fn), ("made", _unmarked(fn))):
        assert accepts_shifted(f) is (name == "lazy")
        step = jax.jit(make_unlearn_step(f, method, tx))
        p, s = params, tx.init(params)
        for _ in range(2):  # the first step probes
            p, s, m = step(p, s, batch, batch, jax.random.key_data(jax.random.key(0)))
        out[name] = (p, m["learning_rate"])
    (p_lazy, lr_lazy), (p_made, lr_made) = out["lazy"], out["made"]
    assert _bits(lr_lazy) == _bits(lr_made) and float(lr_lazy) != 1e-5  # the rate was adapted
    for a, b in zip(jax.tree.leaves(p_lazy), jax.tree.leaves(p_made)):
        assert a.dtype == dtype
        np.testing.assert_array_equal(_bits(a), _bits(b))


def test_gen_scales_a_bfloat16_update_after_probing_from_its_bits():
    """The bfloat16 leaves are scaled after the cond (from the update's bits), the float32 ones
    inside it: both are the adapted rate times the update, rounded once."""
    params = {"a": jnp.linspace(-1.0, 1.0, 64, dtype=jnp.bfloat16), "b": jnp.linspace(0.0, 2.0, 32)}
    updates = {"a": jnp.linspace(0.5, -0.5, 64, dtype=jnp.bfloat16), "b": jnp.linspace(1.0, -1.0, 32)}

    def loss(p):
        return sum(jnp.sum(jnp.square(x.astype(jnp.float32) - 0.3)) for x in jax.tree.leaves(p))

    tx = scale_by_gen(0.05, every=1, smoothing=0.0)
    out, state = jax.jit(lambda u, s, p: tx.update(u, s, p, value_fn=loss))(updates, tx.init(params), params)
    rate = state.learning_rate
    assert float(rate) != 0.05
    for k in updates:
        assert out[k].dtype == updates[k].dtype
        want = rate.astype(updates[k].dtype) * updates[k]
        np.testing.assert_array_equal(_bits(out[k]), _bits(want))


def test_a_settled_weight_has_the_plain_gradient():
    """`settled` (the tied embedding read by the lookup and the head) changes no value."""
    w = jax.random.normal(jax.random.key(0), (64, 16)).astype(jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (8, 16)).astype(jnp.bfloat16)
    ids = jnp.array([1, 5, 5, 63])

    def loss(w, wrap):
        v = wrap(w)
        return jnp.sum((x @ v.T).astype(jnp.float32) ** 2) + jnp.sum(v[ids].astype(jnp.float32))

    g_plain = jax.jit(jax.grad(lambda w: loss(w, lambda v: v)))(w)
    g_settled = jax.jit(jax.grad(lambda w: loss(w, settled)))(w)
    assert g_settled.dtype == jnp.bfloat16
    np.testing.assert_array_equal(_bits(g_plain), _bits(g_settled))
    f = jnp.ones((3,))
    np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(settled(v) * 2.0))(f), 2.0 * f)


def test_differentiating_through_bfloat16_bits_raises_not_zero():
    """GeN carries bfloat16 parameters and updates as bits; bits have no derivative, so a
    meta-gradient through a bfloat16 GeN update is refused instead of being a silent zero (a
    float32 one works)."""

    def loss(p):
        return jnp.sum(jnp.square(p["a"].astype(jnp.float32) - 0.3))

    tx = scale_by_gen(0.05, every=1, smoothing=0.0)

    def meta(updates, dtype):
        params = {"a": jnp.linspace(-1.0, 1.0, 16, dtype=dtype)}
        out, _ = tx.update(updates, tx.init(params), params, value_fn=loss)
        return jnp.sum(out["a"].astype(jnp.float32))

    u32 = {"a": jnp.linspace(0.5, -0.5, 16)}
    g = jax.grad(meta)(u32, jnp.float32)["a"]
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0
    with pytest.raises(ValueError, match="carried as its bits"):
        jax.grad(meta)(jax.tree.map(lambda x: x.astype(jnp.bfloat16), u32), jnp.bfloat16)
