"""Every evaluation metric against values worked out by hand on tiny inputs."""

import math

import numpy as np
import pytest

from ngdiff_jax.evaluation import metrics as M


def test_answer_prob_and_q_a_prob():
    nll = np.array([math.log(2), math.log(4)])  # p = 0.5, 0.25
    assert M.q_a_prob(nll) == pytest.approx(0.375)
    # several answers per question: probabilities averaged per question first
    nll2 = np.log([[2, 4], [1, 1]])  # per-question means 0.375, 1.0
    assert M.q_a_prob(nll2) == pytest.approx((0.375 + 1.0) / 2)


def test_prob_normalised():
    correct = np.log([2.0])  # 0.5
    wrong = np.log([[4.0, 4.0, 8.0]])  # 0.25 + 0.25 + 0.125 = 0.625
    assert M.q_a_prob_normalised(correct, wrong) == pytest.approx(0.5 / 1.125)
    with pytest.raises(ValueError, match="wrong_nll"):
        M.prob_normalised(correct, np.log([4.0]))


def test_truth_ratio_and_aggregates():
    correct = np.log([2.0, 4.0])  # p_correct 0.5, 0.25
    # wrong NLLs are averaged before exp: mean(ln4, ln4) = ln4 -> 0.25; mean(ln1, ln4) = ln2 -> 0.5
    wrong = np.log([[4.0, 4.0], [1.0, 4.0]])
    tr = M.truth_ratios(correct, wrong)
    np.testing.assert_allclose(tr, [0.5, 2.0], rtol=1e-8)
    # forget: mean(min(TR, 1/TR)) = mean(0.5, 0.5)
    assert M.truth_ratio_closer_to_1(tr) == pytest.approx(0.5)
    # others: mean(max(0, 1-TR)) = mean(0.5, 0)
    assert M.truth_ratio_true_better(tr) == pytest.approx(0.25)


def test_rouge_recall_f1_and_stemmer():
    s = M.rouge_scores(["the cat"], ["the cat sat"])[0]
    assert s["rougeL_recall"] == pytest.approx(2 / 3)
    assert s["rougeL_f1"] == pytest.approx(0.8)  # P = 1, R = 2/3
    assert s["rouge1_recall"] == pytest.approx(2 / 3)
    # use_stemmer=True: "cats" matches "cat"
    assert M.rouge_scores(["cats sitting"], ["cat sit"])[0]["rougeL_recall"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="pair up"):
        M.rouge_scores(["a"], [])


def test_cut_at_stop_strings():
    assert M.cut_at_stop_strings(" Paris\n\nQuestion: x", ["\n\n", "\nQuestion", "Question:"]) == "Paris"
    assert M.cut_at_stop_strings("abc", ["\n\n"]) == "abc"


def test_forget_quality_exact_ks_pvalue():
    # D = 1 between disjoint samples of 3: exact two-sided p = 2 / C(6, 3) = 0.1
    assert M.forget_quality([1, 2, 3], [4, 5, 6]) == pytest.approx(0.1)
    assert M.forget_quality([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)
    # D = 2/3 for [1,2,3] vs [2.5,4,5]. Under H0 the 20 interleavings are +-1 walks; those
    # with D < 2/3 never leave [-1, 1], i.e. alternate within each pair: 2^3 = 8. p = 12/20.
    assert M.forget_quality([1, 2, 3], [2.5, 4, 5]) == pytest.approx(0.6)


def test_model_utility_harmonic_mean():
    agg = {k: 0.5 for k in M.MODEL_UTILITY_KEYS}
    agg["wf_Truth_Ratio"] = 0.25
    # 9 / (8 * 2 + 4) = 0.45
    assert M.model_utility(agg) == pytest.approx(0.45)
    agg["ra_Q_A_ROUGE"] = 0.0
    assert M.model_utility(agg) == 0.0
    with pytest.raises(KeyError, match="retain_Q_A_Prob"):
        M.model_utility({})


def test_min_k_score():
    lp = [-1.0, -2.0, -3.0, -4.0, -5.0]
    assert M.min_k_score(lp, k=0.4) == pytest.approx(4.5)  # int(0.4*5)=2 lowest: -5, -4
    assert M.min_k_score(lp, k=0.1) == pytest.approx(5.0)  # max(1, 0) = 1
    assert M.min_k_score([], k=0.4) == 0.0


def test_mia_auc_and_privleak():
    # pairs (forget, holdout): (1,3) (1,2) (2,3) win, (2,2) tie -> 3.5 / 4
    auc = M.mia_auc([1.0, 2.0], [3.0, 2.0])
    assert auc == pytest.approx(0.875)
    assert M.mia_auc([5.0], [1.0]) == pytest.approx(0.0)
    # ((1 - .875) - (1 - .5)) / (1 - .5) * 100
    assert M.privleak(auc, 0.5) == pytest.approx(-75.0)
    assert M.privleak(0.6, None) == pytest.approx(-20.0)
    assert M.privleak(0.7, 0.7) == pytest.approx(0.0, abs=1e-6)


def test_exact_memorization_and_extraction_strength():
    assert M.exact_memorization([True, False, True, True]) == pytest.approx(0.75)
    assert M.extraction_strength([False, True, True]) == pytest.approx(2 / 3)
    assert M.extraction_strength([True, True, True]) == pytest.approx(1.0)
    # open-unlearning's loop quirk: no matching suffix leaves k = n - 1
    assert M.extraction_strength([True, True, False]) == pytest.approx(1 / 3)
    assert M.extraction_strength([]) == 0.0


def test_forget_quality_same_as_open_unlearning_inverse_form():
    # open-unlearning's utils.get_forget_quality runs ks_2samp on 1 / (TR + 1e-10); KS only
    # depends on the ordering, which a decreasing map reverses for both samples alike.
    a, b = np.array([0.2, 0.9, 1.5, 3.0]), np.array([0.5, 0.7, 2.5])
    import scipy.stats

    inv = scipy.stats.ks_2samp(1 / (a + 1e-10), 1 / (b + 1e-10)).pvalue
    assert M.forget_quality(a, b) == pytest.approx(inv)


# ----------------------------------------------------------------------------- MUSE inputs


class _CharTokenizer:
    """One token per character (its code point), BOS = 1 unless ``bos=False``; EOS = 2."""

    eos_token_id = 2
    pad_token_id = 0

    def __init__(self, bos=True):
        self.bos = bos

    def encode(self, text, add_special_tokens=True):
        return ([1] if (self.bos and add_special_tokens) else []) + [ord(c) for c in text]

    def __call__(self, text, add_special_tokens=True, max_length=None, truncation=False):
        ids = self.encode(text, add_special_tokens)
        return {"input_ids": ids[:max_length] if truncation and max_length is not None else ids}

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=None):
        return "".join(chr(t) for t in ids if not (skip_special_tokens and t in (1, 2)))


def test_knowmem_prompt_is_open_unlearnings_template():
    from ngdiff_jax.evaluation.muse import knowmem_prompt

    # open-unlearning MUSE template: user_start "Question: ", user_end "\n",
    # asst_start "Answer: ", asst_end "\n\n"; every ICL pair, then the question.
    icl = [{"question": "Q1?", "answer": "A1"}, {"question": "Q2?", "answer": "A2"}]
    assert knowmem_prompt("Q3?", icl) == (
        "Question: Q1?\nAnswer: A1\n\nQuestion: Q2?\nAnswer: A2\n\nQuestion: Q3?\nAnswer: "
    )


def test_privleak_example_truncates_like_completion_dataset():
    from ngdiff_jax.evaluation.muse import privleak_example

    # BOS prefix (len 1) + at most 4 text tokens; position 0 not scored
    ids, labels = privleak_example(_CharTokenizer(), "abcdef", max_tokens=4)
    assert ids == [1, 97, 98, 99, 100]
    assert labels == [-100, 97, 98, 99, 100]
    # no BOS: the empty prefix has 0 tokens, open-unlearning still never scores index 0
    ids, labels = privleak_example(_CharTokenizer(bos=False), "abcdef", max_tokens=4)
    assert ids == [97, 98, 99, 100]
    assert labels == [-100, 98, 99, 100]


def test_completion_example_verbmem_like_open_unlearning():
    from ngdiff_jax.evaluation.muse import completion_example, verbmem_example

    # prefix "ab" -> BOS a b (3 tokens, not scored); insert_space: "ab" + " " + "cd"
    ids, labels = verbmem_example(_CharTokenizer(), {"prompt": "ab", "gt": "cd"})
    assert ids == [1, 97, 98, 32, 99, 100]
    assert labels == [-100, -100, -100, 32, 99, 100]
    # at most max_tokens tokens after the prefix
    ids, labels = completion_example(_CharTokenizer(), "ab", "cd", 2, insert_space=True)
    assert ids == [1, 97, 98, 32, 99] and labels == [-100, -100, -100, 32, 99]


def test_knowmem_prompt_keeps_its_first_tokens_like_qa_dataset():
    from ngdiff_jax.evaluation.muse import knowmem_inputs, knowmem_prompt

    icl = [{"question": "Q1?", "answer": "A1"}]
    full = knowmem_prompt("Q2?", icl)  # 48 characters -> BOS + 48 tokens
    assert len(full) == 48
    ids, gt, cut = knowmem_inputs(_CharTokenizer(), "Q2?", "A2", icl, max_length=64)
    assert (ids, gt, cut) == ([1] + [ord(c) for c in full], "A2", False)
    ids, gt, cut = knowmem_inputs(_CharTokenizer(), "Q2?", "A2", icl, max_length=10)
    # QADataset: tokenizer(prompt, max_length=10, truncation=True) -> the FIRST 10 tokens
    assert cut and ids == [1] + [ord(c) for c in "Question:"]
    # eval_text_similarity's ground truth: decode(cut prompt+answer + EOS) minus decode(cut prompt)
    assert gt == ""
    # the prompt exactly at the limit: not cut, but prompt + answer is cut at the same 49 tokens, so
    # (as in open-unlearning) nothing of the answer is left; 50: its first token; 51: all of it
    ids, gt, cut = knowmem_inputs(_CharTokenizer(), "Q2?", "A2", icl, max_length=49)
    assert not cut and gt == "" and len(ids) == 49
    assert knowmem_inputs(_CharTokenizer(), "Q2?", "A2", icl, max_length=50)[1:] == ("A", False)
    assert knowmem_inputs(_CharTokenizer(), "Q2?", "A2", icl, max_length=51)[1:] == ("A2", False)
    # one token over: cut, and nothing of the answer survives
    ids, gt, cut = knowmem_inputs(_CharTokenizer(), "Q2?", "A2", icl, max_length=48)
    assert cut and len(ids) == 48 and gt == ""


def test_knowmem_first_tokens_with_a_real_tokenizer(tofu_dir):
    from ngdiff_jax.data import load_tofu, train_tokenizer
    from ngdiff_jax.evaluation.muse import knowmem_inputs, knowmem_prompt

    rows = load_tofu("forget01_perturbed", tofu_dir)
    tok = train_tokenizer([r["question"] + " " + r["answer"] for r in rows], vocab_size=300)
    icl = [{"question": r["question"], "answer": r["answer"]} for r in rows[:6]]
    full = tok.encode(knowmem_prompt("Who?", icl), add_special_tokens=True)
    assert len(full) > 100
    ids, _, cut = knowmem_inputs(tok, "Who?", "Nobody.", icl, max_length=100)
    assert cut and ids == full[:100]  # the start is kept, the question at the end is lost


def test_evaluate_muse_reads_through_load_muse_and_truncates(tmp_path, monkeypatch):
    import json

    from ngdiff_jax.evaluation import muse as muse_mod
    from ngdiff_jax.evaluation.scoring import Scores

    for rel, rows in {
        "verbmem/forget.json": [{"prompt": "p", "gt": "the cat sat"}],
        "knowmem/forget_qa.json": [{"question": "fq", "answer": "red"}],
        "knowmem/forget_qa_icl.json": [{"question": "iq", "answer": "ia"}],
        "knowmem/retain2_qa.json": [{"question": "rq", "answer": "blue"}],  # local name of retain_qa
        "knowmem/retain2_qa_icl.json": [{"question": "iq", "answer": "ia"}],
        "privleak/forget.json": ["x" * 3000, "ab"],
        "privleak/holdout.json": ["cd", "efg"],
    }.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(json.dumps(rows))

    answers = {"fq": "red", "rq": "blue"}

    def fake_generate(model, tokenizer, prompts, **kw):
        out = []
        for p in prompts:
            text = "".join(chr(t) for t in p[1:])
            q = text.rsplit("Question: ", 1)[-1].split("\n")[0]
            out.append(answers.get(q, "the cat"))
        return (out, [None] * len(out)) if kw.get("teach") is not None else out  # VerbMem: scored whole

    seen = []

    class FakeScorer:
        truncated = 0

        def __init__(self, *a, **kw):
            pass

        def score(self, examples, phase="score"):
            seen.extend(examples)
            # forget texts (first two) very likely, holdout unlikely
            lps = [
                np.full(sum(1 for y in lab if y != -100), -0.1 if n < 2 else -1.0)
                for n, (_, lab) in enumerate(examples)
            ]
            correct = [lp > 0 for lp in lps]
            # the VerbMem row (last): " the cat sat" = 12 scored tokens
            correct[-1] = np.array([0, 1, 0] + [1] * 9, bool)
            return Scores(nll=np.zeros(len(examples)), token_logprobs=lps, correct=correct)

    monkeypatch.setattr(muse_mod, "generate_texts", fake_generate)
    monkeypatch.setattr(muse_mod, "Scorer", FakeScorer)
    r = muse_mod.evaluate_muse(None, _CharTokenizer(), tmp_path)
    a = r.aggregates
    # ROUGE-L F1 of "the cat" vs "the cat sat": P = 1, R = 2/3 -> 0.8
    assert a["forget_verbmem_ROUGE"] == pytest.approx(0.8)
    assert a["forget_knowmem_ROUGE"] == pytest.approx(1.0)
    assert a["retain_knowmem_ROUGE"] == pytest.approx(1.0)
    # the 3000-char text keeps BOS + 2048 tokens
    assert len(seen[0][0]) == 1 + muse_mod.PRIVLEAK_MAX_TOKENS == 2049
    # forget scores 0.1 < holdout 1.0 everywhere -> AUC 1; privleak ((0) - .5) / .5 * 100
    assert a["mia_min_k"] == pytest.approx(1.0)
    assert a["privleak"] == pytest.approx(-100.0)
    # extraction strength on "p" + " " + "the cat sat": prefix BOS p unscored, 12 scored tokens
    assert seen[-1][0] == [1] + [ord(c) for c in "p the cat sat"]
    assert seen[-1][1][:2] == [-100, -100] and len(seen[-1][1]) == 14
    # flags without the last: F T F T*8 -> first all-true suffix at k=3 of n=11
    assert a["extraction_strength"] == pytest.approx(1 - 3 / 11)
    assert a["exact_memorization"] == pytest.approx(9 / 11)
    assert r.meta["knowmem_prompts_cut"] == 0 and r.meta["truncated_prompts"] == {}


def test_truth_ratio_aggregators_by_hand():
    # p_correct = exp(-c), p_wrong = exp(-mean of the perturbed NLLs)
    c = np.array([0.5, 2.0])
    w = np.array([[1.0, 2.0], [0.5, 0.5]])
    pc, pw = np.exp(-c), np.exp(-w.mean(1))
    tr = pw / (pc + 1e-10)
    agg, per = M.truth_ratio(c, w, "closer_to_1_better")
    assert agg == pytest.approx(np.mean(np.minimum(tr, 1 / (tr + 1e-10))))
    np.testing.assert_allclose(per, tr)
    agg, _ = M.truth_ratio(c, w, "true_better")
    assert agg == pytest.approx(np.mean(np.maximum(0.0, 1 - tr)))
    agg, per = M.truth_ratio(c, w, "prob_mean")
    np.testing.assert_allclose(per, pc / (pc + pw + 1e-10))
    assert agg == pytest.approx(np.mean(pc / (pc + pw)))
    # first row: p_correct = e^-0.5 > p_wrong = e^-1.5 -> prob_mean row value 1/(1+e^-1)
    assert per[0] == pytest.approx(1 / (1 + np.exp(-1.0)))
    with pytest.raises(ValueError, match="prob_mean"):
        M.truth_ratio(c, w, "mean")
