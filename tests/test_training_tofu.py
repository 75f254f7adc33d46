"""On real TOFU rows (one forget author, one retain author, tiny model): finetune, then a
short NGDiff run lowers the forget answers' probability and keeps the retain answers'."""

import json

import pytest

from ngdiff_jax.config_loader import load_config
from ngdiff_jax.data import load_tofu, write_jsonl
from ngdiff_jax.training import FinetuneConfig, UnlearnConfig, run_finetune, run_unlearn

pytestmark = pytest.mark.slow  # unlearning on TOFU data end to end


@pytest.fixture(scope="module")
def tofu_subset(tofu_dir, tmp_path_factory):
    """A TOFU-layout folder (outside the repo) with 20 forget and 20 retain rows of the real files."""
    d = tmp_path_factory.mktemp("tofu_subset")
    forget = load_tofu("forget01", tofu_dir)[:20]
    retain = load_tofu("retain90", tofu_dir)[:20]
    write_jsonl(d / "forget01.json", forget)
    write_jsonl(d / "retain99.json", retain)
    write_jsonl(d / "full.json", retain + forget)
    return d


def test_ngdiff_on_real_tofu_forgets_and_retains(tofu_subset, tmp_path):
    common = [f"data.source={tofu_subset}", "data.batch_size=8", "data.max_length=64", "data.buckets=[64]",
              "run.progress=false", "run.checkpoint_every=0"]  # fmt: skip
    ft = load_config(FinetuneConfig, None, [
        "model=tiny_llama", "model.tokenizer_vocab_size=512", "data.split=full", "optim.lr=3e-3",
        "optim.warmup_steps=20", "run.steps=250",
        f"run.output_dir={tmp_path / 'target'}", *common])  # fmt: skip
    _, fsum = run_finetune(ft)
    assert fsum["last_metrics"]["loss"] < 1.0, fsum

    un = load_config(UnlearnConfig, None, [
        f"model_path={tmp_path / 'target' / 'model'}", "method=ngdiff", "data.forget_split=forget01",
        "data.retain_split=retain99", "optim.lr=1e-3", "run.steps=15", "run.eval_every=15",
        f"run.output_dir={tmp_path / 'unlearn'}", *common])  # fmt: skip
    _, summary = run_unlearn(un)
    before, after = summary["evals"][0], summary["evals"][-1]
    print(json.dumps({"before": before, "after": after, "step_time_s": summary["step_time_s"]}))
    assert after["forget_prob"] < 0.5 * before["forget_prob"]
    assert after["retain_prob"] > 0.8 * before["retain_prob"]
    assert summary["last_metrics"]["skipped"] == 0
