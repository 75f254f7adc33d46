"""unlearning_optimizer: sign, chaining, skipping, stats, and flax.nnx.Optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import ngdiff_jax
from ngdiff_jax.optim import (
    COMBINERS,
    TaskGrads,
    TaskOptimizer,
    gdiff,
    inject_stats,
    ngdiff,
    unlearning_optimizer,
)

RNG = np.random.default_rng(0)
XA = jnp.asarray(RNG.normal(size=(8, 3)), jnp.float32)
XB = jnp.asarray(XA + 0.3 * RNG.normal(size=(8, 3)), jnp.float32)


def retain_loss(p):
    return jnp.mean((XA @ p["w"] + p["b"] - 1.0) ** 2)


def forget_loss(p):  # a second task whose gradient is not opposed to the first
    return jnp.mean((XB @ p["w"] + p["b"] - 2.0) ** 2)


PARAMS = {"w": jnp.asarray(RNG.normal(size=3), jnp.float32), "b": jnp.zeros((), jnp.float32)}


def test_public_api_reexported():
    for name in ["ngdiff", "gdiff", "mgda", "pcgrad", "scale_by_gen", "unlearning_optimizer"]:
        assert getattr(ngdiff_jax, name) is getattr(ngdiff_jax.optim, name)
    assert set(ngdiff_jax.optim.__all__) <= set(ngdiff_jax.__all__)


@pytest.mark.parametrize("combiner", sorted(COMBINERS))
@pytest.mark.parametrize("adam,gen", [(False, False), (True, True)])
def test_apply_updates_decreases_both_losses(combiner, adam, gen):
    tx = unlearning_optimizer(combiner, 1e-3, adam=adam, gen=gen, gen_every=1)
    g_r, g_f = jax.grad(retain_loss)(PARAMS), jax.grad(forget_loss)(PARAMS)
    extra = {"value_fn": retain_loss} if gen else {}
    u, state = tx.update(TaskGrads(retain=g_r, forget=g_f), tx.init(PARAMS), PARAMS, **extra)
    new = optax.apply_updates(PARAMS, u)
    assert retain_loss(new) < retain_loss(PARAMS)
    assert forget_loss(new) < forget_loss(PARAMS)
    stats = inject_stats(state)
    assert int(stats["skipped"]) == 0
    np.testing.assert_allclose(
        float(stats["retain_norm"]),
        np.linalg.norm(np.concatenate([np.ravel(x) for x in jax.tree.leaves(g_r)])),
        rtol=1e-5,
    )


def test_none_is_plain_sum_and_chain_matches_manual():
    g_r, g_f = jax.grad(retain_loss)(PARAMS), jax.grad(forget_loss)(PARAMS)
    tx = unlearning_optimizer("none", 0.1, adam=False, gen=False)
    u, _ = tx.update(TaskGrads(retain=g_r, forget=g_f), tx.init(PARAMS), PARAMS)
    for k in PARAMS:
        np.testing.assert_allclose(u[k], -0.1 * (g_r[k] + g_f[k]), rtol=1e-6)
    tx = unlearning_optimizer(gdiff(1.0, 0.5), 0.1, adam=False, gen=False)
    u, _ = tx.update(TaskGrads(retain=g_r, forget=g_f), tx.init(PARAMS), PARAMS)
    for k in PARAMS:
        np.testing.assert_allclose(u[k], -0.1 * (g_r[k] + 0.5 * g_f[k]), rtol=1e-6)


def test_schedule_rate_is_recorded():
    sched = optax.linear_schedule(1.0, 0.0, 10)
    tx = unlearning_optimizer("ngdiff", sched, adam=False, gen=False)
    state = tx.init(PARAMS)
    g_r, g_f = jax.grad(retain_loss)(PARAMS), jax.grad(forget_loss)(PARAMS)
    rates = []
    for _ in range(3):
        _, state = tx.update(TaskGrads(retain=g_r, forget=g_f), state, PARAMS)
        rates.append(float(inject_stats(state)["learning_rate"]))
    np.testing.assert_allclose(rates, [1.0, 0.9, 0.8], rtol=1e-6)


def test_nonfinite_step_is_skipped_entirely():
    tx = unlearning_optimizer("ngdiff", 1e-2, adam=True, gen=True, gen_every=1)
    g_r, g_f = jax.grad(retain_loss)(PARAMS), jax.grad(forget_loss)(PARAMS)
    state = tx.init(PARAMS)
    _, state = tx.update(TaskGrads(retain=g_r, forget=g_f), state, PARAMS, value_fn=retain_loss)
    bad_f = {"w": g_f["w"].at[0].set(jnp.inf), "b": g_f["b"]}
    u, new_state = jax.jit(
        lambda s: tx.update(TaskGrads(retain=g_r, forget=bad_f), s, PARAMS, value_fn=retain_loss)
    )(state)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))
    for a, b in zip(jax.tree.leaves(new_state.inner_state), jax.tree.leaves(state.inner_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # Adam and GeN untouched
    assert int(inject_stats(new_state)["skipped"]) == 1


def test_errors_are_clear():
    with pytest.raises(ValueError, match="unknown combiner"):
        unlearning_optimizer("sgd")
    with pytest.raises(TypeError, match="gen=False"):
        unlearning_optimizer("ngdiff", optax.constant_schedule(0.1))
    tx = unlearning_optimizer("ngdiff", 0.1)
    g = jax.grad(retain_loss)(PARAMS)
    with pytest.raises(ValueError, match="value_fn"):
        tx.update(TaskGrads(retain=g, forget=g), tx.init(PARAMS), PARAMS)


def test_inject_stats_in_nested_inject_hyperparams():
    tx = optax.inject_hyperparams(
        lambda learning_rate: optax.chain(
            ngdiff(), optax.scale_by_adam(), optax.scale(-learning_rate)
        )
    )(learning_rate=0.3)
    g_r, g_f = jax.grad(retain_loss)(PARAMS), jax.grad(forget_loss)(PARAMS)
    _, state = tx.update(TaskGrads(retain=g_r, forget=g_f), tx.init(PARAMS), PARAMS)
    stats = jax.jit(inject_stats)(state)
    assert float(stats["learning_rate"]) == pytest.approx(0.3)
    assert float(stats["forget_norm"]) > 0 and int(stats["skipped"]) == 0


class _Tiny(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
        return self.linear(x)


def test_task_optimizer_update_with_task_grads_and_value_fn():
    model = _Tiny(nnx.Rngs(0))
    x = jnp.asarray(RNG.normal(size=(6, 3)), jnp.float32)
    y_r, y_f = jnp.ones((6, 2)), -jnp.ones((6, 2))
    loss_r = lambda m: jnp.mean((m(x) - y_r) ** 2)
    loss_f = lambda m: jnp.mean((m(x) + 0.5 * y_f) ** 2)
    optimizer = TaskOptimizer(model, unlearning_optimizer("ngdiff", 0.05, gen_every=2), wrt=nnx.Param)
    graphdef, _ = nnx.split(model)
    seen = []

    @nnx.jit
    def step(model, optimizer):
        value, g_r = nnx.value_and_grad(loss_r)(model)
        g_f = nnx.grad(loss_f)(model)

        def value_fn(params):  # params: the pure nnx.State of the nnx.Param variables
            seen.append(type(params).__name__)
            return loss_r(nnx.merge(graphdef, params))

        optimizer.update(model, TaskGrads(retain=g_r, forget=g_f), value_fn=value_fn, value=value)
        return inject_stats(optimizer.opt_state)

    r0, f0 = float(loss_r(model)), float(loss_f(model))
    for _ in range(4):
        stats = step(model, optimizer)
    assert float(loss_r(model)) < r0 and float(loss_f(model)) < f0
    assert int(optimizer.step[...]) == 4
    assert set(seen) == {"State"}
    assert float(stats["learning_rate"]) > 0 and int(stats["skipped"]) == 0


def _loss(p):
    return jnp.sum(p["w"] ** 2) + jnp.sum(p["b"] ** 2)


def _step_fn(tx):
    def step(p, s):
        g = jax.grad(_loss)(p)
        u, s = tx.update(TaskGrads(retain=g, forget=jax.tree.map(jnp.negative, g)), s, p, value_fn=_loss)
        return optax.apply_updates(p, u), s

    return step


@pytest.mark.parametrize("combiner", ["ngdiff", "gdiff", "mgda", "pcgrad"])
def test_fresh_state_can_be_donated_to_a_jitted_step(combiner):
    """Every leaf of the initial state owns its buffer, so the state can be donated as is."""
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros((2,))}
    tx = ngdiff_jax.unlearning_optimizer(combiner, 0.1)
    state = tx.init(params)
    new_params, _ = jax.jit(_step_fn(tx), donate_argnums=(1,))(params, state)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(new_params))
