"""Mesh configs, rules, optimizer-state shardings, the memory estimate for a 7B-sized
model on an abstract mesh, and distributed settings from the environment (no devices
beyond the one CPU device needed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

from ngdiff_jax import parallel as par
from ngdiff_jax.training import OptimConfig, load_method, make_optimizer

LLAMA2_7B_DIMS = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                  "num_hidden_layers": 2, "num_attention_heads": 32, "num_key_value_heads": 32,
                  "max_position_embeddings": 4096}  # fmt: skip


def _abstract_mesh(data, fsdp, tensor):
    return AbstractMesh((data, fsdp, tensor), par.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def test_sharding_mesh_config_shapes_and_errors():
    assert par.preset_config("dp").shape(8) == (8, 1, 1)
    assert par.preset_config("fsdp").shape(8) == (1, 8, 1)
    assert par.preset_config("fsdp_tensor").shape(8) == (1, 4, 2)
    assert par.MeshConfig(data=2, fsdp=-1, tensor=2).shape(16) == (2, 4, 2)
    with pytest.raises(ValueError, match="at most one axis"):
        par.MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="divisible by 3"):
        par.MeshConfig(data=3, fsdp=-1).shape(8)
    with pytest.raises(ValueError, match="has 4 devices but 8"):
        par.MeshConfig(data=2, fsdp=2, tensor=1).shape(8)
    with pytest.raises(ValueError, match="unknown sharding rules"):
        par.MeshConfig(rules="zero3")
    with pytest.raises(ValueError, match="unknown mesh preset"):
        par.preset_config("tp")
    mesh = par.make_mesh("fsdp")  # the one CPU device
    assert mesh.axis_names == par.MESH_AXES and mesh.shape["fsdp"] == jax.device_count()


def test_sharding_opt_state_mirrors_params_and_batch_axes():
    from flax import nnx

    from ngdiff_jax import models

    hf = dict(LLAMA2_7B_DIMS, vocab_size=64, hidden_size=16, intermediate_size=32, num_attention_heads=2,
              num_key_value_heads=2, num_hidden_layers=1)  # fmt: skip
    params = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: models.CausalLM(
        models.ModelConfig.from_hf(hf), rngs=nnx.Rngs(0))), nnx.Param))  # fmt: skip
    tx = make_optimizer(load_method("ngdiff"), OptimConfig(), total_steps=1)
    opt = jax.eval_shape(tx.init, params)
    mesh = _abstract_mesh(1, 4, 2)
    p_sh = par.param_shardings(params, mesh, "fsdp_tensor")
    o_sh = par.opt_state_shardings(opt, params, p_sh, mesh)
    adam = o_sh.inner_state[1]
    assert adam.mu == p_sh and adam.nu == p_sh
    assert p_sh["layers"][0]["mlp"]["up_proj"]["kernel"].spec == PartitionSpec("fsdp", "tensor")
    scalars = [s for s, x in zip(jax.tree.leaves(o_sh), jax.tree.leaves(opt)) if x.ndim == 0]
    assert scalars and all(s.spec == PartitionSpec() for s in scalars)
    assert par.batch_axes(mesh, "fsdp") == ("data", "fsdp")
    assert par.batch_axes(mesh, "dp") == ("data",)
    # a dimension the mesh cannot split is reported, not silently replicated
    report = par.sharding_report(params, _abstract_mesh(1, 3, 1), "fsdp")
    assert any("embed" in f and "('fsdp',)" in f for f in report["fallback"]), report


def test_sharding_memory_estimate_for_llama2_7b_dims():
    tx = make_optimizer(load_method("ngdiff_npo"), OptimConfig(), total_steps=1)
    one = par.estimate_for_model(LLAMA2_7B_DIMS, tx, _abstract_mesh(8, 1, 1), "dp", reference=True,
                                 param_dtype=jnp.bfloat16)  # fmt: skip
    fsdp = par.estimate_for_model(LLAMA2_7B_DIMS, tx, _abstract_mesh(1, 8, 1), "fsdp", reference=True,
                                  param_dtype=jnp.bfloat16)  # fmt: skip
    n = 2 * 32000 * 4096 + 2 * (4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096) + 4096
    assert one.total_params == 2 * n and one.params == 2 * n  # bf16, replicated
    assert one.grads == 2 * one.params and one.reference == one.params
    assert one.opt_state >= 2 * one.params  # Adam mu and nu
    # FSDP on 8 devices: every matrix splits 8 ways, only norm scales stay whole
    assert fsdp.params == pytest.approx(one.params / 8, rel=1e-3)
    assert fsdp.total == pytest.approx(one.total / 8, rel=1e-3)
    text = fsdp.format()
    assert "2 gradient trees" in text and "reference model" in text and "fsdp=8" in text


def test_distributed_config_from_env():
    cfg = par.DistributedConfig.from_env({})
    assert not cfg.enabled and par.initialize(cfg) is False
    cfg = par.DistributedConfig.from_env({"NGDIFF_COORDINATOR_ADDRESS": "10.0.0.1:1234", "NGDIFF_NUM_PROCESSES": "4",
                                          "NGDIFF_PROCESS_ID": "3", "NGDIFF_LOCAL_DEVICE_IDS": "0,1"})  # fmt: skip
    assert (
        cfg.enabled
        and cfg.num_processes == 4
        and cfg.process_id == 3
        and cfg.local_device_ids == (0, 1)
    )
    assert par.DistributedConfig.from_env({"NGDIFF_DISTRIBUTED": "auto"}).auto
    with pytest.raises(ValueError, match="together"):
        par.DistributedConfig.from_env({"NGDIFF_COORDINATOR_ADDRESS": "h:1"})
    with pytest.raises(ValueError, match="not an integer"):
        par.DistributedConfig.from_env({"NGDIFF_COORDINATOR_ADDRESS": "h:1", "NGDIFF_NUM_PROCESSES": "two",
                                        "NGDIFF_PROCESS_ID": "0"})  # fmt: skip
    with pytest.raises(ValueError, match="outside"):
        par.DistributedConfig(coordinator_address="h:1", num_processes=2, process_id=2)


def test_sharding_place_gives_donatable_copies():
    mesh = par.make_mesh("fsdp")
    z = jnp.zeros(())
    tree = {"a": z, "b": z, "c": np.ones((4,), np.float32)}
    rep = par.replicated(mesh)
    out = par.place(tree, {"a": rep, "b": rep, "c": rep})
    ptr = lambda x: x.addressable_shards[0].data.unsafe_buffer_pointer()
    assert len({ptr(out["a"]), ptr(out["b"])}) == 2
    f = jax.jit(lambda t: jax.tree.map(lambda x: x + 1, t), donate_argnums=0)
    jax.block_until_ready(f(out))
    assert float(z) == 0.0  # the caller's array survives the donation
