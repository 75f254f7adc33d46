"""Composition of the task-gradient optimizer with optax, NNX and JAX transforms: the task
gradients travel as one value (TaskGrads), so every optax wrapper either sees every task (checked
against hand math) or fails by tree structure; our own entry points raise a message naming the fix."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ngdiff_jax.optim import (
    TaskGrads,
    gdiff,
    inject_stats,
    ngdiff,
    scale_by_gen,
    skip_if_nonfinite,
    unlearning_optimizer,
)

PARAMS = {"a": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array([[0.3, 0.1], [-0.4, 2.0]])}
G_R = {"a": jnp.array([3.0, 0.0, 4.0]), "b": jnp.array([[1.0, 0.0], [0.0, -2.0]])}
G_F = {"a": jnp.array([0.0, -6.0, 1.0]), "b": jnp.array([[0.5, 3.0], [1.0, 0.0]])}


def _flat(t):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)])


def _nan(t):
    return jax.tree.map(lambda x: x.at[0].set(jnp.nan) if x.ndim == 1 else x, t)


# ------------------------------------------------------------------ the task gradients as one value
TASKS = TaskGrads(retain=G_R, forget=G_F)


def _ngdiff_ref(r, f):
    return r / np.linalg.norm(r) + f / np.linalg.norm(f)


def test_single_task_combiner_is_refused():
    with pytest.raises(TypeError, match="combiner must be a combiner.*single-task transformation such as optax.sgd"):
        unlearning_optimizer(combiner=optax.sgd(1.0))


def test_a_chain_without_combiner_fails_by_tree_structure():
    tx = optax.chain(optax.sgd(1.0))
    updates, _ = tx.update(TASKS, tx.init(PARAMS), PARAMS)
    assert isinstance(updates, TaskGrads)  # nothing combined the tasks ...
    with pytest.raises((ValueError, TypeError)):
        optax.apply_updates(PARAMS, updates)  # ... so the update does not fit the params


def test_step_refuses_a_single_task_optimizer():
    from ngdiff_jax.training import load_method, make_unlearn_step

    method = load_method("gdiff")
    step = make_unlearn_step(lambda p, ids, mask: jnp.zeros(ids.shape + (8,)) + p["a"][0], method, optax.sgd(1.0))
    batch = {"input_ids": np.ones((1, 4), np.int32), "attention_mask": np.ones((1, 4), np.int32),
             "labels": np.ones((1, 4), np.int32)}  # fmt: skip
    params = {"a": jnp.ones(2)}
    with pytest.raises(ValueError, match="start its chain with a combiner"):
        step(params, optax.sgd(1.0).init(params), batch, batch, jax.random.key(0))


def test_the_old_forget_grads_keyword_names_the_new_call():
    with pytest.raises(ValueError, match=r"forget_grads= is gone.*TaskGrads\(retain=g_r, forget=g_f\)"):
        ngdiff().update(G_R, ngdiff().init(PARAMS), PARAMS, forget_grads=G_F)


def test_a_single_tree_or_other_tasks_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="expects the task gradients as one value"):
        ngdiff().update(G_R, ngdiff().init(PARAMS), PARAMS)
    with pytest.raises(ValueError, match=r"built for the tasks \('retain', 'forget'\).*\('forget', 'retain'\)"):
        ngdiff().update(TaskGrads(forget=G_F, retain=G_R), ngdiff().init(PARAMS), PARAMS)


def test_a_second_combiner_after_a_combiner_is_refused():
    tx = optax.chain(ngdiff(), gdiff())
    with pytest.raises(ValueError, match="gdiff: expects the task gradients as one value.*after another combiner"):
        tx.update(TASKS, tx.init(PARAMS), PARAMS)


def test_multisteps_fails_by_tree_structure():
    """optax.MultiSteps accumulates ``updates`` shaped like the params: given every task at once it
    cannot accumulate them (run.micro_batches=k accumulates each task inside the step)."""
    for inner in (unlearning_optimizer("ngdiff", 1e-2, gen=False), optax.chain(ngdiff(), optax.sgd(0.1))):
        tx = optax.MultiSteps(inner, every_k_schedule=2)
        with pytest.raises((ValueError, TypeError)):
            tx.update(TASKS, tx.init(PARAMS), PARAMS)


def test_apply_if_finite_fails_by_tree_structure():
    """optax.apply_if_finite checks ``updates`` (here every task) but returns zeros shaped like its
    input on a rejected step, which is not the params' shape: it fails when traced. skip_if_nonfinite
    is the wrapper for combiner chains."""
    tx = optax.apply_if_finite(optax.chain(ngdiff(), optax.sgd(0.1)), max_consecutive_errors=3)
    with pytest.raises(TypeError, match="same pytree structure"):
        tx.update(TASKS, tx.init(PARAMS), PARAMS)


def test_skip_if_nonfinite_checks_every_task():
    tx = skip_if_nonfinite(optax.chain(ngdiff(), optax.adam(0.1)))
    state = tx.init(PARAMS)
    updates, new_state = tx.update(TaskGrads(retain=G_R, forget=_nan(G_F)), state, PARAMS)
    assert not _flat(updates).any() and int(new_state.skipped) == 1
    jax.tree.map(np.testing.assert_array_equal, new_state.inner_state, state.inner_state)


def test_global_clipping_before_the_combiner_clips_every_task_jointly():
    tx = optax.chain(optax.clip_by_global_norm(1.0), gdiff())
    d, _ = tx.update(TASKS, tx.init(PARAMS), PARAMS)
    joint = np.linalg.norm(np.concatenate([_flat(G_R), _flat(G_F)]))
    np.testing.assert_allclose(_flat(d), (_flat(G_R) + _flat(G_F)) / joint, rtol=1e-6)


@pytest.mark.parametrize("clip", [1.0, 4.0, 100.0])
def test_per_task_preprocessing_equals_the_combiners_clip_norm(clip):
    from optax.experimental import aggregating

    from ngdiff_jax.optim import per_task

    want, _ = gdiff(1.0, 0.5, clip_norm=clip).update(TASKS, gdiff().init(PARAMS))
    for tx in (optax.chain(per_task(optax.clip_by_global_norm(clip)), gdiff(1.0, 0.5)),
               aggregating.process(per_task(optax.clip_by_global_norm(clip)), gdiff(1.0, 0.5), optax.identity())):
        d, _ = tx.update(TASKS, tx.init(PARAMS), PARAMS)
        np.testing.assert_allclose(_flat(d), _flat(want), rtol=1e-6)


def test_process_with_per_task_preprocessing_and_the_optimizer_after():
    from optax.experimental import aggregating

    from ngdiff_jax.optim import per_task

    tx = aggregating.process(per_task(optax.scale(2.0)), ngdiff(), optax.sgd(0.1))
    updates, _ = jax.jit(tx.update)(TASKS, tx.init(PARAMS), PARAMS)
    np.testing.assert_allclose(_flat(updates), -0.1 * _ngdiff_ref(_flat(G_R), _flat(G_F)), rtol=1e-6)
    assert isinstance(ngdiff(), aggregating.Aggregator)


def test_nested_chain_with_combiner_first_is_accepted():
    tx = optax.chain(optax.chain(ngdiff(), optax.scale_by_adam()), optax.scale(-0.1))
    updates, _ = tx.update(TASKS, tx.init(PARAMS), PARAMS)
    assert np.isfinite(_flat(updates)).all()


# ------------------------------------------------------------------ per-task clipping
@pytest.mark.parametrize("clip", [1.0, 4.0, 100.0])
def test_per_task_clipping(clip):
    tx = gdiff(1.0, 0.5, clip_norm=clip)
    d, state = tx.update(TASKS, tx.init(PARAMS))
    r, f = _flat(G_R), _flat(G_F)
    nr, nf = np.linalg.norm(r), np.linalg.norm(f)
    want = r * min(1.0, clip / nr) + 0.5 * f * min(1.0, clip / nf)
    np.testing.assert_allclose(_flat(d), want, rtol=1e-6)
    np.testing.assert_allclose([state.norms["retain"], state.norms["forget"]], [nr, nf], rtol=1e-6)  # before


def test_clip_norm_must_be_positive():
    with pytest.raises(ValueError, match="clip_norm must be > 0"):
        ngdiff(clip_norm=0.0)


# ------------------------------------------------------------------ masking
def test_masking_wraps_the_part_after_the_combiner():
    """Masking the combined direction works as in any optax chain; a mask or partition around the
    combiner fails by tree structure (it would mask ``updates`` shaped like the params); to combine
    the trained leaves only, take the task gradients with respect to those leaves (LoRA, nnx.DiffState)."""
    tx = optax.chain(ngdiff(eps=0.0), optax.masked(optax.sgd(1.0), {"a": True, "b": False}))
    updates, _ = tx.update(TASKS, tx.init(PARAMS), PARAMS)
    d = _ngdiff_ref(_flat(G_R), _flat(G_F))
    np.testing.assert_allclose(updates["a"], -d[:3], rtol=1e-6)
    np.testing.assert_allclose(updates["b"], d[3:].reshape(2, 2), rtol=1e-6)  # unmasked: passes through
    for bad in (optax.masked(optax.chain(ngdiff(), optax.sgd(1.0)), {"a": True, "b": False}),
                optax.multi_transform({"t": optax.chain(ngdiff(), optax.sgd(1.0)), "f": optax.set_to_zero()},
                                      {"a": "t", "b": "f"})):  # fmt: skip
        with pytest.raises((ValueError, TypeError)):
            bad.update(TASKS, bad.init(PARAMS), PARAMS)


# ------------------------------------------------------------------ pluggable inner optimizer
def test_inner_optimizer_weight_decay_and_mu_dtype():
    lr, wd = 0.1, 0.01
    tx = unlearning_optimizer("gdiff", lr, gen=False, optimizer=optax.identity(), weight_decay=wd)
    updates, _ = tx.update(TaskGrads(retain=G_R, forget=G_F), tx.init(PARAMS), PARAMS)
    want = -lr * (_flat(G_R) + _flat(G_F) + wd * _flat(PARAMS))
    np.testing.assert_allclose(_flat(updates), want, rtol=1e-6)

    tx = unlearning_optimizer("ngdiff", lr, gen=False, optimizer=optax.scale_by_lion(b1=0.9))
    updates, _ = tx.update(TaskGrads(retain=G_R, forget=G_F), tx.init(PARAMS), PARAMS)
    d = _flat(G_R) / np.linalg.norm(_flat(G_R)) + _flat(G_F) / np.linalg.norm(_flat(G_F))
    np.testing.assert_allclose(_flat(updates), -lr * np.sign(d), rtol=1e-6)  # lion's first step: sign(d)

    state = unlearning_optimizer("ngdiff", lr, mu_dtype=jnp.bfloat16, eps_root=1e-16).init(PARAMS)
    mus = [x for p, x in jax.tree_util.tree_flatten_with_path(state)[0] if "mu" in jax.tree_util.keystr(p)]
    assert mus and all(x.dtype == jnp.bfloat16 for x in mus)


def test_make_optimizer_weight_decay_and_adam_keys():
    from ngdiff_jax.training import OptimConfig, load_method, make_optimizer

    method = load_method("gdiff", rate="constant")
    cfg = OptimConfig(lr=0.1, weight_decay=0.5, eps_root=1e-16, b1=0.0, adam_eps=1e-8)
    tx = make_optimizer(method, cfg, total_steps=10)  # raised before: weight decay was not supported
    params = {"w": jnp.zeros(2)}
    updates, _ = tx.update(TaskGrads(retain={"w": jnp.zeros(2)}, forget={"w": jnp.zeros(2)}), tx.init(params), params)
    assert not _flat(updates).any()
    params = {"w": jnp.ones(2)}
    updates, _ = tx.update(TaskGrads(retain={"w": jnp.zeros(2)}, forget={"w": jnp.zeros(2)}), tx.init(params), params)
    np.testing.assert_allclose(_flat(updates), -0.1 * 0.5 * np.ones(2), rtol=1e-5)  # decay only


@pytest.mark.slow
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
        u, s = tx.update(TaskGrads(retain=jax.grad(_quad_loss)(p), forget=jax.grad(lambda q: -_quad_loss(q))(p)), s, p,
                         value_fn=_quad_loss)
        return optax.apply_updates(p, u), s

    keys = jax.random.split(jax.random.key(0), 2)
    params, state = jax.vmap(run)(keys)
    assert inject_stats(state)["learning_rate"].shape == (2,)
    np.testing.assert_allclose(params["w"][1], run(keys[1])[0]["w"], rtol=1e-6)


# ------------------------------------------------------------------ sharding (8 simulated devices)
def test_combiners_and_gen_under_shard_map_equal_unsharded(devices8):
    """Combiners (axis_name), GeN and total-norm clipping under shard_map on 8 devices equal the
    unsharded transformations."""
    from functools import partial

    from jax.sharding import PartitionSpec as P

    from ngdiff_jax.optim import clip_by_total_norm, mgda, pcgrad

    mesh = jax.sharding.Mesh(np.array(devices8), ("x",))
    k = jax.random.split(jax.random.key(0), 4)
    g_r = {"a": jax.random.normal(k[0], (16, 3)), "b": jax.random.normal(k[1], (8,)) * 1e3}
    g_f = {"a": jax.random.normal(k[2], (16, 3)) * 1e-4, "b": -0.5 * g_r["b"] + 100 * jax.random.normal(k[3], (8,))}
    spec = {"a": P("x"), "b": P("x")}
    for make in (ngdiff, gdiff, mgda, pcgrad, lambda **kw: ngdiff(clip_norm=0.5, **kw)):
        norm_based = make is not gdiff  # gdiff's direction needs no reduction (its logged norms do)
        ref = make()
        d_ref, s_ref = ref.update(TaskGrads(retain=g_r, forget=g_f), ref.init(g_r))
        tx = make(axis_name="x")

        def f(r, fg, tx=tx):
            return tx.update(TaskGrads(retain=r, forget=fg), tx.init(r))

        d, s = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(spec, spec), out_specs=(spec, P())))(g_r, g_f)
        for x, y in zip(jax.tree.leaves(d), jax.tree.leaves(d_ref)):
            np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-7)
        for x, y in zip(jax.tree.leaves(s), jax.tree.leaves(s_ref)):
            np.testing.assert_allclose(x, y, rtol=2e-5)
        if not norm_based:
            continue
        # without axis_name the per-shard norms differ: the option is what makes it right
        d_bad, _ = jax.jit(jax.shard_map(partial(f, tx=make()), mesh=mesh, in_specs=(spec, spec),
                                         out_specs=(spec, P()), check_vma=False))(g_r, g_f)
        assert not all(np.allclose(x, y, rtol=1e-3) for x, y in zip(jax.tree.leaves(d_bad), jax.tree.leaves(d_ref)))
    # GeN: data sharded over x, probe losses averaged over the shards
    X = jax.random.normal(k[0], (64, 2))
    p = {"w": jnp.array([0.5, -1.0])}
    loss = lambda p, X: jnp.mean((X @ p["w"] - 1.0) ** 2)
    ref = scale_by_gen(0.3, every=1, smoothing=0.0, clip_factor=10.0)
    u = jax.tree.map(lambda x: -x, jax.grad(loss)(p, X))
    _, s_ref = ref.update(u, ref.init(p), p, value_fn=lambda q: loss(q, X))
    tx = scale_by_gen(0.3, every=1, smoothing=0.0, clip_factor=10.0, axis_name="x")

    def g(Xs):
        return tx.update(u, tx.init(p), p, value_fn=lambda q: loss(q, Xs))[1].learning_rate
    lr = jax.jit(jax.shard_map(g, mesh=mesh, in_specs=P("x"), out_specs=P()))(X)
    np.testing.assert_allclose(lr, s_ref.learning_rate, rtol=1e-5)
    # total-norm clipping of the combined direction: the norm is summed over the shards
    ref_c, _ = clip_by_total_norm(1.0).update(g_r, optax.EmptyState())
    clip = clip_by_total_norm(1.0, axis_name="x")
    c = jax.jit(jax.shard_map(lambda t: clip.update(t, optax.EmptyState())[0], mesh=mesh, in_specs=(spec,),
                              out_specs=spec))(g_r)
    for x, y in zip(jax.tree.leaves(c), jax.tree.leaves(ref_c)):
        np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-9)

