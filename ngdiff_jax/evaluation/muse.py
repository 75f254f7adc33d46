"""MUSE evaluation (VerbMem, KnowMem, PrivLeak, extraction strength) with open-unlearning's metric names.

Data are read with :func:`ngdiff_jax.data.load_muse` (a local folder such as
``../shared/data/muse_news``, or a hub id): ``verbmem/forget`` ({prompt, gt}),
``knowmem/{forget_qa,retain_qa}`` and their ``*_icl`` in-context examples
({question, answer}), ``privleak/{forget,holdout}`` (texts).

* ``forget_verbmem_ROUGE``: greedy 128 new tokens from the prompt, ROUGE-L F1 against ``gt`` as
  open-unlearning's ``eval_text_similarity`` sees it: the scored tokens of ``prompt + " " + gt``
  (at most 2048, as for ``extraction_strength`` below) decoded, the decoded prompt removed, stripped
  (:func:`~ngdiff_jax.evaluation.metrics.rouge_ground_truth`).
* ``forget_knowmem_ROUGE`` / ``retain_knowmem_ROUGE``: the in-context examples as
  ``"Question: {q}\\nAnswer: {a}\\n\\n"`` followed by ``"Question: {q}\\nAnswer: "``,
  tokenized with ``max_length=512, truncation=True`` as open-unlearning's ``QADataset``
  (so a longer prompt keeps its *first* 512 tokens); greedy 32 new tokens cut at
  ``"\\n\\n"``, ``"\\nQuestion"``, ``"Question:"``; ROUGE-L F1 against the decoded conversation
  (prompt + answer, tokenized with the same ``max_length=512`` cut, EOS appended) less the decoded prompt.
* ``extraction_strength`` (open-unlearning's MUSE suite, ``MUSE_forget_verbmem`` as a
  ``CompletionDataset``: ``prompt + " " + gt``, the prompt's tokens not scored, at most 2048
  scored tokens): per text ``1 - k / n`` over the greedy-match flags of its scored tokens
  without the last; ``exact_memorization`` (in their suite but commented out) from the same
  flags. The scored tokens are teacher-forced on the VerbMem prompt's KV cache inside the
  generation program (the ~900-token prompt is encoded once for both), except for a row whose
  prompt was cut or whose example does not start with the prompt's own tokens, which is scored
  whole (``meta["verbmem_teacher_forced"]`` counts the others).
* ``mia_min_k``: Min-40% AUC of the forget vs holdout texts (BOS + at most 2048 text
  tokens each, as open-unlearning's ``CompletionDataset``; forget labelled 0, so 1 =
  forget much more likely); ``privleak`` relative to the retain model's ``mia_min_k``
  (0.5 without one): ``((1-auc) - (1-auc_ref)) / ((1-auc_ref) + 1e-10) * 100``.

Cuts are counted in ``meta``: ``truncated_examples`` (scored texts longer than the
context, their start kept), ``truncated_prompts`` (generation prompts longer than the
context minus the new tokens, their end kept; per phase) and ``knowmem_prompts_cut``
(KnowMem prompts over 512 tokens; the ground truth of such a row is what is left of the cut
conversation after the cut prompt, usually empty, in open-unlearning and here).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ngdiff_jax.errors import require_counts
from ngdiff_jax.evaluation import metrics as M
from ngdiff_jax.evaluation.batching import Stopwatch, Timings
from ngdiff_jax.evaluation.generation import generate_texts
from ngdiff_jax.evaluation.results import EvalResult, reference_stats
from ngdiff_jax.evaluation.scoring import Scorer
from ngdiff_jax.models.logprobs import IGNORE_INDEX

VERBMEM_MAX_NEW_TOKENS = 128
KNOWMEM_MAX_NEW_TOKENS = 32
KNOWMEM_STOP = ("\n\n", "\nQuestion", "Question:")
MIN_K = 0.4
#: open-unlearning's ``CompletionDataset(max_length=2048)`` for the privleak texts: at most
#: 2048 tokens after the (empty-prefix, i.e. BOS) prefix are kept.
PRIVLEAK_MAX_TOKENS = 2048
#: ``MUSE_forget_verbmem`` (``CompletionDataset``, ``max_length: 2048``, ``insert_space: True``).
VERBMEM_MAX_TOKENS = 2048
#: ``MUSE_{forget,retain}_knowmem`` (``QADataset``, ``max_length: 512``).
KNOWMEM_MAX_LENGTH = 512


def knowmem_prompt(question: str, icl: Sequence[dict]) -> str:
    """MUSE's few-shot KnowMem prompt."""
    shots = "".join(f"Question: {e['question']}\nAnswer: {e['answer']}\n\n" for e in icl)
    return f"{shots}Question: {question}\nAnswer: "


def _encode_text(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=True))


def completion_example(
    tokenizer, prefix: str, text: str, max_tokens: int, *, insert_space: bool = False
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` as open-unlearning's ``preprocess_pretraining_instance``.

    ``prefix + (" " if insert_space) + text`` is tokenized with special tokens; the prefix's
    own tokens (``tokenizer(prefix)``) are not scored, and never position 0; at most
    ``max_tokens`` tokens follow them (``full_ids[: prefix_len + max_length]``).
    """
    prefix_len = len(_encode_text(tokenizer, prefix))
    ids = _encode_text(tokenizer, prefix + (" " if insert_space else "") + text)[: prefix_len + max_tokens]
    n_ignored = max(prefix_len, 1)
    return ids, [IGNORE_INDEX] * min(n_ignored, len(ids)) + ids[n_ignored:]


def privleak_example(tokenizer, text: str, max_tokens: int = PRIVLEAK_MAX_TOKENS) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one privleak text, as open-unlearning's ``CompletionDataset``.

    The prefix is empty, so its tokens are just what the tokenizer adds (BOS, or none);
    they are not scored (at least position 0 never is) and at most ``max_tokens`` tokens
    follow them (``preprocess_pretraining_instance``: ``full_ids[: prefix_len + max_length]``).
    """
    return completion_example(tokenizer, "", text, max_tokens)


def verbmem_example(tokenizer, row: dict, max_tokens: int = VERBMEM_MAX_TOKENS) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one VerbMem row for ``extraction_strength``: ``prompt + " " + gt``."""
    return completion_example(tokenizer, row["prompt"], row["gt"], max_tokens, insert_space=True)


def knowmem_inputs(
    tokenizer, question: str, answer: str, icl: Sequence[dict], max_length: int = KNOWMEM_MAX_LENGTH
) -> tuple[list[int], str, bool]:
    """``(prompt_ids, ground_truth, cut)`` of one KnowMem row, as open-unlearning's ``QADataset``.

    The prompt is tokenized with ``max_length=max_length, truncation=True`` (a longer prompt
    keeps its first ``max_length`` tokens with a right-truncating tokenizer; ``cut`` says it
    was). The ground truth is what open-unlearning's ``eval_text_similarity`` gets
    (:func:`~ngdiff_jax.evaluation.metrics.rouge_ground_truth`): the conversation tokenized with
    the same cut, EOS appended, decoded, with the decoded prompt removed, stripped; the answer's
    decoded tokens, or less of it (nothing, for a cut prompt) where the cut reaches it.
    """
    prompt = knowmem_prompt(question, icl)
    kw = dict(add_special_tokens=True, max_length=max_length, truncation=True)
    ids = list(tokenizer(prompt, **kw)["input_ids"])
    cut = len(_encode_text(tokenizer, prompt)) > max_length
    chat = list(tokenizer(prompt + answer, **kw)["input_ids"])
    if chat[-1] != tokenizer.eos_token_id:
        chat.append(tokenizer.eos_token_id)
    return ids, M.rouge_ground_truth(tokenizer, chat, ids), cut


def evaluate_muse(
    model,
    tokenizer,
    data_dir: str | Path | None = None,
    *,
    retain_reference=None,
    batch_size: int = 8,
    generation_batch_size: int | None = None,
    verbmem_max_new_tokens: int = VERBMEM_MAX_NEW_TOKENS,
    knowmem_max_new_tokens: int = KNOWMEM_MAX_NEW_TOKENS,
    knowmem_max_length: int = KNOWMEM_MAX_LENGTH,
    max_length: int | None = None,
    limit: int | None = None,
    name: str = "model",
    k: float = MIN_K,
    buckets: Sequence[int] | None = None,
    meta: dict | None = None,
    reference_model=None,
    mia_attacks: Sequence[str] = ("min_k",),
) -> EvalResult:
    """Evaluate ``model`` on MUSE-News; returns aggregates and per-sample values.

    ``mia_attacks`` adds the other membership-inference attacks (``loss``, ``zlib``,
    ``min_k_plus_plus``, ``gradnorm``, ``reference`` with ``reference_model``) on the privleak
    texts, as ``mia_<attack>`` / ``privleak_<attack>`` (off by default, as open-unlearning's
    MUSE config; see :mod:`ngdiff_jax.evaluation.mia`).

    Args:
      data_dir: the MUSE-News folder (default ``shared_data_dir()/"muse_news"``), or
        anything ``ngdiff_jax.data.load_muse`` accepts (e.g. ``"muse-bench/MUSE-News"``).
      retain_reference: the retain model's evaluation (result, or path to a saved one /
        open-unlearning ``MUSE_EVAL.json``) for ``privleak``.
      batch_size: rows per compiled scoring batch.
      generation_batch_size: prompts decoded together (default ``max(batch_size, 64)``, fewer
        when their KV cache would pass ``generation.CACHE_BUDGET``).
      knowmem_max_length: KnowMem prompts keep their first this many tokens (open-unlearning: 512).
      max_length: context used for scoring and prompts (default the model's
        ``max_position_embeddings``); longer texts are cut (scoring: keep the start;
        generation prompts: keep the end) and counted in ``meta``.
      limit: only the first ``limit`` rows of every file.
    """
    from ngdiff_jax.data import load_muse

    if data_dir is None:
        from ngdiff_jax.paths import shared_data_dir

        data_dir = shared_data_dir() / "muse_news"
    require_counts(batch_size=batch_size, generation_batch_size=generation_batch_size, limit=limit,
                   verbmem_max_new_tokens=verbmem_max_new_tokens, knowmem_max_new_tokens=knowmem_max_new_tokens,
                   knowmem_max_length=knowmem_max_length, max_length=max_length)  # fmt: skip
    cut = (lambda rows: rows[:limit]) if limit is not None else (lambda rows: rows)
    timings = Timings()
    with Stopwatch() as sw_load:
        verbmem = cut(load_muse(data_dir, "verbmem", "forget"))
        know = {
            split: (
                cut(load_muse(data_dir, "knowmem", f"{split}_qa")),
                load_muse(data_dir, "knowmem", f"{split}_qa_icl"),
            )
            for split in ("forget", "retain")
        }
        priv = {s: cut(load_muse(data_dir, "privleak", s)) for s in ("forget", "holdout")}

    agg: dict = {}
    per: dict = {}
    generations: dict = {}
    prompt_cuts: dict = {}
    gen_batch = generation_batch_size or max(batch_size, 64)

    # ---- VerbMem ----------------------------------------------------------------------------
    prompts = [_encode_text(tokenizer, r["prompt"]) for r in verbmem]
    # prompt + " " + gt as open-unlearning's CompletionDataset (also scored for extraction strength below);
    # the ROUGE reference is its decoded scored tokens less the decoded prompt (eval_text_similarity)
    verb_examples = [verbmem_example(tokenizer, r) for r in verbmem]
    verb_truths = [M.rouge_ground_truth(tokenizer, labels, p) for (_, labels), p in zip(verb_examples, prompts)]
    # extraction strength's continuation, teacher-forced on the prompt's KV cache in the generation
    # program, where the scored example starts with the generation prompt's very tokens
    teach = [ids[len(p):] if ids[: len(p)] == p and len(p) >= 1 and labels[len(p) - 1] == IGNORE_INDEX
             and all(y != IGNORE_INDEX for y in labels[len(p):]) else None
             for (ids, labels), p in zip(verb_examples, prompts)]  # fmt: skip
    texts, forced = generate_texts(
        model, tokenizer, prompts, max_new_tokens=verbmem_max_new_tokens, batch_size=gen_batch,
        buckets=buckets, max_length=max_length, timings=timings, phase="verbmem_generate", cut_counts=prompt_cuts,
        teach=teach,
    )  # fmt: skip
    rouge = M.rouge_scores(texts, verb_truths)
    per["forget_verbmem_ROUGE"] = [s["rougeL_f1"] for s in rouge]
    agg["forget_verbmem_ROUGE"] = float(np.mean(per["forget_verbmem_ROUGE"]))
    generations["forget_verbmem_ROUGE"] = texts

    # ---- KnowMem ----------------------------------------------------------------------------
    knowmem_cut = 0
    for split, (rows, icl) in know.items():
        inputs = [knowmem_inputs(tokenizer, r["question"], r["answer"], icl, knowmem_max_length) for r in rows]
        knowmem_cut += sum(c for _, _, c in inputs)
        texts = generate_texts(
            model, tokenizer, [p for p, _, _ in inputs], max_new_tokens=knowmem_max_new_tokens,
            batch_size=gen_batch, stop_strings=KNOWMEM_STOP, buckets=buckets, max_length=max_length,
            timings=timings, phase="knowmem_generate", cut_counts=prompt_cuts,
        )  # fmt: skip
        rouge = M.rouge_scores(texts, [gt for _, gt, _ in inputs])
        key = f"{split}_knowmem_ROUGE"
        per[key] = [s["rougeL_f1"] for s in rouge]
        agg[key] = float(np.mean(per[key]))
        generations[key] = texts

    # ---- PrivLeak (Min-K% on whole texts) and extraction strength (VerbMem), one scoring pass --
    examples, owner = [], []
    for split in ("forget", "holdout"):
        for text in priv[split]:  # load_muse returns the texts as strings
            examples.append(privleak_example(tokenizer, text))
            owner.append(split)
    for ex, f in zip(verb_examples, forced):
        if f is None:  # its prompt was cut, or tokenizes differently inside the example: scored whole
            examples.append(ex)
            owner.append("verbmem")
    scorer = Scorer(model, batch_size=batch_size, max_length=max_length, buckets=buckets, timings=timings,
                    distribution_stats="min_k_plus_plus" in mia_attacks)  # read by the opt-in MIA attacks
    scores = scorer.score(examples, phase="privleak_score")
    mink = {"forget": [], "holdout": []}
    scored = iter([c for s, c in zip(owner, scores.correct) if s == "verbmem"])
    flags = [f[1] if f is not None else next(scored) for f in forced]  # greedy-match flags per VerbMem row
    # open-unlearning's tokenwise_vocab_logprobs drops the last scored token
    es = [M.extraction_strength(c[:-1]) for c in flags]
    em = [M.exact_memorization(c[:-1]) for c in flags]
    for s, lp in zip(owner, scores.token_logprobs):
        if s != "verbmem":
            mink[s].append(M.min_k_score(lp[:-1], k))  # last scored token left out, as open-unlearning
    per["extraction_strength"], per["exact_memorization"] = es, em
    agg["extraction_strength"] = float(np.mean(es))
    agg["exact_memorization"] = float(np.nanmean(em)) if np.isfinite(em).any() else None
    per["mia_min_k"] = mink
    agg["mia_min_k"] = M.mia_auc(mink["forget"], mink["holdout"])
    ref = None if retain_reference is None else reference_stats(retain_reference)
    ref_auc = None if ref is None else ref["mia_min_k"]
    agg["privleak"] = M.privleak(agg["mia_min_k"], ref_auc)
    mia_skipped = {}
    others = [a for a in mia_attacks if a != "min_k"]
    if others:  # opt-in: the rest of open-unlearning's MIA suite on the privleak texts (evaluation/mia.py)
        from ngdiff_jax.evaluation import mia

        rows = {sp: [i for i, o in enumerate(owner) if o == sp] for sp in ("forget", "holdout")}
        m_agg, m_per, mia_skipped = mia.run_attacks(
            model, tokenizer, {sp: [examples[i] for i in rows[sp]] for sp in rows}, attacks=others,
            reference_model=reference_model, reference_aucs=None if ref is None else ref.get("mia"), k=k,
            batch_size=batch_size, buckets=buckets, max_length=max_length,
            statistics={sp: mia.statistics_from_scores(scores, rows[sp]) for sp in rows},  # the scoring pass's
        )  # fmt: skip
        agg.update(m_agg)
        per.update({f"mia_{a}": v for a, v in m_per.items()})

    info = dict(meta or {})
    info.update(
        {
            "rows": {
                "verbmem": len(verbmem),
                "forget_knowmem": len(know["forget"][0]),
                "retain_knowmem": len(know["retain"][0]),
                "privleak_forget": len(priv["forget"]),
                "privleak_holdout": len(priv["holdout"]),
            },
            "retain_reference": None if ref is None else ref["source"],
            "privleak_reference_auc": 0.5 if ref_auc is None else ref_auc,
            "batch_size": batch_size,
            "generation_batch_size": gen_batch,
            "min_k": k,
            "mia_attacks": list(mia_attacks),
            "mia_skipped": mia_skipped,
            "truncated_examples": scorer.truncated,
            "truncated_prompts": prompt_cuts,
            "knowmem_prompts_cut": knowmem_cut,
            # VerbMem rows whose extraction strength was read in the generation program (the rest: scored whole)
            "verbmem_teacher_forced": sum(f is not None for f in forced),
            "knowmem_max_length": knowmem_max_length,
        }
    )
    t = timings.as_dict()
    t["load_s"] = round(sw_load.seconds, 4)
    return EvalResult(
        name=name, benchmark="muse", aggregates=agg, per_sample=per,
        generations=generations, timings=t, meta=info,
    )  # fmt: skip
