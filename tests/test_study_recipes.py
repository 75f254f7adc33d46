"""Recipes (configs/experiments/tofu_*), split pairing, model_path on the command line, and the
study runner on real TOFU files with a tiny random model that uses SmolLM2's tokenizer."""

import json
from pathlib import Path

import pytest

from ngdiff_jax.cli import main

SMOL = Path("~/.cache/ngdiff-jax/SmolLM2-135M-Instruct-hf-ref").expanduser()


@pytest.mark.parametrize(
    "config,fmt",
    [
        ("tofu_smollm2_finetune", "open-unlearning"),
        ("tofu_llama3.2-1b_finetune", "llama3-instruct"),
        ("tofu_phi-1_5_finetune", "question-answer"),
        ("tofu_llama2-7b-chat_finetune", "llama2-chat"),
    ],
)
def test_finetune_recipes_resolve(config, fmt, capsys):
    import yaml

    assert main(["finetune", "--config", config, "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"] is None and cfg["model_path"]
    assert cfg["format"]["name"] == fmt
    # open-unlearning's finetune hyper-parameters
    assert (cfg["optim"]["lr"], cfg["optim"]["weight_decay"], cfg["run"]["epochs"]) == (1e-5, 0.01, 5)
    assert cfg["data"]["batch_size"] == 32 and cfg["data"]["max_length"] == 512


def test_model_path_on_the_command_line_replaces_the_configs_model(capsys, tmp_path):
    import yaml

    # tofu_finetune_target builds a model from scratch (model: small_llama)
    assert main(["finetune", "--config", "tofu_finetune_target", f"model_path={tmp_path}", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"] is None and cfg["model_path"] == str(tmp_path)
    assert main(["finetune", "--config", "tofu_smollm2_finetune", "model=tiny_llama", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model_path"] is None and cfg["model"]["hf"]["model_type"] == "llama"


def test_retain_split_follows_forget_split():
    from ngdiff_jax.training.config_schema import DataConfig
    from ngdiff_jax.training.data_assembly import resolve_retain_split

    for f, r in (("forget01", "retain99"), ("forget05", "retain95"), ("forget10", "retain90")):
        assert resolve_retain_split(DataConfig(forget_split=f)) == r
    assert resolve_retain_split(DataConfig(forget_split="forget01", retain_split="mine")) == "mine"
    with pytest.raises(ValueError, match="data.retain_split"):
        resolve_retain_split(DataConfig(forget_split="my_forget"))


@pytest.fixture(scope="module")
def tiny_smol(tmp_path_factory):
    if not (SMOL / "tokenizer.json").is_file():
        pytest.skip(f"SmolLM2 tokenizer not cached at {SMOL} (see tests/test_models_gguf.py)")
    from flax import nnx
    from transformers import AutoTokenizer

    from ngdiff_jax import models

    tok = AutoTokenizer.from_pretrained(SMOL)
    hf = dict(model_type="llama", vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True,
              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    d = tmp_path_factory.mktemp("tiny_smol") / "model"
    models.save_pretrained(models.from_config(hf, rngs=nnx.Rngs(0)), d, tokenizer=tok)
    return d


@pytest.mark.slow  # about 1 min on 2 idle cores (compiles for a 49k-token vocabulary, 4 runs of the CLI)
def test_study_on_tofu_subset_runs_resumes_and_saves_the_format(tiny_smol, tmp_path, tofu_dir, capsys):
    # the CLI in this process (its entry point, exit codes and output): a subprocess per run would only add imports
    out = tmp_path / "study"
    args = [
        "study", "--config", "tofu_smollm2", "--out", str(out), "--no-progress",
        f"model_path={tiny_smol}", f"benchmark.source={tofu_dir}", "benchmark.retain_authors=1",
        "benchmark.eval_rows=2", "benchmark.forget_eval_rows=2", "sweep.lr=[2e-5]", "sweep.selection_seeds=[0]",
        "train.steps=1", "train.epochs=null", "train.optim.warmup_steps=0",
        "min_target_forget_rouge=0",  # a tiny random model memorizes nothing "train.retain_steps=1", "unlearn.steps=1",
        "evaluation.max_new_tokens=2", "evaluation.batch_size=4", "train.batch_size=4", "--methods", "ngdiff",
    ]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err[-3000:]
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]) == {"ngdiff"} and set(report["references"]) == {"retain", "target"}
    assert report["methods"]["ngdiff"]["runs"] == 1 and report["reported_round"] == "selection"
    (out / "tradeoff.png").stat()
    data = out / "data" / "tofu"
    assert sum(1 for _ in open(data / "demo_target_train.json")) == 60  # forget01 (40) + 1 retain author
    assert sum(1 for _ in open(data / "forget01_perturbed.json")) == 2
    saved = json.loads((out / "runs" / "target" / "model" / "ngdiff_format.json").read_text())
    assert saved["format"]["name"] == "open-unlearning"
    member = json.loads((out / "sweep" / "selection" / "ngdiff" / "results" / "m000.json").read_text())
    assert member["meta"]["forget_split"] == "forget01" and member["meta"]["rows"]["forget"] == 2
    # resume: every phase is loaded, not redone; another config is refused
    (out / "report.json").unlink()
    rc = main([*args, "--resume"])
    stdout, stderr = capsys.readouterr()
    assert rc == 0, stderr[-3000:]
    assert stdout.count("done before (resumed)") == 2 and (out / "report.json").is_file()
    rc = main([*args[:-2], "sweep.lr=[1e-3]", *args[-2:], "--resume"])  # overrides come before --methods
    assert rc != 0 and "another config" in capsys.readouterr().err
    rc = main(args)
    assert rc != 0 and "--resume" in capsys.readouterr().err


def test_eval_reads_the_saved_format_and_split(tmp_path, monkeypatch, tofu_dir):
    """`ngdiff eval` scores with the format and forget split saved beside the model; another --format
    is an error unless --allow-format-change."""
    from flax import nnx

    from ngdiff_jax import models
    from ngdiff_jax.data import load_format, save_format, train_tokenizer
    from ngdiff_jax.evaluation import EvalResult
    from ngdiff_jax.evaluation import tofu as tofu_eval

    tok = train_tokenizer(["Question: who?\nAnswer: me"] * 5, tmp_path / "tok", vocab_size=300)
    hf = dict(model_type="llama", vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)  # fmt: skip
    model_dir = tmp_path / "model"
    models.save_pretrained(models.from_config(hf, rngs=nnx.Rngs(0)), model_dir, tokenizer=tok)
    spec = load_format("question-answer")
    save_format(spec, model_dir, stage="unlearn", forget_split="forget05", retain_split="retain95")
    seen = {}

    def fake_evaluate_tofu(model, tokenizer, data_dir=None, **kw):
        seen.update(kw)
        return EvalResult(name=kw["name"], benchmark="tofu",
                          aggregates={"model_utility": 0.5, "forget_Q_A_ROUGE": 0.4, "forget_Q_A_Prob": 0.3})

    monkeypatch.setattr(tofu_eval, "evaluate_tofu", fake_evaluate_tofu)
    args = ["eval", "--model", str(model_dir), "--data", str(tofu_dir), "--out", str(tmp_path / "r.json")]
    assert main(args) == 0
    assert seen["forget_split"] == "forget05" and seen["formatter"].spec == spec
    assert not seen["formatter"].uses_chat_template
    assert main([*args, "--forget-split", "forget01"]) == 0 and seen["forget_split"] == "forget01"
    assert main([*args, "--format", "llama2-chat"]) == 2
    assert main([*args, "--format", "llama2-chat", "--allow-format-change"]) == 0
    assert seen["formatter"].spec == load_format("llama2-chat")


def test_study_configs_state_open_unlearnings_settings():
    """The SmolLM2 sweep and the full-size GPU sweep (issue 23): their shape and the settings they claim."""
    from ngdiff_jax.demo import load_demo_config

    smol = load_demo_config("tofu_smollm2")
    gpu = load_demo_config("tofu_llama3.2-1b")
    for cfg in (smol, gpu):
        sw = cfg.sweep
        assert set(sw.methods) == {"ngdiff", "ngdiff_fixed", "gdiff", "npo", "simnpo", "rmu"}
        assert len(sw.lr) >= 3 and len(sw.selection_seeds) >= 3
        assert cfg.unlearn.optim.weight_decay == 0.01
    assert (smol.benchmark.forget_eval_rows, smol.benchmark.eval_rows, smol.evaluation.max_new_tokens) == (40, 20, 64)
    # the GPU recipe: open-unlearning's epochs, batch, rate and answers; precision stated (float32 masters)
    assert (gpu.train.epochs, gpu.unlearn.epochs, gpu.unlearn.batch_size, gpu.evaluation.max_new_tokens) == (5, 10,
                                                                                                              32, 200)
    assert 1e-5 in gpu.sweep.lr and gpu.benchmark.retain_authors is None and gpu.unlearn.retain_set == "tofu"
    assert (gpu.unlearn.precision.params, gpu.unlearn.precision.compute) == ("float32", "bfloat16")


def test_study_epochs_follow_each_split(tofu_dir, tmp_path):
    from ngdiff_jax.config_loader import ConfigError
    from ngdiff_jax.demo import load_demo_config
    from ngdiff_jax.demo.inputs import resolve_epochs, write_tofu_subset

    for split, retain_rows in (("forget01", 3960), ("forget10", 3600)):
        cfg = load_demo_config("tofu_llama3.2-1b", overrides=[f"benchmark.forget_split={split}",
                                                             f"benchmark.source={tofu_dir}"])  # fmt: skip
        d = tmp_path / split
        cfg = resolve_epochs(cfg, d, write_tofu_subset(cfg, d))
        forget = {"forget01": 40, "forget10": 400}[split]
        # ceil(rows / 32) steps per epoch, as the Trainer's dataloader without drop_last
        assert cfg.train.steps == 5 * -(-4000 // 32) and cfg.train.retain_steps == 5 * -(-retain_rows // 32)
        assert cfg.unlearn.steps == 10 * -(-forget // 32)
    with pytest.raises(ConfigError, match="set exactly one"):
        load_demo_config("tofu_llama3.2-1b", overrides=["unlearn.steps=5"])
    with pytest.raises(ConfigError, match="forget_eval_rows=0"):
        load_demo_config("tofu_smollm2", overrides=["benchmark.forget_eval_rows=0"])
