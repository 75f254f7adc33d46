"""Functional core, with_params, logical axes, sharded streaming load, bf16 compute, from_config."""

import json

import numpy as np
import pytest

pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from ngdiff_jax import models as M  # noqa: E402
from ngdiff_jax.models.testing import tiny_hf_config, tiny_hf_model  # noqa: E402


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    tiny_hf_model("llama", d)
    return d, M.from_pretrained(d)


def test_functional_and_with_params(llama):
    _, model = llama
    apply_fn, params = M.functional(model)
    assert isinstance(params, dict) and all(isinstance(x, jax.Array) for x in jax.tree.leaves(params))
    ids = jnp.asarray(np.random.RandomState(0).randint(3, 128, (2, 6)), jnp.int32)
    mask = jnp.ones_like(ids)
    labels = ids.at[:, :2].set(M.IGNORE_INDEX)
    logits = jax.jit(apply_fn)(params, ids, mask)
    np.testing.assert_allclose(logits, model(ids, mask), rtol=1e-5, atol=1e-5)

    def loss(p):
        return M.sequence_nll(apply_fn(p, ids, mask), labels).mean()

    jloss = jax.jit(loss)
    val, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert np.isfinite(val)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert float(jnp.abs(grads["layers"][0]["attn"]["q_proj"]["kernel"]).sum()) > 0
    new = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    m2 = M.with_params(model, new)
    assert float(jloss(new)) < float(val)
    np.testing.assert_allclose(m2(ids, mask), apply_fn(new, ids, mask), rtol=1e-5, atol=1e-5)
    # the original module is untouched
    np.testing.assert_allclose(model(ids, mask), logits, rtol=1e-5, atol=1e-5)


def test_logical_axes_and_shardings(llama):
    _, model = llama
    axes = M.logical_axes(model)
    params = M.functional(model)[1]
    assert jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, tuple)) == jax.tree.structure(params)
    assert axes["embed"] == ("vocab", "embed")
    assert axes["layers"][0]["attn"]["k_proj"]["kernel"] == ("embed", "kv", "head_dim")
    assert axes["layers"][1]["mlp"]["down_proj"]["kernel"] == ("mlp", "embed")
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"))
    sh = M.param_shardings(model, mesh, M.FSDP_TENSOR)
    assert all(s is None for s in sh["layers"][0]["attn"]["q_proj"]["kernel"].spec)  # size-1 axes dropped
    loaded = M.from_pretrained(llama[0], mesh=mesh, rules=M.FSDP)
    np.testing.assert_array_equal(loaded.embed[...], model.embed[...])


def test_sharded_streaming_load_on_four_cpu_devices(tmp_path, devices8):
    """Weights streamed into a (1, 2, 2) mesh of four devices: sharded as the rules say, equal to the
    one-device load, same logits."""
    for fam in ("llama", "gpt2"):
        tiny_hf_model(fam, tmp_path / fam)
        ref = M.from_pretrained(tmp_path / fam)
        mesh = jax.make_mesh((1, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3,
                             devices=devices8[:4])  # fmt: skip
        m = M.from_pretrained(tmp_path / fam, mesh=mesh, rules=M.FSDP_TENSOR)
        q = m.layers[0].attn.q_proj.kernel[...]
        assert tuple(q.sharding.spec) == ("fsdp", "tensor", None), q.sharding.spec
        assert len(q.addressable_shards) == 4
        for a, b in zip(jax.tree.leaves(M.functional(m)[1]), jax.tree.leaves(M.functional(ref)[1])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        ids = np.random.RandomState(0).randint(3, 128, (2, 6))
        np.testing.assert_allclose(np.asarray(m(ids)), np.asarray(ref(ids)), rtol=1e-5, atol=1e-5)


def test_bf16_compute_with_f32_params(llama):
    d, model = llama
    m16 = M.from_pretrained(d, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert m16.embed[...].dtype == jnp.float32
    ids = np.random.RandomState(0).randint(3, 128, (2, 6))
    a, b = np.asarray(m16(ids)), np.asarray(model(ids))
    assert a.dtype == np.float32
    assert np.abs(a - b).max() / np.abs(b).max() < 5e-2


def test_from_config_and_config_roundtrip(tmp_path):
    hf = tiny_hf_config("phi")
    cfg = M.ModelConfig.from_hf(hf)
    assert cfg.rotary_dim == 4 and cfg.parallel_block and cfg.lm_head_bias
    assert M.ModelConfig.from_hf(cfg.to_hf()) == cfg
    model = M.from_config(hf, rngs=nnx.Rngs(1))
    assert model.config == cfg
    logits = model(np.zeros((1, 5), np.int32))
    assert logits.shape == (1, 5, 128)
    m16 = M.from_config(cfg, rngs=nnx.Rngs(1), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    M.save_pretrained(m16, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    back = M.from_pretrained(tmp_path / "bf16", param_dtype=jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(back.embed[...]), np.asarray(m16.embed[...]))
