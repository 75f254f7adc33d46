"""Batched, bucketed teacher-forced scoring of (input_ids, labels) examples.

For every row: the mean NLL over the scored tokens (as
``ngdiff_jax.models.logprobs.sequence_nll``), the scored tokens' log-probs, whether each
was the greedy (argmax) prediction, and on request the mean and variance of the log-prob under
the model's next-token distribution at each scored position (Min-K%++'s ``mu``/``sigma``: the
membership-inference attacks read them from here instead of scoring the rows again).

With a model, examples of at most :data:`PACK_TOKENS` tokens are *packed*, several to a row
(:func:`ngdiff_jax.evaluation.engine.score_packed`): those that share their unscored prompt
(TOFU: a question's answer, paraphrased and perturbed answers) follow one copy of it, each
attending to the prompt and to itself only, so the prompt is computed once per question, and
rows carry almost no padding whatever the examples' lengths; the rows of a call are batched
evenly, so a whole evaluation's short examples compile one shape. Longer examples (MUSE's texts)
are scored whole: sorted by length, grouped into fixed-size batches (the last one filled with
dummy rows) and right-padded to a length bucket. Each compiled shape is kept once per model
architecture (:mod:`ngdiff_jax.evaluation.engine`); compile and run time are measured apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from ngdiff_jax.evaluation import engine
from ngdiff_jax.evaluation.batching import Stopwatch, Timings, bucket_length, length_sorted_batches
from ngdiff_jax.evaluation.members import split_model
from ngdiff_jax.models.logprobs import IGNORE_INDEX, token_logprobs

Example = tuple[Sequence[int], Sequence[int]]  # (input_ids, labels), labels -100 where not scored

#: tokens per packed row (short examples, several to a row; ``Scorer._score_packed``)
PACK_TOKENS = 256
#: most rows x padded length per batch of whole rows (long texts get smaller batches: memory)
SCORE_TOKENS = 4096
#: a batch of whole rows takes a padded length already used in the same call when that is at most
#: this factor above its own bucket (one compile fewer)
REUSE_PADDING = 1.25


@dataclass
class Scores:
    """Per-example results of :meth:`Scorer.score`, in the input order.

    Attributes:
      nll: ``[n]`` mean NLL over each example's scored tokens.
      token_logprobs: per example, the log-prob of every scored token (``[n_scored]``).
      correct: per example, whether each scored token was the argmax prediction.
      mu, sigma: per example, at each scored position, ``E_v[log p(v)]`` and its variance
        (:func:`ngdiff_jax.evaluation.engine.distribution_stats`); ``None`` unless the scorer was
        made with ``distribution_stats=True``.
    """

    nll: np.ndarray
    token_logprobs: list[np.ndarray]
    correct: list[np.ndarray]
    mu: list[np.ndarray] | None = None
    sigma: list[np.ndarray] | None = None


def _outputs(logits, labels):
    logp, mask = token_logprobs(logits, labels)
    n = mask.sum(-1)
    nll = -logp.sum(-1) / jnp.maximum(n, 1.0)
    correct = jnp.argmax(logits[:, :-1], axis=-1) == labels[:, 1:]
    return nll, logp, mask, correct


def _score_apply(apply_fn):
    def f(params, input_ids, attention_mask, labels):
        return _outputs(apply_fn(params, input_ids, attention_mask), labels)

    return jax.jit(f)


# apply_fn-mode executables: (apply_fn, shape) -> executable
_COMPILED: dict = {}


def _first_scored(labels) -> int:
    for t, y in enumerate(labels):
        if y != IGNORE_INDEX:
            return t
    return len(labels)


class Scorer:
    """Scores examples with a model.

    Args:
      model: a ``CausalLM`` (compiled code is shared by every model of the same
        architecture), or :class:`~ngdiff_jax.evaluation.members.Members` (several models
        scored by one program; :meth:`score` then returns one :class:`Scores` per member);
        or pass ``apply_fn(params, ids, mask) -> logits`` and ``params``
        directly (e.g. during training, as from ``ngdiff_jax.models.functional``; rows are
        then always scored whole).
      batch_size: rows per compiled batch (answer rows, with a shared prompt).
      max_length: longest row kept (defaults to the model's ``max_position_embeddings``);
        longer rows are cut at the right and counted in ``self.truncated``.
      buckets: explicit padded lengths; default powers of two from 32, multiples of 256 above.
      share_prefix: pack short examples, those sharing a prompt after one copy of it (False:
        every example is scored whole, in its own row).
      distribution_stats: also compute each scored position's ``mu``/``sigma`` (``Scores.mu``,
        ``Scores.sigma``; Min-K%++ needs them; several passes over the logits, so off by default;
        not with ``apply_fn``).
    """

    def __init__(
        self,
        model=None,
        *,
        apply_fn=None,
        params=None,
        batch_size: int = 16,
        max_length: int | None = None,
        buckets: Sequence[int] | None = None,
        timings: Timings | None = None,
        share_prefix: bool = True,
        distribution_stats: bool = False,
    ):
        self.members = None
        if model is not None:
            self.graphdef, self.params, self.members = split_model(model)
            self._apply = None
            if max_length is None:
                max_length = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        elif apply_fn is not None and params is not None:
            self.params = params
            self._apply = apply_fn
            self._lower = _score_apply(apply_fn).lower
        else:
            raise ValueError("Scorer needs a model, or both apply_fn and params.")
        self.batch_size = int(batch_size)
        self.max_length = max_length
        self.buckets = buckets
        self.timings = timings if timings is not None else Timings()
        self.share_prefix = bool(share_prefix) and self._apply is None
        if distribution_stats and self._apply is not None:
            raise ValueError("distribution_stats needs a model (Scorer(model)), not apply_fn.")
        self.dist = bool(distribution_stats)
        self.truncated = 0

    def _bucket(self, n: int) -> int:
        t = bucket_length(n, buckets=self.buckets)
        return t if self.max_length is None else min(t, self.max_length)

    def score(self, examples: Sequence[Example], *, phase: str = "score") -> Scores | list[Scores]:
        """Score ``examples`` (pairs of equal-length ``input_ids`` and ``labels`` lists); for
        :class:`~ngdiff_jax.evaluation.members.Members`, a list with each member's scores."""
        n = len(examples)
        rows = []
        for i, (ids, labels) in enumerate(examples):
            if len(ids) != len(labels):
                raise ValueError(
                    f"Example {i} has {len(ids)} input_ids but {len(labels)} labels; they must align."
                )
            if self.max_length is not None and len(ids) > self.max_length:
                ids, labels = ids[: self.max_length], labels[: self.max_length]
                self.truncated += 1
            rows.append((list(ids), list(labels)))
        k = self.members or 1
        self._nll = np.zeros((k, n), dtype=np.float64)
        self._lps: list = [[None] * n for _ in range(k)]
        self._cors: list = [[None] * n for _ in range(k)]
        self._mus: list = [[None] * n for _ in range(k)]
        self._sigmas: list = [[None] * n for _ in range(k)]
        whole = list(range(n))
        if self.share_prefix:
            whole = self._score_packed(rows, phase)
        if whole:
            self._score_whole(rows, whole, phase)
        out = [Scores(nll=self._nll[j], token_logprobs=self._lps[j], correct=self._cors[j],
                      mu=self._mus[j] if self.dist else None, sigma=self._sigmas[j] if self.dist else None)
               for j in range(self.members or 1)]  # fmt: skip
        return out if self.members is not None else out[0]

    def _store_rows(self, out, order):
        """Row ``r`` of the program's outputs ``out`` is example ``order[r]`` (for every member)."""
        out = [np.asarray(o) for o in out]
        if self.members is None:
            out = [o[None] for o in out]
        for j in range(self.members or 1):
            for r, i in enumerate(order):
                nll, logp, mask, cor, *dist = (o[j, r] for o in out)
                m = mask > 0
                self._nll[j, i] = float(nll)
                self._lps[j][i] = np.asarray(logp[m], dtype=np.float64)
                self._cors[j][i] = np.asarray(cor[m], dtype=bool)
                if dist:
                    self._mus[j][i] = np.asarray(dist[0][m], dtype=np.float64)
                    self._sigmas[j][i] = np.asarray(dist[1][m], dtype=np.float64)

    def _score_whole(self, rows, idx, phase):
        B = self.batch_size
        if self._apply is None:  # fewer rows per batch on long texts, no more dummy rows than needed
            longest = self._bucket(max(len(rows[i][0]) for i in idx))
            B = max(1, min(B, SCORE_TOKENS // longest // (self.members or 1), len(idx)))  # members share it
        used: list[int] = []
        for b in length_sorted_batches([len(rows[i][0]) for i in idx], B):
            batch = [idx[j] for j in b]
            t = self._bucket(max(len(rows[i][0]) for i in batch))
            # a length this call already compiles, if it pads at most REUSE_PADDING more: long
            # texts (1024 -> 1280) pay less in padding than in compiling another shape
            t = min((u for u in used if t <= u <= t * REUSE_PADDING), default=t)
            if t not in used:
                used.append(t)
            ids = np.zeros((B, t), np.int32)
            lengths = np.ones(B, np.int32)  # dummy rows attend to one token (no all-masked softmax)
            labels = np.full((B, t), IGNORE_INDEX, np.int32)
            for r, i in enumerate(batch):
                x, y = rows[i]
                ids[r, : len(x)], labels[r, : len(y)], lengths[r] = x, y, len(x)
            if self._apply is None:
                out = engine.score_plain(self.graphdef, self.params, ids, lengths, labels, timings=self.timings,
                                         phase=phase, members=self.members, dist=self.dist)  # fmt: skip
            else:
                out = self._score_apply(ids, lengths, labels, phase)
            self._store_rows(out, batch)

    def _score_apply(self, ids, lengths, labels, phase):
        shape = ids.shape
        key = (self._apply, shape, engine.placement(self.params))
        if key not in _COMPILED:
            spec = jax.ShapeDtypeStruct(shape, jnp.int32)
            with Stopwatch() as sw:
                _COMPILED[key] = self._lower(self.params, spec, spec, spec).compile()
            self.timings.add(phase, sw.seconds, compile=True)
        self.timings.add_shape("score", shape)
        mask = (np.arange(shape[1])[None, :] < lengths[:, None]).astype(np.int32)
        with Stopwatch() as sw:
            out = jax.device_get(_COMPILED[key](self.params, ids, mask, labels))
        self.timings.add(phase, sw.seconds, compile=False)
        return out

    def _score_packed(self, rows, phase) -> list[int]:
        """Score every example that fits a packed row; returns the indices of those that do not.

        Example ``i`` is its prompt ``ids[:p]`` (``p``: one before its first scored label) and its
        continuation ``ids[p:]`` (the last prompt token predicts the first scored one). Examples
        with the same prompt form a group: one copy of the prompt, then their continuations
        (a group longer than a row is split, the prompt repeated). Groups are packed into rows of
        ``T`` tokens (first fit, longest first) and the rows batched evenly: one compiled shape."""
        starts = [min(max(_first_scored(y) - 1, 0), len(x) - 1) for x, y in rows]
        total = sum(len(x) for x, _ in rows)
        want = min(total, PACK_TOKENS)
        fits = [b for b in (self.buckets or ()) if b >= want]
        T = min(PACK_TOKENS, self._bucket(want)) if fits or not self.buckets else max(self.buckets)
        if self.max_length is not None:
            T = min(T, self.max_length)
        groups: dict = {}
        unfit = []
        for i, ((ids, _), p) in enumerate(zip(rows, starts)):
            if len(ids) > T:
                unfit.append(i)
            else:
                groups.setdefault(tuple(ids[:p]), []).append(i)
        if not groups:
            return unfit
        chunks = []  # (prompt, [example indices]) of at most T tokens each
        for prompt, idx in groups.items():
            cur, used = [], len(prompt)
            for i in idx:
                size = len(rows[i][0]) - len(prompt)
                if cur and used + size > T:
                    chunks.append((prompt, cur))
                    cur, used = [], len(prompt)
                cur.append(i)
                used += size
            chunks.append((prompt, cur))
        size = {id(c): len(c[0]) + sum(len(rows[i][0]) - len(c[0]) for i in c[1]) for c in chunks}
        bins: list = []  # [free tokens, [chunks]]
        for c in sorted(chunks, key=lambda c: -size[id(c)]):
            for b in bins:
                if b[0] >= size[id(c)]:
                    b[0] -= size[id(c)]
                    b[1].append(c)
                    break
            else:
                bins.append([T - size[id(c)], [c]])
        per_batch = max(1, SCORE_TOKENS // T // (self.members or 1))  # members share the batch's memory
        n_batches = -(-len(bins) // per_batch)
        B = -(-len(bins) // n_batches)  # rows per batch, as even as one shape allows
        for a in range(0, len(bins), B):
            ids, pos = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
            group, part = np.full((B, T), -1, np.int32), np.zeros((B, T), np.int32)
            targets = np.full((B, T), IGNORE_INDEX, np.int32)
            places = []  # (example, row, first slot, length)
            for r, (_, row_chunks) in enumerate(bins[a : a + B]):
                t = 0
                for g, (prompt, idx) in enumerate(row_chunks):
                    P = len(prompt)
                    ids[r, t : t + P], pos[r, t : t + P], group[r, t : t + P] = prompt, np.arange(P), g
                    t += P
                    for k, i in enumerate(idx, start=1):
                        x, y = rows[i]
                        L = len(x) - P
                        ids[r, t : t + L], pos[r, t : t + L] = x[P:], np.arange(P, len(x))
                        group[r, t : t + L], part[r, t : t + L] = g, k
                        targets[r, t : t + L - 1] = y[P + 1 :]
                        places.append((i, r, t, L))
                        t += L
            out = engine.score_packed(self.graphdef, self.params, ids, pos, group, part, targets, timings=self.timings,
                                      phase=phase, members=self.members, dist=self.dist)  # fmt: skip
            out = [np.asarray(o) for o in out]
            if self.members is None:
                out = [o[None] for o in out]
            for j in range(self.members or 1):
                for i, r, t, L in places:
                    logp, mask, cor, *dist = (o[j, r, t : t + L] for o in out)
                    m = mask > 0
                    lp = np.asarray(logp[m], dtype=np.float64)
                    self._nll[j, i] = -float(np.sum(lp)) / max(int(m.sum()), 1)
                    self._lps[j][i] = lp
                    self._cors[j][i] = np.asarray(cor[m], dtype=bool)
                    if dist:
                        self._mus[j][i] = np.asarray(dist[0][m], dtype=np.float64)
                        self._sigmas[j][i] = np.asarray(dist[1][m], dtype=np.float64)
        return unfit
