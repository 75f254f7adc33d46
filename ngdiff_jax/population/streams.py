"""Every member's own batches, stacked along a leading member axis.

Each member of a population reads its own data order (its seed's ``Batcher``);
:class:`MemberStreams` draws one batch from each and stacks them into ``[K, B, T]`` arrays.
Members whose batches fall into different length buckets on a step are right-padded to
the longest (padding tokens are masked and unscored, as a bucket's own padding is). The
position of every member's stream is saved and restored together, so a resumed population
continues each member's data exactly where it stopped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ngdiff_jax.data.formatting import IGNORE_INDEX

__all__ = ["MemberStreams", "stack_batches"]


def _pad_value(key: str, pad_id: int) -> int:
    if key.endswith("labels"):
        return IGNORE_INDEX
    if key.endswith("attention_mask"):
        return 0
    return pad_id


def stack_batches(batches: Sequence[dict], pad_id: int) -> dict[str, np.ndarray]:
    """``[{key: [B, T_k, ...]}] -> {key: [K, B, max T, ...]}`` (2-D entries right-padded with the
    key's padding value: ``pad_id`` for token ids, 0 for masks, -100 for labels)."""
    if not batches:
        raise ValueError("stack_batches needs at least one batch.")
    keys = list(batches[0])
    out = {}
    for key in keys:
        arrays = [np.asarray(b[key]) for b in batches]
        if arrays[0].ndim >= 2:
            t = max(a.shape[1] for a in arrays)
            arrays = [
                a if a.shape[1] == t else np.pad(a, [(0, 0), (0, t - a.shape[1])] + [(0, 0)] * (a.ndim - 2),
                                                 constant_values=_pad_value(key, pad_id))
                for a in arrays
            ]  # fmt: skip
        out[key] = np.stack(arrays)
    return out


class MemberStreams:
    """One batch stream per member (anything with ``next()``, ``state()``, ``restore()``), stacked."""

    def __init__(self, streams: Sequence, *, pad_id: int):
        if not streams:
            raise ValueError("MemberStreams needs one stream per member.")
        self.streams = list(streams)
        self.pad_id = int(pad_id)

    def __len__(self) -> int:
        return len(self.streams[0])

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return stack_batches([next(s) for s in self.streams], self.pad_id)

    def state(self) -> dict:
        return {"members": [s.state() for s in self.streams]}

    def restore(self, position) -> None:
        saved = position["members"]
        if len(saved) != len(self.streams):
            raise ValueError(f"the saved data position holds {len(saved)} members, this population "
                             f"{len(self.streams)}.")  # fmt: skip
        for s, p in zip(self.streams, saved):
            s.restore(p)
