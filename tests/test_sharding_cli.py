"""`ngdiff unlearn ... mesh.preset=fsdp` on the 8 simulated CPU devices of the test process, with
the blocks unrolled or scanned over stacked weights
(``run.scan_layers``), exports the parameters of the single-device run (1e-5 relative),
prints the per-device memory estimate before the first step, and resumes from a sharded orbax
checkpoint to the same result; bad `mesh`/`distributed` values are config errors naming the key.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

STEPS = 4


def _overrides(bench, model, out, *extra):
    return [
        f"data.source={bench}", f"model_path={model}", f"run.output_dir={out}", "run.progress=false",
        "method=ngdiff_npo", "method.rate=constant", f"run.steps={STEPS}", "run.checkpoint_every=2",
        "run.eval_every=0", *extra,
    ]  # fmt: skip


def _safetensors(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def tiny(synthetic_model):
    """The synthetic benchmark + a tiny llama (and tokenizer) saved like a finetune export (conftest)."""
    return synthetic_model(1)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["run.scan_layers=true", "run.remat=full"]], ids=["unrolled", "scan"])
def test_sharding_cli_fsdp_matches_single_device_and_resumes(tiny, tmp_path, extra, devices8, capsys):
    from ngdiff_jax.config_loader import load_config
    from ngdiff_jax.training import UnlearnConfig, run_unlearn

    sharded_out = tmp_path / "fsdp"
    import jax

    n = jax.device_count()  # mesh.preset=fsdp spans every device
    _sharded_run_and_resume(tiny["bench"], tiny["model"], sharded_out, *extra)
    stdout = capsys.readouterr().out
    single_out = tmp_path / "single"
    cfg = load_config(UnlearnConfig, "synthetic_ngdiff", _overrides(tiny["bench"], tiny["model"], single_out, *extra),
                      subdir="experiments")  # fmt: skip
    assert not cfg.mesh.enabled
    run_unlearn(cfg)

    # the estimate is printed once per run (before the loop starts)
    assert stdout.count(f"per-device memory estimate on mesh data=1 x fsdp={n} x tensor=1") == 2, stdout
    assert "reference model" in stdout
    first = json.loads((sharded_out / "summary_first.json").read_text())
    assert first["mesh"] == {"data": 1, "fsdp": n, "tensor": 1} and first["resumed_from"] is None
    assert first["memory_estimate"]["reference"] > 0  # ngdiff_npo: reference model sharded too
    resumed = json.loads((sharded_out / "summary.json").read_text())
    assert resumed["resumed_from"] == 2 and resumed["steps"] == STEPS

    want = _safetensors(single_out / "model")
    got_first = _safetensors(sharded_out / "model_first")
    got_resumed = _safetensors(sharded_out / "model")
    assert want.keys() == got_first.keys() == got_resumed.keys()
    moved = 0
    init = _safetensors(tiny["model"])
    for k in want:
        err = np.linalg.norm(got_first[k] - want[k]) / max(np.linalg.norm(want[k]), 1e-30)
        assert err < 1e-5, (k, err)
        np.testing.assert_array_equal(got_resumed[k], got_first[k], err_msg=k)  # same mesh: bitwise
        moved += not np.array_equal(want[k], init[k])
    assert moved > 0  # the runs did update the parameters
    steps = [json.loads(x)["step"] for x in (sharded_out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))


def test_sharding_config_rejects_bad_mesh_and_distributed_values(capsys):
    from ngdiff_jax.cli import main
    from ngdiff_jax.config_loader import ConfigError, load_config
    from ngdiff_jax.training import UnlearnConfig

    def build(*overrides):
        return load_config(UnlearnConfig, None, ["model_path=some/model", *overrides])

    cfg = build()
    assert cfg.mesh.preset == "none" and cfg.mesh.mesh_config() is None
    m = build("mesh.preset=fsdp_tensor", "mesh.tensor=4", "mesh.data=2").mesh.mesh_config()
    assert (m.data, m.fsdp, m.tensor, m.rules) == (2, -1, 4, "fsdp_tensor")

    with pytest.raises(ConfigError, match=r"mesh\.preset='fsdp2' is not one of 'none', 'dp', 'fsdp', 'fsdp_tensor'"):
        build("mesh.preset=fsdp2")
    with pytest.raises(ValueError, match=r"mesh\.fsdp=0: mesh axis sizes are positive"):
        build("mesh.preset=fsdp", "mesh.fsdp=0")
    with pytest.raises(ValueError, match=r"at most one axis may be -1"):
        build("mesh.preset=fsdp", "mesh.data=-1")
    with pytest.raises(ValueError, match=r"mesh\.tensor=2 is set but mesh\.preset=none"):
        build("mesh.tensor=2")
    with pytest.raises(ConfigError, match=r"unknown key 'mesh\.tensr'"):
        build("mesh.preset=fsdp", "mesh.tensr=2")
    with pytest.raises(ValueError, match=r"distributed: .*coordinator_address, num_processes and process_id together"):
        build("mesh.preset=fsdp", "distributed.process_id=1")
    with pytest.raises(ValueError, match=r"distributed is set but mesh\.preset=none"):
        build("distributed.auto=true")
    # the CLI prints the message and exits with 2
    assert main(["unlearn", "model_path=some/model", "mesh.preset=fsdp2"]) == 2
    assert "mesh.preset='fsdp2'" in capsys.readouterr().err


def _sharded_run_and_resume(bench, model, out: Path, *extra: str) -> None:
    """The fsdp run through the CLI; then delete its last checkpoint and run again (resume from 2).
    ``extra``: more overrides (``run.scan_layers=true``: the stacked weights, sharded)."""
    from ngdiff_jax.cli import main

    args = ["unlearn", "--config", "synthetic_ngdiff", *_overrides(bench, model, out, "mesh.preset=fsdp", *extra)]
    assert main(args) == 0
    shutil.copytree(out / "model", out / "model_first")
    shutil.copy(out / "summary.json", out / "summary_first.json")
    shutil.rmtree(out / "checkpoints" / str(STEPS))
    assert main(args) == 0
