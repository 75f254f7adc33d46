"""Deterministic, resumable, bucketed batching of tokenized examples.

An *example* is a pair ``(input_ids, labels)`` of equal-length int sequences (what
``QAFormatter.encode`` and ``chunk_corpus`` return). Batches are dicts of int32 numpy
arrays ``input_ids``, ``attention_mask``, ``labels``, all ``[batch_size, length]``,
right-padded to the smallest *bucket* length that fits, so a jitted step compiles
once per bucket rather than once per batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ngdiff_jax.data.formatting import IGNORE_INDEX

Example = tuple[Sequence[int], Sequence[int]]


def bucket_lengths(max_length: int, *, min_length: int = 16) -> tuple[int, ...]:
    """Powers of two from ``min_length`` below ``max_length``, then ``max_length`` itself.

    ``bucket_lengths(200)`` -> ``(16, 32, 64, 128, 200)``.
    """
    if max_length < 1 or min_length < 1:
        raise ValueError(
            f"bucket lengths must be positive, got max_length={max_length}, min_length={min_length}."
        )
    out, n = [], min_length
    while n < max_length:
        out.append(n)
        n *= 2
    out.append(max_length)
    return tuple(out)


def _pick_bucket(length: int, buckets: Sequence[int] | int | None) -> int:
    """Smallest bucket >= length: ``None`` = exact, an int = round up to its multiple."""
    if buckets is None:
        return length
    if isinstance(buckets, (int, np.integer)):
        m = int(buckets)
        if m < 1:
            raise ValueError(f"bucket multiple must be positive, got {m}.")
        return -(-length // m) * m
    for b in buckets:
        if b >= length:
            return int(b)
    raise ValueError(
        f"An example of {length} tokens is longer than the largest bucket {max(buckets)}; "
        "truncate the examples (QAFormatter(max_length=...)) or add a larger bucket."
    )


def _check_example(i: int, ex: Example) -> None:
    if len(ex) != 2 or len(ex[0]) != len(ex[1]):
        raise ValueError(
            f"Example {i} must be a pair (input_ids, labels) of equal length; "
            "build examples with QAFormatter.encode or chunk_corpus."
        )
    if len(ex[0]) == 0:
        raise ValueError(f"Example {i} is empty; drop empty examples before batching.")


def collate(
    examples: Sequence[Example],
    *,
    pad_id: int,
    batch_size: int | None = None,
    buckets: Sequence[int] | int | None = None,
) -> dict[str, np.ndarray]:
    """Right-pad examples into a batch; rows beyond ``len(examples)`` (up to ``batch_size``) are
    all padding: ``attention_mask`` 0 and ``labels`` -100."""
    batch_size = len(examples) if batch_size is None else batch_size
    if len(examples) > batch_size:
        raise ValueError(f"{len(examples)} examples do not fit in batch_size={batch_size}.")
    for i, ex in enumerate(examples):
        _check_example(i, ex)
    longest = max((len(ex[0]) for ex in examples), default=1)
    length = _pick_bucket(longest, buckets)
    input_ids = np.full((batch_size, length), pad_id, dtype=np.int32)
    attention_mask = np.zeros((batch_size, length), dtype=np.int32)
    labels = np.full((batch_size, length), IGNORE_INDEX, dtype=np.int32)
    for row, (ids, lab) in enumerate(examples):
        n = len(ids)
        input_ids[row, :n] = ids
        attention_mask[row, :n] = 1
        labels[row, :n] = lab
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass(frozen=True)
class BatchPosition:
    """Where a ``Batcher`` is: the next batch is number ``index`` of epoch ``epoch``."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": int(self.epoch), "index": int(self.index)}

    @classmethod
    def from_dict(cls, d) -> BatchPosition:
        return cls(int(d["epoch"]), int(d["index"]))


class Batcher:
    """Fixed-size, seeded, resumable batches over a list of examples.

    The order of epoch ``e`` is a permutation drawn from ``np.random.default_rng([seed, e])``
    (identity when ``shuffle=False``), so batch ``(epoch, index)`` is a pure function of
    the examples and settings: saving ``position`` and building a new ``Batcher`` with
    ``position=`` (or calling ``restore``) yields exactly the same subsequent batches.

    Every batch has ``batch_size`` rows. The last, short batch of an epoch is padded
    with fully masked rows (``drop_last=False``) or skipped (``drop_last=True``).

    Args:
      examples: ``(input_ids, labels)`` pairs.
      batch_size: rows per batch.
      pad_id: token id for padding (``tokenizer.pad_token_id``).
      seed: shuffling seed.
      shuffle: shuffle each epoch.
      drop_last: drop the last, incomplete batch of each epoch.
      buckets: allowed padded lengths. ``None``: ``bucket_lengths(max_length)``; a sequence of
        lengths; or an int ``m`` to round up to a multiple of ``m``.
      max_length: the longest allowed example (default: the longest example), used for the
        default buckets; longer examples are an error.
      position: where to start (``BatchPosition`` or ``{"epoch", "index"}``).
    """

    def __init__(
        self,
        examples: Sequence[Example],
        batch_size: int,
        *,
        pad_id: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        buckets: Sequence[int] | int | None = None,
        max_length: int | None = None,
        position: BatchPosition | dict | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        if not examples:
            raise ValueError(
                "Batcher got no examples; check the split or filter that produced them."
            )
        for i, ex in enumerate(examples):
            _check_example(i, ex)
        self.examples = list(examples)
        self.batch_size = batch_size
        self.pad_id = int(pad_id)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        longest = max(len(ex[0]) for ex in self.examples)
        if max_length is not None and longest > max_length:
            raise ValueError(
                f"An example has {longest} tokens, more than max_length={max_length}; truncate "
                "the examples (QAFormatter(max_length=...)) or raise max_length."
            )
        self.max_length = longest if max_length is None else int(max_length)
        self.buckets = bucket_lengths(self.max_length) if buckets is None else buckets
        if len(self) == 0:
            raise ValueError(
                f"{len(self.examples)} examples with batch_size={batch_size} and drop_last=True "
                "give no batch; lower batch_size or set drop_last=False."
            )
        self.position = BatchPosition()
        if position is not None:
            self.restore(position)

    def __len__(self) -> int:
        """Batches per epoch."""
        n = len(self.examples)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """Example indices of ``epoch`` in batch order."""
        n = len(self.examples)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, int(epoch)]).permutation(n)

    def indices(self, epoch: int, index: int) -> np.ndarray:
        """Example indices in batch ``index`` of ``epoch`` (fewer than ``batch_size`` for a padded last batch)."""
        if not 0 <= index < len(self):
            raise IndexError(f"batch index {index} out of range: an epoch has {len(self)} batches.")
        return self.order(epoch)[index * self.batch_size : (index + 1) * self.batch_size]

    def batch(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        """Batch ``index`` of ``epoch`` (pure: does not move ``position``)."""
        rows = [self.examples[i] for i in self.indices(epoch, index)]
        return collate(rows, pad_id=self.pad_id, batch_size=self.batch_size, buckets=self.buckets)

    def state(self) -> dict[str, int]:
        """The position to save with a checkpoint: ``{"epoch", "index"}`` of the next batch."""
        return self.position.to_dict()

    def restore(self, position: BatchPosition | dict) -> None:
        """Continue from a saved ``state()``."""
        pos = position if isinstance(position, BatchPosition) else BatchPosition.from_dict(position)
        if pos.epoch < 0 or not 0 <= pos.index <= len(self):
            raise ValueError(
                f"Position {pos.to_dict()} is invalid for {len(self)} batches per epoch; "
                "was it saved with other examples or batch size?"
            )
        if pos.index == len(self):
            pos = BatchPosition(pos.epoch + 1, 0)
        self.position = pos

    def __next__(self) -> dict[str, np.ndarray]:
        pos = self.position
        out = self.batch(pos.epoch, pos.index)
        nxt = pos.index + 1
        self.position = (
            BatchPosition(pos.epoch, nxt) if nxt < len(self) else BatchPosition(pos.epoch + 1, 0)
        )
        return out

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Endless: batches from ``position`` on, across epochs; ``position`` advances."""
        return self

    def epoch(self) -> Iterator[dict[str, np.ndarray]]:
        """The remaining batches of the current epoch (advancing ``position``)."""
        start = self.position.epoch
        while self.position.epoch == start:
            yield next(self)


def make_batches(
    examples: Sequence[Example],
    batch_size: int,
    *,
    pad_id: int,
    seed: int = 0,
    shuffle: bool = False,
    drop_last: bool = False,
    buckets: Sequence[int] | int | None = None,
    max_length: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """One epoch of batches as a list (unshuffled by default: evaluation order = example order)."""
    b = Batcher(
        examples, batch_size, pad_id=pad_id, seed=seed, shuffle=shuffle,
        drop_last=drop_last, buckets=buckets, max_length=max_length,
    )  # fmt: skip
    return [b.batch(0, i) for i in range(len(b))]


def pad_prompts(
    prompts: Sequence[Sequence[int]],
    pad_id: int,
    bucket: Sequence[int] | int | None = None,
    *,
    batch_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad prompt ids for generation: ``(input_ids, attention_mask)``, int32 ``[B, L]``.

    ``L`` is the longest prompt rounded up by ``bucket`` (an int multiple, a sequence of
    lengths, or ``None`` for exact). With ``batch_size``, extra all-padding rows
    (attention 0) fill the batch to that size.
    """
    if not prompts:
        raise ValueError("pad_prompts got no prompts.")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("pad_prompts got an empty prompt; every prompt needs at least one token.")
    rows = len(prompts) if batch_size is None else batch_size
    if len(prompts) > rows:
        raise ValueError(f"{len(prompts)} prompts do not fit in batch_size={batch_size}.")
    length = _pick_bucket(max(len(p) for p in prompts), bucket)
    input_ids = np.full((rows, length), pad_id, dtype=np.int32)
    attention_mask = np.zeros((rows, length), dtype=np.int32)
    for r, p in enumerate(prompts):
        input_ids[r, length - len(p) :] = p
        attention_mask[r, length - len(p) :] = 1
    return input_ids, attention_mask
