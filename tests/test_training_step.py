"""The jitted unlearning step with the real optimizer and a tiny real model: every method,
reference handling, metrics, no recompilation after warm-up."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ngdiff_jax import models
from ngdiff_jax.training import (
    OptimConfig,
    available_methods,
    load_method,
    make_optimizer,
    make_unlearn_step,
    reference_logp_sum,
)

V, T, B = 96, 16, 4
METRICS = {"forget_loss", "retain_loss", "forget_nll", "retain_nll", "forget_grad_norm",
           "retain_grad_norm", "learning_rate", "skipped"}  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    hf = {"model_type": "llama", "vocab_size": V, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
          "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64}  # fmt: skip
    model = models.from_config(hf, rngs=nnx.Rngs(0))
    return models.functional(model)


def _batch(seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, V, (B, T)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[-1, T // 2 :] = 0  # one right-padded row
    labels = np.where(mask == 1, ids, -100).astype(np.int32)
    labels[:, :5] = -100  # the prompt
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


FIXED_RATE = ("ga", "gdiff", "npo", "simnpo", "mgda", "pcgrad")


@pytest.mark.slow  # over 4 s on 2 cores: the full suite (pyproject's markers)
def test_every_fixed_rate_method_runs_and_reports_metrics(tiny):
    # The wiring of objectives, reference and combiner; jitted (one compile per method costs less
    # than dispatching the step op by op under disable_jit).
    apply_fn, params = tiny
    fb, rb = _batch(0), _batch(1)
    assert set(FIXED_RATE) | {"ngdiff", "ngdiff_npo"} <= set(available_methods())
    for name in FIXED_RATE:
        method = load_method(name)
        assert not method.rate.adaptive
        # the wiring at full rate: no warm-up (whose first step has rate 0; tests/test_fidelity_training.py)
        method = load_method(name, rate={"warmup_epochs": 0.0})
        tx = make_optimizer(method, OptimConfig(lr=1e-3), total_steps=10)
        step = jax.jit(make_unlearn_step(apply_fn, method, tx))
        ref = params if method.needs_reference else None
        p, _, m = step(params, tx.init(params), fb, rb, jax.random.PRNGKey(0), ref)
        assert set(m) == METRICS, name
        assert all(np.isfinite(float(v)) for v in m.values()), (name, m)
        assert int(m["skipped"]) == 0 and float(m["learning_rate"]) == pytest.approx(1e-3)  # step 0: the peak
        moved = sum(float(jnp.abs(a - b).sum()) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(params)))
        assert moved > 0, f"method {name} did not change the parameters"
        if method.retain.kind == "none":
            assert float(m["retain_grad_norm"]) == 0.0 and float(m["retain_nll"]) > 0
        if name == "ga":
            assert float(m["forget_loss"]) == pytest.approx(-float(m["forget_nll"]))


def test_npo_reference_precomputed_equals_ref_params(tiny):
    apply_fn, params = tiny
    fb, rb = _batch(4), _batch(5)
    method = load_method("npo")
    tx = make_optimizer(method, OptimConfig(lr=1e-3), total_steps=5, steps_per_epoch=2.0)
    step = jax.jit(make_unlearn_step(apply_fn, method, tx))
    st = tx.init(params)
    p1, _, m1 = step(params, st, fb, rb, jax.random.PRNGKey(0), params)
    fb2 = dict(fb, ref_logp_sum=reference_logp_sum(apply_fn, params, fb))
    p2, _, m2 = step(params, st, fb2, rb, jax.random.PRNGKey(0))
    # at the reference itself, NPO's loss is 2/beta * log 2
    assert float(m1["forget_loss"]) == pytest.approx(2 / method.forget.beta * np.log(2), rel=1e-5)
    with pytest.raises(ValueError, match="needs the reference model"):
        step(params, st, fb, rb, jax.random.PRNGKey(0))
    np.testing.assert_allclose(float(m1["forget_loss"]), float(m2["forget_loss"]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_ngdiff_jitted_unlearns_without_recompiling(tiny):
    apply_fn, params = tiny
    method = load_method("ngdiff")  # GeN probes every 4th step: must be inside the same program
    tx = make_optimizer(method, OptimConfig(lr=1e-2), total_steps=10, steps_per_epoch=2.0)
    step = jax.jit(make_unlearn_step(apply_fn, method, tx), donate_argnums=(0, 1))
    p, st = jax.tree.map(jnp.copy, (params, tx.init(params)))
    fb, rb = _batch(2), _batch(3)

    compiles = []

    class Count(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("Compiling jit(step)"):
                compiles.append(record.getMessage())

    handler = Count()
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    history = []
    try:
        with jax.log_compiles():
            for i in range(12):
                # same shapes, fresh numpy batches every step (as the loop feeds them)
                p, st, m = step(p, st, {k: v.copy() for k, v in fb.items()}, dict(rb), jax.random.PRNGKey(i))
                history.append({k: float(v) for k, v in m.items()})
    finally:
        logger.removeHandler(handler)
    assert len(compiles) == 1, compiles
    first, last = history[0], history[-1]
    assert last["forget_nll"] > first["forget_nll"] + 0.5
    assert last["retain_nll"] < first["retain_nll"] + 0.1
    assert last["learning_rate"] > 0 and last["learning_rate"] != pytest.approx(1e-2)  # GeN moved it
    assert last["skipped"] == 0


def test_micro_batch_gradients_accumulate_in_float32_for_bfloat16_params():
    """A bfloat16 running sum rounds each addition to 8 bits of mantissa: four contributions of
    2^-9 next to 1.0 vanish (1 + 2^-9 rounds to 1). The accumulators are float32 and the sum is
    rounded to the parameters' dtype once, at the end."""
    from ngdiff_jax.training.grad_accum import accumulate, accumulators, in_dtypes_of

    params = {"w": jnp.zeros((3,), jnp.bfloat16)}
    acc = accumulators(params)
    assert acc["w"].dtype == jnp.float32
    one = jnp.float32(1.0)
    for g in (1.0, 2.0**-9, 2.0**-9, 2.0**-9, 2.0**-9):
        acc = accumulate(acc, one, {"w": jnp.full((3,), g, jnp.bfloat16)})
    out = in_dtypes_of(acc, params)["w"]
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.full(3, 1 + 2.0**-7, np.float32))
    bf16_sum = jnp.zeros((3,), jnp.bfloat16)  # what a bfloat16 accumulator gives
    for g in (1.0, 2.0**-9, 2.0**-9, 2.0**-9, 2.0**-9):
        bf16_sum = bf16_sum + jnp.bfloat16(g)
    assert float(bf16_sum[0]) == 1.0
