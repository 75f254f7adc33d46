"""Two processes on loopback (``jax.distributed``, gloo CPU collectives, 4 CPU devices
each, one 8-device mesh ``data=2 x fsdp=4``) run the sharded unlearning step on a model
each process loads shard-wise from a Hugging Face checkpoint, and reach the parameters
of the single-process step. The processes also write an orbax checkpoint together and
export the model gathered to process 0.

Run as a script (``python tests/test_distributed_two_process.py <model_dir> <out_dir>
<coordinator> <process_id>``) it is the body of one process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # two processes under jax.distributed

HF = {"model_type": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}  # fmt: skip
B, T, STEPS = 8, 16, 2


def _batches():
    out = []
    for i in range(STEPS):
        pair = []
        for seed in (2 * i, 2 * i + 1):
            rng = np.random.default_rng(seed)
            ids = rng.integers(3, HF["vocab_size"], (B, T)).astype(np.int32)
            mask = np.ones_like(ids)
            mask[-1, T // 2 :] = 0
            labels = np.where(mask == 1, ids, -100).astype(np.int32)
            labels[:, :4] = -100
            pair.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
        out.append(tuple(pair))
    return out


def _method_and_tx():
    from ngdiff_jax.training import OptimConfig, load_method, make_optimizer

    method = load_method("ngdiff")
    return method, make_optimizer(method, OptimConfig(lr=1e-3, gen_every=2), total_steps=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_two_processes_match_single_process(tmp_path):
    import jax
    from flax import nnx

    from ngdiff_jax import models
    from ngdiff_jax.models.sharding import path_str
    from ngdiff_jax.training import make_unlearn_step

    model_dir = tmp_path / "model"
    models.save_pretrained(models.from_config(HF, rngs=nnx.Rngs(0)), model_dir)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    coord = f"127.0.0.1:{_free_port()}"
    env = dict(
        os.environ, JAX_PLATFORMS="cpu",
        XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(model_dir), str(out_dir), coord, str(pid)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in range(2)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for pid, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {pid} failed:\n{log[-6000:]}"

    # the same steps in this (single-device) process
    model = models.from_pretrained(model_dir)
    apply_fn, params = models.functional(model)
    method, tx = _method_and_tx()
    step = jax.jit(make_unlearn_step(apply_fn, method, tx))
    p, s = params, tx.init(params)
    hist = {}
    for i, (fb, rb) in enumerate(_batches()):
        p, s, m = step(p, s, fb, rb, jax.random.PRNGKey(i))
        for k, v in m.items():
            hist.setdefault(k, []).append(float(v))
    ref = {path_str(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(p)[0]}

    res = json.loads((out_dir / "result.json").read_text())
    assert res["process_count"] == 2 and res["device_count"] == 8 and res["local_device_count"] == 4
    assert res["local_shards_only"], res
    for k in ("forget_loss", "retain_loss", "forget_grad_norm", "retain_grad_norm"):
        np.testing.assert_allclose(res["metrics"][k], hist[k], rtol=1e-5, err_msg=k)
    got = dict(np.load(out_dir / "params.npz"))
    assert set(got) == set(ref)
    for k, want in ref.items():
        rel = np.linalg.norm(got[k] - want) / np.linalg.norm(want)
        assert rel < 1e-5, (k, rel)
    assert res["checkpoint_roundtrip"], res

    # the export gathered to process 0 is a loadable HF checkpoint with the trained weights
    exported = models.functional(models.from_pretrained(out_dir / "export"))[1]
    for k, v in jax.tree_util.tree_flatten_with_path(exported)[0]:
        np.testing.assert_array_equal(np.asarray(v), got[path_str(k)])


def _process_body(model_dir: str, out_dir: str, coordinator: str, process_id: int) -> None:
    from ngdiff_jax import parallel as par

    par.initialize(
        par.DistributedConfig(
            coordinator_address=coordinator, num_processes=2, process_id=process_id
        )
    )
    import jax

    from ngdiff_jax.models.sharding import path_str
    from ngdiff_jax.training import make_unlearn_step

    mesh = par.make_mesh(par.MeshConfig(data=2, fsdp=4, tensor=1, rules="fsdp"))
    model, apply_fn, params = par.load_sharded(model_dir, mesh, "fsdp")
    # each process holds (and read from the checkpoint) only its own devices' blocks
    local = set(jax.local_devices())
    local_only = all({s.device for s in x.addressable_shards} <= local and not x.is_fully_addressable
                     for x in jax.tree.leaves(params))  # fmt: skip
    method, tx = _method_and_tx()
    opt_state = jax.jit(tx.init)(params)
    sharded = par.shard_unlearn_step(make_unlearn_step(apply_fn, method, tx), mesh, "fsdp", params, opt_state,
                                     print_memory=par.is_main_process())  # fmt: skip
    P, S = sharded.place_state(params, opt_state)
    hist = {}
    for i, (fb, rb) in enumerate(_batches()):
        P, S, m = sharded(P, S, fb, rb, jax.random.PRNGKey(i))
        for k, v in par.gather_to_host(m).items():
            hist.setdefault(k, []).append(float(v))

    # orbax: every process writes its shards, then restores them
    ckpt = Path(out_dir) / "ckpt"
    par.save_sharded(ckpt, STEPS, {"params": P}, {"step": STEPS})
    restored, meta = par.restore_sharded(
        ckpt, par.abstract_state({"params": P}, {"params": sharded.param_shardings})
    )
    same = all(
        all(
            np.array_equal(np.asarray(a.data), np.asarray(b.data))
            for a, b in zip(x.addressable_shards, y.addressable_shards)
        )
        for x, y in zip(jax.tree.leaves(P), jax.tree.leaves(restored["params"]))
    ) and meta == {"step": STEPS}

    host = par.gather_to_host(P)
    par.save_pretrained_gathered(model, P, Path(out_dir) / "export")
    if par.is_main_process():
        flat = {path_str(k): v for k, v in jax.tree_util.tree_flatten_with_path(host)[0]}
        np.savez(Path(out_dir) / "params.npz", **flat)
        (Path(out_dir) / "result.json").write_text(json.dumps({
            "process_count": jax.process_count(), "device_count": jax.device_count(),
            "local_device_count": jax.local_device_count(), "local_shards_only": local_only,
            "metrics": hist, "checkpoint_roundtrip": bool(same),
        }))  # fmt: skip
    jax.distributed.shutdown()


if __name__ == "__main__":
    _process_body(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
