"""Issue 12: never lose a result, never exit 0 on a broken run.

Output ownership (lock, inputs, same run only, atomic export), validation before any work,
divergence as a failure, checkpoint fallback and the CLI's error boundary. Every test here
fails on the code before these guarantees existed.
"""

import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ngdiff_jax.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Synthetic benchmark + a tiny llama (2 finetune steps: weights only need to be a model)."""
    from ngdiff_jax.data.synthetic import write_benchmark

    root = tmp_path_factory.mktemp("rel")
    bench = write_benchmark(root / "bench", n_authors=4, questions_per_author=4, seed=0)
    out = root / "target"
    rc = main(["finetune", "--config", "synthetic_finetune", "--no-progress", f"data.source={bench}",
               f"run.output_dir={out}", "run.steps=2", "run.checkpoint_every=0"])  # fmt: skip
    assert rc == 0
    return {"bench": bench, "model": out / "model", "root": root}


def _unlearn(base, out, *extra, model=None, bench=None):
    return main([
        "unlearn", "--config", "synthetic_ngdiff", "--no-progress", f"data.source={bench or base['bench']}",
        f"model_path={model or base['model']}", f"run.output_dir={out}", "run.steps=2", "run.checkpoint_every=1",
        "run.eval_every=0", *extra,
    ])  # fmt: skip


def _digest(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}  # fmt: skip


# -- 1. output ownership ----------------------------------------------------------------------


@pytest.mark.parametrize("where", ["parent", "same", "inside"])
def test_output_dir_at_or_around_the_input_model_is_refused(base, tmp_path, capsys, where):
    model = tmp_path / "tgt" / "model"
    shutil.copytree(base["model"], model)
    before = _digest(model.parent)
    out = {"parent": model.parent, "same": model, "inside": model / "sub"}[where]
    assert _unlearn(base, out, model=model) == 2
    err = capsys.readouterr().err
    assert "run.output_dir" in err and "model_path" in err, err
    assert _digest(model.parent) == before  # the input model is untouched, nothing was written


def test_relative_and_absolute_paths_are_the_same_input(base, tmp_path, capsys, monkeypatch):
    shutil.copytree(base["model"], tmp_path / "m" / "model")
    monkeypatch.chdir(tmp_path)
    assert _unlearn(base, "./m/../m", model="m/model") == 2
    assert "contains the input model_path" in capsys.readouterr().err


def test_lock_refuses_a_second_run_and_stale_lock_is_taken_over(base, tmp_path, capsys):
    from ngdiff_jax.training.ownership import LOCK_NAME, OutputLock

    out = tmp_path / "out"
    with OutputLock(out, "unlearn"):
        assert _unlearn(base, out) == 1
        err = capsys.readouterr().err
        assert "is in use by `ngdiff unlearn`" in err and f"PID {os.getpid()}" in err, err
        assert socket.gethostname() in err
    # a lock nobody holds (its owner was killed): reported, taken over, removed at the end
    (out / LOCK_NAME).write_text(json.dumps({"pid": 999999999, "host": "elsewhere", "command": "unlearn"}))
    assert _unlearn(base, out) == 0
    err = capsys.readouterr().err
    assert "stale lock" in err and "999999999" in err and "elsewhere" in err, err
    assert not (out / LOCK_NAME).exists()


@pytest.mark.slow
def test_lock_held_by_a_live_process(base, tmp_path):
    """Another process holds the lock (flock): a run into the same dir stops at once with exit code 1."""
    out = tmp_path / "out"
    code = ("import sys, time; from ngdiff_jax.training.ownership import OutputLock;"
            f"lock = OutputLock({str(out)!r}, 'unlearn').acquire(); print('held', flush=True); "
            "time.sleep(60)")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "ngdiff_jax.cli", "unlearn", "--config", "synthetic_ngdiff",
               f"data.source={base['bench']}", f"model_path={base['model']}", f"run.output_dir={out}"]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 1, proc.stderr
        assert f"PID {holder.pid}" in proc.stderr and "Traceback" not in proc.stderr
        assert time.perf_counter() - t0 < 60
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


@pytest.mark.slow
def test_dir_of_another_config_or_command_is_refused_naming_the_key(base, tmp_path, capsys):
    out = tmp_path / "out"
    assert _unlearn(base, out) == 0
    summary = (out / "summary.json").read_text()
    weights = _digest(out / "model")
    capsys.readouterr()
    assert _unlearn(base, out, "method=gdiff") == 2
    err = capsys.readouterr().err
    assert "method.combiner.type='ngdiff' there, 'gdiff' now" in err, err
    assert _unlearn(base, out, "optim.lr=0.002") == 2
    assert "optim.lr=0.001 there, 0.002 now" in capsys.readouterr().err
    rc = main(["finetune", "--config", "synthetic_finetune", f"data.source={base['bench']}", f"run.output_dir={out}"])
    assert rc == 2 and "not `ngdiff finetune`" in capsys.readouterr().err
    assert (out / "summary.json").read_text() == summary and _digest(out / "model") == weights
    # the same run again (cosmetic keys may change) is a resume, not a conflict
    assert _unlearn(base, out, "run.log_every=2") == 0
    # a key only one side has (added or removed by another ngdiff version) is not a difference
    manifest = json.loads((out / ".ngdiff-run.json").read_text())
    del manifest["settings"]["optim"]["weight_decay"]
    manifest["settings"]["optim"]["retired_key"] = 1
    (out / ".ngdiff-run.json").write_text(json.dumps(manifest))
    assert _unlearn(base, out) == 0
    # precision.compute: null is recorded as what it resolved to (this CPU's float32): a run started
    # where it meant bfloat16 (a GPU) is not resumed here in float32; an older record (null) still resumes
    manifest = json.loads((out / ".ngdiff-run.json").read_text())
    assert manifest["settings"]["precision"]["compute"] == "float32"
    capsys.readouterr()
    for recorded, rc in (("bfloat16", 2), (None, 0)):
        manifest["settings"]["precision"]["compute"] = recorded
        (out / ".ngdiff-run.json").write_text(json.dumps(manifest))
        assert _unlearn(base, out) == rc
    assert "precision.compute='bfloat16' there, 'float32' now" in capsys.readouterr().err
    # a run that stopped before writing anything worth keeping does not block a corrected one
    out2 = tmp_path / "out2"
    out2.mkdir()
    (out2 / ".ngdiff-run.json").write_text(json.dumps({"command": "unlearn", "settings": {"optim": {"lr": 5.0}}}))
    (out2 / "log.jsonl").write_text("")
    assert _unlearn(base, out2) == 0
    out2 = tmp_path / "out2"



def test_foreign_files_are_refused_not_deleted(base, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert _unlearn(base, out) == 2
    assert "notes.txt" in capsys.readouterr().err and (out / "notes.txt").read_text() == "mine"

    out = tmp_path / "run"
    assert _unlearn(base, out) == 0
    (out / "model" / "model-extra.bin").write_text("mine")
    assert _unlearn(base, out) == 2
    assert "model-extra.bin" in capsys.readouterr().err and (out / "model" / "model-extra.bin").exists()


def test_atomic_dir_swaps_whole_exports_and_repairs_a_cut_swap(tmp_path):
    from ngdiff_jax.training.ownership import EXPORT_MARKER, atomic_dir, repair_exports

    final = tmp_path / "model"
    with atomic_dir(final) as d:
        (d / "model.safetensors").write_text("v1")
    assert (final / "model.safetensors").read_text() == "v1" and (final / EXPORT_MARKER).is_file()
    with pytest.raises(RuntimeError), atomic_dir(final) as d:  # a failing export leaves the old one whole
        (d / "model.safetensors").write_text("half")
        raise RuntimeError("killed")
    assert (final / "model.safetensors").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with atomic_dir(final) as d:
        (d / "model-00001-of-00002.safetensors").write_text("v2")
    assert sorted(p.name for p in final.iterdir()) == [EXPORT_MARKER, "model-00001-of-00002.safetensors"]
    # a kill between the two renames of the fallback swap: the finished export is put in place
    shutil.move(final, tmp_path / ".model.tmp-123")
    (tmp_path / ".model.tmp-456").mkdir()  # an unfinished one: removed
    repair_exports(tmp_path)
    assert (final / "model-00001-of-00002.safetensors").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# -- 2. validation before any work --------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=-1e-3", "optim.lr=-0.001: must be > 0"),
        ("method.rate=constant optim.lr=-1", "optim.lr=-1.0: must be > 0 (a negative rate climbs the loss"),
        ("run.steps=0", "run.steps=0: must be >= 1"),
        ("run.epochs=-1", "run.epochs=-1.0: must be > 0"),
        ("run.checkpoint_every=-1", "run.checkpoint_every=-1: must be >= 0"),
        ("run.max_checkpoints=0", "run.max_checkpoints=0: must be >= 1"),
        ("method=npo method.forget.beta=-0.1", "method.forget.beta=-0.1: must be > 0"),
        ("run.log_every=0", "run.log_every=0: must be >= 1"),
        ("optim.lr=.nan", "optim.lr=nan: must be a finite number"),
        ("data.batch_size=0", "data.batch_size=0: must be >= 1"),
        ("run.max_skipped_fraction=2", "run.max_skipped_fraction=2.0: must be in [0, 1]"),
    ],
)
def test_bad_numbers_exit_2_before_any_work_and_write_nothing(base, tmp_path, capsys, override, message):
    out = tmp_path / "out"
    t0 = time.perf_counter()
    assert _unlearn(base, out, *override.split()) == 2
    err = capsys.readouterr().err
    assert message in err and "set e.g." in err, err
    assert not out.exists()
    assert time.perf_counter() - t0 < 20


def _model_copy(base, tmp_path, edit_config=None):
    m = tmp_path / "model_copy"
    shutil.copytree(base["model"], m)
    if edit_config:
        cfg = json.loads((m / "config.json").read_text())
        edit_config(cfg)
        (m / "config.json").write_text(json.dumps(cfg))
    return m


def test_tokenizer_larger_than_model_vocab(base, tmp_path, capsys):
    m = _model_copy(base, tmp_path, lambda c: c.update(vocab_size=c["vocab_size"] - 8))
    assert _unlearn(base, tmp_path / "out", model=m) == 2
    err = capsys.readouterr().err
    assert "tokens but the model's vocab_size is" in err and "config.json" in err, err
    assert not (tmp_path / "out").exists()


def test_max_length_beyond_model_positions(base, tmp_path, capsys):
    m = _model_copy(base, tmp_path, lambda c: c.update(max_position_embeddings=32))
    assert _unlearn(base, tmp_path / "out", model=m) == 2
    assert "data.max_length=64 exceeds the model's 32 positions" in capsys.readouterr().err


def test_overlong_rows_error_option_names_the_row(base, tmp_path, capsys):
    assert _unlearn(base, tmp_path / "out", "data.max_length=32", "data.buckets=[32]", "data.overlong=error") == 2
    err = capsys.readouterr().err
    assert "data.forget_split=forget10" in err and "row" in err and "max_length=32" in err, err


def test_row_without_answer_names_file_and_row(base, tmp_path, capsys):
    bench = tmp_path / "bench"
    shutil.copytree(base["bench"], bench)
    f = bench / "retain90.json"
    rows = [json.loads(x) for x in f.read_text().splitlines()]
    del rows[3]["answer"]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _unlearn(base, tmp_path / "out", bench=bench) == 2
    err = capsys.readouterr().err
    assert f"{f}: row 3 has no string 'answer'" in err, err


def test_non_finite_input_weights(base, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    m = _model_copy(base, tmp_path)
    w = load_file(m / "model.safetensors")
    name = sorted(w)[0]
    w[name] = w[name].copy()
    w[name].flat[0] = np.nan
    save_file(w, m / "model.safetensors", metadata={"format": "pt"})
    assert _unlearn(base, tmp_path / "out", model=m) == 2
    assert f"tensor {name} has 1 non-finite values" in capsys.readouterr().err


def test_hub_id_typo_fails_fast_without_network(base, tmp_path, capsys):
    t0 = time.perf_counter()
    assert _unlearn(base, tmp_path / "out", bench="benchh/forget") == 2
    assert _unlearn(base, tmp_path / "out", model="someone/nosuchmodel") == 2
    err = capsys.readouterr().err
    assert "data.source='benchh/forget' is not a local directory" in err
    assert "not in the local Hugging Face cache" in err
    assert "model_path='someone/nosuchmodel'" in err
    assert time.perf_counter() - t0 < 15


def test_yaml_syntax_and_transformers_config_errors_are_one_line(base, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  steps: 3\n output_dir: x\n")
    assert main(["unlearn", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"config file {bad}:3:" in err and "not valid YAML" in err and "Traceback" not in err, err
    m = _model_copy(base, tmp_path, lambda c: c.update(model_type="nosuch_arch"))
    assert _unlearn(base, tmp_path / "out", model=m) == 2
    err = capsys.readouterr().err
    assert str(m / "config.json") in err and len(err.strip().splitlines()) == 1, err


# -- 3. divergence is a failure ----------------------------------------------------------------


def test_huge_rate_diverges_exit_1_and_no_export(base, tmp_path, capsys):
    out = tmp_path / "out"
    assert _unlearn(base, out, "optim.lr=1e30", "method.rate=constant", "run.steps=4") == 1
    err = capsys.readouterr().err
    assert "the run diverged, first at step" in err and "lower the rate" in err and "optim.lr=1e+29" in err, err
    assert not (out / "model").exists() and not (out / "summary.json").exists()
    verdict = json.loads((out / "diverged.json").read_text())
    assert verdict["diverged"] and verdict["first_bad_step"] >= 1


def test_check_run_verdicts(tmp_path):
    from types import SimpleNamespace

    from ngdiff_jax.errors import DivergedError
    from ngdiff_jax.training.divergence import check_run

    cfg = SimpleNamespace(run=SimpleNamespace(max_skipped_fraction=0.1), optim=SimpleNamespace(lr=1e-3))
    ok = SimpleNamespace(step=10, last_metrics={"loss": 1.0, "skipped": 1})
    check_run(ok, tmp_path, cfg, params={"w": jnp.ones(3)})  # 1 of 10 skipped: within the threshold
    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": NaN}\n')
    with pytest.raises(DivergedError, match=r"first at step 2: the final loss=nan"):
        check_run(SimpleNamespace(step=2, last_metrics={"loss": float("nan")}), tmp_path, cfg)
    with pytest.raises(DivergedError, match="2 of 10 steps were skipped"):
        check_run(SimpleNamespace(step=10, last_metrics={"skipped": 2}), tmp_path, cfg)
    with pytest.raises(DivergedError, match="the weights hold NaN/Inf"):
        check_run(ok, tmp_path, cfg, params={"w": jnp.array([1.0, jnp.inf])})
    # logged every 10 steps: the first bad step is only known to lie in 11..20, and is reported so
    (tmp_path / "log.jsonl").write_text('{"step": 10, "loss": 1.0, "skipped": 0}\n'
                                        '{"step": 20, "loss": 1.0, "skipped": 3}\n{"step": 30, "skipped": 5}\n')
    with pytest.raises(DivergedError, match=r"first between steps 11 and 20 \(logged every run.log_every"):
        check_run(SimpleNamespace(step=30, last_metrics={"skipped": 5}), tmp_path, cfg)
    verdict = json.loads((tmp_path / "diverged.json").read_text())
    assert verdict["first_bad_step"] is None and verdict["first_bad_between"] == [11, 20]


# -- 4. checkpoint fallback ------------------------------------------------------------------------


def _toy(out, num_steps):
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
        value, g = jax.value_and_grad(lambda p: jnp.mean((x @ p["w"] - x.sum(-1)) ** 2))(params)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": value}

    return run_loop(step, params, tx.init(params), streams={"train": stream}, num_steps=num_steps,
                    rng=jax.random.PRNGKey(0), out_dir=out, checkpoint_every=2, max_checkpoints=3,
                    progress=False, meta={"lr": 0.1})  # fmt: skip


def _truncate_data(step_dir: Path):
    (data,) = (step_dir / "state" / "d").iterdir()  # the merged OCDBT data file the restore reads
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)


DAMAGE = {
    "truncated_data": _truncate_data,
    "deleted_manifest": lambda d: (d / "state" / "manifest.ocdbt").unlink(),
    "truncated_array_metadata": lambda d: (d / "state" / "array_metadatas" / "process_0").write_text('{"arr'),
    "deleted_state": lambda d: shutil.rmtree(d / "state"),
    "garbage_meta": lambda d: (d / "meta" / "metadata").write_text("{not json"),
    "garbage_state_metadata": lambda d: (d / "state" / "_METADATA").write_text("\x00garbage"),
    # issue 26: step 6's directory holding step 4's meta (resuming it would replay steps 5-6 on step 6's state)
    "meta_of_another_step": lambda d: shutil.copy(d.parent / "4" / "meta" / "metadata", d / "meta" / "metadata"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_and_is_moved_aside(tmp_path, capsys, damage):
    full = _toy(tmp_path / "full", 8)
    _toy(tmp_path / "part", 6)  # checkpoints 2, 4, 6
    DAMAGE[damage](tmp_path / "part" / "checkpoints" / "6")
    capsys.readouterr()
    rest = _toy(tmp_path / "part", 8)
    err = capsys.readouterr().err
    assert rest.resumed_from == 4, err
    assert "checkpoint step 6" in err and "cannot be restored" in err and "checkpoints.damaged" in err, err
    np.testing.assert_array_equal(np.asarray(full.params["w"]), np.asarray(rest.params["w"]))
    aside = list((tmp_path / "part" / "checkpoints.damaged").iterdir())
    assert len(aside) == 1 and aside[0].name.startswith("6-")  # moved, not deleted


def test_every_checkpoint_damaged_stops_then_restarts(tmp_path, capsys):
    from ngdiff_jax.errors import NgdiffError

    _toy(tmp_path / "part", 4)
    for s in (2, 4):
        DAMAGE["garbage_meta"](tmp_path / "part" / "checkpoints" / str(s))
    with pytest.raises(NgdiffError, match="none of the checkpoints"):
        _toy(tmp_path / "part", 6)
    assert _toy(tmp_path / "part", 6).resumed_from is None


def test_cli_resumes_with_relative_vs_plain_paths(base, tmp_path, capsys, monkeypatch):
    shutil.copytree(base["model"], tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    assert _unlearn(base, "./u", model="./m") == 0
    assert _unlearn(base, "u", "run.steps=2", model="m") == 0
    assert json.loads(Path("u/summary.json").read_text())["resumed_from"] == 2


# -- 5. the error boundary ----------------------------------------------------------------------


def _limit_file_size(limit):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return pre


@pytest.mark.slow
def test_disk_full_is_one_line_and_keeps_the_old_export(base, tmp_path):
    out = tmp_path / "out"
    assert _unlearn(base, out) == 0
    before = _digest(out / "model")
    size = (out / "model" / "model.safetensors").stat().st_size
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # the same run again (resumes at its last step and exports again) with a file size limit below the weights
    proc = subprocess.run(
        [sys.executable, "-m", "ngdiff_jax.cli", "unlearn", "--config", "synthetic_ngdiff", "--no-progress",
         f"data.source={base['bench']}", f"model_path={base['model']}", f"run.output_dir={out}",
         "run.steps=2", "run.checkpoint_every=1", "run.eval_every=0"],
        capture_output=True, text=True, env=env, preexec_fn=_limit_file_size(size // 2), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    errs = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(errs) == 1 and "file size limit" in errs[0] and "Traceback" not in proc.stderr, proc.stderr
    assert _digest(out / "model") == before  # the previous export is whole, no half-written one
    assert not list(out.glob(".model.*"))


def test_bugs_get_a_traceback_only_with_debug(monkeypatch, capsys):
    from ngdiff_jax.commands import toy

    def boom(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(toy, "run", boom)
    assert main(["toy"]) == 1
    err = capsys.readouterr().err
    assert "internal error (a bug in ngdiff): RuntimeError: a bug" in err and "Traceback" not in err
    assert main(["toy", "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_eval_checks_every_input_before_loading(base, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    t0 = time.perf_counter()
    rc = main(["eval", "--model", str(base["model"]), "--data", str(tmp_path / "nodata"),
               "--retain-eval", str(bad), "--out", str(tmp_path)])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "--data" in err and "nodata" in err and f"--retain-eval {bad}" in err and "is a directory" in err, err
    assert time.perf_counter() - t0 < 10
    rc = main(["eval", "--model", str(base["model"]), "--data", str(base["bench"]), "--retain-eval",
               str(tmp_path / "missing.json"), "--limit", "2"])  # fmt: skip
    assert rc == 2 and "missing.json does not exist" in capsys.readouterr().err


def test_report_with_bad_aggregates_or_file_out_writes_nothing(tmp_path, capsys):
    from ngdiff_jax.evaluation import EvalResult

    good = EvalResult(name="a", benchmark="tofu", aggregates={"model_utility": 0.5, "forget_quality": 0.1})
    good.save(tmp_path / "a.json")
    bad = EvalResult(name="b", benchmark="tofu", aggregates={"model_utility": "high"})
    bad.save(tmp_path / "b.json")
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(out)]) == 2
    assert "aggregates['model_utility']='high' is not a number" in capsys.readouterr().err
    assert not out.exists()
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["report", str(tmp_path / "a.json"), "--out", str(f)]) == 2
    assert "is a file" in capsys.readouterr().err and f.read_text() == "x"
