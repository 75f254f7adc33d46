"""Length buckets and a compile/run stopwatch shared by the scoring and generation runners."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

DEFAULT_MIN_BUCKET = 32
#: above this, default buckets are multiples of it instead of powers of two (less padding on long texts)
DEFAULT_LONG_STEP = 256


def bucket_length(n: int, *, buckets: Sequence[int] | None = None, cap: int | None = None) -> int:
    """Padded length for a batch whose longest row has ``n`` tokens.

    With ``buckets`` the smallest bucket ``>= n``; otherwise the next power of two (at
    least 32) up to 256, then the next multiple of 256, so a whole evaluation compiles only
    a handful of shapes. ``cap`` (the model's context) bounds the result; ``n`` above the
    cap is an error.
    """
    if n < 1:
        raise ValueError(f"bucket_length needs a positive length, got {n}.")
    if cap is not None and n > cap:
        raise ValueError(f"A row of {n} tokens does not fit the maximum length {cap}; truncate it first.")
    if buckets:
        for b in sorted(buckets):
            if b >= n:
                return int(b) if cap is None else min(int(b), cap)
        raise ValueError(f"No bucket in {sorted(buckets)} holds {n} tokens; add a larger bucket.")
    b = DEFAULT_MIN_BUCKET
    while b < n and b < DEFAULT_LONG_STEP:
        b *= 2
    if b < n:
        b = -(-n // DEFAULT_LONG_STEP) * DEFAULT_LONG_STEP
    return b if cap is None else min(b, cap)


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of ``batch_size`` after sorting by length (longest first)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def fitted_batch_size(n_rows: int, batch_size: int) -> int:
    """Rows per compiled batch for ``n_rows`` rows: ``batch_size``, or for fewer rows the
    smallest power of two that holds them all, so a small split is not padded to a full batch
    (4 rows run as a batch of 4, not 16) while splits of similar size still share one shape."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    b = 1
    while b < n_rows and b < batch_size:
        b *= 2
    return min(b, batch_size)


@dataclass
class Timings:
    """Seconds spent compiling (or in the first call of a new shape) vs running, per phase."""

    compile_s: dict = field(default_factory=dict)
    run_s: dict = field(default_factory=dict)
    shapes: dict = field(default_factory=dict)

    def add(self, phase: str, seconds: float, *, compile: bool) -> None:
        d = self.compile_s if compile else self.run_s
        d[phase] = d.get(phase, 0.0) + float(seconds)

    def add_shape(self, phase: str, shape) -> None:
        self.shapes.setdefault(phase, [])
        if list(shape) not in self.shapes[phase]:
            self.shapes[phase].append(list(shape))

    def merge(self, other: Timings) -> None:
        for k, v in other.compile_s.items():
            self.add(k, v, compile=True)
        for k, v in other.run_s.items():
            self.add(k, v, compile=False)
        for k, v in other.shapes.items():
            for s in v:
                self.add_shape(k, s)

    def as_dict(self) -> dict:
        return {
            "compile_s": {k: round(v, 4) for k, v in self.compile_s.items()},
            "run_s": {k: round(v, 4) for k, v in self.run_s.items()},
            "total_compile_s": round(sum(self.compile_s.values()), 4),
            "total_run_s": round(sum(self.run_s.values()), 4),
            "shapes": self.shapes,
        }


class Stopwatch:
    """``with Stopwatch() as sw: ...; sw.seconds``."""

    def __enter__(self):
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._t
        return False
