"""Batched, bucketed teacher-forced scoring of (input_ids, labels) examples.

One jitted function per padded shape computes, for every row, the mean NLL over the
scored tokens (``ngdiff_jax.models.logprobs.sequence_nll``), the scored tokens'
log-probs and whether each was the greedy (argmax) prediction. Rows are sorted by
length, grouped into fixed-size batches (the last one filled with dummy rows) and
right-padded to a length bucket, so an evaluation compiles only a few shapes; each
shape is compiled ahead of time so compile and run time are measured separately.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ngdiff_jax.evaluation.batching import Stopwatch, Timings, bucket_length, length_sorted_batches
from ngdiff_jax.models.logprobs import IGNORE_INDEX, token_logprobs

Example = tuple[Sequence[int], Sequence[int]]  # (input_ids, labels), labels -100 where not scored


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


@partial(jax.jit, static_argnums=0)
def _score_module(graphdef, state, input_ids, attention_mask, labels):
    model = nnx.merge(graphdef, state)
    return _outputs(model(input_ids, attention_mask), labels)


def _score_apply(apply_fn):
    def f(params, input_ids, attention_mask, labels):
        return _outputs(apply_fn(params, input_ids, attention_mask), labels)

    return jax.jit(f)


# Compiled executables, shared by every Scorer: (graphdef or apply_fn, shape) -> executable.
# Models of the same architecture (e.g. checkpoints of one run) reuse them.
_COMPILED: dict = {}


class Scorer:
    """Scores examples with a model's functional form ``apply_fn(params, ids, mask) -> logits``.

    Args:
      model: a ``CausalLM`` (split with ``nnx.split``; compiled code is shared by every
        model of the same architecture); or pass ``apply_fn(params, ids, mask) -> logits``
        and ``params`` directly (e.g. during training, as from ``ngdiff_jax.models.functional``).
      batch_size: rows per compiled batch.
      max_length: longest row kept (defaults to the model's ``max_position_embeddings``);
        longer rows are cut at the right and counted in ``self.truncated``.
      buckets: explicit padded lengths; default powers of two from 32.
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
    ):
        if model is not None:
            graphdef, self.params = nnx.split(model)
            self._key, self._jit = graphdef, partial(_score_module, graphdef)
            self._lower = lambda *a: _score_module.lower(graphdef, *a)
            if max_length is None:
                max_length = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        elif apply_fn is not None and params is not None:
            self.params = params
            jitted = _score_apply(apply_fn)
            self._key, self._lower = apply_fn, jitted.lower
        else:
            raise ValueError("Scorer needs a model, or both apply_fn and params.")
        self.batch_size = int(batch_size)
        self.max_length = max_length
        self.buckets = buckets
        self.timings = timings if timings is not None else Timings()
        self.truncated = 0

    def _compiled_for(self, shape, phase):
        key = (self._key, shape)
        if key not in _COMPILED:
            spec = jax.ShapeDtypeStruct(shape, jnp.int32)
            with Stopwatch() as sw:
                _COMPILED[key] = self._lower(self.params, spec, spec, spec).compile()
            self.timings.add(phase, sw.seconds, compile=True)
        self.timings.add_shape("score", shape)
        return _COMPILED[key]

    def score(self, examples: Sequence[Example], *, phase: str = "score") -> Scores:
        """Score ``examples`` (pairs of equal-length ``input_ids`` and ``labels`` lists)."""
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
        nll = np.zeros(n, dtype=np.float64)
        lps: list = [None] * n
        cors: list = [None] * n
        for batch in length_sorted_batches([len(r[0]) for r in rows], self.batch_size):
            t = bucket_length(max(len(rows[i][0]) for i in batch), buckets=self.buckets)
            if self.max_length is not None:
                t = min(t, self.max_length)
            shape = (self.batch_size, t)
            ids = np.zeros(shape, np.int32)
            mask = np.zeros(shape, np.int32)
            labels = np.full(shape, IGNORE_INDEX, np.int32)
            mask[:, 0] = 1  # dummy rows attend to one token (no all-masked softmax)
            for r, i in enumerate(batch):
                x, y = rows[i]
                ids[r, : len(x)] = x
                mask[r, : len(x)] = 1
                labels[r, : len(y)] = y
            fn = self._compiled_for(shape, phase)
            with Stopwatch() as sw:
                out = jax.device_get(fn(self.params, ids, mask, labels))
            self.timings.add(phase, sw.seconds, compile=False)
            b_nll, b_logp, b_mask, b_cor = out
            for r, i in enumerate(batch):
                m = b_mask[r] > 0
                nll[i] = float(b_nll[r])
                lps[i] = np.asarray(b_logp[r][m], dtype=np.float64)
                cors[i] = np.asarray(b_cor[r][m], dtype=bool)
        return Scores(nll=nll, token_logprobs=lps, correct=cors)
