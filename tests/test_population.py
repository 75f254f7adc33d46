"""Populations: many runs as one compiled program with a leading member axis.

Each member equals its separate run (float32, 1e-5), GeN's probes stay a branch under ``vmap``,
a diverging member is stopped while the others continue, LoRA members share one frozen base,
micro-batches compose, and a population resumes chunk by chunk."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ngdiff_jax import models
from ngdiff_jax.population import (
    MEMBER_AXIS,
    PopulationSection,
    concrete_configs,
    init_member_state,
    member_values,
    population_step,
    stack_batches,
    traced_configs,
)
from ngdiff_jax.training import OptimConfig, load_method, make_optimizer, make_unlearn_step

B, T, V = 4, 12, 64


@pytest.fixture(scope="module")
def tiny():
    hf = {"model_type": "llama", "vocab_size": V, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
          "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 32}  # fmt: skip
    return models.functional(models.from_config(hf, rngs=nnx.Rngs(0)))


def _batch(*seed):
    r = np.random.default_rng(list(seed))
    ids = r.integers(0, V, (B, T)).astype(np.int32)
    labels = ids.copy()
    labels[:, :4] = -100
    return {"input_ids": ids, "attention_mask": np.ones((B, T), np.int32), "labels": labels}


#: forget rows / batch size of the methods' warm-up (open-unlearning's one epoch: 2 steps here)
SPE = 2.0


def _separate(apply_fn, params, method, optim, member, steps, data, ref=None, micro_batches=1):
    """A member's own run: its concrete configs, its own jitted step and key sequence."""
    meth, opt = concrete_configs(method, optim, member)
    tx = make_optimizer(meth, opt, steps, steps_per_epoch=SPE)
    step = jax.jit(make_unlearn_step(apply_fn, meth, tx, micro_batches=micro_batches))
    p, s, key = params, tx.init(params), jax.random.PRNGKey(member.seed)
    metrics = []
    for t in range(steps):
        key, sub = jax.random.split(key)
        p, s, m = step(p, s, *data(member.seed, t), sub, *(() if ref is None else (ref,)))
        metrics.append(m)
    return p, metrics


def _population(apply_fn, params, method, optim, members, steps, data, ref=None, micro_batches=1, max_skipped=None,
                at_once=None):  # fmt: skip
    def build(values):
        meth, opt = traced_configs(method, optim, values)
        tx = make_optimizer(meth, opt, steps, member_axis=MEMBER_AXIS, steps_per_epoch=SPE)
        return make_unlearn_step(apply_fn, meth, tx, micro_batches=micro_batches)

    def init(values):
        meth, opt = traced_configs(method, optim, values)
        return make_optimizer(meth, opt, steps, member_axis=MEMBER_AXIS, steps_per_epoch=SPE).init

    values = {k: jnp.asarray(v) for k, v in member_values(members).items()}
    P = jax.tree.map(lambda x: jnp.stack([x] * len(members)), params)
    S = jax.jit(lambda v, p: init_member_state(init, p, v, [m.seed for m in members]))(values, P)
    f = jax.jit(population_step(build, max_skipped=max_skipped, at_once=at_once))
    metrics = []
    for t in range(steps):
        fb = stack_batches([data(m.seed, t)[0] for m in members], 0)
        rb = stack_batches([data(m.seed, t)[1] for m in members], 0)
        P, S, M = f(P, S, (fb, rb), None, values, *(() if ref is None else (ref,)))
        metrics.append(M)
    return P, S, metrics, f, (P, S, (fb, rb), None, values, *(() if ref is None else (ref,)))


def _data(seed, t):
    return _batch(seed, t, 0), _batch(seed, t, 1)


def _assert_member(P, S_metrics, k, sep_params, sep_metrics):
    for a, b in zip(jax.tree.leaves(P), jax.tree.leaves(sep_params)):
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b), rtol=1e-5, atol=1e-5)
    for mp, ms in zip(S_metrics, sep_metrics):
        for key in ("forget_loss", "retain_loss", "learning_rate", "forget_grad_norm", "retain_grad_norm"):
            np.testing.assert_allclose(float(mp[key][k]), float(ms[key]), rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("name,settings,at_once", [
    ("ngdiff", {"optim.gen_every": [1, 2]}, None),   # GeN, members probing on different schedules
    ("ngdiff", {"optim.gen_every": [1, 2]}, 2),      # the same, two members at a time
    ("npo", {"method.forget.beta": [0.1, 0.5]}, None),    # fixed rate, a traced loss setting, a shared reference
    ("gdiff", {"method.combiner.retain_weight": [1.0, 0.5], "optim.weight_decay": [0.0, 0.1]}, None),
])  # fmt: skip
def test_each_member_equals_its_separate_run(tiny, name, settings, at_once):
    apply_fn, params = tiny
    method = load_method(name)
    optim = OptimConfig(lr=1e-3, gen_every=2)
    members = PopulationSection(seeds=(0, 3), lr=(1e-3, 5e-3), settings=settings).members(seed=0, lr=1e-3)
    members = members[:: max(1, len(members) // 4)][:4]  # four members spanning every axis
    ref = params if method.needs_reference else None
    P, S, metrics, *_ = _population(apply_fn, params, method, optim, members, 4, _data, ref=ref, at_once=at_once)
    for k, m in enumerate(members):
        sep_p, sep_m = _separate(apply_fn, params, method, optim, m, 4, _data, ref=ref)
        _assert_member(P, metrics, k, sep_p, sep_m)
    assert bool(jnp.all(S.alive)) and int(S.count) == 4


@pytest.mark.xla_cpu
def test_gen_probes_are_one_branch_of_the_population(tiny):
    """With one probing schedule the population's step keeps GeN's `lax.cond` (probes on probing
    steps only), where plain `vmap` turns it into a select that probes on every step."""
    apply_fn, params = tiny
    method, optim = load_method("ngdiff"), OptimConfig(lr=1e-3)
    members = PopulationSection(seeds=(0, 1)).members(seed=0, lr=1e-3)
    *_, f, args = _population(apply_fn, params, method, optim, members, 1, _data)
    assert f.lower(*args).as_text().count("stablehlo.case") == 1

    def build(values):  # the same step vmapped without the member axis name: a select, no branch
        meth, opt = traced_configs(method, optim, values)
        return make_unlearn_step(apply_fn, meth, make_optimizer(meth, opt, 1))

    plain = jax.jit(population_step(build))
    assert plain.lower(*args).as_text().count("stablehlo.case") == 0


@pytest.mark.slow
@pytest.mark.parametrize("at_once", [None, 1])
def test_a_diverging_member_is_stopped_and_the_others_continue(tiny, at_once):
    apply_fn, params = tiny
    method, optim = load_method("gdiff"), OptimConfig(lr=1e-3)
    members = PopulationSection(seeds=(0,), lr=(1e-3, 1e30)).members(seed=0, lr=1e-3)
    P, S, metrics, *_ = _population(apply_fn, params, method, optim, members, 3, _data, max_skipped=0, at_once=at_once)
    assert bool(S.alive[0]) and not bool(S.alive[1])
    assert int(S.stopped_at[1]) >= 1 and int(S.stopped_at[0]) == 0
    assert all(bool(jnp.isfinite(x[1]).all()) for x in jax.tree.leaves(P))  # the stopped member keeps finite weights
    sep_p, sep_m = _separate(apply_fn, params, method, optim, members[0], 3, _data)
    _assert_member(P, metrics, 0, sep_p, sep_m)


@pytest.mark.slow
def test_micro_batches_in_a_population(tiny):
    apply_fn, params = tiny
    method, optim = load_method("ngdiff"), OptimConfig(lr=1e-3, gen_every=1)
    members = PopulationSection(seeds=(0, 1)).members(seed=0, lr=1e-3)
    P, S, metrics, *_ = _population(apply_fn, params, method, optim, members, 2, _data, micro_batches=2)
    for k, m in enumerate(members):
        sep_p, sep_m = _separate(apply_fn, params, method, optim, m, 2, _data, micro_batches=2)
        _assert_member(P, metrics, k, sep_p, sep_m)


def test_population_section_checks_and_grid():
    pop = PopulationSection(seeds=(0, 1), lr=(1e-4, 1e-3), settings={"method.forget.beta": [0.1, 0.2]})
    ms = pop.members(seed=7, lr=5e-4)
    assert len(ms) == 8 and [m.index for m in ms] == list(range(8))
    assert ms[0].values == {"optim.lr": 1e-4, "method.forget.beta": 0.1} and ms[1].seed == 1
    assert [len(c) for c in dataclasses.replace(pop, chunk_size=3).chunks(ms)] == [3, 3, 2]
    assert PopulationSection().members(seed=7, lr=5e-4)[0].values == {"optim.lr": 5e-4}
    assert not PopulationSection().enabled and pop.enabled
    bad = [
        ({"settings": {"method.forget.layer": [1, 2]}}, "not a setting a population can vary"),
        ({"settings": {"optim.lr": [1e-3]}}, "population.lr instead"),
        ({"settings": {"method.forget.beta": 0.1}}, "non-empty list"),
        ({"settings": {"method.forget.beta": [0.1, 0.1]}}, "twice"),
        ({"settings": {"optim.gen_every": [1.5]}}, "integer"),
        ({"lr": (0.0,)}, "positive"),
        ({"seeds": (1.5,)}, "integers"),
        ({"chunk_size": 0}, "positive"),
        ({"at_once": 3, "chunk_size": 4}, "must divide"),
    ]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            PopulationSection(**kw)
