"""ngdiff's evaluation (batched, shared-prompt scoring, shared-prefix generation) equals a plain
one-prompt-at-a-time transformers evaluation (the eval-speed benchmark's reference) on a tiny
random Llama: every aggregate and per-sample value, every generation."""

import numpy as np
import pytest

pytest.importorskip("torch")

from flax import nnx  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from ngdiff_jax.bench.eval_speed import compare  # noqa: E402
from ngdiff_jax.data import QAFormatter, load_tofu, train_tokenizer  # noqa: E402
from ngdiff_jax.evaluation.tofu import evaluate_tofu  # noqa: E402
from ngdiff_jax.models import from_config, save_pretrained  # noqa: E402


def test_compare_reports_the_largest_differences():
    a = {"aggregates": {"x": 0.5, "y": None, "z": 1.0}, "per_sample": {"p": [[1.0, 2.0]], "m": {"f": [1.0]}, "q": [1]},
         "generations": {"g": ["a", "b"]}}  # fmt: skip
    b = {"aggregates": {"x": 0.5003, "y": 1.0, "z": 1.0}, "per_sample": {"p": [[1.0, 2.5]], "m": {"f": [1.0]}},
         "generations": {"g": ["a", "c"]}}  # fmt: skip
    d = compare(a, b)
    assert d["max_aggregate_diff"] == pytest.approx(3e-4) and d["worst_aggregate"] == "x"
    assert d["max_per_sample_diff"] == pytest.approx(0.5) and d["worst_per_sample"] == "p"
    assert d["generations_differing"] == 1 and d["only_in_one"] == ["q"]


def _tiny_llama(tok, path, *, max_positions: int, seed: int):
    """A random 2-layer tied Llama for ``tok``, saved to ``path`` (read by the PyTorch side)."""
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    model = from_config(cfg, rngs=nnx.Rngs(seed))
    save_pretrained(model, path, tokenizer=tok)
    return model


def test_tofu_equals_the_pytorch_reference(tofu_dir, tmp_path, monkeypatch):
    from ngdiff_jax.bench.eval_torch import TorchRunner, eval_tofu
    from ngdiff_jax.evaluation import mia

    # the MIA attacks read the scoring pass's statistics: no pass (and no compile) of their own
    monkeypatch.setattr(mia, "model_statistics", lambda *a, **k: pytest.fail("the MIA attacks scored again"))

    rows = load_tofu("forget01_perturbed", tofu_dir)
    tok = train_tokenizer([r["question"] + " " + r["answer"] for r in rows], tmp_path / "tok", vocab_size=300)
    model = _tiny_llama(tok, tmp_path / "m", max_positions=512, seed=3)
    fmt = QAFormatter(tok)
    ours = evaluate_tofu(model, tok, tofu_dir, forget_split="forget01", limit=3, batch_size=8, max_new_tokens=8,
                         formatter=fmt).to_dict()  # fmt: skip
    theirs = eval_tofu(TorchRunner(str(tmp_path / "m"), threads=1), tofu_dir, forget_split="forget01", limit=3,
                       max_new_tokens=8, formatter=fmt)  # fmt: skip
    theirs = {k: {kk: (np.asarray(vv).tolist() if not isinstance(vv, dict) else vv) for kk, vv in v.items()}
              for k, v in theirs.items()}  # fmt: skip
    d = compare(ours, theirs)
    assert d["generations_differing"] == 0
    assert d["max_aggregate_diff"] < 1e-5, d
    assert d["max_per_sample_diff"] < 1e-4, d
    assert set(theirs["aggregates"]) <= set(ours["aggregates"])
    assert set(theirs["per_sample"]) <= set(ours["per_sample"])
    assert {"mia_loss", "mia_zlib", "mia_min_k_plus_plus"} <= set(ours["aggregates"])


@pytest.mark.slow
def test_muse_equals_the_pytorch_reference(muse_news_dir, tmp_path, monkeypatch):
    # long texts (PrivLeak ~2000 tokens, VerbMem prompts ~1000) go through the causal-block paths of
    # scoring and generation prefill (engine.ATTENTION_BLOCK, blocks of 512 positions here)
    from ngdiff_jax.bench.eval_torch import TorchRunner, eval_muse
    from ngdiff_jax.data import load_muse
    from ngdiff_jax.evaluation import engine
    from ngdiff_jax.evaluation.muse import evaluate_muse

    monkeypatch.setattr(engine, "ATTENTION_BLOCK", 512)
    texts = [r["prompt"] + " " + r["gt"] for r in load_muse(muse_news_dir, "verbmem", "forget")[:20]]
    qa = load_muse(muse_news_dir, "knowmem", "forget_qa")
    texts += [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in qa]
    tok = train_tokenizer(texts, tmp_path / "tok", vocab_size=2000)
    model = _tiny_llama(tok, tmp_path / "m", max_positions=4096, seed=5)
    ours = evaluate_muse(model, tok, muse_news_dir, limit=1, batch_size=4)
    assert ours.timings["shapes"]["score"] and max(s[1] for s in ours.timings["shapes"]["score"]) > 1024
    assert ours.meta["truncated_examples"] == 0 and not any(ours.meta["truncated_prompts"].values())
    assert ours.meta["verbmem_teacher_forced"] == 1  # extraction strength read on the generation's prompt cache
    theirs = eval_muse(TorchRunner(str(tmp_path / "m"), threads=1), muse_news_dir, limit=1)
    theirs = {k: {kk: (np.asarray(vv).tolist() if not isinstance(vv, dict) else vv) for kk, vv in v.items()}
              for k, v in theirs.items()}  # fmt: skip
    d = compare(ours.to_dict(), theirs)
    assert d["generations_differing"] == 0
    assert d["max_aggregate_diff"] < 1e-5, d
    assert d["max_per_sample_diff"] < 1e-4, d
    assert set(theirs["aggregates"]) <= set(ours.aggregates)
