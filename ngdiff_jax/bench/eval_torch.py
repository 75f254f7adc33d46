"""A plain transformers (PyTorch) TOFU / MUSE evaluation, one prompt at a time: the reference of
``python -m ngdiff_jax.bench.eval_speed``.

Written as a typical PyTorch evaluation loop: every (question, answer) pair, text or prompt
goes through ``model(...)`` / ``model.generate(...)`` on its own (no padding, no batching,
``torch.no_grad``), with the same token ids as ``ngdiff eval`` (the same formatter and MUSE
example builders, which only tokenize) and open-unlearning's per-sample statistics
(``evaluate_probability``: mean NLL over the scored tokens; ``tokenwise_logprobs`` /
``tokenwise_vocab_logprobs``: scored tokens without the last one, greedy-match flags).
Aggregates come from the same pure-numpy metric functions (``ngdiff_jax.evaluation.metrics``).
Generation is ``model.generate(do_sample=False)``; MUSE KnowMem stops at its stop strings
(``stop_strings=``, as open-unlearning's stopping criteria) and is cut there afterwards.

    python -m ngdiff_jax.bench.eval_torch --benchmark tofu --model DIR --limit 5 --out torch.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from ngdiff_jax.evaluation import metrics as M

IGNORE = -100


class TorchRunner:
    """The model on ``device`` (``cpu``, ``cuda``, ``cuda:1``, ...) in ``dtype`` (float32 or bfloat16;
    log-probs are taken in float32)."""

    def __init__(self, model_dir: str, threads: int, device: str = "cpu", dtype: str = "float32"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        self.torch = torch
        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(self.device)
        self.model.eval()
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        eos = {self.tok.eos_token_id}
        cfg_eos = self.model.config.eos_token_id
        eos |= set(cfg_eos if isinstance(cfg_eos, (list, tuple)) else [cfg_eos]) - {None}
        self.eos = sorted(eos)
        self.seconds = {"score_s": 0.0, "generate_s": 0.0}  # wall time inside stats() / generate()

    def stats(self, ids, labels):
        """(mean NLL, scored-token log-probs, greedy flags) of one example."""
        t0 = time.perf_counter()
        try:
            return self._stats(ids, labels)
        finally:
            self.seconds["score_s"] += time.perf_counter() - t0

    def generate(self, ids, max_new_tokens, stop_strings=()):
        """Greedy text after ``ids`` (one prompt), cut at EOS and at the stop strings."""
        t0 = time.perf_counter()
        try:
            return self._generate(ids, max_new_tokens, stop_strings)
        finally:
            self.seconds["generate_s"] += time.perf_counter() - t0

    def _stats(self, ids, labels):
        torch = self.torch
        with torch.no_grad():
            logits = self.model(torch.tensor([ids], device=self.device)).logits[0].float()
        lab = torch.tensor(labels, device=self.device)
        logp = torch.log_softmax(logits[:-1], dim=-1)
        tgt = lab[1:]
        m = tgt != IGNORE
        picked = logp[m].gather(-1, tgt[m][:, None])[:, 0]
        greedy = logits[:-1][m].argmax(-1) == tgt[m]
        return float(-picked.mean()), picked.double().cpu().numpy(), greedy.cpu().numpy()

    def _generate(self, ids, max_new_tokens, stop_strings=()):
        torch = self.torch
        kw = {"stop_strings": list(stop_strings), "tokenizer": self.tok} if stop_strings else {}
        with torch.no_grad():
            out = self.model.generate(
                torch.tensor([ids], device=self.device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=self.device),
                max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.tok.eos_token_id,
                eos_token_id=self.eos, **kw,
            )[0, len(ids):].tolist()  # fmt: skip
        for j, t in enumerate(out):
            if t in self.eos:
                out = out[:j]
                break
        return M.cut_at_stop_strings(M.decode_text(self.tok, out), stop_strings)


def eval_tofu(run: TorchRunner, data_dir, *, forget_split, limit, max_new_tokens, formatter) -> dict:
    from ngdiff_jax.data import load_tofu
    from ngdiff_jax.evaluation.tofu import UTILITY_SPLITS, holdout_split_for

    def load(split):
        rows = load_tofu(split, data_dir)
        return rows[:limit] if limit is not None else rows

    data = {"forget": load(f"{forget_split}_perturbed"), "holdout": load(holdout_split_for(forget_split))}
    for p, (split, _, _) in UTILITY_SPLITS.items():
        data[p] = load(split)
    correct_field = {"forget": "paraphrased_answer", **{p: f for p, (_, f, _) in UTILITY_SPLITS.items()}}
    agg, per, gens = {}, {}, {}
    tokstats = {}
    for prefix in ("forget", "retain", "ra", "wf"):
        ans, para, pert, texts, truths = [], [], [], [], []
        for i, r in enumerate(data[prefix]):
            ids, labels = formatter.encode(r["question"], r["answer"])
            nll, lp, c = run.stats(ids, labels)
            truths.append(M.rouge_ground_truth(run.tok, ids, formatter.encode_prompt(r["question"])))
            ans.append(nll)
            tokstats[(prefix, i)] = (lp, c)
            if correct_field[prefix] != "answer":
                para.append(run.stats(*formatter.encode(r["question"], r[correct_field[prefix]]))[0])
            pert.append([run.stats(*formatter.encode(r["question"], p))[0] for p in r["perturbed_answer"]])
            texts.append(run.generate(formatter.encode_prompt(r["question"]), max_new_tokens))
        ans, pert = np.array(ans), np.array(pert)
        per[f"{prefix}_Q_A_Prob"] = M.answer_prob(ans)
        agg[f"{prefix}_Q_A_Prob"] = M.q_a_prob(ans)
        per[f"{prefix}_Q_A_PERT_Prob"] = M.answer_prob(pert)
        agg[f"{prefix}_Q_A_PERT_Prob"] = M.q_a_prob(pert)
        if correct_field[prefix] == "answer":
            correct = ans
            per[f"{prefix}_Q_A_Prob_normalised"] = M.prob_normalised(ans, pert)
            agg[f"{prefix}_Q_A_Prob_normalised"] = M.q_a_prob_normalised(ans, pert)
        else:
            correct = np.array(para)
            per[f"{prefix}_Q_A_PARA_Prob"] = M.answer_prob(correct)
            agg[f"{prefix}_Q_A_PARA_Prob"] = M.q_a_prob(correct)
        tr = M.truth_ratios(correct, pert)
        if prefix == "forget":
            per["forget_truth_ratio"], agg["forget_truth_ratio"] = tr, M.truth_ratio_closer_to_1(tr)
        else:
            key = UTILITY_SPLITS[prefix][2]
            per[key], agg[key] = tr, M.truth_ratio_true_better(tr)
        rouge = M.rouge_scores(texts, truths)
        per[f"{prefix}_Q_A_ROUGE"] = [s["rougeL_recall"] for s in rouge]
        agg[f"{prefix}_Q_A_ROUGE"] = float(np.mean(per[f"{prefix}_Q_A_ROUGE"]))
        gens[f"{prefix}_Q_A_ROUGE"] = texts
    agg["model_utility"] = M.model_utility(agg)
    es = [M.extraction_strength(tokstats[("forget", i)][1][:-1]) for i in range(len(data["forget"]))]
    em = [M.exact_memorization(tokstats[("forget", i)][1][:-1]) for i in range(len(data["forget"]))]
    per["extraction_strength"], per["exact_memorization"] = es, em
    agg["extraction_strength"], agg["exact_memorization"] = float(np.mean(es)), float(np.nanmean(em))
    mink = {"forget": [M.min_k_score(tokstats[("forget", i)][0][:-1]) for i in range(len(data["forget"]))]}
    mink["holdout"] = [
        M.min_k_score(run.stats(*formatter.encode(r["question"], r["answer"]))[1][:-1]) for r in data["holdout"]
    ]
    per["mia_min_k"] = mink
    agg["mia_min_k"] = M.mia_auc(mink["forget"], mink["holdout"])
    agg["privleak"] = M.privleak(agg["mia_min_k"], None)
    agg["forget_quality"] = None
    return {"aggregates": agg, "per_sample": per, "generations": gens}


def eval_muse(run: TorchRunner, data_dir, *, limit) -> dict:
    from ngdiff_jax.data import load_muse
    from ngdiff_jax.evaluation import muse as mu

    cut = (lambda rows: rows[:limit]) if limit is not None else (lambda rows: rows)
    tok = run.tok
    agg, per, gens = {}, {}, {}
    verbmem = cut(load_muse(data_dir, "verbmem", "forget"))
    texts = [run.generate(mu._encode_text(tok, r["prompt"]), mu.VERBMEM_MAX_NEW_TOKENS) for r in verbmem]
    truths = [M.rouge_ground_truth(tok, mu.verbmem_example(tok, r)[1], mu._encode_text(tok, r["prompt"]))
              for r in verbmem]  # fmt: skip
    per["forget_verbmem_ROUGE"] = [s["rougeL_f1"] for s in M.rouge_scores(texts, truths)]
    agg["forget_verbmem_ROUGE"] = float(np.mean(per["forget_verbmem_ROUGE"]))
    gens["forget_verbmem_ROUGE"] = texts
    for split in ("forget", "retain"):
        rows = cut(load_muse(data_dir, "knowmem", f"{split}_qa"))
        icl = load_muse(data_dir, "knowmem", f"{split}_qa_icl")
        inputs = [mu.knowmem_inputs(tok, r["question"], r["answer"], icl) for r in rows]
        texts = [run.generate(ids, mu.KNOWMEM_MAX_NEW_TOKENS, mu.KNOWMEM_STOP) for ids, _, _ in inputs]
        key = f"{split}_knowmem_ROUGE"
        per[key] = [s["rougeL_f1"] for s in M.rouge_scores(texts, [gt for _, gt, _ in inputs])]
        agg[key] = float(np.mean(per[key]))
        gens[key] = texts
    mink = {}
    for split in ("forget", "holdout"):
        texts = cut(load_muse(data_dir, "privleak", split))
        mink[split] = [M.min_k_score(run.stats(*mu.privleak_example(tok, t))[1][:-1]) for t in texts]
    per["mia_min_k"] = mink
    agg["mia_min_k"] = M.mia_auc(mink["forget"], mink["holdout"])
    agg["privleak"] = M.privleak(agg["mia_min_k"], None)
    flags = [run.stats(*mu.verbmem_example(tok, r))[2][:-1] for r in verbmem]
    per["extraction_strength"] = [M.extraction_strength(c) for c in flags]
    per["exact_memorization"] = [M.exact_memorization(c) for c in flags]
    agg["extraction_strength"] = float(np.mean(per["extraction_strength"]))
    agg["exact_memorization"] = float(np.nanmean(per["exact_memorization"]))
    return {"aggregates": agg, "per_sample": per, "generations": gens}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--benchmark", choices=("tofu", "muse"), required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--forget-split", default="forget01")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=200, help="TOFU answer length")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N (default: cpu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="model dtype, as ngdiff eval --dtype (default: float32)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    run = TorchRunner(a.model, a.threads, device=a.device, dtype=a.dtype)
    if a.benchmark == "tofu":
        from ngdiff_jax.data import QAFormatter
        from ngdiff_jax.training.data_assembly import resolve_format

        fmt = QAFormatter(run.tok, spec=resolve_format(None, a.model))
        res = eval_tofu(run, a.data, forget_split=a.forget_split, limit=a.limit,
                        max_new_tokens=a.max_new_tokens, formatter=fmt)  # fmt: skip
    else:
        res = eval_muse(run, a.data, limit=a.limit)
    res["seconds_in_process"] = time.perf_counter() - t0
    res["timings"] = {k: round(v, 2) for k, v in run.seconds.items()}
    with open(a.out, "w") as f:
        json.dump(res, f, default=lambda x: x.tolist() if hasattr(x, "tolist") else str(x))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
