"""End to end on the synthetic benchmark: `ngdiff finetune` a tiny model, `ngdiff unlearn` it,
the per-step log, the exported model, and kill -9 + resume == an uninterrupted run."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from ngdiff_jax.cli import main
from ngdiff_jax.config_loader import load_config
from ngdiff_jax.training import Checkpointer, UnlearnConfig, run_unlearn


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Synthetic benchmark + a tiny llama finetuned on all of it through the CLI."""
    from ngdiff_jax.data.synthetic import write_benchmark

    root = tmp_path_factory.mktemp("synthetic")
    bench = write_benchmark(root / "bench", n_authors=10, questions_per_author=8, seed=0)
    out = root / "target"
    rc = main([
        "finetune", "--config", "synthetic_finetune", "--no-progress",
        f"data.source={bench}", f"run.output_dir={out}", "run.steps=150", "run.checkpoint_every=0",
    ])  # fmt: skip
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["last_metrics"]["loss"] < 0.5, summary
    return {"bench": bench, "model": out / "model", "root": root}


def _overrides(trained, out, *extra):
    return [
        f"data.source={trained['bench']}", f"model_path={trained['model']}", f"run.output_dir={out}",
        "run.progress=false", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_unlearn_npo_under_ngdiff_logs_exports_and_does_not_recompile(trained, tmp_path):
    out = tmp_path / "unlearn"
    cfg = load_config(
        UnlearnConfig, "synthetic_ngdiff",
        _overrides(trained, out, "method=ngdiff_npo", "method.rate.probe=sum", "run.steps=12",
                   "run.eval_every=6", "run.checkpoint_every=6"),
        subdir="experiments",
    )  # fmt: skip
    compiles = []

    class Count(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("Compiling jit(step)"):
                compiles.append(record.getMessage())

    logger = logging.getLogger("jax")
    handler = Count()
    logger.addHandler(handler)
    try:
        with jax.log_compiles():
            result, _ = run_unlearn(cfg)
    finally:
        logger.removeHandler(handler)
    assert len(compiles) == 1, compiles  # one bucket shape: one compilation for 12 steps

    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 13))
    for k in ("forget_loss", "retain_loss", "forget_grad_norm", "retain_grad_norm", "learning_rate", "skipped"):
        assert k in lines[-1]
    evals = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 6, 12]
    assert evals[-1]["forget_prob"] < evals[0]["forget_prob"]
    assert sorted(Checkpointer(out / "checkpoints").all_steps()) == [6, 12]

    # exported with the tokenizer; transformers reads both back
    from transformers import AutoConfig, AutoTokenizer

    from ngdiff_jax import models

    model_dir = out / "model"
    assert AutoTokenizer.from_pretrained(model_dir).eos_token is not None
    assert AutoConfig.from_pretrained(model_dir).model_type == "llama"
    _, reloaded = models.functional(models.from_pretrained(model_dir))
    for a, b in zip(jax.tree.leaves(reloaded), jax.tree.leaves(result.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _cmd(trained, out):
    return [
        sys.executable, "-m", "ngdiff_jax.cli", "unlearn", "--config", "synthetic_ngdiff",
        *_overrides(trained, out, "run.steps=24", "run.checkpoint_every=8", "run.eval_every=0"),
    ]  # fmt: skip


def _safetensors(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.slow
def test_kill_9_and_resume_equals_uninterrupted_run(trained, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"))
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_cmd(trained, full), env=env, check=True, capture_output=True, cwd=tmp_path, timeout=300)

    proc = subprocess.Popen(_cmd(trained, killed), env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    ckpt_dir = killed / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir()):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before its first checkpoint appeared"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists(), "killed too late: the run had finished"
    first = Checkpointer(ckpt_dir).latest_step()
    assert first is not None and first < 24

    res = subprocess.run(
        _cmd(trained, killed), env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["resumed_from"] is not None and summary["resumed_from"] >= first

    a, b = _safetensors(full / "model"), _safetensors(killed / "model")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # the log of the resumed run has every step once
    steps = [json.loads(x)["step"] for x in (killed / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 25))


def test_unfinished_checkpoint_is_ignored(tmp_path):
    import jax.numpy as jnp

    ck = Checkpointer(tmp_path / "ck")
    state = {"w": jnp.arange(3.0), "rng": jax.random.PRNGKey(1)}
    ck.save(2, state, {"step": 2})
    ck.close()
    # what a kill in the middle of saving step 4 leaves behind
    (tmp_path / "ck" / "4.orbax-checkpoint-tmp-123").mkdir()
    ck = Checkpointer(tmp_path / "ck")
    assert ck.latest_step() == 2
    restored, meta = ck.restore(None, state)
    assert meta["step"] == 2
    np.testing.assert_array_equal(restored["w"], np.arange(3.0))
    np.testing.assert_array_equal(restored["rng"], jax.random.PRNGKey(1))
    ck.close()


def _toy_run(out, num_steps, meta):
    """run_loop on a least-squares toy: the step is tiny, so this tests the loop alone."""
    import jax.numpy as jnp
    import optax

    from ngdiff_jax.data import Batcher
    from ngdiff_jax.training import run_loop

    examples = [([i + 1, i + 2, i + 3], [i + 1, i + 2, i + 3]) for i in range(10)]
    stream = Batcher(examples, 4, pad_id=0, seed=3, buckets=[4])
    tx = optax.adam(0.1)
    params = {"w": jnp.zeros(4)}

    def step(params, opt_state, batches, rng):
        (b,) = batches
        x = b["input_ids"].astype(jnp.float32)
        noise = jax.random.normal(rng, ())

        def loss(p):
            return jnp.mean((x @ p["w"] - x.sum(-1) - noise) ** 2)

        value, g = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": value}

    return run_loop(step, params, tx.init(params), streams={"train": stream}, num_steps=num_steps,
                    rng=jax.random.PRNGKey(0), out_dir=out, checkpoint_every=2, progress=False, meta=meta)  # fmt: skip


def test_loop_resume_in_process_and_settings_mismatch(tmp_path):
    full = _toy_run(tmp_path / "full", 7, {"lr": 0.1})
    part = _toy_run(tmp_path / "part", 4, {"lr": 0.1})
    assert part.resumed_from is None and part.step == 4
    rest = _toy_run(tmp_path / "part", 7, {"lr": 0.1})
    assert rest.resumed_from == 4 and rest.step == 7
    np.testing.assert_array_equal(np.asarray(full.params["w"]), np.asarray(rest.params["w"]))
    np.testing.assert_array_equal(np.asarray(full.rng), np.asarray(rest.rng))
    steps = [json.loads(x)["step"] for x in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 8))
    with pytest.raises(ValueError, match=r"different settings \(lr: checkpoint 0.1 vs now 0.2\)"):
        _toy_run(tmp_path / "part", 9, {"lr": 0.2})


class _Counter:
    """A batch stream: ``next()`` gives the step's number, as a batch."""

    def __init__(self):
        self.i = 0

    def next(self):
        self.i += 1
        return np.float32(self.i)

    __next__ = next

    def state(self):
        return {"i": self.i}

    def restore(self, s):
        self.i = s["i"]


def test_loop_syncs_with_the_host_only_on_logged_steps(tmp_path, monkeypatch):
    """Between logged steps the loop only dispatches (no metric fetch, no block_until_ready);
    each log line's ``time_s`` is the mean step time of its interval; None means 1 on CPU."""
    import jax.numpy as jnp

    from ngdiff_jax.training import loop

    fetched = []
    real_host = loop._host
    monkeypatch.setattr(loop, "_host", lambda raw: fetched.append(1) or real_host(raw))

    def no_block(*a, **k):
        raise AssertionError("block_until_ready on an unlogged step")

    monkeypatch.setattr(jax, "block_until_ready", no_block)

    def step(params, opt_state, batches, rng):
        params = params + batches[0]
        return params, opt_state, {"loss": params}

    res = loop.run_loop(step, jnp.float32(0), (), streams={"d": _Counter()}, num_steps=7,
                        rng=jax.random.PRNGKey(0), out_dir=tmp_path, checkpoint_every=0, log_every=3,
                        progress=False)  # fmt: skip
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [3, 6, 7] and len(fetched) == 3
    assert [r["loss"] for r in lines] == [6.0, 21.0, 28.0]  # the logged values are those steps'
    assert float(res.params) == 28.0 and all(r["time_s"] > 0 for r in lines)
    assert loop.default_log_every("cpu") == 1 and loop.default_log_every("gpu") == 10
    res = loop.run_loop(step, jnp.float32(0), (), streams={"d": _Counter()}, num_steps=2,
                        rng=jax.random.PRNGKey(0), out_dir=tmp_path / "b", checkpoint_every=0, progress=False)
    assert len((tmp_path / "b" / "log.jsonl").read_text().splitlines()) == (2 if jax.default_backend() == "cpu"
                                                                             else 1)  # fmt: skip
