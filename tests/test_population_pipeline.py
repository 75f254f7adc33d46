"""`ngdiff unlearn` with a `population:` section: members equal their own `ngdiff unlearn` runs
(full weights and LoRA on a shared base), exports per member, chunk-by-chunk resume, members
spread over devices, and the batched evaluation of a population."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from ngdiff_jax.config_loader import load_config
from ngdiff_jax.training import UnlearnConfig
from ngdiff_jax.training.population_run import run_population


@pytest.fixture(scope="module")
def tiny(synthetic_model):
    return synthetic_model(1)


def _cfg(tiny, out, *extra):
    return load_config(UnlearnConfig, "synthetic_ngdiff", [
        f"model_path={tiny['model']}", f"data.source={tiny['bench']}", f"run.output_dir={out}", "run.steps=3",
        "run.eval_every=0", "run.checkpoint_every=0", "run.progress=false", "data.batch_size=4", "optim.gen_every=2",
        "data.max_length=128", "data.buckets=[128]", *extra], subdir="experiments")  # fmt: skip


def _weights(d):
    files = sorted(p for p in os.listdir(d) if p.endswith(".safetensors"))
    out = {}
    for f in files:
        out.update(load_file(os.path.join(d, f)))
    return out


def _close(a, b):
    """Equal weights up to float32 rounding: a batched (vmapped) matmul sums in another order than
    a single one, and Adam divides each coordinate by its own gradient scale, so a coordinate whose
    gradient is rounding noise (a token the batch barely touches) can move by a few 1e-5 after a few
    steps; 99.9% of the elements agree to 1e-5 and none differs by more than 1e-4."""
    assert set(a) == set(b)
    for k in a:
        d = np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)) / (1 + np.abs(b[k].astype(np.float64)))
        assert np.quantile(d, 0.999) <= 1e-5 and d.max() <= 1e-4, (k, float(d.max()))


@pytest.mark.slow
def test_population_members_equal_their_own_runs_and_export(tiny, tmp_path):
    from ngdiff_jax.cli import main

    pop = _cfg(tiny, tmp_path / "pop", "population.seeds=[0, 1]", "population.lr=[1e-3, 3e-3]")
    res = run_population(pop)
    assert [r["name"] for r in res.results] == ["lr=0.001 seed=0", "lr=0.001 seed=1", "lr=0.003 seed=0",
                                                "lr=0.003 seed=1"]  # fmt: skip
    assert not any(r["diverged"] for r in res.results)
    saved = json.loads((tmp_path / "pop" / "population.json").read_text())
    assert saved["summary"]["members"] == 4 and len(saved["members"]) == 4
    rc = main(["unlearn", "--config", "synthetic_ngdiff", f"model_path={tiny['model']}",
               f"data.source={tiny['bench']}", f"run.output_dir={tmp_path / 'one'}", "run.steps=3", "run.eval_every=0",
               "run.checkpoint_every=0", "run.progress=false", "data.batch_size=4", "optim.gen_every=2",
               "data.max_length=128", "data.buckets=[128]", "run.seed=1", "optim.lr=3e-3"])  # fmt: skip
    assert rc == 0
    _close(_weights(tmp_path / "pop" / "members" / "m003" / "model"), _weights(tmp_path / "one" / "model"))
    log = [json.loads(x) for x in (tmp_path / "pop" / "chunks" / "c000" / "log.jsonl").read_text().splitlines()]
    one = [json.loads(x) for x in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    for a, b in zip(log, one):
        np.testing.assert_allclose(a["retain_loss"][3], b["retain_loss"], rtol=1e-5)
        np.testing.assert_allclose(a["learning_rate"][3], b["learning_rate"], rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("scan", [[], ["run.scan_layers=true", "run.remat=full"]], ids=["unrolled", "scanned"])
def test_lora_members_share_one_base_and_equal_their_own_runs(tiny, tmp_path, scan):
    """A scanned population (adapters stacked on the layer axis, each member's drawn as the unrolled
    model draws them) equals the unrolled single run too."""
    from ngdiff_jax.training import run_unlearn

    lora = ["lora.rank=2", "lora.alpha=4", "method=npo"]
    res = run_population(_cfg(tiny, tmp_path / "pop", *lora, *scan, "population.seeds=[0, 1]"))
    assert len(res.results) == 2
    run_unlearn(_cfg(tiny, tmp_path / "one", *lora, "run.seed=1"))
    _close(_weights(tmp_path / "pop" / "members" / "m001" / "adapter"), _weights(tmp_path / "one" / "adapter"))
    # seed 0's adapters started elsewhere (their own A matrices)
    a0 = _weights(tmp_path / "pop" / "members" / "m000" / "adapter")
    a1 = _weights(tmp_path / "pop" / "members" / "m001" / "adapter")
    assert any(not np.allclose(a0[k], a1[k]) for k in a0 if "lora_A" in k)


@pytest.mark.slow
def test_a_killed_population_resumes_chunk_by_chunk(tiny, tmp_path):
    members = ["population.seeds=[0, 1, 2]", "population.chunk_size=2", "run.checkpoint_every=1"]
    full = run_population(_cfg(tiny, tmp_path / "full", *members))

    class Killed(Exception):
        pass

    def kill_in_second_chunk(chunk, params, results):
        if chunk[0].index == 2:
            raise Killed

    with pytest.raises(Killed):
        run_population(_cfg(tiny, tmp_path / "cut", *members), on_chunk=kill_in_second_chunk)
    assert (tmp_path / "cut" / "chunks" / "c000" / "result.json").is_file()
    assert not (tmp_path / "cut" / "chunks" / "c001" / "result.json").is_file()
    seen = []
    again = run_population(_cfg(tiny, tmp_path / "cut", *members), on_chunk=lambda c, p, r: seen.append(c[0].index))
    assert seen == [2]  # the first chunk was read back, not rerun
    for a, b in zip(full.results, again.results):
        for k in ("forget_loss", "retain_loss", "learning_rate"):
            np.testing.assert_allclose(a["last_metrics"][k], b["last_metrics"][k], rtol=1e-6)
    _close(_weights(tmp_path / "full" / "members" / "m002" / "model"),
           _weights(tmp_path / "cut" / "members" / "m002" / "model"))


def test_population_config_errors(tiny, tmp_path):
    with pytest.raises(ValueError, match="population is set with mesh.preset=fsdp"):
        _cfg(tiny, tmp_path / "x", "population.seeds=[0, 1]", "mesh.preset=fsdp")
    with pytest.raises(ValueError, match="lora and selection.tofu"):
        _cfg(tiny, tmp_path / "x", "population.seeds=[0, 1]", "lora.rank=2", "selection.every=1", "selection.tofu=true",
             "selection.maximize=model_utility")
    with pytest.raises(ValueError, match="population member m001 .*method.forget.beta"):
        run_population(_cfg(tiny, tmp_path / "x", "method=npo",
                            "population.settings={method.forget.beta: [0.1, -1.0]}"))


@pytest.mark.slow
def test_members_spread_over_devices_equal_one_device(tiny, tmp_path, devices8):
    """Three members in chunks of two, spread over the 'member' mesh axis of 8 devices, give the
    results of one device (``population.spread=false``): the axis takes as many devices as a chunk
    has members (2, not 8 with six padding copies), and the last chunk's one member is padded."""
    members = ["run.steps=2", "population.seeds=[0, 1, 2]", "population.export=false", "population.chunk_size=2"]
    one = run_population(_cfg(tiny, tmp_path / "one", *members, "population.spread=false"))
    eight = run_population(_cfg(tiny, tmp_path / "eight", *members))
    assert json.loads((tmp_path / "one" / "population.json").read_text())["devices"] == 1
    assert json.loads((tmp_path / "eight" / "population.json").read_text())["devices"] == 2 < len(jax.local_devices())
    assert len(eight.results) == len(one.results) == 3
    for a, b in zip(eight.results, one.results):
        for k in ("forget_loss", "retain_loss", "learning_rate"):
            np.testing.assert_allclose(a["last_metrics"][k], b["last_metrics"][k], rtol=1e-5)


@pytest.mark.slow
def test_population_evaluation_equals_member_by_member(tiny):
    """One batched TOFU evaluation of two members gives each member's own evaluation to 1e-6."""
    import jax.numpy as jnp

    from ngdiff_jax import models
    from ngdiff_jax.evaluation import evaluate_tofu, evaluate_tofu_members
    from ngdiff_jax.training import model_io

    m = models.from_pretrained(tiny["model"])
    tok = model_io.load_tokenizer(str(tiny["model"]))
    _, p0 = models.functional(m)
    p1 = jax.tree.map(lambda x: x * 1.1 + 0.01, p0)
    kw = dict(forget_split="forget10", batch_size=8, max_new_tokens=6, buckets=[64, 128], limit=6,
              mia_attacks=("min_k", "loss", "zlib", "min_k_plus_plus"))  # fmt: skip
    ref = evaluate_tofu(m, tok, tiny["bench"], name="retain", **kw)
    both = evaluate_tofu_members(m, jax.tree.map(lambda a, b: jnp.stack([a, b]), p0, p1), tok, tiny["bench"],
                                 names=["a", "b"], retain_reference=ref, **kw)  # fmt: skip
    for params, res in zip((p0, p1), both):
        one = evaluate_tofu(models.with_params(m, params), tok, tiny["bench"], name="x", retain_reference=ref, **kw)
        assert res.generations == one.generations
        for k, v in one.aggregates.items():
            if isinstance(v, float):
                assert res.aggregates[k] == pytest.approx(v, rel=1e-6, abs=1e-6), k
    assert both[0].aggregates["forget_Q_A_Prob"] != both[1].aggregates["forget_Q_A_Prob"]


@pytest.mark.slow
def test_each_member_keeps_its_best_step(tiny, tmp_path):
    """`selection` in a population: every member's own selection state and best model, as its own
    run's; early stopping (patience) is refused for a population."""
    from ngdiff_jax.training import run_unlearn

    sel = ["selection.every=1", "selection.maximize=retain_prob", "run.steps=3"]
    res = run_population(_cfg(tiny, tmp_path / "pop", *sel, "population.lr=[1e-3, 3e-3]"))
    run_unlearn(_cfg(tiny, tmp_path / "one", *sel, "optim.lr=3e-3"))
    one = json.loads((tmp_path / "one" / "selection.json").read_text())
    mine = json.loads((tmp_path / "pop" / "members" / "m001" / "selection.json").read_text())
    assert mine["best"]["step"] == one["best"]["step"] == res.results[1]["selection"]["best_step"]
    assert [h["step"] for h in mine["history"]] == [0, 1, 2, 3]
    np.testing.assert_allclose([h["retain_prob"] for h in mine["history"]], [h["retain_prob"] for h in one["history"]],
                               rtol=1e-5)  # fmt: skip
    _close(_weights(tmp_path / "pop" / "members" / "m001" / "best_model"), _weights(tmp_path / "one" / "best_model"))
    with pytest.raises(ValueError, match="selection.patience=2"):
        _cfg(tiny, tmp_path / "x", *sel, "selection.patience=2", "population.seeds=[0, 1]")


@pytest.mark.slow
def test_a_population_whose_every_member_diverged_fails(tiny, tmp_path):
    from ngdiff_jax.cli import main

    rc = main(["unlearn", "--config", "synthetic_ngdiff", f"model_path={tiny['model']}", f"data.source={tiny['bench']}",
               f"run.output_dir={tmp_path / 'pop'}", "run.steps=2", "run.eval_every=0", "run.progress=false",
               "data.batch_size=4", "data.max_length=128", "data.buckets=[128]", "method=gdiff",
               "method.rate.warmup_epochs=0", "population.lr=[1e30, 1e31]"])  # fmt: skip
    assert rc == 1
    saved = json.loads((tmp_path / "pop" / "population.json").read_text())
    assert all(m["diverged"] for m in saved["members"])
    assert not (tmp_path / "pop" / "members" / "m000" / "model").exists()


@pytest.mark.slow
def test_a_member_whose_weights_never_move_is_flagged_and_not_exported(tiny, tmp_path):
    """Issue 26: a rate whose every update rounds away leaves the member bit-identical to the input;
    it is flagged ``unchanged`` and not exported, and a population of only such members fails."""
    from ngdiff_jax.training.divergence import UnchangedError

    res = run_population(_cfg(tiny, tmp_path / "pop", "method=gdiff", "population.lr=[1e-15, 1e-3]"))
    flags = {r["values"]["optim.lr"]: r["unchanged"] for r in res.results}
    assert flags == {1e-15: True, 1e-3: False}, flags
    assert res.summary["unchanged"] == [r["key"] for r in res.results if r["unchanged"]]
    assert [r.get("model_dir") is None for r in res.results] == [True, False]
    with pytest.raises(UnchangedError, match="every member of the population ended with weights bit-identical"):
        run_population(_cfg(tiny, tmp_path / "tiny", "method=gdiff", "population.lr=[1e-15, 1e-16]"))
