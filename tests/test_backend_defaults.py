"""The backend boundary (`ngdiff_jax.backends`): per-platform defaults resolved once where a
model, a loop or an evaluation is built; the XLA:CPU package swapped out gives the same model,
step and optimizer results (issue 24, parts 1-2)."""

from __future__ import annotations

import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ngdiff_jax import backends
from ngdiff_jax.evaluation import engine
from ngdiff_jax.training.config_schema import PrecisionSection

GPU = backends.for_platform("gpu")


def test_cpu_and_accelerator_values():
    cpu = backends.for_platform("cpu")
    assert (cpu.name, cpu.head_chunk_elements, cpu.log_every, cpu.compute) == ("cpu_fast", 1 << 22, 1, "float32")
    assert (cpu.eval_attention_block, cpu.eval_head_tokens) == (256, 2048)
    for acc in (GPU, backends.for_platform("tpu")):
        assert (acc.name, acc.log_every, acc.compute, acc.eval_attention_block) == ("xla", 10, "bfloat16", None)
        assert acc.head_chunk_elements == 1 << 27 and acc.eval_head_tokens == 16384
    assert (cpu.attention(jnp.bfloat16), GPU.attention(jnp.bfloat16), GPU.attention(jnp.float32)) == (
        "einsum", "cudnn", "xla")  # fmt: skip
    assert cpu.portable().name == "xla" and cpu.portable().head_chunk_elements == cpu.head_chunk_elements
    assert backends.resolve("xla", "cpu") == cpu.portable() and backends.resolve(cpu) is cpu


def test_precision_compute_default_is_the_backends(monkeypatch):
    assert PrecisionSection().jnp("compute") == jnp.float32  # this machine: CPU
    assert PrecisionSection(compute="bfloat16").jnp("compute") == jnp.bfloat16
    monkeypatch.setattr(backends, "for_platform", lambda platform=None: GPU)
    assert PrecisionSection().jnp("compute") == jnp.bfloat16
    assert PrecisionSection().jnp("params") == jnp.float32 and PrecisionSection().jnp("moments") == jnp.float32
    assert PrecisionSection(compute="float32").jnp("compute") == jnp.float32  # an explicit value wins


def _device(platform, stats):
    return types.SimpleNamespace(platform=platform, memory_stats=lambda: stats)


def test_kv_cache_budget_from_memory_stats():
    assert backends.kv_cache_budget(_device("cpu", None)) == 1 << 30
    gpu = _device("gpu", {"bytes_limit": 80 << 30, "bytes_in_use": 8 << 30})
    assert backends.kv_cache_budget(gpu) == 18 << 30  # a quarter of the free 72 GiB
    assert backends.kv_cache_budget(_device("gpu", {"bytes_limit": 2 << 30, "bytes_in_use": 1 << 30})) == 1 << 30
    assert backends.kv_cache_budget(_device("tpu", None)) == 4 << 30  # no statistics


def test_evaluation_blocks_follow_the_backend_unless_set(monkeypatch):
    assert engine._attention_block() == 256 and engine._head_tokens(None) == 2048 and engine._head_tokens(4) == 512
    monkeypatch.setattr(engine, "backend_defaults", lambda platform=None: GPU)
    assert engine._attention_block() is None and engine._head_tokens(None) == 16384
    monkeypatch.setattr(engine, "ATTENTION_BLOCK", 512)
    monkeypatch.setattr(engine, "HEAD_TOKENS", 1024)
    assert engine._attention_block() == 512 and engine._head_tokens(2) == 512
    monkeypatch.setattr(engine, "ATTENTION_BLOCK", 0)  # 0: one block
    assert engine._attention_block() is None


def test_eval_dtype_default_is_the_backends(monkeypatch):
    from ngdiff_jax.commands.evaluate import _dtype

    assert _dtype(None) == jnp.float32 and _dtype("bfloat16") == jnp.bfloat16
    monkeypatch.setattr(backends, "for_platform", lambda platform=None: GPU)
    assert _dtype(None) == jnp.bfloat16


@pytest.mark.parametrize("platform", ["cpu", "gpu", "tpu"])
def test_model_takes_the_platforms_defaults_at_construction(platform):
    from ngdiff_jax.models import from_config
    from ngdiff_jax.models.testing import tiny_hf_config

    b = backends.for_platform(platform)
    m = from_config(tiny_hf_config("llama"), rngs=nnx.Rngs(0), backend=b.portable())
    assert m.head_chunk_elements == b.head_chunk_elements and m.kernels == "xla"
    assert all(layer.backend == b.portable() for layer in m.layers)  # every computing module holds it


def _build_step(backend, dtype, stacked=False):
    """A tiny llama with a tied head on ``backend`` and its NGDiff + GeN unlearning step (model,
    optimizer and step all given ``backend``); ``stacked``: the scan_layers layout."""
    from ngdiff_jax import models
    from ngdiff_jax.models.testing import tiny_hf_config
    from ngdiff_jax.training import OptimConfig, load_method, make_optimizer, make_unlearn_step

    model = models.from_config(tiny_hf_config("llama_tied"), rngs=nnx.Rngs(0), backend=backend, dtype=dtype,
                               param_dtype=dtype)  # fmt: skip
    apply_fn, params = models.functional(models.stacked.scanned(model) if stacked else model)
    method = load_method("ngdiff")
    tx = make_optimizer(method, OptimConfig(lr=1e-2), total_steps=10, steps_per_epoch=2.0, backend=backend)
    return make_unlearn_step(apply_fn, method, tx, backend=backend), params, tx


def _step_results(backend, dtype, stacked=False):
    """Four NGDiff + GeN unlearning steps (one GeN probe) of a tiny llama with a tied head on
    ``backend``: the metrics and the new parameters."""
    step, params, tx = _build_step(backend, dtype, stacked)
    step = jax.jit(step)
    rng = np.random.default_rng(0)

    def batch():
        ids = rng.integers(3, 128, (2, 12)).astype(np.int32)
        labels = ids.copy()
        labels[:, :4] = -100
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}

    state, history, initial = tx.init(params), [], jax.tree.map(jnp.copy, params)
    for i in range(4):
        params, state, metrics = step(params, state, batch(), batch(), jax.random.key(i))
        history.append({k: float(v) for k, v in metrics.items()})
    return jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), params, initial), history


@pytest.mark.slow
@pytest.mark.parametrize("stacked", [False, True], ids=["per_block", "stacked"])
@pytest.mark.parametrize("dtype,rtol,update_tol", [(jnp.float32, 1e-4, 1e-4), (jnp.bfloat16, 3e-2, 0.1)])
def test_swapping_the_cpu_package_out_gives_the_same_step(monkeypatch, dtype, rtol, update_tol, stacked):
    """The XLA:CPU backend against the portable one built as if ``ngdiff_jax.backends.cpu`` were
    deleted: the model, the unlearning step and the optimizer give the same results (bfloat16:
    the XLA:CPU head, lookup and SwiGLU kernels round differently, within bfloat16's resolution;
    Adam's normalized steps turn such differences in tiny gradients into whole steps, so the
    updates are compared by the norm of their difference)."""
    fast_update, fast = _step_results(backends.resolve("cpu_fast"), dtype, stacked)
    monkeypatch.setitem(sys.modules, "ngdiff_jax.backends.cpu", None)  # an import of it now fails
    plain = backends.for_platform("cpu")
    assert type(plain) is backends.Backend and plain.name == "xla"
    with pytest.raises(ValueError, match="needs the package ngdiff_jax.backends.cpu"):
        backends.resolve("cpu_fast")
    plain_update, slow = _step_results(plain, dtype, stacked)
    assert fast[-1]["forget_loss"] != fast[0]["forget_loss"]  # the steps moved the model
    for a, b in zip(fast, slow):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=1e-6, err_msg=k)
    pairs = zip(jax.tree.leaves(fast_update), jax.tree.leaves(plain_update))
    diff = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in pairs))
    norm = np.sqrt(sum(np.sum(b**2) for b in jax.tree.leaves(plain_update)))
    assert norm > 0 and diff < update_tol * norm, diff / norm


def test_jvp_through_the_default_model():
    """Forward-mode autodiff (a Hessian-vector product) through the model built with the
    platform's default backend (``cpu_fast`` here): its kernels fall back to the portable ones."""
    from ngdiff_jax import losses, models
    from ngdiff_jax.models.testing import tiny_hf_config

    model = models.from_config(tiny_hf_config("llama"), rngs=nnx.Rngs(0))
    assert model.backend == backends.for_platform()
    apply_fn, params = models.functional(model)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 128, (2, 8)), jnp.int32)

    def loss(p):
        return losses.nll(apply_fn.token_logprobs(p, ids, ids), ids)

    t = jax.tree.map(jnp.ones_like, params)
    _, jv = jax.jvp(loss, (params,), (t,))
    _, hv = jax.jvp(jax.grad(loss), (params,), (t,))
    assert np.isfinite(float(jv)) and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(hv))


def _primitives(fn, *args) -> set[str]:
    names = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            names.add(eqn.primitive.name)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return names


@pytest.mark.parametrize("backend", [backends.resolve("cpu_fast"), GPU], ids=["cpu_fast", "gpu"])
def test_after_keeps_values_under_every_transform(backend):
    """`Backend.after`: the same values under jit, vmap, grad and jvp, ordered by a data dependency
    (no barrier: XLA:CPU drops it, see tests/test_memory_lean.py)."""
    tree = {"ids": jnp.arange(4, dtype=jnp.int32), "x": jnp.linspace(-1.0, 1.0, 4)}
    for done in (jnp.float32(0.5), jnp.float32(jnp.nan), jnp.float32(-jnp.inf)):
        out = jax.jit(backend.after)(tree, done)
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(tree)))
    xs = jnp.ones((3, 4))
    np.testing.assert_array_equal(jax.vmap(lambda x: backend.after(x, x.sum()))(xs), xs)
    np.testing.assert_array_equal(jax.grad(lambda x: backend.after(x, x.sum()).sum())(xs[0]), np.ones(4))
    _, t = jax.jvp(lambda x: backend.after(x * 2.0, x.sum()), (xs[0],), (jnp.ones(4),))
    np.testing.assert_array_equal(t, 2.0 * np.ones(4))
    assert "optimization_barrier" not in _primitives(backend.after, tree, jnp.float32(1.0))


@pytest.mark.filterwarnings("ignore:attention='cudnn' cannot run")
def test_the_step_and_gen_take_the_backend_they_are_given():
    """Built on this CPU machine with the accelerator backend passed in, the bfloat16 step (model,
    GeN, step) carries nothing as bits; with the CPU backend it carries bfloat16 as bits through
    GeN's cond and the layer scan: the backend is an argument, not the platform read while
    tracing."""
    def prims(backend):
        step, params, tx = _build_step(backend, jnp.bfloat16, stacked=True)
        ids = jnp.ones((2, 8), jnp.int32)
        batch = {"input_ids": ids, "attention_mask": ids, "labels": ids}
        return _primitives(step, params, tx.init(params), batch, batch, jax.random.key(0))

    gpu, cpu = prims(GPU), prims(backends.resolve("cpu_fast"))
    assert "bitcast_convert_type" not in gpu
    assert "bitcast_convert_type" in cpu
