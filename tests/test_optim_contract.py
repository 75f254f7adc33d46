"""The two-task optimizers' contract, as a table (optax's ``contrib/_common_test.py`` shape): every
entry of ``CONTRACT`` (the four combiners in front of SGD, GeN behind a combiner, the paper's whole
optimizer) is checked under ``jit``, ``vmap``, ``inject_hyperparams``, ``shard_map`` (data parallel over
the 8 simulated devices, ``axis_name``), bfloat16 inputs, a non-finite gradient and zero gradients, each
against its own eager float32 run. A new combiner or rate rule is one row. (Sharded gradient trees and
the refusals without ``axis_name``: ``test_optim_compose.py``, ``test_reliability_round3.py``.)

Calling convention of every entry: ``update(TaskGrads(retain=..., forget=...), state, params,
value_fn=...)``; ``value_fn`` is the retain loss (GeN's probe; combiners ignore it)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ngdiff_jax.optim import TaskGrads, gdiff, inject_stats, mgda, ngdiff, pcgrad, scale_by_gen, unlearning_optimizer

RNG = np.random.default_rng(7)
XA = jnp.asarray(RNG.normal(size=(8, 3)), jnp.float32)
XB = jnp.asarray(XA + 0.5 * RNG.normal(size=(8, 3)), jnp.float32)
PARAMS = {"w": jnp.asarray(RNG.normal(size=3), jnp.float32), "b": jnp.zeros((2,), jnp.float32)}


def retain_loss(p, x=XA):
    return jnp.mean((x @ p["w"] + p["b"].sum() - 1.0) ** 2)


def forget_loss(p, x=XB):  # minimized too (for gradient ascent it would be -NLL); conflicts in part with retain
    return -jnp.mean((x @ p["w"] + p["b"][0] - 2.0) ** 2)


#: name -> (factory of the transformation from a learning rate and ``axis_name=``, the rate)
CONTRACT = {
    "ngdiff": (lambda lr, **kw: optax.chain(ngdiff(**kw), optax.sgd(lr)), 0.1),
    "gdiff": (lambda lr, **kw: optax.chain(gdiff(**kw), optax.sgd(lr)), 0.1),
    "mgda": (lambda lr, **kw: optax.chain(mgda(**kw), optax.sgd(lr)), 0.1),
    "pcgrad": (lambda lr, **kw: optax.chain(pcgrad(**kw), optax.sgd(lr)), 0.1),
    "gen": (lambda lr, **kw: optax.chain(ngdiff(**kw), optax.scale(-1.0), scale_by_gen(lr, every=1, **kw)), 0.05),
    "unlearning_optimizer": (lambda lr, **kw: unlearning_optimizer("ngdiff", lr, gen_every=1, **kw), 0.05),
}
STEPS = 3


def _grads(params):
    return jax.grad(retain_loss)(params), jax.grad(forget_loss)(params)


def _run(tx, params, steps=STEPS, grads=_grads):
    """``steps`` updates from ``params``; returns the params and the state."""
    state = tx.init(params)
    for _ in range(steps):
        g_r, g_f = grads(params)
        u, state = tx.update(TaskGrads(retain=g_r, forget=g_f), state, params, value_fn=retain_loss)
        params = optax.apply_updates(params, u)
    return params, state


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


@pytest.fixture(params=sorted(CONTRACT))
def entry(request):
    make, lr = CONTRACT[request.param]
    return request.param, make, lr


def test_descends_the_retain_loss(entry):
    _, make, lr = entry
    params, _ = _run(make(lr), PARAMS)
    assert np.isfinite(_flat(params)).all()
    assert float(retain_loss(params)) < float(retain_loss(PARAMS))


def test_jit_equals_eager_and_traces_once(entry):
    _, make, lr = entry
    tx = make(lr)
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(1)
        g_r, g_f = _grads(params)
        u, state = tx.update(TaskGrads(retain=g_r, forget=g_f), state, params, value_fn=retain_loss)
        return optax.apply_updates(params, u), state

    params, state = PARAMS, tx.init(PARAMS)
    for _ in range(STEPS):
        params, state = step(params, state)
    assert len(traces) == 1
    np.testing.assert_allclose(_flat(params), _flat(_run(make(lr), PARAMS)[0]), rtol=1e-5, atol=1e-6)


def test_vmap_over_problems_equals_each_alone(entry):
    _, make, lr = entry
    starts = jax.tree.map(lambda x: jnp.stack([x, x + 0.3]), PARAMS)
    batched, _ = jax.vmap(lambda p: _run(make(lr), p))(starts)
    for i in range(2):
        pick = lambda tree, i=i: jax.tree.map(lambda x: x[i], tree)  # noqa: E731
        alone, _ = _run(make(lr), pick(starts))
        np.testing.assert_allclose(_flat(pick(batched)), _flat(alone), rtol=1e-5, atol=1e-6)


def test_inject_hyperparams_equals_a_fixed_rate(entry):
    _, make, lr = entry
    tx = optax.inject_hyperparams(lambda learning_rate: make(learning_rate))(learning_rate=lr)
    np.testing.assert_allclose(_flat(_run(tx, PARAMS)[0]), _flat(_run(make(lr), PARAMS)[0]), rtol=1e-5, atol=1e-6)


def test_shard_map_data_parallel_equals_the_whole_batch(entry, devices8):
    """Each of the 8 devices holds one row of the data and the replicated parameters; the shards' losses
    / 8 give gradients summed over the devices (JAX's rule for replicated inputs), and ``axis_name``
    makes GeN's probe losses the whole batch's. Equal to the unsharded run."""
    from jax.sharding import PartitionSpec as P

    _, make, lr = entry
    tx = make(lr, axis_name="x")

    def run(xa, xb):
        params, state = PARAMS, tx.init(PARAMS)
        for _ in range(STEPS):
            g_r = jax.grad(lambda p: retain_loss(p, xa) / 8)(params)
            g_f = jax.grad(lambda p: forget_loss(p, xb) / 8)(params)
            u, state = tx.update(TaskGrads(retain=g_r, forget=g_f), state, params,
                                 value_fn=lambda p: retain_loss(p, xa))  # fmt: skip
            params = optax.apply_updates(params, u)
        return params

    mesh = jax.sharding.Mesh(np.array(devices8), ("x",))
    params = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(P("x"), P("x")), out_specs=P()))(XA, XB)
    np.testing.assert_allclose(_flat(params), _flat(_run(make(lr), PARAMS)[0]), rtol=2e-5, atol=1e-6)


def test_bfloat16_params_keep_their_dtype_and_follow_float32(entry):
    _, make, lr = entry
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
    tx = make(lr)
    state = tx.init(p16)
    g_r, g_f = _grads(p16)
    u, state = tx.update(TaskGrads(retain=g_r, forget=g_f), state, p16, value_fn=retain_loss)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))
    g32 = _grads(PARAMS)
    u32, _ = make(lr).update(TaskGrads(retain=g32[0], forget=g32[1]), make(lr).init(PARAMS), PARAMS,
                             value_fn=retain_loss)  # fmt: skip
    np.testing.assert_allclose(_flat(u), _flat(u32), rtol=3e-2, atol=3e-3)


@pytest.mark.parametrize("task", ["retain", "forget"])
def test_a_non_finite_gradient_moves_nothing_and_is_counted(entry, task):
    _, make, lr = entry
    tx = make(lr)
    state = tx.init(PARAMS)
    g_r, g_f = _grads(PARAMS)
    bad = jax.tree.map(lambda x: x.at[0].set(jnp.nan), g_r if task == "retain" else g_f)
    g_r, g_f = (bad, g_f) if task == "retain" else (g_r, bad)
    u, state = tx.update(TaskGrads(retain=g_r, forget=g_f), state, PARAMS, value_fn=retain_loss)
    assert np.all(_flat(u) == 0), "a non-finite step must not move the parameters"
    assert int(inject_stats(state)["skipped"]) == 1
    # and the next, finite step is an ordinary first step
    g_r, g_f = _grads(PARAMS)
    u2, _ = tx.update(TaskGrads(retain=g_r, forget=g_f), state, PARAMS, value_fn=retain_loss)
    first, _ = make(lr).update(TaskGrads(retain=g_r, forget=g_f), make(lr).init(PARAMS), PARAMS, value_fn=retain_loss)
    np.testing.assert_allclose(_flat(u2), _flat(first), rtol=1e-5, atol=1e-7)


def test_zero_gradients_give_finite_updates(entry):
    _, make, lr = entry
    zero = jax.tree.map(jnp.zeros_like, PARAMS)
    params, state = _run(make(lr), PARAMS, steps=2, grads=lambda p: (zero, zero))
    assert np.isfinite(_flat(params)).all()
    np.testing.assert_allclose(_flat(params), _flat(PARAMS), atol=1e-7)
    assert int(inject_stats(state)["skipped"]) == 0
