"""Batched, bucketed teacher-forced scoring of (input_ids, labels) examples.

For every row: the mean NLL over the scored tokens (as
``ngdiff_jax.models.logprobs.sequence_nll``), the scored tokens' log-probs and whether each
was the greedy (argmax) prediction.

With a model, rows whose unscored prompt is shared by other rows (TOFU: a question's answer,
paraphrased and perturbed answers) are scored from one encoding of that prompt
(:func:`ngdiff_jax.evaluation.engine.score_with_prefix`: the prompt's KV cache is reused by
each answer); other rows are scored whole. Rows are sorted by length, grouped into
fixed-size batches (the last one filled with dummy rows) and right-padded to a length
bucket, so an evaluation compiles only a few shapes, each once per model architecture
(:mod:`ngdiff_jax.evaluation.engine` keeps them); compile and run time are measured apart.
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

#: shortest shared prompt worth its own encoding
MIN_SHARED_PREFIX = 4
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
    """

    nll: np.ndarray
    token_logprobs: list[np.ndarray]
    correct: list[np.ndarray]


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
      share_prefix: score rows that share their prompt from one encoding of it.
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
        whole = list(range(n))
        if self.share_prefix:
            groups: dict = {}
            for i, (ids, labels) in enumerate(rows):
                p = _first_scored(labels) - 1  # the last prompt token predicts the first answer token
                if p >= MIN_SHARED_PREFIX and p < len(ids) - 1:
                    groups.setdefault(tuple(ids[:p]), []).append(i)
            shared = {k: v for k, v in groups.items() if len(v) > 1}
            in_shared = {i for v in shared.values() for i in v}
            whole = [i for i in whole if i not in in_shared]
            if shared:
                self._score_shared(rows, shared, phase)
        if whole:
            self._score_whole(rows, whole, phase)
        out = [Scores(nll=self._nll[j], token_logprobs=self._lps[j], correct=self._cors[j])
               for j in range(self.members or 1)]  # fmt: skip
        return out if self.members is not None else out[0]

    def _store_rows(self, out, order):
        """Row ``r`` of the program's outputs ``out`` is example ``order[r]`` (for every member)."""
        out = [np.asarray(o) for o in out]
        if self.members is None:
            out = [o[None] for o in out]
        for j in range(self.members or 1):
            for r, i in enumerate(order):
                nll, logp, mask, cor = (o[j, r] for o in out)
                m = mask > 0
                self._nll[j, i] = float(nll)
                self._lps[j][i] = np.asarray(logp[m], dtype=np.float64)
                self._cors[j][i] = np.asarray(cor[m], dtype=bool)

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
                out = engine.score_plain(self.graphdef, self.params, ids, lengths, labels,
                                         timings=self.timings, phase=phase, members=self.members)  # fmt: skip
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

    def _score_shared(self, rows, groups: dict, phase):
        B = self.batch_size
        Bp = max(1, B // 4)
        items = []  # (prefix, [row indices]) with at most B rows each
        for prefix, idx in groups.items():
            for a in range(0, len(idx), B):
                items.append((prefix, idx[a : a + B]))
        p_len = len  # noqa: E731
        suffix_len = {i: len(rows[i][0]) - len(prefix) for prefix, idx in items for i in idx}
        items.sort(key=lambda it: (-p_len(it[0]), -max(suffix_len[i] for i in it[1])))
        batches, cur, n_rows = [], [], 0
        for it in items:
            if cur and (len(cur) == Bp or n_rows + len(it[1]) > B):
                batches.append(cur)
                cur, n_rows = [], 0
            cur.append(it)
            n_rows += len(it[1])
        if cur:
            batches.append(cur)
        for batch in batches:
            P = self._bucket(max(len(pre) for pre, _ in batch))
            T = self._bucket(max(suffix_len[i] for _, idx in batch for i in idx))
            pre_ids = np.zeros((Bp, P), np.int32)
            pre_len = np.ones(Bp, np.int32)
            ids = np.zeros((B, T), np.int32)
            lengths = np.ones(B, np.int32)
            labels = np.full((B, T), IGNORE_INDEX, np.int32)
            owner = np.zeros(B, np.int32)
            order = []
            for g, (pre, idx) in enumerate(batch):
                pre_ids[g, : len(pre)], pre_len[g] = pre, len(pre)
                for i in idx:
                    r = len(order)
                    x, y = rows[i]
                    ids[r, : len(x) - len(pre)] = x[len(pre) :]
                    labels[r, : len(y) - len(pre)] = y[len(pre) :]
                    lengths[r], owner[r] = len(x) - len(pre), g
                    order.append(i)
            out = engine.score_with_prefix(self.graphdef, self.params, pre_ids, pre_len, ids, lengths, labels, owner,
                                           timings=self.timings, phase=phase, members=self.members)  # fmt: skip
            self._store_rows(out, order)
