"""Per-platform defaults (`ngdiff_jax.backend`): each setting left at None resolves to its
platform's value, read once where a model, a loop or an evaluation is built (issue 24, part 2)."""

from __future__ import annotations

import types

import jax.numpy as jnp
import pytest

from ngdiff_jax import backend
from ngdiff_jax.evaluation import engine
from ngdiff_jax.training.config_schema import PrecisionSection

GPU = backend.defaults("gpu")


def test_cpu_and_accelerator_values():
    cpu = backend.defaults("cpu")
    assert (cpu.kernels, cpu.head_chunk_elements, cpu.log_every, cpu.compute) == ("cpu_fast", 1 << 22, 1, "float32")
    assert (cpu.eval_attention_block, cpu.eval_head_tokens) == (256, 2048)
    for acc in (GPU, backend.defaults("tpu")):
        assert (acc.kernels, acc.log_every, acc.compute, acc.eval_attention_block) == ("xla", 10, "bfloat16", None)
        assert acc.head_chunk_elements == 1 << 27 and acc.eval_head_tokens == 16384
    assert (cpu.attention(jnp.bfloat16), GPU.attention(jnp.bfloat16), GPU.attention(jnp.float32)) == (
        "einsum", "cudnn", "xla")  # fmt: skip


def test_precision_compute_default_is_the_backends(monkeypatch):
    assert PrecisionSection().jnp("compute") == jnp.float32  # this machine: CPU
    assert PrecisionSection(compute="bfloat16").jnp("compute") == jnp.bfloat16
    monkeypatch.setattr(backend, "defaults", lambda platform=None: GPU)
    assert PrecisionSection().jnp("compute") == jnp.bfloat16
    assert PrecisionSection().jnp("params") == jnp.float32 and PrecisionSection().jnp("moments") == jnp.float32
    assert PrecisionSection(compute="float32").jnp("compute") == jnp.float32  # an explicit value wins


def _device(platform, stats):
    return types.SimpleNamespace(platform=platform, memory_stats=lambda: stats)


def test_kv_cache_budget_from_memory_stats():
    assert backend.kv_cache_budget(_device("cpu", None)) == 1 << 30
    gpu = _device("gpu", {"bytes_limit": 80 << 30, "bytes_in_use": 8 << 30})
    assert backend.kv_cache_budget(gpu) == 18 << 30  # a quarter of the free 72 GiB
    assert backend.kv_cache_budget(_device("gpu", {"bytes_limit": 2 << 30, "bytes_in_use": 1 << 30})) == 1 << 30
    assert backend.kv_cache_budget(_device("tpu", None)) == 4 << 30  # no statistics


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
    monkeypatch.setattr(backend, "defaults", lambda platform=None: GPU)
    assert _dtype(None) == jnp.bfloat16


@pytest.mark.parametrize("platform", ["cpu", "gpu", "tpu"])
def test_model_takes_the_defaults_at_construction(platform, monkeypatch):
    from flax import nnx

    from ngdiff_jax.models import from_config, modeling
    from ngdiff_jax.models.testing import tiny_hf_config

    monkeypatch.setattr(modeling, "backend_defaults", lambda p=None: backend.defaults(platform))
    m = from_config(tiny_hf_config("llama"), rngs=nnx.Rngs(0), kernels="xla", attention="einsum")
    assert m.head_chunk_elements == backend.defaults(platform).head_chunk_elements
