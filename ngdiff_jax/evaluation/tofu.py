"""TOFU evaluation of a model with open-unlearning's metric names and definitions.

Splits used (files of ``../shared/data/tofu``): ``<forget>_perturbed`` (question, answer,
paraphrased_answer, perturbed_answer[5]), ``retain_perturbed``,
``real_authors_perturbed`` / ``world_facts_perturbed`` (question, answer,
perturbed_answer[3]) and ``holdout<NN>`` for the membership-inference metrics.

Aggregates (see :mod:`ngdiff_jax.evaluation.metrics` for the formulas):

* ``forget_Q_A_Prob``, ``forget_Q_A_PARA_Prob``, ``forget_Q_A_PERT_Prob``,
  ``forget_Q_A_ROUGE`` (ROUGE-L recall of the greedy answer against the row's decoded
  answer tokens, :func:`~ngdiff_jax.evaluation.metrics.rouge_ground_truth`), ``forget_truth_ratio``
  (paraphrased vs perturbed, ``mean(min(TR, 1/TR))``), ``forget_quality`` (KS p-value
  against the retain model's per-sample forget truth ratios; ``None`` without one);
* ``retain_Q_A_Prob``, ``retain_Q_A_PARA_Prob``, ``retain_Q_A_PERT_Prob``,
  ``retain_Q_A_ROUGE``, ``retain_Truth_Ratio`` (``mean(max(0, 1 - TR))``);
* ``ra_`` / ``wf_``: ``Q_A_Prob``, ``Q_A_PERT_Prob``, ``Q_A_Prob_normalised``,
  ``Q_A_ROUGE``, ``Truth_Ratio`` (answer vs perturbed);
* ``model_utility`` (harmonic mean of the nine utility numbers);
* ``mia_min_k`` (Min-40% AUC, forget vs holdout), ``privleak`` (relative to the retain
  model's ``mia_min_k``, or to 0.5 without one, as open-unlearning); ``mia_loss``,
  ``mia_zlib``, ``mia_min_k_plus_plus``, ``mia_gradnorm``, ``mia_reference`` and their
  ``privleak_<attack>`` (:mod:`ngdiff_jax.evaluation.mia`);
* ``extraction_strength``, ``exact_memorization`` on the forget answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ngdiff_jax.errors import require_counts
from ngdiff_jax.evaluation import metrics as M
from ngdiff_jax.evaluation.batching import Stopwatch, Timings
from ngdiff_jax.evaluation.generation import generate_texts
from ngdiff_jax.evaluation.members import Members
from ngdiff_jax.evaluation.results import EvalResult, reference_stats
from ngdiff_jax.evaluation.scoring import Scorer

TOFU_MAX_NEW_TOKENS = 200
MIN_K = 0.4
# open-unlearning's MIA suite; ``reference`` runs only with a reference model (the retain model)
MIA_ATTACKS = ("min_k", "loss", "zlib", "min_k_plus_plus", "gradnorm", "reference")
# the default: every attack that costs one forward pass (GradNorm needs a backward pass per sample)
DEFAULT_MIA_ATTACKS = ("min_k", "loss", "zlib", "min_k_plus_plus", "reference")

# prefix -> (split, correct-answer field for the truth ratio, truth-ratio aggregate key)
UTILITY_SPLITS = {
    "retain": ("retain_perturbed", "paraphrased_answer", "retain_Truth_Ratio"),
    "ra": ("real_authors_perturbed", "answer", "ra_Truth_Ratio"),
    "wf": ("world_facts_perturbed", "answer", "wf_Truth_Ratio"),
}


def holdout_split_for(forget_split: str) -> str:
    """``forget10`` -> ``holdout10`` (the never-trained-on authors of the same size)."""
    if not (forget_split.startswith("forget") and forget_split[6:].isdigit()):
        raise ValueError(f"forget_split must look like 'forget10', got {forget_split!r}.")
    return "holdout" + forget_split[6:]


def _perturbed(rows: list[dict], split: str) -> list[list[str]]:
    out = []
    for i, r in enumerate(rows):
        p = r.get("perturbed_answer")
        if not isinstance(p, list) or not p:
            raise KeyError(f"Row {i} of {split} has no perturbed_answer list; is this a *_perturbed split?")
        out.append(p)
    n = {len(p) for p in out}
    if len(n) != 1:
        raise ValueError(f"{split} rows have different numbers of perturbed answers {sorted(n)}.")
    return out


def evaluate_tofu_members(template, params, tokenizer, data_dir=None, *, names: Sequence[str], meta=None,
                          **kwargs) -> list[EvalResult]:  # fmt: skip
    """:func:`evaluate_tofu` of ``K`` models like ``template`` whose (full, per-block) parameters
    are ``params`` with a leading member axis, as one batched evaluation (equal to evaluating
    each member alone, up to the rounding of batched matrix products)."""
    return evaluate_tofu(Members(template, params), tokenizer, data_dir, name=list(names), meta=meta, **kwargs)


def _drop_last(a: np.ndarray) -> np.ndarray:
    """open-unlearning's token-level metrics leave out the last scored token (the EOS prediction)."""
    return a[:-1]


def evaluate_tofu(
    model,
    tokenizer,
    data_dir: str | Path | None = None,
    *,
    forget_split: str = "forget10",
    holdout_split: str | None = None,
    retain_reference=None,
    batch_size: int = 16,
    generation_batch_size: int | None = None,
    max_new_tokens: int = TOFU_MAX_NEW_TOKENS,
    formatter=None,
    limit: int | None = None,
    name: str = "model",
    k: float = MIN_K,
    buckets: Sequence[int] | None = None,
    meta: dict | None = None,
    reference_model=None,
    mia_attacks: Sequence[str] = DEFAULT_MIA_ATTACKS,
    forget_truth_ratio: str = "closer_to_1_better",
    utility_truth_ratio: str = "true_better",
) -> EvalResult | list[EvalResult]:
    """Evaluate ``model`` on TOFU and return every aggregate and per-sample value.

    Args:
      model: a ``CausalLM``; or :class:`~ngdiff_jax.evaluation.members.Members` (a population's
        members, scored and decoded by one program each): then ``name`` and ``meta`` are lists
        with one entry per member (``meta`` may be one dict for all) and the result is a list.
      tokenizer: its Hugging Face tokenizer.
      data_dir: folder of TOFU JSON-lines files (default ``shared_data_dir()/"tofu"``) or
        anything ``ngdiff_jax.data.load_tofu`` accepts.
      forget_split: ``forget01`` / ``forget05`` / ``forget10``.
      holdout_split: default the matching ``holdoutNN``.
      retain_reference: the retain-only model's evaluation (an :class:`EvalResult` or the
        path of a saved one / an open-unlearning ``TOFU_EVAL.json``) for ``forget_quality``
        and ``privleak``; ``None`` leaves forget_quality ``None`` and uses AUC 0.5 for privleak.
      batch_size: rows per compiled scoring batch.
      generation_batch_size: prompts decoded together (default ``max(batch_size, 64)``, fewer
        when their KV cache would pass ``generation.CACHE_BUDGET``).
      max_new_tokens: greedy tokens per answer (TOFU: 200).
      formatter: object with ``encode(q, a)`` / ``encode_prompt(q)``; default
        ``ngdiff_jax.data.QAFormatter(tokenizer)`` (same prompts as training).
      limit: evaluate only the first ``limit`` rows of every split (quick checks).
      name: the model's name in the result and report.
      k: Min-K% fraction (0.4), also for Min-K%++.
      reference_model: the model of the ``mia_reference`` attack (open-unlearning: the retain
        model); without one that attack is left out (``meta["mia_skipped"]``).
      forget_truth_ratio / utility_truth_ratio: the truth-ratio aggregator of ``forget_truth_ratio``
        and of ``retain_/ra_/wf_Truth_Ratio`` (``closer_to_1_better``, ``true_better``, ``prob_mean``;
        defaults as open-unlearning's TOFU configs; see docs/METRICS.md).
      mia_attacks: the membership-inference attacks on forget vs holdout (``mia_<attack>`` AUC and
        ``privleak_<attack>``; ``mia_min_k``/``privleak`` always), see :mod:`ngdiff_jax.evaluation.mia`;
        default all but ``gradnorm`` (one backward pass per sample: add it with ``MIA_ATTACKS``).
    """
    from ngdiff_jax.data import QAFormatter, load_tofu

    if data_dir is None:
        from ngdiff_jax.paths import shared_data_dir

        data_dir = shared_data_dir() / "tofu"
    fmt = formatter if formatter is not None else QAFormatter(tokenizer)
    holdout_split = holdout_split or holdout_split_for(forget_split)
    require_counts(batch_size=batch_size, generation_batch_size=generation_batch_size,
                   max_new_tokens=max_new_tokens, limit=limit)  # fmt: skip
    for what, v in (("forget_truth_ratio", forget_truth_ratio), ("utility_truth_ratio", utility_truth_ratio)):
        if v not in M.TRUTH_RATIO_AGGREGATORS:
            raise ValueError(f"{what}={v!r}: choose one of {', '.join(M.TRUTH_RATIO_AGGREGATORS)}.")
    timings = Timings()

    def load(split):
        rows = load_tofu(split, data_dir)
        return rows[:limit] if limit is not None else rows

    with Stopwatch() as sw_load:
        data = {"forget": load(f"{forget_split}_perturbed"), "holdout": load(holdout_split)}
        for prefix, (split, _, _) in UTILITY_SPLITS.items():
            data[prefix] = load(split)
    split_names = {"forget": f"{forget_split}_perturbed", "holdout": holdout_split}
    split_names.update({p: s for p, (s, _, _) in UTILITY_SPLITS.items()})

    # ---- every teacher-forced example of every split in one bucketed pass ----------------
    examples, keys = [], []

    def add(key, q, a):
        keys.append(key)
        examples.append(fmt.encode(q, a))

    correct_field = {"forget": "paraphrased_answer"}
    correct_field.update({p: f for p, (_, f, _) in UTILITY_SPLITS.items()})
    pert = {}
    prompts, gkeys, truths = [], [], {}
    sw_tok = Stopwatch().__enter__()
    for prefix in ("forget", "retain", "ra", "wf"):
        rows = data[prefix]
        pert[prefix] = _perturbed(rows, split_names[prefix])
        truths[prefix] = []
        for i, r in enumerate(rows):
            add((prefix, "answer", i, 0), r["question"], r["answer"])
            # the greedy answer's prompt, and its ROUGE reference: open-unlearning's decoded labels (the
            # whole conversation as encoded for this row) less the decoded prompt, not r["answer"]
            prompts.append(fmt.encode_prompt(r["question"]))
            gkeys.append((prefix, i))
            truths[prefix].append(M.rouge_ground_truth(tokenizer, examples[-1][0], prompts[-1]))
            if correct_field[prefix] != "answer":
                add((prefix, "para", i, 0), r["question"], r[correct_field[prefix]])
            for j, p in enumerate(pert[prefix][i]):
                add((prefix, "pert", i, j), r["question"], p)
    for i, r in enumerate(data["holdout"]):
        add(("holdout", "answer", i, 0), r["question"], r["answer"])
    sw_tok.__exit__(None, None, None)
    scorer = Scorer(model, batch_size=batch_size, buckets=buckets, timings=timings,
                    distribution_stats="min_k_plus_plus" in mia_attacks)  # read by the MIA attacks below
    many = isinstance(model, Members)
    all_scores = scorer.score(examples, phase="score")
    index = {key: n for n, key in enumerate(keys)}

    # ---- greedy answers for the ROUGE metrics (prompts and references made above) ------------
    prompt_cuts: dict = {}
    gen_batch = generation_batch_size or max(batch_size, 64)
    all_texts = generate_texts(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=gen_batch,
        buckets=buckets,
        timings=timings,
        phase="generate",
        cut_counts=prompt_cuts,
    )
    ref = None if retain_reference is None else reference_stats(retain_reference)
    all_mia = None
    if mia_attacks:  # the other attacks of open-unlearning's MIA suite (evaluation/mia.py)
        from ngdiff_jax.evaluation import mia

        others = [a for a in mia_attacks if a != "min_k"]
        rows = {s: [index[(s, "answer", i, 0)] for i in range(len(data[s]))] for s in ("forget", "holdout")}
        mia_ex = {s: [examples[n] for n in rows[s]] for s in rows}
        # the model's own statistics come from the scoring pass above (no second pass, no compile)
        stats = [{s: mia.statistics_from_scores(sc, rows[s]) for s in rows}
                 for sc in (all_scores if many else [all_scores])]
        all_mia = mia.run_attacks(
            model, tokenizer, mia_ex, attacks=others, reference_model=reference_model,
            reference_aucs=None if ref is None else ref.get("mia"), k=k, batch_size=batch_size, buckets=buckets,
            statistics={s: [st[s] for st in stats] if many else stats[0][s] for s in rows},
        )  # fmt: skip
    if not many:
        all_scores, all_texts, all_mia = [all_scores], [all_texts], [all_mia]
    names = list(name) if many else [name]
    metas = list(meta) if many and isinstance(meta, (list, tuple)) else [meta] * len(names)
    if len(names) != len(all_scores) or len(metas) != len(all_scores):
        raise ValueError(f"evaluate_tofu: {len(all_scores)} members but {len(names)} names and {len(metas)} metas.")
    t = timings.as_dict()
    t["load_s"] = round(sw_load.seconds, 4)
    t["tokenize_s"] = round(sw_tok.seconds, 4)
    if many:
        t["members"] = len(names)  # the timings are the whole population's
    results = []
    for scores, texts, mia_out, member_name, member_meta in zip(all_scores, all_texts, all_mia, names, metas):
        results.append(_tofu_result(
            scores, texts, mia_out, data=data, pert=pert, index=index, gkeys=gkeys, truths=truths,
            correct_field=correct_field,
            ref=ref, k=k, forget_truth_ratio=forget_truth_ratio, utility_truth_ratio=utility_truth_ratio,
            name=member_name, timings=t, info={
                **dict(member_meta or {}),
                "forget_split": forget_split,
                "holdout_split": holdout_split,
                "rows": {p: len(v) for p, v in data.items()},
                "retain_reference": None if ref is None else ref["source"],
                "privleak_reference_auc": 0.5 if ref is None or ref["mia_min_k"] is None else ref["mia_min_k"],
                "max_new_tokens": max_new_tokens,
                "batch_size": batch_size,
                "generation_batch_size": gen_batch,
                "min_k": k,
                "mia_attacks": list(mia_attacks),
                "truth_ratio_aggregators": {"forget": forget_truth_ratio, "utility": utility_truth_ratio},
                "mia_skipped": {} if mia_out is None else mia_out[2],
                "truncated_examples": scorer.truncated,
                "truncated_prompts": prompt_cuts,
            },
        ))  # fmt: skip
    return results if many else results[0]


def _tofu_result(scores, texts, mia_out, *, data, pert, index, gkeys, truths, correct_field, ref, k, forget_truth_ratio,
                 utility_truth_ratio, name, timings, info) -> EvalResult:  # fmt: skip
    """One model's :class:`EvalResult` from its scores, greedy answers and MIA statistics."""

    def nll(prefix, kind):
        n_rows = len(data[prefix])
        if kind == "pert":
            m = len(pert[prefix][0])
            return np.array([[scores.nll[index[(prefix, kind, i, jj)]] for jj in range(m)] for i in range(n_rows)])
        return np.array([scores.nll[index[(prefix, kind, i, 0)]] for i in range(n_rows)])

    gen = {p: [None] * len(data[p]) for p in ("forget", "retain", "ra", "wf")}
    for (prefix, i), t in zip(gkeys, texts):
        gen[prefix][i] = t

    # ---- metrics ---------------------------------------------------------------------------
    agg: dict = {}
    per: dict = {}
    generations: dict = {}
    for prefix in ("forget", "retain", "ra", "wf"):
        ans = nll(prefix, "answer")
        wrong = nll(prefix, "pert")
        per[f"{prefix}_Q_A_Prob"] = M.answer_prob(ans)
        agg[f"{prefix}_Q_A_Prob"] = M.q_a_prob(ans)
        per[f"{prefix}_Q_A_PERT_Prob"] = M.answer_prob(wrong)
        agg[f"{prefix}_Q_A_PERT_Prob"] = M.q_a_prob(wrong)
        if correct_field[prefix] == "answer":
            correct = ans
            per[f"{prefix}_Q_A_Prob_normalised"] = M.prob_normalised(ans, wrong)
            agg[f"{prefix}_Q_A_Prob_normalised"] = M.q_a_prob_normalised(ans, wrong)
        else:
            correct = nll(prefix, "para")
            per[f"{prefix}_Q_A_PARA_Prob"] = M.answer_prob(correct)
            agg[f"{prefix}_Q_A_PARA_Prob"] = M.q_a_prob(correct)
        # per-sample scores stay TOFU's p_wrong / p_correct (forget_quality's KS input); the aggregate
        # follows the chosen aggregator (prob_mean: p_correct / (p_correct + p_wrong), docs/METRICS.md)
        tr = M.truth_ratios(correct, wrong)
        key = "forget_truth_ratio" if prefix == "forget" else UTILITY_SPLITS[prefix][2]
        per[key] = tr
        aggregator = forget_truth_ratio if prefix == "forget" else utility_truth_ratio
        agg[key], tr_per = M.truth_ratio(correct, wrong, aggregator)
        if aggregator == "prob_mean":
            per[key + "_prob"] = tr_per
        rouge = M.rouge_scores(gen[prefix], truths[prefix])
        per[f"{prefix}_Q_A_ROUGE"] = [s["rougeL_recall"] for s in rouge]
        agg[f"{prefix}_Q_A_ROUGE"] = float(np.mean(per[f"{prefix}_Q_A_ROUGE"]))
        generations[f"{prefix}_Q_A_ROUGE"] = gen[prefix]
    agg["model_utility"] = M.model_utility(agg)

    # token-level: extraction strength / exact memorization on forget, Min-K% forget vs holdout
    def tok(prefix, i):
        n = index[(prefix, "answer", i, 0)]
        return scores.token_logprobs[n], scores.correct[n]

    es, em = [], []
    for i in range(len(data["forget"])):
        _, c = tok("forget", i)
        es.append(M.extraction_strength(_drop_last(c)))
        em.append(M.exact_memorization(_drop_last(c)))
    per["extraction_strength"], per["exact_memorization"] = es, em
    agg["extraction_strength"] = float(np.mean(es))
    agg["exact_memorization"] = float(np.nanmean(em)) if np.isfinite(em).any() else None
    mink = {
        s: [M.min_k_score(_drop_last(tok(s, i)[0]), k) for i in range(len(data[s]))]
        for s in ("forget", "holdout")
    }
    per["mia_min_k"] = mink
    agg["mia_min_k"] = M.mia_auc(mink["forget"], mink["holdout"])

    if ref is not None and ref["forget_truth_ratio"] is not None:
        agg["forget_quality"] = M.forget_quality(per["forget_truth_ratio"], ref["forget_truth_ratio"])
    else:
        agg["forget_quality"] = None
    ref_auc = None if ref is None else ref["mia_min_k"]
    agg["privleak"] = M.privleak(agg["mia_min_k"], ref_auc)
    if mia_out is not None:
        m_agg, m_per, _ = mia_out
        agg.update(m_agg)
        per.update({f"mia_{a}": v for a, v in m_per.items()})
    return EvalResult(
        name=name,
        benchmark="tofu",
        aggregates=agg,
        per_sample=per,
        generations=generations,
        timings=dict(timings),
        meta=info,
    )
