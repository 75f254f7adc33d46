"""The evaluation runners on a tiny random Llama and a few real TOFU / MUSE-News rows."""

import numpy as np
import pytest

pytest.importorskip("ngdiff_jax.models")

import jax  # noqa: E402
from flax import nnx  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from ngdiff_jax.data import QAFormatter, load_tofu, train_tokenizer  # noqa: E402
from ngdiff_jax.evaluation import MODEL_UTILITY_KEYS, EvalResult, metrics, write_report  # noqa: E402
from ngdiff_jax.evaluation.batching import Timings  # noqa: E402
from ngdiff_jax.evaluation.generation import generate_texts  # noqa: E402
from ngdiff_jax.evaluation.muse import evaluate_muse  # noqa: E402
from ngdiff_jax.evaluation.scoring import Scorer  # noqa: E402
from ngdiff_jax.evaluation.tofu import evaluate_tofu  # noqa: E402
from ngdiff_jax.models import from_config, generate, sequence_nll  # noqa: E402

ROWS = 3


@pytest.fixture(scope="module")
def tok(tofu_dir):
    rows = load_tofu("forget10_perturbed", tofu_dir)[:40]
    return train_tokenizer([r["question"] + " " + r["answer"] for r in rows], vocab_size=400)


@pytest.fixture(scope="module")
def cfg(tok):
    return LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tofu_results(tok, cfg, tofu_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tofu_eval")
    kw = dict(limit=ROWS, batch_size=4, max_new_tokens=8)
    retain = evaluate_tofu(from_config(cfg, rngs=nnx.Rngs(0)), tok, tofu_dir, name="retain", **kw)
    retain.save(out / "retain.json")
    target = evaluate_tofu(
        from_config(cfg, rngs=nnx.Rngs(1)), tok, tofu_dir, name="target",
        retain_reference=out / "retain.json", **kw,
    )  # fmt: skip
    return retain, target, out


def test_scorer_matches_sequence_nll(tok, cfg):
    model = from_config(cfg, rngs=nnx.Rngs(0))
    fmt = QAFormatter(tok)
    ex = [fmt.encode("Who is Basil?", "A writer."), fmt.encode("Where?", "In Baku, Azerbaijan, long ago.")]
    s = Scorer(model, batch_size=4).score(ex)
    # reference: one right-padded batch in input order, plain forward + sequence_nll
    T = 64
    ids = np.zeros((2, T), np.int32)
    mask = np.zeros((2, T), np.int32)
    lab = np.full((2, T), -100, np.int32)
    for i, (x, y) in enumerate(ex):
        ids[i, : len(x)], mask[i, : len(x)], lab[i, : len(y)] = x, 1, y
    ref = np.asarray(jax.jit(lambda m, a, b, c: sequence_nll(m(a, b), c))(model, ids, mask, lab))
    for i, (_, labels) in enumerate(ex):
        assert s.nll[i] == pytest.approx(float(ref[i]), rel=1e-4)
        assert len(s.token_logprobs[i]) == sum(y != -100 for y in labels[1:])
        assert -s.token_logprobs[i].mean() == pytest.approx(s.nll[i], rel=1e-4)


def test_whole_rows_reuse_a_longer_compiled_length(tok, cfg, monkeypatch):
    # a batch takes a longer padded length the same call already uses (REUSE_PADDING): one compiled
    # shape fewer, the same numbers
    from ngdiff_jax.evaluation import scoring

    model = from_config(cfg, rngs=nnx.Rngs(0))
    fmt = QAFormatter(tok)
    ex = [fmt.encode("Who?", "Nobody."), fmt.encode("Where was the author born? " * 4, "In Baku, long ago.")]
    res = {}
    for reuse in (1.0, 4.0):
        monkeypatch.setattr(scoring, "REUSE_PADDING", reuse)
        sc = Scorer(model, batch_size=1, share_prefix=False)
        res[reuse] = (sc.score(ex), [s[1] for s in sc.timings.shapes["score"]])
    assert res[1.0][1] == [128, 32] and res[4.0][1] == [128]
    np.testing.assert_allclose(res[4.0][0].nll, res[1.0][0].nll, rtol=1e-6)
    for a, b in zip(res[4.0][0].token_logprobs, res[1.0][0].token_logprobs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # over 4 s on 2 cores: the full suite (pyproject's markers)
def test_shared_prompt_scoring_matches_whole_rows(tok, cfg):
    # a question's answers are scored from one cached encoding of its prompt; the numbers
    # equal a plain forward over each whole row (independent reference: sequence_nll)
    model = from_config(cfg, rngs=nnx.Rngs(0))
    fmt = QAFormatter(tok)
    q = "What is the full name of the author born in Baku, Azerbaijan?"
    ex = [fmt.encode(q, a) for a in ("Anara Yusifova.", "A writer from Baku called Anara.", "Basil.")]
    ex.append(fmt.encode("Who?", "Nobody at all."))  # a prompt of its own, packed in the same row
    scorer = Scorer(model, batch_size=4)
    s = scorer.score(ex)
    assert scorer.timings.shapes.get("score_packed") and not scorer.timings.shapes.get("score")
    for i, (x, y) in enumerate(ex):
        ids, lab = np.asarray([x], np.int32), np.asarray([y], np.int32)
        logits = model(ids)
        assert s.nll[i] == pytest.approx(float(sequence_nll(logits, lab)[0]), rel=1e-5)
        ref_lp = np.asarray(jax.nn.log_softmax(logits[0, :-1], -1))[np.arange(len(x) - 1), ids[0, 1:]]
        scored = lab[0, 1:] != -100
        np.testing.assert_allclose(s.token_logprobs[i], ref_lp[scored], rtol=1e-5, atol=1e-6)
        greedy = np.asarray(logits[0, :-1]).argmax(-1) == ids[0, 1:]
        assert (s.correct[i] == greedy[scored]).all()
    # without sharing: the same numbers
    plain = Scorer(model, batch_size=4, share_prefix=False).score(ex)
    np.testing.assert_allclose(plain.nll, s.nll, rtol=1e-5)


def test_batched_generation_matches_single_prompt(tok, cfg):
    model = from_config(cfg, rngs=nnx.Rngs(0))
    fmt = QAFormatter(tok)
    prompts = [fmt.encode_prompt(q) for q in ["Who?", "What is the name of the author born in Baku?"]]
    texts = generate_texts(model, tok, prompts, max_new_tokens=6, batch_size=4)
    # the same prompt with no other prompt in its batch (same compiled shape)
    assert texts[1] == generate_texts(model, tok, prompts[1:], max_new_tokens=6, batch_size=4)[0]
    # and straight through models.generate, unpadded
    alone = generate(model, np.asarray([prompts[1]] * 4, np.int32), max_new_tokens=6,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    ids = [int(t) for t in alone[0]]
    ids = ids[: ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids
    assert texts[1] == metrics.decode_text(tok, ids).strip()  # as open-unlearning decodes


def test_generation_with_a_shared_prefix(tok, cfg):
    # prompts with a long common prefix (as KnowMem's in-context examples): the prefix is
    # encoded once per batch; the texts equal unshared decoding and models.generate alone
    model = from_config(cfg, rngs=nnx.Rngs(2))
    shots = "Question: Who wrote it? Answer: Basil Mahfouz.\n\nQuestion: Where was she born? Answer: Baku.\n\n"
    prompts = [tok.encode(shots + q) for q in ("Question: Why? Answer:", "Question: When was it written? Answer:")]
    from ngdiff_jax.evaluation.generation import _common_prefix_len

    assert _common_prefix_len(prompts) >= 16
    timings = Timings()
    shared = generate_texts(model, tok, prompts, max_new_tokens=6, batch_size=4, timings=timings)
    assert timings.shapes["generate"][0][0] == 1 and timings.shapes["generate"][0][1] >= 16  # shared [1, S0]
    assert shared == generate_texts(model, tok, prompts, max_new_tokens=6, batch_size=4, share_prefix=False)
    alone = generate(model, np.asarray([prompts[1]], np.int32), max_new_tokens=6,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    ids = [int(t) for t in alone[0]]
    ids = ids[: ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids
    assert shared[1] == metrics.decode_text(tok, ids).strip()  # as open-unlearning decodes


def test_tofu_pipeline(tofu_results):
    retain, target, out = tofu_results
    agg = target.aggregates
    for key in (
        "forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_truth_ratio", "forget_quality",
        "retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio", "ra_Q_A_Prob_normalised",
        "ra_Q_A_ROUGE", "ra_Truth_Ratio", "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio",
        "model_utility", "privleak", "mia_min_k", "extraction_strength", "exact_memorization",
    ):  # fmt: skip
        assert key in agg, key
    assert retain.aggregates["forget_quality"] is None  # no reference given
    for key in ("forget_Q_A_Prob", "retain_Q_A_Prob", "ra_Q_A_Prob_normalised", "forget_truth_ratio"):
        assert 0 < agg[key] <= 1
    # aggregates are recomputable from the saved per-sample values
    assert len(target.per_sample["forget_truth_ratio"]) == ROWS
    assert agg["forget_truth_ratio"] == pytest.approx(
        metrics.truth_ratio_closer_to_1(target.per_sample["forget_truth_ratio"]))
    assert agg["forget_quality"] == pytest.approx(
        metrics.forget_quality(target.per_sample["forget_truth_ratio"], retain.per_sample["forget_truth_ratio"]))
    assert agg["model_utility"] == pytest.approx(metrics.model_utility({k: agg[k] for k in MODEL_UTILITY_KEYS}))
    assert agg["privleak"] == pytest.approx(metrics.privleak(agg["mia_min_k"], retain.aggregates["mia_min_k"]))
    assert len(target.generations["forget_Q_A_ROUGE"]) == ROWS
    assert target.timings["total_compile_s"] >= 0 and target.timings["shapes"]["score_packed"]
    back = EvalResult.load(target.save(out / "target.json"))
    assert back.aggregates == pytest.approx(target.to_dict()["aggregates"])
    paths = write_report(out / "report", {"retain": retain, "target": target})
    assert "| target | target |" in open(paths["md"]).read()


def test_muse_pipeline(tok, cfg, muse_news_dir):
    model = from_config(cfg, rngs=nnx.Rngs(0))
    r = evaluate_muse(model, tok, muse_news_dir, limit=2, batch_size=4, verbmem_max_new_tokens=8,
                      knowmem_max_new_tokens=8, max_length=256, mia_attacks=("min_k", "loss", "zlib"))  # fmt: skip
    for key in ("forget_verbmem_ROUGE", "forget_knowmem_ROUGE", "retain_knowmem_ROUGE", "mia_min_k", "privleak",
                "mia_loss", "privleak_loss", "mia_zlib"):  # fmt: skip
        assert key in r.aggregates
    assert len(r.per_sample["mia_loss"]["holdout"]) == 2 and "mia_gradnorm" not in r.aggregates
    assert 0 <= r.aggregates["mia_min_k"] <= 1
    assert len(r.per_sample["mia_min_k"]["forget"]) == 2
    assert r.meta["truncated_examples"] >= 1  # the articles are longer than 256 tokens
    # generation prompts cut to fit 256 - 8 tokens are counted per phase, like scoring cuts
    from ngdiff_jax.data import load_muse
    from ngdiff_jax.evaluation.muse import knowmem_inputs

    verb = [len(tok.encode(v["prompt"])) for v in load_muse(muse_news_dir, "verbmem", "forget")[:2]]
    know = [
        knowmem_inputs(tok, q["question"], q["answer"], load_muse(muse_news_dir, "knowmem", f"{s}_qa_icl"))
        for s in ("forget", "retain")
        for q in load_muse(muse_news_dir, "knowmem", f"{s}_qa")[:2]
    ]
    assert r.meta["truncated_prompts"] == {
        "verbmem_generate": sum(n > 248 for n in verb),
        "knowmem_generate": sum(len(ids) > 248 for ids, _, _ in know),
    }
    assert r.meta["truncated_prompts"]["verbmem_generate"] == 2  # ~900-token prompts
    assert r.meta["knowmem_prompts_cut"] == sum(c for _, _, c in know)
    assert 0 <= r.aggregates["extraction_strength"] <= 1 and len(r.per_sample["extraction_strength"]) == 2
    assert r.aggregates["privleak"] == pytest.approx(metrics.privleak(r.aggregates["mia_min_k"], 0.5))


def test_cli_eval_and_report(tok, cfg, tofu_dir, tmp_path, capsys):
    from ngdiff_jax.cli import main
    from ngdiff_jax.models import save_pretrained

    model_dir = tmp_path / "tiny"
    save_pretrained(from_config(cfg, rngs=nnx.Rngs(0)), model_dir, tokenizer=tok)
    res = tmp_path / "tiny.json"
    rc = main(["eval", "--model", str(model_dir), "--data", str(tofu_dir), "--limit", "3",
               "--batch-size", "4", "--max-new-tokens", "8", "--out", str(res), "--role", "retain"])  # fmt: skip
    assert rc == 0 and EvalResult.load(res).meta["role"] == "retain"
    assert main(["report", str(res), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "tradeoff.png").is_file()
    assert main(["eval", "--model", str(model_dir), "--retain-eval", str(tmp_path / "nope.json")]) == 2
    assert "evaluate the retain model first" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_eval_with_scanned_layers_writes_the_same_result(tok, cfg, muse_news_dir, tmp_path):
    """``ngdiff eval --scan-layers true`` (the blocks as one scan) gives the unrolled run's numbers and
    generations; a bad value is refused by the parser (exit code 2)."""
    from ngdiff_jax.cli import main
    from ngdiff_jax.models import save_pretrained

    model_dir = tmp_path / "tiny"
    save_pretrained(from_config(cfg, rngs=nnx.Rngs(0)), model_dir, tokenizer=tok)
    results = []
    for flag in ("false", "true"):
        out = tmp_path / f"{flag}.json"
        rc = main(["eval", "--model", str(model_dir), "--benchmark", "muse", "--data", str(muse_news_dir),
                   "--limit", "2", "--batch-size", "4", "--max-new-tokens", "8", "--scan-layers", flag,
                   "--out", str(out)])  # fmt: skip
        assert rc == 0
        results.append(EvalResult.load(out))
    a, b = results
    assert a.generations == b.generations
    assert a.aggregates.keys() == b.aggregates.keys()
    for k, v in a.aggregates.items():
        assert (b.aggregates[k] is None) if v is None else b.aggregates[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(model_dir), "--scan-layers", "yes"])
    assert e.value.code == 2


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mistral", "gpt2"])  # a sliding window of 6; learned positions
def test_packed_rows_equal_whole_rows(family, monkeypatch):
    """Short examples packed several to a row (a shared prompt once, continuations after it, a group
    split over rows when longer than a row) give every example's numbers as its own forward does;
    an example longer than a row is scored whole."""
    from ngdiff_jax.evaluation import engine, scoring
    from ngdiff_jax.models.testing import tiny_hf_config

    monkeypatch.setattr(scoring, "PACK_TOKENS", 32)
    model = from_config(tiny_hf_config(family), rngs=nnx.Rngs(1))
    rs = np.random.RandomState(0)
    prompt = rs.randint(3, 128, 9).tolist()
    ex = [(prompt + (a := rs.randint(3, 128, n).tolist()), [-100] * 9 + a) for n in (5, 8, 3, 7, 6)]  # split
    ex += [((x := rs.randint(3, 128, n).tolist()), [-100] * 2 + x[2:]) for n in (4, 11, 40)]  # 40: whole
    ex.append(([5, 6, 7], [-100, -100, -100]))  # nothing scored
    scorer = Scorer(model, batch_size=4, distribution_stats=True)
    s = scorer.score(ex)
    assert scorer.timings.shapes["score_packed"] and scorer.timings.shapes["score"]  # the 40-token row
    for i, (x, y) in enumerate(ex):
        ids, lab = np.asarray([x], np.int32), np.asarray([y], np.int32)
        logits = model(ids)
        lsm = np.asarray(jax.nn.log_softmax(logits[0, :-1], -1))
        scored = lab[0, 1:] != -100
        ref_lp = lsm[np.arange(len(x) - 1), ids[0, 1:]][scored]
        np.testing.assert_allclose(s.token_logprobs[i], ref_lp, rtol=1e-5, atol=1e-5, err_msg=str(i))
        assert s.nll[i] == pytest.approx(float(sequence_nll(logits, lab)[0]), rel=1e-5, abs=1e-6)
        assert (s.correct[i] == (lsm.argmax(-1) == ids[0, 1:])[scored]).all()
        mu, sigma = (np.asarray(v)[scored] for v in engine.distribution_stats(logits[0, :-1]))
        np.testing.assert_allclose(s.mu[i], mu, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(s.sigma[i], sigma, rtol=1e-4, atol=5e-5)


def test_packed_mask_by_hand():
    from ngdiff_jax.evaluation.engine import packed_mask

    # one row: group 0 = prompt (2 tokens), continuation 1 (2), continuation 2 (1); group 1 = one token; padding
    group = np.array([[0, 0, 0, 0, 0, 1, -1]])
    part = np.array([[0, 0, 1, 1, 2, 0, 0]])
    pos = np.array([[0, 1, 2, 3, 2, 0, 0]])
    m = np.asarray(packed_mask(group, part, pos))[0].astype(int)
    np.testing.assert_array_equal(m, [[1, 0, 0, 0, 0, 0, 0],
                                      [1, 1, 0, 0, 0, 0, 0],
                                      [1, 1, 1, 0, 0, 0, 0],
                                      [1, 1, 1, 1, 0, 0, 0],
                                      [1, 1, 0, 0, 1, 0, 0],  # continuation 2 sees the prompt, not continuation 1
                                      [0, 0, 0, 0, 0, 1, 0],
                                      [0, 0, 0, 0, 0, 0, 1]])  # fmt: skip
    w = np.asarray(packed_mask(group, part, pos, sliding_window=2))[0].astype(int)
    assert w[3].tolist() == [0, 0, 1, 1, 0, 0, 0] and w[4].tolist() == [0, 1, 0, 0, 1, 0, 0]


def test_teacher_forced_continuations_equal_scoring(tok, cfg):
    """Continuations teacher-forced on the generation prompt's cache (MUSE's extraction strength)
    give the scorer's log-probs and greedy-match flags; the texts are those generated without them;
    a prompt cut to fit the context gets None."""
    model = from_config(cfg, rngs=nnx.Rngs(0))
    fmt = QAFormatter(tok)
    qs = ["Who?", "What is the full name of the author born in Baku, Azerbaijan?", "Where?"]
    answers = ["Nobody at all, really.", "Anara Yusifova.", "In Baku."]
    prompts = [fmt.encode_prompt(q) for q in qs]
    teach = [fmt.encode(q, a)[0][len(p):] for q, a, p in zip(qs, answers, prompts)]
    teach[2] = None  # none given for this one
    texts, forced = generate_texts(model, tok, prompts, max_new_tokens=5, batch_size=4, teach=teach)
    assert texts == generate_texts(model, tok, prompts, max_new_tokens=5, batch_size=4)
    assert forced[2] is None
    s = Scorer(model, batch_size=4, share_prefix=False).score([(p + t, [-100] * len(p) + t) for p, t in
                                                               zip(prompts[:2], teach[:2])])  # fmt: skip
    for i in range(2):
        logp, correct = forced[i]
        np.testing.assert_allclose(logp, s.token_logprobs[i], rtol=1e-5, atol=1e-5)
        assert (correct == s.correct[i]).all() and len(correct) == len(teach[i])
    long = max(len(p) for p in prompts[:2])
    _, cut = generate_texts(model, tok, prompts[:2], max_new_tokens=4, batch_size=4, teach=teach[:2],
                            max_length=long + 3)  # fmt: skip
    assert cut[1] is None  # its prompt was cut to fit the context
    np.testing.assert_allclose(cut[0][0], forced[0][0], rtol=1e-5, atol=1e-5)  # it fits: as before
