"""The lm-evaluation-harness adapter (`ngdiff_jax.integrations.lm_harness`): on a tiny random Llama,
every log-likelihood, greedy flag, rolling log-likelihood and greedy generation equals lm-eval's
own transformers backend (``HFLM``) on the same saved model; an offline task (a YAML and a JSONL
made here) runs end to end through ``lm_eval.simple_evaluate`` and ``ngdiff eval --benchmark
lm-eval``; bad model arguments and sampling requests fail naming the key."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import numpy as np
import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("torch")

from flax import nnx  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from ngdiff_jax.data import train_tokenizer  # noqa: E402
from ngdiff_jax.integrations.lm_harness import NgdiffLM  # noqa: E402
from ngdiff_jax.models import from_config, save_pretrained  # noqa: E402

TEXTS = [
    "The capital of France is Paris.", "Water boils at one hundred degrees.", "Cats like to sleep in the sun.",
    "The author wrote three novels about the sea.", "A quick brown fox jumps over the lazy dog.",
    "Question: What colour is the sky? Answer: blue", "Numbers: one two three four five six seven eight nine ten.",
]  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("lm_harness")
    tok = train_tokenizer(TEXTS * 4, path / "tok", vocab_size=300)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    save_pretrained(from_config(cfg, rngs=nnx.Rngs(7)), path / "model", tokenizer=tok)
    return path / "model"


@pytest.fixture(scope="module")
def both(model_dir):
    from lm_eval.models.huggingface import HFLM

    ours = NgdiffLM(pretrained=str(model_dir), dtype="float32", batch_size=4)
    theirs = HFLM(pretrained=str(model_dir), device="cpu", dtype="float32", batch_size=4)
    return ours, theirs


def _requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihoods_equal_lm_evals_hf_backend(both):
    ours, theirs = both
    args = [(c, " " + t.split()[-1]) for c in ("The capital of France is", "Cats like to") for t in TEXTS[:4]]
    args += [("", "Water boils."), ("Question: What colour is the sky? Answer:", " blue"),
             ("A quick brown fox jumps over the lazy", " dog.")]  # fmt: skip
    a = ours.loglikelihood(_requests("loglikelihood", args))
    b = theirs.loglikelihood(_requests("loglikelihood", args))
    np.testing.assert_allclose([x for x, _ in a], [x for x, _ in b], rtol=1e-4, atol=1e-4)
    assert [g for _, g in a] == [g for _, g in b]


def test_rolling_loglikelihoods_equal_lm_evals_hf_backend(both):
    ours, theirs = both
    args = [(t,) for t in TEXTS] + [(" ".join(TEXTS[:3]),)]  # the last one is longer than one window? no: 64 tokens
    a = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", args))
    b = theirs.loglikelihood_rolling(_requests("loglikelihood_rolling", args))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_greedy_generation_equals_lm_evals_hf_backend(both):
    ours, theirs = both
    args = [(t[:12], {"until": ["."], "max_gen_toks": 10, "do_sample": False}) for t in TEXTS]
    args += [(TEXTS[0], {"max_gen_toks": 6})]
    assert ours.generate_until(_requests("generate_until", args)) == theirs.generate_until(
        _requests("generate_until", args))


def test_sampling_and_bad_model_args_fail_naming_the_key(model_dir, both):
    ours, _ = both
    req = _requests("generate_until", [("The", {"do_sample": True, "temperature": 0.7})])
    with pytest.raises(ValueError, match="do_sample: false"):
        ours.generate_until(req)
    with pytest.raises(ValueError, match="batch_size='x'"):
        NgdiffLM(pretrained=str(model_dir), batch_size="x")
    with pytest.raises(ValueError, match="revision='main'"):
        NgdiffLM(pretrained=str(model_dir), revision="main")
    with pytest.raises(ValueError, match="not a local model directory"):
        NgdiffLM(pretrained="some-org/some-model")
    with pytest.raises(ValueError, match="max_length=4096"):
        NgdiffLM(pretrained=str(model_dir), max_length=4096)
    # a continuation longer than the context is refused, not scored in part
    with pytest.raises(ValueError, match="continuation of 64 tokens does not fit the context of 64"):
        ours._loglikelihood_tokens([(None, [1], list(range(3, 67)))])


def _local_task(tmp_path) -> str:
    """A multiple-choice task read from a JSONL file (no network), ``tiny_mc``, and one whose file
    is missing, ``tiny_mc_missing``: their include path."""
    rows = [{"question": "The capital of France is", "choices": [" Paris.", " blue", " dog."], "label": 0},
            {"question": "Cats like to", "choices": [" sleep in the sun.", " Paris.", " ten."], "label": 0},
            {"question": "A quick brown fox jumps over the lazy", "choices": [" sea.", " dog."], "label": 1}]
    data = tmp_path / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for task, path in (("tiny_mc", data), ("tiny_mc_missing", tmp_path / "missing.jsonl")):
        (tmp_path / f"{task}.yaml").write_text(
            f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {path}\ntest_split: test\noutput_type: multiple_choice\n"
            'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
            "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
        )
    return str(tmp_path)


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory) -> str:
    """`_local_task`'s folder, shared by the module's tests (lm-eval indexes it once: `task_manager`)."""
    return _local_task(tmp_path_factory.mktemp("lm_eval_tasks"))


def test_the_task_manager_is_built_once_per_state_of_its_folder(tmp_path, monkeypatch):
    """`task_manager`: one index per folder while its task YAMLs are unchanged; an added or edited
    task file gives a new one (lm-eval's TaskManager counted, not built: each takes ~6 s)."""
    import lm_eval.tasks

    from ngdiff_jax.integrations.lm_harness import _task_manager, task_manager

    built = []

    class Counted:
        def __init__(self, include_path=None):
            built.append(include_path)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Counted)
    _task_manager.cache_clear()
    try:
        include = _local_task(tmp_path)
        first = task_manager(include)
        assert task_manager(include) is first and task_manager() is task_manager()
        assert built == [str(Path(include).resolve()), None]
        (tmp_path / "results.json").write_text("{}")  # not a task file
        assert task_manager(include) is first
        (tmp_path / "extra").mkdir()
        (tmp_path / "extra" / "tiny_mc2.yaml").write_text("task: tiny_mc2\n")
        second = task_manager(include)
        assert second is not first and task_manager(include) is second
        (tmp_path / "extra" / "tiny_mc2.yaml").write_text("task: tiny_mc2\ntest_split: test\n")  # edited
        assert task_manager(include) is not second and len(built) == 4
        one = tmp_path / "extra" / "tiny_mc2.yaml"  # a task file as the include path: its own state is the key
        assert task_manager(one) is task_manager(str(one)) and len(built) == 5
        one.write_text("task: tiny_mc2\n")
        assert task_manager(one) is not None and len(built) == 6
    finally:
        _task_manager.cache_clear()


@pytest.mark.slow
def test_an_offline_task_runs_and_equals_the_hf_backend(both, local_tasks, monkeypatch):
    import lm_eval

    from ngdiff_jax.integrations.lm_harness import task_manager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tm = task_manager(local_tasks)
    ours, theirs = both
    res = [lm_eval.simple_evaluate(model=m, tasks=["tiny_mc"], task_manager=tm, log_samples=False)["results"]
           ["tiny_mc"] for m in (ours, theirs)]  # fmt: skip
    for key in ("acc,none", "acc_norm,none"):
        assert res[0][key] == pytest.approx(res[1][key])


@pytest.mark.slow
def test_ngdiff_eval_lm_eval_writes_a_result(model_dir, local_tasks, tmp_path, monkeypatch, capsys):
    from ngdiff_jax.cli import main

    out = tmp_path / "res.json"
    rc = main(["eval", "--benchmark", "lm-eval", "--tasks", "tiny_mc", "--lm-eval-include", local_tasks,
               "--model", str(model_dir), "--dtype", "float32", "--out", str(out)])  # fmt: skip
    assert rc == 0, capsys.readouterr()
    r = json.loads(out.read_text())
    assert r["benchmark"] == "lm-eval" and 0.0 <= r["aggregates"]["tiny_mc/acc"] <= 1.0
    assert "tiny_mc/acc_stderr" in r["aggregates"]
    from ngdiff_jax.evaluation.report import write_report

    md = open(write_report(tmp_path / "report", {"ngdiff": str(out)})["md"]).read()
    assert "General utility (lm-evaluation-harness)" in md and "tiny_mc/acc" in md


@pytest.mark.slow
def test_ngdiff_eval_lm_eval_fails_at_once_for_a_task_without_local_data(model_dir, tmp_path, capsys):
    from ngdiff_jax.cli import main

    rc = main(["eval", "--benchmark", "lm-eval", "--tasks", "no_such_task_xyz", "--model", str(model_dir),
               "--out", str(tmp_path / "r.json")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "no_such_task_xyz" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_ngdiff_lm_eval_is_lm_evals_cli_with_the_ngdiff_model(model_dir, local_tasks, tmp_path, monkeypatch, capsys):
    """``ngdiff-lm-eval --model ngdiff ...`` (the console script): lm-eval's own command line, the
    adapter registered."""
    import sys

    from ngdiff_jax.integrations.lm_harness import main

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    logger = logging.getLogger("lm_eval")  # lm-eval's CLI adds a handler on this test's stderr: undone after
    monkeypatch.setattr(logger, "handlers", list(logger.handlers))
    monkeypatch.setattr(logger, "level", logger.level)
    out = tmp_path / "out"
    main(["--model", "ngdiff", "--model_args", f"pretrained={model_dir},dtype=float32", "--batch_size", "2", "--tasks",
          "tiny_mc", "--include_path", local_tasks, "--output_path", str(out)])  # fmt: skip
    written = list(out.rglob("results*.json"))
    assert written and "tiny_mc" in json.loads(written[0].read_text())["results"]


@pytest.mark.slow
def test_ngdiff_eval_lm_eval_fails_at_once_for_missing_task_data(model_dir, local_tasks, tmp_path, capsys):
    """A known task whose data file is missing (offline: nothing downloads) fails before the model
    runs, in one line naming the task (exit 2); so does a negative --num-fewshot."""
    from ngdiff_jax.cli import main

    rc = main(["eval", "--benchmark", "lm-eval", "--tasks", "tiny_mc_missing", "--lm-eval-include", local_tasks,
               "--model", str(model_dir), "--out", str(tmp_path / "r.json")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "--tasks tiny_mc_missing: lm-eval could not load the task data offline" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r.json").exists()
    rc = main(["eval", "--benchmark", "lm-eval", "--tasks", "tiny_mc", "--num-fewshot", "-1", "--model",
               str(model_dir), "--out", str(tmp_path / "r.json")])  # fmt: skip
    assert rc == 2 and "--num-fewshot -1: must be >= 0" in capsys.readouterr().err


@pytest.mark.slow
def test_mesh_model_arg_shards_the_weights_and_gives_the_same_numbers(model_dir, devices8):
    """``--model_args mesh=fsdp`` on the 8 simulated CPU devices: the weights are sharded over the fsdp axis
    and every log-likelihood, greedy flag and generation equals the one-device model's."""
    reqs = [("The capital of", " France is Paris."), ("Cats like", " to sleep in the sun."), ("", "Water boils.")]
    one = NgdiffLM(pretrained=str(model_dir), dtype="float32", batch_size=2)
    sharded = NgdiffLM(pretrained=str(model_dir), dtype="float32", batch_size=2, mesh="fsdp")
    shardings = {str(x.sharding.spec) for x in jax.tree.leaves(nnx.state(sharded.model))}
    assert any("fsdp" in s for s in shardings), shardings
    inst = [Instance(request_type="loglikelihood", doc={}, arguments=a, idx=i) for i, a in enumerate(reqs)]
    a, b = one.loglikelihood(inst), sharded.loglikelihood(inst)
    assert [x[1] for x in a] == [x[1] for x in b]
    np.testing.assert_allclose([x[0] for x in a], [x[0] for x in b], rtol=1e-5, atol=1e-5)
    until = {"until": ["\n"], "max_gen_toks": 6}
    gen = [Instance(request_type="generate_until", doc={}, arguments=("Numbers: one", until), idx=0)]
    assert one.generate_until(gen) == sharded.generate_until(gen)
    with pytest.raises(ValueError, match="mesh='rings'"):
        NgdiffLM(pretrained=str(model_dir), mesh="rings")
