"""Membership-inference attacks on forget vs holdout, as open-unlearning's ``src/evals/metrics/mia/``.

Every attack gives each sample a *loss-like* score (higher = less likely a training
member); ``mia_<attack>`` is the ROC AUC with forget labelled 0 and holdout 1
(:func:`ngdiff_jax.evaluation.metrics.mia_auc`, open-unlearning ``mia/utils.py:mia_auc``),
and ``privleak_<attack>`` its relative gap to the retain model's AUC
(:func:`ngdiff_jax.evaluation.metrics.privleak`; plain ``privleak`` is Min-K%'s, as in
open-unlearning). Scores per sample (open-unlearning file in brackets):

* ``loss`` (``mia/loss.py``): the mean NLL of the scored tokens (``evaluate_probability``'s
  ``avg_loss``, EOS included);
* ``zlib`` (``mia/zlib.py``): ``avg_loss / len(zlib.compress(text.encode()))``, ``text`` the
  labelled tokens decoded with ``skip_special_tokens=True``;
* ``reference`` (``mia/reference.py``): ``avg_loss(model) - avg_loss(reference model)``;
* ``min_k`` (``mia/min_k.py``): ``-mean`` of the lowest ``max(1, int(k n))`` token log-probs;
* ``min_k_plus_plus`` (``mia/min_k_plus_plus.py``): the same over
  ``(log p(x_t) - mu_t) / sqrt(max(sigma_t, 1e-6))`` with ``mu_t = E_v[log p(v)]`` and
  ``sigma_t = E_v[log p(v)^2] - mu_t^2`` under the model's next-token distribution;
* ``gradnorm`` (``mia/gradnorm.py``): the mean over parameter tensors of the ``p``-norm of
  the gradient of ``-mean(token log-probs)``.

Token-level attacks (``min_k``, ``min_k_plus_plus``, ``gradnorm``) leave out the last scored
token (the EOS prediction), as open-unlearning's ``tokenwise_logprobs``. Our parameter
tensors are those of the NNX model (for Llama the same set as transformers', tied
embeddings counted once), so ``gradnorm``'s mean runs over the same tensors.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from ngdiff_jax.evaluation import metrics as M

ATTACKS = ("loss", "zlib", "reference", "min_k", "min_k_plus_plus", "gradnorm")
GRADNORM_P = 2


# ----------------------------------------------------------------------------- per-sample scores


def loss_score(avg_loss: float) -> float:
    """LOSS attack: the sample's mean NLL."""
    return float(avg_loss)


def zlib_score(avg_loss: float, text: str) -> float:
    """ZLib attack: ``avg_loss / len(zlib.compress(text.encode("utf-8")))``."""
    return float(avg_loss) / len(zlib.compress(text.encode("utf-8")))


def reference_score(avg_loss: float, ref_avg_loss: float) -> float:
    """Reference attack: the model's mean NLL minus the reference model's."""
    return float(avg_loss) - float(ref_avg_loss)


def min_k_plus_plus_score(token_logprobs, mu, sigma, k: float = 0.4) -> float:
    """Min-K%++ of one sample from its token log-probs and the per-position mean ``mu`` and
    variance ``sigma`` of the log-prob under the model's next-token distribution."""
    lp = np.asarray(token_logprobs, np.float64).reshape(-1)
    if lp.size == 0:
        return 0.0
    if not 0 < k <= 1:
        raise ValueError(f"min_k_plus_plus_score needs 0 < k <= 1, got k={k}.")
    z = (lp - np.asarray(mu, np.float64).reshape(-1)) / np.sqrt(np.maximum(np.asarray(sigma, np.float64), 1e-6))
    n = max(1, int(len(z) * k))
    return float(-np.mean(np.sort(z)[:n]))


def aggregate(scores: Mapping[str, Mapping[str, Sequence[float]]], reference_aucs: Mapping | None = None):
    """``{attack: {"forget": [...], "holdout": [...]}}`` -> aggregates ``mia_<attack>`` (AUC) and
    ``privleak_<attack>`` (against ``reference_aucs["mia_<attack>"]``, 0.5 when absent)."""
    agg = {}
    ref = dict(reference_aucs or {})
    for attack, s in scores.items():
        auc = M.mia_auc(s["forget"], s["holdout"])
        agg[f"mia_{attack}"] = auc
        agg[f"privleak_{attack}"] = M.privleak(auc, ref.get(f"mia_{attack}"))
    return agg


# ----------------------------------------------------------------------------- model statistics


def _drop_last_scored(mask):
    """``mask [B, T-1]`` without each row's last scored position (the EOS prediction)."""
    import jax.numpy as jnp

    t = jnp.arange(mask.shape[1])
    last = jnp.max(jnp.where(mask > 0, t, -1), axis=1, keepdims=True)
    return mask * (t[None] != last)


def _stats(logits, labels):
    import jax.numpy as jnp

    from ngdiff_jax.evaluation.engine import distribution_stats
    from ngdiff_jax.models.logprobs import token_logprobs

    logp, mask = token_logprobs(logits, labels)
    n = (labels != -100).sum(-1)
    avg_loss = -logp.sum(-1) / jnp.maximum(n, 1)
    mu, sigma = distribution_stats(logits[:, :-1])
    return avg_loss, logp, _drop_last_scored(mask), mu, sigma


def _apply(graphdef, state, ids, mask):
    from flax import nnx

    return nnx.merge(graphdef, state)(ids, mask)


def _stats_fn(graphdef, state, ids, mask, labels):
    return _stats(_apply(graphdef, state, ids, mask), labels)


def _gradnorm_fn(graphdef, state, ids, mask, labels, p):
    """Per-row ``mean over parameter tensors of |grad|_p`` of ``-mean(token log-probs)`` (EOS left out)."""
    import jax
    import jax.numpy as jnp

    from ngdiff_jax.models.logprobs import token_logprobs

    def row(args):
        i, m, y = args

        def loss(st):
            logp, tm = token_logprobs(_apply(graphdef, st, i[None], m[None]), y[None])
            tm = _drop_last_scored(tm)
            return -(logp * tm).sum() / jnp.maximum(tm.sum(), 1.0)

        leaves = jax.tree_util.tree_leaves(jax.grad(loss)(state))
        if p == 1:
            norms = [jnp.abs(x).sum() for x in leaves]
        elif p == 2:
            norms = [jnp.sqrt(jnp.square(x.astype(jnp.float32)).sum()) for x in leaves]
        else:
            norms = [jnp.abs(x).max() for x in leaves]
        return jnp.mean(jnp.stack(norms))

    return jax.lax.map(row, (ids, mask, labels))


_JIT: dict = {}


def _jitted(kind: str, members: bool = False):
    import jax

    if (kind, members) not in _JIT:  # graphdef (and p) static: models of one architecture share the executables
        fn = _stats_fn if kind == "stats" else _gradnorm_fn
        if members:  # a leading member axis on the state: the same rows for every member
            inner = fn

            def fn(graphdef, state, *args):
                return jax.vmap(lambda st: inner(graphdef, st, *args))(state)

        _JIT[kind, members] = jax.jit(fn, static_argnums=(0,) if kind == "stats" else (0, 5))
    return _JIT[kind, members]


def _batches(examples, batch_size: int, buckets):
    from ngdiff_jax.data.batching import collate
    from ngdiff_jax.evaluation.batching import bucket_length, length_sorted_batches

    for batch in length_sorted_batches([len(e[0]) for e in examples], batch_size):
        t = bucket_length(max(len(examples[i][0]) for i in batch), buckets=buckets)
        b = collate([examples[i] for i in batch], pad_id=0, batch_size=batch_size, buckets=[t])
        b["attention_mask"][len(batch):, 0] = 1  # dummy rows attend to one token
        yield batch, b


def model_statistics(model, examples, *, batch_size: int = 16, buckets=None, gradnorm_p=None, max_length=None):
    """Per example of ``model`` (a ``CausalLM``): ``avg_loss``, scored token log-probs and
    ``mu``/``sigma`` with the EOS prediction left out, and (``gradnorm_p`` set) the gradient
    norm. Lists in input order. Rows longer than ``max_length`` (default: the model's context)
    are cut at the right, as the evaluation's :class:`~ngdiff_jax.evaluation.scoring.Scorer` does.
    For :class:`~ngdiff_jax.evaluation.members.Members`, a list with each member's statistics."""
    from ngdiff_jax.evaluation.members import split_model

    if max_length is None:
        max_length = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_length is not None:
        examples = [(list(i)[:max_length], list(y)[:max_length]) for i, y in examples]
    from ngdiff_jax.evaluation.batching import fitted_batch_size

    graphdef, state, members = split_model(model)
    n = len(examples)
    batch_size = fitted_batch_size(n, batch_size)  # padding rows cost a full forward (and backward) each
    if gradnorm_p is not None and gradnorm_p not in (1, 2, float("inf")):
        raise ValueError(f"gradnorm p must be 1, 2 or inf (open-unlearning), got {gradnorm_p!r}.")
    outs = []
    for _ in range(members or 1):
        o = {"avg_loss": np.zeros(n), "logp": [None] * n, "mu": [None] * n, "sigma": [None] * n}
        if gradnorm_p is not None:
            o["gradnorm"] = np.zeros(n)
        outs.append(o)
    many = members is not None
    for rows, b in _batches(examples, batch_size, buckets):
        args = (graphdef, state, b["input_ids"], b["attention_mask"], b["labels"])
        stats = [np.asarray(x) for x in _jitted("stats", many)(*args)]
        if gradnorm_p is not None:
            stats.append(np.asarray(_jitted("gradnorm", many)(*args, gradnorm_p)))
        if not many:
            stats = [x[None] for x in stats]
        for j, out in enumerate(outs):
            avg, logp, mask, mu, sigma = (x[j] for x in stats[:5])
            for r, i in enumerate(rows):
                m = mask[r] > 0
                out["avg_loss"][i] = float(avg[r])
                out["logp"][i], out["mu"][i], out["sigma"][i] = logp[r][m], mu[r][m], sigma[r][m]
                if gradnorm_p is not None:
                    out["gradnorm"][i] = float(stats[5][j][r])
    return outs if many else outs[0]


def statistics_from_scores(scores, rows: Sequence[int]) -> dict:
    """:func:`model_statistics` (without ``gradnorm``) of examples ``rows`` read from the
    evaluation's :class:`~ngdiff_jax.evaluation.scoring.Scores`: the same numbers (up to the
    rounding of prompt-sharing batches) without a pass, or a compile, of its own."""
    dist = scores.mu is not None and scores.sigma is not None  # Scorer(distribution_stats=True)
    return {
        "avg_loss": np.array([scores.nll[i] for i in rows], dtype=np.float64),
        "logp": [scores.token_logprobs[i][:-1] for i in rows],  # the EOS prediction left out
        "mu": [scores.mu[i][:-1] for i in rows] if dist else None,
        "sigma": [scores.sigma[i][:-1] for i in rows] if dist else None,
    }


def target_text(tokenizer, labels) -> str:
    """The labelled tokens decoded with ``skip_special_tokens=True`` (open-unlearning's
    ``extract_target_texts_from_processed_data``)."""
    ids = [int(t) for t in labels if int(t) != -100]
    return tokenizer.decode(ids, skip_special_tokens=True)


def run_attacks(
    model,
    tokenizer,
    examples: Mapping[str, Sequence],
    *,
    attacks: Sequence[str] = ATTACKS,
    reference_model=None,
    reference_aucs: Mapping | None = None,
    k: float = 0.4,
    gradnorm_p=GRADNORM_P,
    batch_size: int = 16,
    buckets=None,
    max_length=None,
    statistics: Mapping[str, object] | None = None,
):
    """Every attack in ``attacks`` on ``examples = {"forget": [...], "holdout": [...]}`` (pairs of
    ``input_ids``, ``labels``). ``reference`` needs ``reference_model`` (the retain model in
    open-unlearning's configs) and is skipped (reported in ``skipped``) without one.
    ``statistics``: the model's :func:`model_statistics` of each split's examples, already
    computed (:func:`statistics_from_scores`; for ``Members`` a list per member); they are then
    not computed again, except for ``gradnorm``, which needs a backward pass of its own, and for
    ``min_k_plus_plus`` when they lack ``mu``/``sigma``.

    Returns ``(aggregates, per_sample, skipped)``: ``mia_<attack>`` / ``privleak_<attack>``,
    ``{attack: {"forget": scores, "holdout": scores}}`` and ``{attack: reason}``; for
    :class:`~ngdiff_jax.evaluation.members.Members`, a list of those, one per member.
    """
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown MIA attacks {unknown}; choose from {list(ATTACKS)}.")
    skipped = {}
    attacks = list(attacks)
    if "reference" in attacks and reference_model is None:
        attacks.remove("reference")
        skipped["reference"] = "no reference model given (open-unlearning uses the retain model)"
    from ngdiff_jax.evaluation.members import Members

    many = isinstance(model, Members)
    pers: list = [{a: {} for a in attacks} for _ in range(model.k if many else 1)]
    for split in ("forget", "holdout"):
        ex = list(examples[split])
        given = None if statistics is None else statistics[split]
        lacking = given is not None and "min_k_plus_plus" in attacks and any(
            st["mu"] is None for st in (given if isinstance(given, list) else [given]))
        if given is not None and "gradnorm" not in attacks and not lacking:
            sts = given
        else:
            sts = model_statistics(model, ex, batch_size=batch_size, buckets=buckets, max_length=max_length,
                                   gradnorm_p=gradnorm_p if "gradnorm" in attacks else None)  # fmt: skip
        rs = None
        if "reference" in attacks:  # the reference model's statistics, once for every member
            rs = model_statistics(reference_model, ex, batch_size=batch_size, buckets=buckets, max_length=max_length)
        texts = [target_text(tokenizer, e[1]) for e in ex] if "zlib" in attacks else None
        for per, st in zip(pers, sts if many else [sts]):
            if "loss" in attacks:
                per["loss"][split] = [loss_score(v) for v in st["avg_loss"]]
            if "zlib" in attacks:
                per["zlib"][split] = [zlib_score(v, t) for v, t in zip(st["avg_loss"], texts)]
            if "min_k" in attacks:
                per["min_k"][split] = [M.min_k_score(lp, k) for lp in st["logp"]]
            if "min_k_plus_plus" in attacks:
                per["min_k_plus_plus"][split] = [
                    min_k_plus_plus_score(lp, mu, sg, k) for lp, mu, sg in zip(st["logp"], st["mu"], st["sigma"])
                ]
            if "gradnorm" in attacks:
                per["gradnorm"][split] = [float(v) for v in st["gradnorm"]]
            if "reference" in attacks:
                per["reference"][split] = [reference_score(a, b) for a, b in zip(st["avg_loss"], rs["avg_loss"])]
    out = [(aggregate(per, reference_aucs), per, skipped) for per in pers]
    return out if many else out[0]
