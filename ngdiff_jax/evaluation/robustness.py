"""Robustness of forgetting: does the forget set come back after a change a user could make?

Forget quality and model utility alone overstate forgetting: a few relearning steps, a precision
change or a rephrased prompt can bring the knowledge back (e.g. Lynch et al. 2024, "Eight methods
to evaluate robust unlearning in LLMs"; Zhang et al. 2024, "Catastrophic failure of LLM unlearning
via quantization"). Each check measures the forget answers again, on a changed model or prompt:

* ``relearn``: ``relearn_steps`` steps of plain NLL fine-tuning (Adam, ``relearn_lr``) on the first
  ``relearn_fraction`` of the forget rows (or on ``relearn_rows`` given, e.g. retain rows); the
  metrics are taken on the forget rows it did **not** train on;
* ``bf16``: the weights and the compute cast to bfloat16;
* ``int8`` / ``int4``: every weight with at least two dimensions rounded through symmetric absmax
  quantization in blocks of `QUANT_BLOCK` consecutive entries (``round(w / s) * s``,
  ``s = max|w_block| / (2**(bits-1) - 1)``: a quantize-dequantize round trip, as a weight-only
  quantized deployment would see the model); norms and biases stay;
* ``paraphrase``: the paraphrased questions (TOFU's ``paraphrased_question``);
* ``format:<preset>``: each other prompt-format preset (``configs/formats``), the question and
  answer unchanged.

For each, on the checked rows: ``forget_Q_A_Prob`` (mean answer probability ``exp(-mean NLL)``) and
``forget_Q_A_ROUGE`` (ROUGE-L recall of the greedy answer against the answer), as TOFU's forget
metrics (`ngdiff_jax.evaluation.tofu`). ``worst`` is, per metric, the largest value over the
checks (the most knowledge any of them recovers) and which check gave it; a model that forgot
keeps ``worst`` near its ``baseline``. `robustness_aggregates` names them for a result's
aggregates: ``robust_<check>_<metric>``, ``robust_worst_<metric>``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ngdiff_jax.evaluation import metrics as M
from ngdiff_jax.models import stacked

__all__ = ["CHECKS", "QUANT_BLOCK", "forget_probe", "parse_checks", "quantize_roundtrip", "robustness_aggregates",
           "robustness_checks", "robustness_table"]  # fmt: skip

CHECKS = ("relearn", "bf16", "int8", "int4", "paraphrase", "formats")
#: entries per absmax block of the quantization round trip (bitsandbytes' 4-bit default block size)
QUANT_BLOCK = 64
METRICS = ("forget_Q_A_Prob", "forget_Q_A_ROUGE")


def parse_checks(value: str) -> tuple[str, ...]:
    """``ngdiff eval --robustness``'s value: ``all`` or a comma-separated subset of `CHECKS`; a
    ``ValueError`` naming an unknown one."""
    checks = CHECKS if value.strip() == "all" else tuple(c.strip() for c in value.split(",") if c.strip())
    bad = [c for c in checks if c not in CHECKS]
    if bad or not checks:
        raise ValueError(f"--robustness {value!r}: unknown check {bad[0] if bad else '(none)'}; use 'all' or some "
                         f"of {','.join(CHECKS)}.")  # fmt: skip
    return checks


def quantize_roundtrip(w, bits: int, block: int = QUANT_BLOCK):
    """``w`` rounded through symmetric absmax ``bits``-bit integers in blocks of ``block``
    consecutive entries (the last block may be shorter), in ``w``'s dtype. Arrays with fewer than
    two dimensions (norms, biases) are returned as they are.

    >>> import numpy as np
    >>> w = np.array([[0.1, -0.7, 0.35, 0.0]], np.float32)
    >>> quantize_roundtrip(w, 4, block=4).tolist()   # step 0.7 / 7 = 0.1
    [[0.10000000149011612, -0.699999988079071, 0.4000000059604645, 0.0]]
    """
    if bits < 2 or bits > 16:
        raise ValueError(f"quantize_roundtrip: bits={bits}; use 2..16 (8 and 4 are the checks').")
    w = jnp.asarray(w)
    if w.ndim < 2:
        return w
    levels = 2 ** (bits - 1) - 1
    flat = w.astype(jnp.float32).reshape(-1)
    n = flat.shape[0]
    pad = (-n) % block
    blocks = jnp.pad(flat, (0, pad)).reshape(-1, block)
    scale = jnp.max(jnp.abs(blocks), axis=1, keepdims=True) / levels
    safe = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(blocks / safe), -levels, levels) * safe
    return q.reshape(-1)[:n].reshape(w.shape).astype(w.dtype)


def _requantized(model, bits: int):
    """``model`` with every weight quantized (`quantize_roundtrip`), block by block: a scanned model's
    stacked weights are quantized per block, as the unrolled model's (its norms and biases stay)."""
    if model.scan_layers:
        return stacked.scanned(_requantized(stacked.unrolled(model), bits))
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: quantize_roundtrip(x, bits), state)
    return nnx.merge(graphdef, state)


def _in_dtype(model, dtype):
    """``model`` rebuilt with parameters and compute in ``dtype`` (same architecture and backend)."""
    from ngdiff_jax.models import abstract_like, functional, with_params

    _, params = functional(model)
    # the attention implementation is chosen again for the new dtype
    clone = abstract_like(model, dtype=dtype, param_dtype=dtype, attention=None)
    return with_params(clone, jax.tree.map(lambda x: jnp.asarray(x, dtype), params))


def forget_probe(model, tokenizer, rows: Sequence[dict], formatter, *, question_key: str = "question",
                 max_new_tokens: int = 64, batch_size: int = 16) -> dict:
    """``{"forget_Q_A_Prob", "forget_Q_A_ROUGE", "n"}`` of ``model`` on ``rows`` (dicts with
    ``question_key`` and ``answer``), with ``formatter``'s prompts."""
    from ngdiff_jax.evaluation.generation import generate_texts
    from ngdiff_jax.evaluation.scoring import Scorer

    if not rows:
        raise ValueError("forget_probe: no rows to check.")
    examples = [formatter.encode(r[question_key], r["answer"]) for r in rows]
    prompts = [formatter.encode_prompt(r[question_key]) for r in rows]
    scores = Scorer(model, batch_size=batch_size).score(examples, phase="robustness_score")
    texts = generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=max(batch_size, 8),
                           phase="robustness_generate")  # fmt: skip
    truths = [M.rouge_ground_truth(tokenizer, ex[0], p) for ex, p in zip(examples, prompts)]
    rouge = M.rouge_scores(texts, truths)
    return {"forget_Q_A_Prob": M.q_a_prob(np.asarray(scores.nll)),
            "forget_Q_A_ROUGE": float(np.mean([s["rougeL_recall"] for s in rouge])), "n": len(rows)}  # fmt: skip


def _relearned(model, tokenizer, rows, formatter, *, steps: int, lr: float, batch_size: int):
    import optax

    from ngdiff_jax.data.batching import collate
    from ngdiff_jax.models import functional, with_params
    from ngdiff_jax.training.step import make_finetune_step

    apply_fn, params = functional(model)
    params = jax.tree.map(jnp.copy, params)  # the model's own arrays stay intact: the copy is donated
    tx = optax.adam(lr)
    step = jax.jit(make_finetune_step(apply_fn, tx), donate_argnums=(0, 1))
    opt_state = tx.init(params)
    examples = [formatter.encode(r["question"], r["answer"]) for r in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = [collate(examples[i:i + batch_size], pad_id=pad, batch_size=min(batch_size, len(examples)))
               for i in range(0, len(examples), batch_size)]  # fmt: skip
    for s in range(steps):
        params, opt_state, m = step(params, opt_state, batches[s % len(batches)], jax.random.key(s))
        if not np.isfinite(float(m["loss"])):
            raise FloatingPointError(f"relearn check: the fine-tuning loss is {float(m['loss'])} at step {s}; "
                                     "lower relearn_lr.")  # fmt: skip
    return with_params(model, params)


def robustness_checks(model, tokenizer, rows: Sequence[dict], formatter, *, checks: Sequence[str] = CHECKS,
                      relearn_steps: int = 5, relearn_lr: float = 1e-5, relearn_fraction: float = 0.5,
                      relearn_rows: Sequence[dict] | None = None, formats: Sequence[str] | None = None,
                      max_new_tokens: int = 64, batch_size: int = 16) -> dict:
    """Run ``checks`` (a subset of `CHECKS`) on the forget ``rows`` (TOFU rows: ``question``,
    ``answer``, ``paraphrased_question`` for ``paraphrase``): ``{"baseline": probe, <check>: probe,
    ..., "worst": {metric: {"value", "check"}}, "settings": {...}}`` (module doc). ``relearn``
    takes its probe and its baseline on the rows it did not train on (``"relearn_baseline"``)."""
    from ngdiff_jax.data import QAFormatter, available_formats, load_format

    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        raise ValueError(f"robustness checks {unknown}: choose from {', '.join(CHECKS)}.")
    if not 0 < relearn_fraction < 1:
        raise ValueError(f"relearn_fraction={relearn_fraction}: use a fraction in (0, 1).")
    if relearn_steps < 1 or not relearn_lr > 0:
        raise ValueError(f"relearn_steps={relearn_steps}, relearn_lr={relearn_lr}: use >= 1 step and a rate > 0.")
    rows = list(rows)
    kw = {"max_new_tokens": max_new_tokens, "batch_size": batch_size}
    out: dict = {"baseline": forget_probe(model, tokenizer, rows, formatter, **kw)}
    if "relearn" in checks:
        cut = int(len(rows) * relearn_fraction) if relearn_rows is None else 0
        train = rows[:cut] if relearn_rows is None else list(relearn_rows)
        held = rows[cut:]
        if not train or not held:
            raise ValueError(f"relearn check: {len(rows)} forget rows leave nothing to train on or to check "
                             "(relearn_fraction); pass more rows.")  # fmt: skip
        out["relearn_baseline"] = forget_probe(model, tokenizer, held, formatter, **kw)
        relearned = _relearned(model, tokenizer, train, formatter, steps=relearn_steps, lr=relearn_lr,
                               batch_size=batch_size)  # fmt: skip
        out["relearn"] = forget_probe(relearned, tokenizer, held, formatter, **kw)
        del relearned
    if "bf16" in checks:
        out["bf16"] = forget_probe(_in_dtype(model, jnp.bfloat16), tokenizer, rows, formatter, **kw)
    for bits in (8, 4):
        if f"int{bits}" in checks:
            out[f"int{bits}"] = forget_probe(_requantized(model, bits), tokenizer, rows, formatter, **kw)
    if "paraphrase" in checks:
        if not all("paraphrased_question" in r for r in rows):
            raise ValueError("paraphrase check: the forget rows have no paraphrased_question (TOFU's "
                             "forgetNN_perturbed splits have it); leave the check out.")  # fmt: skip
        out["paraphrase"] = forget_probe(model, tokenizer, rows, formatter, question_key="paraphrased_question", **kw)
    if "formats" in checks:
        # each preset whose prompts differ from those already checked (the model's own included)
        seen = {tuple(formatter.encode_prompt(rows[0]["question"]))}
        for name in formats if formats is not None else available_formats():
            try:
                other = QAFormatter(tokenizer, spec=load_format(name))
                prompt = tuple(other.encode_prompt(rows[0]["question"]))
            except ValueError:  # e.g. a chat preset for a tokenizer without a chat template
                continue
            if prompt in seen:
                continue
            seen.add(prompt)
            out[f"format:{name}"] = forget_probe(model, tokenizer, rows, other, **kw)
    checked = {k: v for k, v in out.items() if k not in ("baseline", "relearn_baseline")}
    out["worst"] = {}
    for metric in METRICS:
        if checked:
            check = max(checked, key=lambda c: checked[c][metric])
            out["worst"][metric] = {"value": checked[check][metric], "check": check}
    out["settings"] = {"checks": list(checks), "relearn_steps": relearn_steps, "relearn_lr": relearn_lr,
                       "relearn_fraction": relearn_fraction if relearn_rows is None else None,
                       "relearn_on": "forget" if relearn_rows is None else "given rows",
                       "quant_block": QUANT_BLOCK, "max_new_tokens": max_new_tokens}  # fmt: skip
    return out


def robustness_aggregates(result: dict) -> dict:
    """The checks' numbers as flat aggregates: ``robust_<check>_<metric>``, ``robust_worst_<metric>``
    (``format:<preset>`` becomes ``format_<preset>``)."""
    agg = {}
    for check, probe in result.items():
        if check in ("worst", "settings"):
            continue
        for metric in METRICS:
            agg[f"robust_{check.replace(':', '_')}_{metric}"] = probe[metric]
    for metric, w in result.get("worst", {}).items():
        agg[f"robust_worst_{metric}"] = w["value"]
    return agg


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.3g}"


def robustness_table(named: dict, *, label: str = "model") -> list[str]:
    """Markdown lines: one row per ``name -> (aggregates, record)`` (`robustness_aggregates` keys;
    the `robustness_checks` record names the worst check), a column per check (forget ROUGE /
    forget Prob), the baseline first and the worst last; a check a model lacks shows ``–``."""
    checks = list(dict.fromkeys(k[len("robust_"):-len("_forget_Q_A_ROUGE")] for agg, _ in named.values() for k in agg
                                if k.startswith("robust_") and k.endswith("_forget_Q_A_ROUGE")
                                and k != "robust_worst_forget_Q_A_ROUGE"))  # fmt: skip
    lines = [f"| {label} | " + " | ".join(checks) + " | worst (check) |", "|---|" + "---|" * (len(checks) + 1)]
    for name, (agg, rec) in named.items():
        cells = [f"{_fmt(agg.get(f'robust_{c}_forget_Q_A_ROUGE'))} / {_fmt(agg.get(f'robust_{c}_forget_Q_A_Prob'))}"
                 for c in checks]  # fmt: skip
        worst = ((rec or {}).get("worst") or {}).get("forget_Q_A_ROUGE", {}).get("check", "?")
        cells.append(f"{_fmt(agg.get('robust_worst_forget_Q_A_ROUGE'))} ({worst})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines
