"""Composition of the two-task optimizer with optax, NNX and JAX transforms: every combination
that used to give a wrong result silently now either works (checked against hand math) or raises
a message naming the right tool."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ngdiff_jax.optim import (
    gdiff,
    inject_stats,
    ngdiff,
    scale_by_gen,
    skip_if_nonfinite,
    two_task,
    unlearning_optimizer,
)

PARAMS = {"a": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array([[0.3, 0.1], [-0.4, 2.0]])}
G_R = {"a": jnp.array([3.0, 0.0, 4.0]), "b": jnp.array([[1.0, 0.0], [0.0, -2.0]])}
G_F = {"a": jnp.array([0.0, -6.0, 1.0]), "b": jnp.array([[0.5, 3.0], [1.0, 0.0]])}


def _flat(t):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)])


def _nan(t):
    return jax.tree.map(lambda x: x.at[0].set(jnp.nan) if x.ndim == 1 else x, t)


# ------------------------------------------------------------------ single-task parts refused
def test_single_task_combiner_is_refused():
    with pytest.raises(TypeError, match="two-task combiner.*optax.sgd would ignore forget_grads"):
        unlearning_optimizer(combiner=optax.sgd(1.0))


def test_chain_without_combiner_is_refused_by_two_task():
    tx = two_task(optax.chain(optax.sgd(1.0)))
    state = tx.init(PARAMS)
    with pytest.raises(ValueError, match="no two-task combiner ran, so forget_grads were ignored"):
        tx.update(G_R, state, PARAMS, forget_grads=G_F)


def test_step_refuses_a_single_task_optimizer():
    from ngdiff_jax.training import load_method, make_unlearn_step

    method = load_method("gdiff")
    step = make_unlearn_step(lambda p, ids, mask: jnp.zeros(ids.shape + (8,)) + p["a"][0], method, optax.sgd(1.0))
    batch = {"input_ids": np.ones((1, 4), np.int32), "attention_mask": np.ones((1, 4), np.int32),
             "labels": np.ones((1, 4), np.int32)}  # fmt: skip
    params = {"a": jnp.ones(2)}
    with pytest.raises(ValueError, match="no two-task combiner ran"):
        step(params, optax.sgd(1.0).init(params), batch, batch, jax.random.key(0))


def test_multisteps_is_refused_with_the_right_tool():
    for inner in (unlearning_optimizer("ngdiff", 1e-2, gen=False), optax.chain(ngdiff(), optax.sgd(0.1))):
        tx = optax.MultiSteps(inner, every_k_schedule=2)
        state = tx.init(PARAMS)
        with pytest.raises(ValueError, match="MultiSteps accumulates only retain_grads.*run.micro_batches"):
            tx.update(G_R, state, PARAMS, forget_grads=G_F)


def test_apply_if_finite_is_refused_with_the_right_tool():
    tx = optax.apply_if_finite(optax.chain(ngdiff(), optax.sgd(0.1)), max_consecutive_errors=3)
    with pytest.raises(ValueError, match="apply_if_finite checks only retain_grads.*skip_if_nonfinite"):
        tx.update(G_R, tx.init(PARAMS), PARAMS, forget_grads=G_F)


def test_skip_if_nonfinite_checks_forget_grads():
    tx = skip_if_nonfinite(optax.chain(ngdiff(), optax.adam(0.1)))
    state = tx.init(PARAMS)
    updates, new_state = tx.update(G_R, state, PARAMS, forget_grads=_nan(G_F))
    assert not _flat(updates).any() and int(new_state.skipped) == 1
    jax.tree.map(np.testing.assert_array_equal, new_state.inner_state, state.inner_state)


@pytest.mark.parametrize("wrap", [False, True])
def test_clip_before_combiner_is_refused(wrap):
    tx = optax.chain(optax.clip_by_global_norm(1.0), ngdiff(), optax.sgd(0.1))
    tx = two_task(tx) if wrap else tx
    with pytest.raises(ValueError, match="must be the first member of the chain.*clip_norm="):
        tx.update(G_R, tx.init(PARAMS), PARAMS, forget_grads=G_F)


def test_nested_chain_with_combiner_first_is_accepted():
    tx = two_task(optax.chain(optax.chain(ngdiff(), optax.scale_by_adam()), optax.scale(-0.1)))
    updates, _ = tx.update(G_R, tx.init(PARAMS), PARAMS, forget_grads=G_F)
    assert np.isfinite(_flat(updates)).all()


# ------------------------------------------------------------------ per-task clipping
@pytest.mark.parametrize("clip", [1.0, 4.0, 100.0])
def test_per_task_clipping(clip):
    tx = gdiff(1.0, 0.5, clip_norm=clip)
    d, state = tx.update(G_R, tx.init(PARAMS), forget_grads=G_F)
    r, f = _flat(G_R), _flat(G_F)
    nr, nf = np.linalg.norm(r), np.linalg.norm(f)
    want = r * min(1.0, clip / nr) + 0.5 * f * min(1.0, clip / nf)
    np.testing.assert_allclose(_flat(d), want, rtol=1e-6)
    np.testing.assert_allclose([state.retain_norm, state.forget_norm], [nr, nf], rtol=1e-6)  # before clipping


def test_clip_norm_must_be_positive():
    with pytest.raises(ValueError, match="clip_norm must be > 0"):
        ngdiff(clip_norm=0.0)


# ------------------------------------------------------------------ masking
def test_multi_transform_norms_over_trained_leaves():
    labels = {"a": "train", "b": "freeze"}
    tx = two_task(optax.multi_transform(
        {"train": optax.chain(ngdiff(eps=0.0), optax.sgd(1.0)), "freeze": optax.set_to_zero()},
        labels, mask_compatible_extra_args=True))  # fmt: skip
    updates, _ = tx.update(G_R, tx.init(PARAMS), PARAMS, forget_grads=G_F)
    r, f = np.asarray(G_R["a"]), np.asarray(G_F["a"])
    np.testing.assert_allclose(updates["a"], -(r / np.linalg.norm(r) + f / np.linalg.norm(f)), rtol=1e-6)
    assert not np.asarray(updates["b"]).any()


def test_masked_without_mask_compatible_extra_args_names_it():
    tx = optax.masked(optax.chain(ngdiff(), optax.sgd(1.0)), {"a": True, "b": False})
    with pytest.raises(ValueError, match="mask_compatible_extra_args=True"):
        tx.update(G_R, tx.init(PARAMS), PARAMS, forget_grads=G_F)


# ------------------------------------------------------------------ pluggable inner optimizer
def test_inner_optimizer_weight_decay_and_mu_dtype():
    lr, wd = 0.1, 0.01
    tx = unlearning_optimizer("gdiff", lr, gen=False, optimizer=optax.identity(), weight_decay=wd)
    updates, _ = tx.update(G_R, tx.init(PARAMS), PARAMS, forget_grads=G_F)
    want = -lr * (_flat(G_R) + _flat(G_F) + wd * _flat(PARAMS))
    np.testing.assert_allclose(_flat(updates), want, rtol=1e-6)

    tx = unlearning_optimizer("ngdiff", lr, gen=False, optimizer=optax.scale_by_lion(b1=0.9))
    updates, _ = tx.update(G_R, tx.init(PARAMS), PARAMS, forget_grads=G_F)
    d = _flat(G_R) / np.linalg.norm(_flat(G_R)) + _flat(G_F) / np.linalg.norm(_flat(G_F))
    np.testing.assert_allclose(_flat(updates), -lr * np.sign(d), rtol=1e-6)  # lion's first step: sign(d)

    state = unlearning_optimizer("ngdiff", lr, mu_dtype=jnp.bfloat16, eps_root=1e-16).init(PARAMS)
    mus = [x for p, x in jax.tree_util.tree_flatten_with_path(state)[0] if "mu" in jax.tree_util.keystr(p)]
    assert mus and all(x.dtype == jnp.bfloat16 for x in mus)


def test_make_optimizer_weight_decay_and_adam_keys():
    from ngdiff_jax.training import OptimConfig, load_method, make_optimizer

    method = load_method("gdiff", lr_rule="constant", warmup_epochs=0.0)
    cfg = OptimConfig(lr=0.1, weight_decay=0.5, eps_root=1e-16, b1=0.0, adam_eps=1e-8)
    tx = make_optimizer(method, cfg, total_steps=10)  # raised before: weight decay was not supported
    params = {"w": jnp.zeros(2)}
    updates, _ = tx.update({"w": jnp.zeros(2)}, tx.init(params), params, forget_grads={"w": jnp.zeros(2)})
    assert not _flat(updates).any()
    params = {"w": jnp.ones(2)}
    updates, _ = tx.update({"w": jnp.zeros(2)}, tx.init(params), params, forget_grads={"w": jnp.zeros(2)})
    np.testing.assert_allclose(_flat(updates), -0.1 * 0.5 * np.ones(2), rtol=1e-5)  # decay only


def test_meta_gradient_through_unlearning_steps_on_a_tiny_lm_is_finite():
    """``jax.grad`` of the retain loss after 3 unlearning steps (GeN, Adam with ``eps_root``) with
    respect to the initial parameters of a tiny LM whose embedding gradient has exactly-zero
    rows (tokens absent from the batch)."""
    from flax import nnx

    from ngdiff_jax import models
    from ngdiff_jax.training import OptimConfig, load_method, make_optimizer, make_unlearn_step

    hf = {"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
          "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
          "max_position_embeddings": 32}  # fmt: skip
    apply_fn, params = models.functional(models.from_config(hf, rngs=nnx.Rngs(0), backend="xla"))
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 30, (2, 8)).astype(np.int32)  # tokens 30..63 never appear
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids}
    method = load_method("ngdiff")
    tx = make_optimizer(method, OptimConfig(lr=1e-2, gen_every=2, eps_root=1e-16), total_steps=3)
    step = make_unlearn_step(apply_fn, method, tx)

    def final_loss(p0):
        def body(carry, _):
            p, s, m = step(*carry, batch, batch, jax.random.key(0))
            return (p, s), m["retain_loss"]

        _, losses = jax.lax.scan(body, (p0, tx.init(p0)), None, length=4)
        return losses[-1]  # the retain loss after 3 unlearning steps

    g = jax.jit(jax.grad(final_loss))(params)
    flat = _flat(g)
    assert np.isfinite(flat).all() and np.abs(flat).max() > 0


# ------------------------------------------------------------------ traceable GeN
def _quad_loss(p):
    return 0.5 * jnp.sum(jnp.array([1.0, 3.0]) * p["w"] ** 2)


Q_PARAMS = {"w": jnp.array([1.0, 1.0])}


def _gen_run(tx, steps=3, params=Q_PARAMS):
    state = tx.init(params)
    for _ in range(steps):
        u, state = tx.update(jax.grad(_quad_loss)(params), state, params, value_fn=_quad_loss)
        params = optax.apply_updates(params, u)
    return params, state


def test_inject_hyperparams_gen_under_jit_and_multiplier():
    ref = optax.chain(optax.scale(-1.0), scale_by_gen(0.1, every=1, smoothing=0.0, rate_multiplier=0.5))
    p_ref, s_ref = _gen_run(ref)
    inj = optax.chain(optax.scale(-1.0), optax.inject_hyperparams(scale_by_gen)(
        learning_rate=0.1, every=1, smoothing=0.0, rate_multiplier=0.5))  # fmt: skip
    state = inj.init(Q_PARAMS)
    params = Q_PARAMS
    upd = jax.jit(lambda g, s, p: inj.update(g, s, p, value_fn=_quad_loss))
    for _ in range(3):
        u, state = upd(jax.grad(_quad_loss)(params), state, params)
        params = optax.apply_updates(params, u)
    np.testing.assert_allclose(_flat(params), _flat(p_ref), rtol=1e-6)
    np.testing.assert_allclose(inject_stats(state)["learning_rate"], inject_stats(s_ref)["learning_rate"], rtol=1e-6)
    # the multiplier really scales the step: without it the first update is twice as large
    p1, _ = _gen_run(optax.chain(optax.scale(-1.0), scale_by_gen(0.1, every=1, smoothing=0.0)), steps=1)
    p_half, _ = _gen_run(ref, steps=1)
    np.testing.assert_allclose(_flat(Q_PARAMS) - _flat(p1), 2 * (_flat(Q_PARAMS) - _flat(p_half)), rtol=1e-6)


def test_gen_schedule_multiplier():
    sched = optax.linear_schedule(0.0, 1.0, 4)
    tx = optax.chain(optax.scale(-1.0), scale_by_gen(0.1, every=1, rate_multiplier=sched))
    p, _ = _gen_run(tx, steps=1)
    np.testing.assert_array_equal(_flat(p), _flat(Q_PARAMS))  # warm-up starts at 0


def test_tree_set_changes_the_live_rate():
    tx = optax.chain(optax.scale(-1.0), scale_by_gen(0.1, every=100))
    state = tx.init(Q_PARAMS)
    u, state = tx.update(jax.grad(_quad_loss)(Q_PARAMS), state, Q_PARAMS, value_fn=_quad_loss)  # probes at count 0
    state = optax.tree.set(state, learning_rate=jnp.asarray(0.25))
    u, state = tx.update(jax.grad(_quad_loss)(Q_PARAMS), state, Q_PARAMS, value_fn=_quad_loss)
    np.testing.assert_allclose(_flat(u), -0.25 * _flat(jax.grad(_quad_loss)(Q_PARAMS)), rtol=1e-6)


def test_vmap_over_initial_rates_and_batched_stats():
    rates = jnp.array([0.05, 0.1, 0.2])

    def run(lr):
        tx = optax.chain(optax.scale(-1.0), scale_by_gen(lr, every=1, smoothing=0.5))
        return _gen_run(tx, steps=2)

    params, state = jax.vmap(run)(rates)
    stats = inject_stats(state)
    assert stats["learning_rate"].shape == (3,)
    for i, lr in enumerate([0.05, 0.1, 0.2]):
        p_i, s_i = run(lr)
        np.testing.assert_allclose(params["w"][i], p_i["w"], rtol=1e-6)
        np.testing.assert_allclose(stats["learning_rate"][i], inject_stats(s_i)["learning_rate"], rtol=1e-6)


def test_vmap_over_seeds_of_the_full_optimizer():
    def run(key):
        p = {"w": jax.random.normal(key, (2,))}
        tx = unlearning_optimizer("ngdiff", 0.1, gen_every=1)
        s = tx.init(p)
        u, s = tx.update(jax.grad(_quad_loss)(p), s, p, forget_grads=jax.grad(lambda q: -_quad_loss(q))(p),
                         value_fn=_quad_loss)
        return optax.apply_updates(p, u), s

    keys = jax.random.split(jax.random.key(0), 2)
    params, state = jax.vmap(run)(keys)
    assert inject_stats(state)["learning_rate"].shape == (2,)
    np.testing.assert_allclose(params["w"][1], run(keys[1])[0]["w"], rtol=1e-6)


# ------------------------------------------------------------------ sharding (8 simulated devices)
def test_combiners_and_gen_under_shard_map_equal_unsharded():
    import os
    import subprocess
    import sys

    env = {"XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", _SHARDED], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "OK" in proc.stdout, proc.stdout[-2000:]


_SHARDED = r'''
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import PartitionSpec as P
from ngdiff_jax.optim import ngdiff, gdiff, mgda, pcgrad, scale_by_gen
assert jax.device_count() == 8
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
k = jax.random.split(jax.random.key(0), 4)
g_r = {"a": jax.random.normal(k[0], (16, 3)), "b": jax.random.normal(k[1], (8,)) * 1e3}
g_f = {"a": jax.random.normal(k[2], (16, 3)) * 1e-4, "b": -0.5 * g_r["b"] + 100 * jax.random.normal(k[3], (8,))}
spec = {"a": P("x"), "b": P("x")}
for make in (ngdiff, gdiff, mgda, pcgrad, lambda **kw: ngdiff(clip_norm=0.5, **kw)):
    norm_based = make is not gdiff  # gdiff's direction needs no reduction (its logged norms do)
    ref = make()
    d_ref, s_ref = ref.update(g_r, ref.init(g_r), forget_grads=g_f)
    tx = make(axis_name="x")
    def f(r, fg):
        d, s = tx.update(r, tx.init(r), forget_grads=fg)
        return d, s
    d, s = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(spec, spec), out_specs=(spec, P())))(g_r, g_f)
    for x, y in zip(jax.tree.leaves(d), jax.tree.leaves(d_ref)):
        np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-7)
    for x, y in zip(s, s_ref):
        np.testing.assert_allclose(x, y, rtol=2e-5)
    if not norm_based:
        continue
    # without axis_name the per-shard norms differ: the option is what makes it right
    tx = make()
    d_bad, _ = jax.jit(jax.shard_map(lambda r, fg: tx.update(r, tx.init(r), forget_grads=fg), mesh=mesh,
                                     in_specs=(spec, spec), out_specs=(spec, P()), check_vma=False))(g_r, g_f)
    assert not all(np.allclose(x, y, rtol=1e-3) for x, y in zip(jax.tree.leaves(d_bad), jax.tree.leaves(d_ref)))
# GeN: data sharded over x, probe losses averaged over the shards
X = jax.random.normal(k[0], (64, 2)); p = {"w": jnp.array([0.5, -1.0])}
loss = lambda p, X: jnp.mean((X @ p["w"] - 1.0) ** 2)
ref = scale_by_gen(0.3, every=1, smoothing=0.0, clip_factor=10.0)
u = jax.grad(loss)(p, X); u = jax.tree.map(lambda x: -x, u)
_, s_ref = ref.update(u, ref.init(p), p, value_fn=lambda q: loss(q, X))
tx = scale_by_gen(0.3, every=1, smoothing=0.0, clip_factor=10.0, axis_name="x")
def g(Xs):
    return tx.update(u, tx.init(p), p, value_fn=lambda q: loss(q, Xs))[1].learning_rate
lr = jax.jit(jax.shard_map(g, mesh=mesh, in_specs=P("x"), out_specs=P()))(X)
np.testing.assert_allclose(lr, s_ref.learning_rate, rtol=1e-5)
# total-norm clipping of the combined direction: the norm is summed over the shards
from ngdiff_jax.optim import clip_by_total_norm
import optax
ref_c, _ = clip_by_total_norm(1.0).update(g_r, optax.EmptyState())
clip = clip_by_total_norm(1.0, axis_name="x")
c = jax.jit(jax.shard_map(lambda t: clip.update(t, optax.EmptyState())[0], mesh=mesh, in_specs=(spec,),
                          out_specs=spec))(g_r)
for x, y in zip(jax.tree.leaves(c), jax.tree.leaves(ref_c)):
    np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-9)
print("OK")
'''
