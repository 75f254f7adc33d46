"""TOFU and MUSE metrics as pure numpy/scipy functions, defined as in open-unlearning.

Every function here takes per-sample statistics that a runner computed from a model
(mean answer NLLs, token log-probs, generations) and returns numbers; none of them
touches a model. Definitions follow open-unlearning (``src/evals/metrics``) so the
numbers can be compared with its TOFU/MUSE evaluations:

* answer probability ``p = exp(-mean answer-token NLL)`` (``probability``);
* ``*_Q_A_Prob_normalised = p_true / (p_true + sum_i p_perturbed_i + 1e-10)``
  (``probability_w_options``);
* truth ratio ``TR = p_wrong / (p_correct + 1e-10)`` with
  ``p_wrong = exp(-mean_i NLL(perturbed_i))``; aggregated on the forget set as
  ``mean(min(TR, 1 / (TR + 1e-10)))`` (``closer_to_1_better``) and elsewhere as
  ``mean(max(0, 1 - TR))`` (``true_better``);
* ROUGE from ``rouge_score.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)``,
  ``scorer.score(target=ground_truth, prediction=generation)``: TOFU reports the
  ROUGE-L recall, MUSE the ROUGE-L F1; the ground truth is the row's decoded label tokens
  (:func:`rouge_ground_truth`), not the dataset's answer string;
* ``forget_quality``: the two-sample Kolmogorov-Smirnov p-value
  (``scipy.stats.ks_2samp``) between the per-sample forget truth ratios of the model
  and of the retain-only model;
* ``model_utility``: ``scipy.stats.hmean`` of the nine retain / real-author /
  world-fact Prob, ROUGE and truth-ratio aggregates;
* Min-K% membership score ``-mean(lowest max(1, int(k * n)) token log-probs)``,
  ``mia_min_k`` = ROC AUC with forget labelled 0 and holdout 1 (1 when the forget set is
  much more likely than the holdout), and ``privleak = ((1 - auc) - (1 - auc_ref)) /
  ((1 - auc_ref) + 1e-10) * 100`` (MUSE's convention, as in open-unlearning's
  ``privleak``; ``auc_ref`` is the retain model's AUC, 0.5 when none is given);
* ``exact_memorization`` and ``extraction_strength`` from per-token greedy-match flags.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.stats

EPS = 1e-10

# The nine aggregates whose harmonic mean is TOFU's model utility (open-unlearning's
# model_utility pre_compute list).
MODEL_UTILITY_KEYS = (
    "retain_Q_A_Prob",
    "retain_Q_A_ROUGE",
    "retain_Truth_Ratio",
    "ra_Q_A_Prob_normalised",
    "ra_Q_A_ROUGE",
    "ra_Truth_Ratio",
    "wf_Q_A_Prob_normalised",
    "wf_Q_A_ROUGE",
    "wf_Truth_Ratio",
)


def _as_1d(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of per-sample values, got shape {a.shape}.")
    return a


def _as_2d(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D array [samples, options] of per-answer values, got shape {a.shape}."
        )
    return a


# ----------------------------------------------------------------------------- probabilities


def answer_prob(mean_nll) -> np.ndarray:
    """Per-sample answer probability ``exp(-mean answer-token NLL)`` (any shape)."""
    return np.exp(-np.asarray(mean_nll, dtype=np.float64))


def q_a_prob(mean_nll) -> float:
    """``*_Q_A_Prob``: mean over samples of ``exp(-mean NLL)``.

    ``mean_nll`` is ``[n]`` or ``[n, options]`` (several answers per question, e.g. the
    perturbed ones); per-sample probabilities are first averaged over the options, as
    open-unlearning's ``aggregate_to_1D`` does.
    """
    p = answer_prob(mean_nll)
    if p.ndim == 0 or p.size == 0:
        raise ValueError("q_a_prob needs at least one per-sample NLL.")
    return float(np.mean(p.reshape(p.shape[0], -1).mean(axis=1)))


def prob_normalised(correct_nll, wrong_nll) -> np.ndarray:
    """Per-sample ``p_true / (p_true + sum_i p_wrong_i + 1e-10)``.

    Args:
      correct_nll: ``[n]`` mean NLL of the true answer.
      wrong_nll: ``[n, m]`` mean NLL of each of the m perturbed answers.
    """
    c = answer_prob(_as_1d(correct_nll, "correct_nll"))
    w = answer_prob(_as_2d(wrong_nll, "wrong_nll"))
    if w.shape[0] != c.shape[0]:
        raise ValueError(
            f"correct_nll has {c.shape[0]} samples but wrong_nll has {w.shape[0]}; they must match."
        )
    return c / (c + w.sum(axis=1) + EPS)


def q_a_prob_normalised(correct_nll, wrong_nll) -> float:
    """``ra_Q_A_Prob_normalised`` / ``wf_Q_A_Prob_normalised``: mean of :func:`prob_normalised`."""
    return float(np.mean(prob_normalised(correct_nll, wrong_nll)))


# ----------------------------------------------------------------------------- truth ratio


def truth_ratios(correct_nll, wrong_nll) -> np.ndarray:
    """Per-sample truth ratio ``TR = p_wrong / (p_correct + 1e-10)``.

    ``p_correct = exp(-correct_nll)`` and ``p_wrong = exp(-mean_i wrong_nll[:, i])``: the
    mean NLL of each perturbed answer is averaged over the answers before exponentiating.

    Args:
      correct_nll: ``[n]`` mean NLL of the correct (paraphrased, for forget/retain) answer.
      wrong_nll: ``[n]`` or ``[n, m]`` mean NLL of the perturbed answers.
    """
    c = _as_1d(correct_nll, "correct_nll")
    w = np.asarray(wrong_nll, dtype=np.float64)
    if w.shape[0] != c.shape[0]:
        raise ValueError(
            f"correct_nll has {c.shape[0]} samples but wrong_nll has {w.shape[0]}; they must match."
        )
    w = w.reshape(w.shape[0], -1).mean(axis=1)
    return np.exp(-w) / (np.exp(-c) + EPS)


def truth_ratio_closer_to_1(tr) -> float:
    """Forget-set aggregate ``mean(min(TR, 1 / (TR + 1e-10)))`` (1 = cannot tell true from false)."""
    tr = _as_1d(tr, "truth ratios")
    return float(np.mean(np.minimum(tr, 1.0 / (tr + EPS))))


def truth_ratio_true_better(tr) -> float:
    """Retain/real-author/world-fact aggregate ``mean(max(0, 1 - TR))`` (1 = true answer preferred)."""
    tr = _as_1d(tr, "truth ratios")
    return float(np.mean(np.maximum(0.0, 1.0 - tr)))


def truth_ratios_prob(correct_nll, wrong_nll) -> np.ndarray:
    """Per-sample ``p_correct / (p_correct + p_wrong + 1e-10)``: open-unlearning's newer truth
    ratio for the ``prob_mean`` aggregator (its "extent of knowledge"; 1 = true answer preferred)."""
    c = _as_1d(correct_nll, "correct_nll")
    w = np.asarray(wrong_nll, dtype=np.float64)
    if w.shape[0] != c.shape[0]:
        raise ValueError(
            f"correct_nll has {c.shape[0]} samples but wrong_nll has {w.shape[0]}; they must match."
        )
    pc, pw = np.exp(-c), np.exp(-w.reshape(w.shape[0], -1).mean(axis=1))
    return pc / (pc + pw + EPS)


def truth_ratio_prob_mean(values) -> float:
    """``prob_mean`` aggregate: the mean of :func:`truth_ratios_prob`."""
    return float(np.mean(_as_1d(values, "truth ratios")))


TRUTH_RATIO_AGGREGATORS = ("closer_to_1_better", "true_better", "prob_mean")


def truth_ratio(correct_nll, wrong_nll, aggregator: str) -> tuple[float, np.ndarray]:
    """open-unlearning's ``truth_ratio`` metric (``src/evals/metrics/memorization.py``) with one of
    its aggregators: ``(aggregate, per-sample ratios)``. ``closer_to_1_better`` and
    ``true_better`` use TOFU's ``p_wrong / p_correct``, ``prob_mean`` uses
    ``p_correct / (p_correct + p_wrong)`` (docs/METRICS.md)."""
    if aggregator == "prob_mean":
        per = truth_ratios_prob(correct_nll, wrong_nll)
        return truth_ratio_prob_mean(per), per
    per = truth_ratios(correct_nll, wrong_nll)
    if aggregator == "closer_to_1_better":
        return truth_ratio_closer_to_1(per), per
    if aggregator == "true_better":
        return truth_ratio_true_better(per), per
    raise ValueError(f"truth ratio aggregator must be one of {TRUTH_RATIO_AGGREGATORS}, got {aggregator!r}.")


# ----------------------------------------------------------------------------- ROUGE

_SCORER = None


def _scorer():
    global _SCORER
    if _SCORER is None:
        import logging

        from rouge_score import rouge_scorer

        logging.getLogger("absl").setLevel(logging.WARNING)
        _SCORER = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    return _SCORER


def rouge_scores(generations: Sequence[str], ground_truths: Sequence[str]) -> list[dict]:
    """Per-sample ``{"rouge1_recall", "rougeL_f1", "rougeL_recall"}`` of each generation.

    Uses ``RougeScorer(["rouge1", "rougeL"], use_stemmer=True).score(ground_truth, generation)``
    exactly as open-unlearning's ``eval_text_similarity``.
    """
    if len(generations) != len(ground_truths):
        raise ValueError(
            f"{len(generations)} generations but {len(ground_truths)} ground truths; they must pair up."
        )
    scorer = _scorer()
    out = []
    for gen, gt in zip(generations, ground_truths):
        s = scorer.score(gt, gen)
        out.append(
            {
                "rouge1_recall": float(s["rouge1"].recall),
                "rougeL_f1": float(s["rougeL"].fmeasure),
                "rougeL_recall": float(s["rougeL"].recall),
            }
        )
    return out


def clean_up_tokenization(text: str) -> str:
    """transformers' own ``clean_up_tokenization`` (the spaces before punctuation and contractions
    that ``clean_up_tokenization_spaces=True`` removes; ``" do n't ."`` -> ``" don't."``), called
    without a tokenizer instance (it reads none of its state)."""
    from transformers import PreTrainedTokenizerBase

    return PreTrainedTokenizerBase.clean_up_tokenization(PreTrainedTokenizerBase, text)


def decode_text(tokenizer, ids: Sequence[int]) -> str:
    """open-unlearning's decode of generations and ROUGE references:
    ``tokenizer.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)``.

    open-unlearning pins transformers 4.45.1, which cleans up for every tokenizer; transformers 5
    ignores the flag for BPE tokenizers, so the clean-up is applied here explicitly
    (:func:`clean_up_tokenization`) and the text is the same under either version.
    """
    text = tokenizer.decode([int(t) for t in ids], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return clean_up_tokenization(text)


def rouge_ground_truth(tokenizer, labels: Sequence[int], input_ids: Sequence[int]) -> str:
    """The ROUGE reference of one row, as open-unlearning's ``eval_text_similarity``
    (``src/evals/metrics/utils.py``) computes it from the generation batch: the label tokens
    (``labels != -100``) decoded, with every occurrence of the decoded prompt ``input_ids``
    removed, stripped. Both decodes are :func:`decode_text`.

    Its generation datasets (``predict_with_generate``) give as ``labels`` the whole conversation
    (``QADataset``: prompt + answer + EOS, as tokenized for the row, so cut by ``max_length`` with the
    answer) or the prefix-masked text (``CompletionDataset``, MUSE VerbMem); ``input_ids`` is the prompt.
    The result is the decoded answer tokens, not the dataset's answer string: shorter where the row
    was cut, normalized as the tokenizer normalizes, cleaned up as :func:`clean_up_tokenization`.
    """
    tokens = [int(t) for t in labels if int(t) != -100]
    return decode_text(tokenizer, tokens).replace(decode_text(tokenizer, input_ids), "").strip()


def cut_at_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
    """Cut ``text`` at the first occurrence of each stop string (in order), then strip.

    Mirrors open-unlearning: ``for w in stopwords: if w in text: text = text.split(w)[0]``.
    """
    for word in stop_strings:
        if word and word in text:
            text = text.split(word)[0]
    return text.strip()


# ----------------------------------------------------------------------------- KS / hmean


def forget_quality(model_forget_tr, retain_forget_tr) -> float:
    """``forget_quality``: ``scipy.stats.ks_2samp(model_tr, retain_tr).pvalue``.

    Both arguments are the per-sample forget-set truth ratios (``forget_truth_ratio``
    per-sample scores) of the evaluated model and of the retain-only model.
    """
    a = _as_1d(model_forget_tr, "model_forget_tr")
    b = _as_1d(retain_forget_tr, "retain_forget_tr")
    if a.size == 0 or b.size == 0:
        raise ValueError("forget_quality needs non-empty truth-ratio samples from both models.")
    return float(scipy.stats.ks_2samp(a, b).pvalue)


def model_utility(aggregates: dict) -> float:
    """``model_utility``: harmonic mean (``scipy.stats.hmean``) of :data:`MODEL_UTILITY_KEYS`.

    A zero among them gives 0, as in scipy.
    """
    missing = [k for k in MODEL_UTILITY_KEYS if aggregates.get(k) is None]
    if missing:
        raise KeyError(f"model_utility needs the aggregates {missing}; evaluate those splits first.")
    values = [float(aggregates[k]) for k in MODEL_UTILITY_KEYS]
    if min(values) < 0:
        raise ValueError(f"model_utility needs non-negative values, got {dict(zip(MODEL_UTILITY_KEYS, values))}.")
    if min(values) == 0:
        return 0.0
    return float(scipy.stats.hmean(values))


# ----------------------------------------------------------------------------- membership inference


def min_k_score(token_logprobs, k: float = 0.4) -> float:
    """Min-K% Prob score of one sample: ``-mean`` of its ``max(1, int(k * n))`` lowest token log-probs.

    ``token_logprobs`` are the scored tokens' log-probs (open-unlearning drops the last
    scored token, the EOS prediction, before this; the runners do the same). An empty
    sample scores 0. Higher = less likely = looks less like training data.
    """
    lp = np.asarray(token_logprobs, dtype=np.float64).reshape(-1)
    if not 0 < k <= 1:
        raise ValueError(f"min_k_score needs 0 < k <= 1, got k={k}.")
    if lp.size == 0:
        return 0.0
    n = max(1, int(len(lp) * k))
    return float(-np.mean(np.sort(lp)[:n]))


def mia_auc(forget_scores, holdout_scores) -> float:
    """ROC AUC of an attack score with forget samples labelled 0 and holdout samples 1.

    Same as ``sklearn.metrics.roc_auc_score([0]*n_f + [1]*n_h, forget + holdout)``:
    ``P(score_holdout > score_forget) + 0.5 * P(tie)``. With loss-like scores (Min-K%) it is
    1 when the forget data is much more likely than the holdout data, 0.5 when they look alike.
    """
    f = _as_1d(forget_scores, "forget_scores")
    h = _as_1d(holdout_scores, "holdout_scores")
    if f.size == 0 or h.size == 0:
        raise ValueError("mia_auc needs at least one forget and one holdout score.")
    ranks = scipy.stats.rankdata(np.concatenate([f, h]))  # average ranks for ties
    u = ranks[f.size :].sum() - h.size * (h.size + 1) / 2.0
    return float(u / (f.size * h.size))


def privleak(auc: float, reference_auc: float | None = 0.5) -> float:
    """``privleak``: ``((1 - auc) - (1 - ref)) / ((1 - ref) + 1e-10) * 100``.

    ``auc`` is the model's ``mia_min_k`` AUC (forget vs holdout), ``reference_auc`` the
    retain model's (open-unlearning falls back to 0.5 without one). 0 = no leak relative
    to the retain model; large negative = the forget set is recognisably member-like.
    """
    ref = 0.5 if reference_auc is None else float(reference_auc)
    score = 1.0 - float(auc)
    ref = 1.0 - ref
    return float((score - ref) / (ref + EPS) * 100.0)


# ----------------------------------------------------------------------------- memorization


def exact_memorization(correct) -> float:
    """Per-sample exact memorization: fraction of answer tokens that are the greedy (argmax) prediction.

    ``correct`` is the boolean greedy-match flag of each scored token (without the final
    EOS token, as open-unlearning). Returns NaN for an empty sample (open-unlearning: None).
    """
    c = np.asarray(correct, dtype=bool).reshape(-1)
    return float(c.mean()) if c.size else float("nan")


def extraction_strength(correct) -> float:
    """Per-sample extraction strength ``1 - k / n``, k the first position whose suffix is all greedy matches.

    Reproduces open-unlearning exactly, including its loop quirk: when no suffix matches
    (the last token is wrong) k stays at ``n - 1`` and the score is ``1 / n``; an empty
    sample scores 0.
    """
    c = np.asarray(correct, dtype=bool).reshape(-1)
    n = c.size
    if n == 0:
        return 0.0
    # suffix_ok[k] = all(c[k:])
    suffix_ok = np.flip(np.cumprod(np.flip(c))).astype(bool)
    hits = np.flatnonzero(suffix_ok)
    k = int(hits[0]) if hits.size else n - 1
    return 1.0 - k / n
