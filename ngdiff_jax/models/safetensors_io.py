"""Minimal safetensors reader/writer with slice reads through ``os.pread``.

Why not ``safetensors.safe_open``: it memory-maps the file, and every page it
touches stays resident (and counted in RSS) while the file is open, so loading a
whole checkpoint through it holds the file *and* the converted arrays at once.
Reading exactly the needed bytes with ``pread`` keeps the peak near one copy of the
parameters. Supports bfloat16 through ``ml_dtypes`` (numpy has none).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    """``np.empty`` whose data is ``align``-byte aligned: jax's CPU backend then adopts the
    buffer without a copy in ``device_put`` (keeps the loader's peak memory near one copy)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = np.empty(n + align, np.uint8)
    off = (-buf.ctypes.data) % align
    return buf[off:off + n].view(dtype).reshape(shape)


class SafetensorsFile:
    """Header of one ``.safetensors`` file plus ``read(name, ranges)`` of a sub-block."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
            head = os.pread(self._fd, 8, 0)
            if len(head) != 8:
                raise ValueError("file shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000:
                raise ValueError(f"implausible header length {n}")
            header = json.loads(os.pread(self._fd, n, 8).decode("utf-8"))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read safetensors file {self.path}: {e}") from e
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self.tensors: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            dt = _DTYPES.get(info["dtype"])
            if dt is None:
                raise ValueError(f"tensor {name!r} in {self.path} has unsupported dtype {info['dtype']}")
            b, e = info["data_offsets"]
            self.tensors[name] = (dt, tuple(int(s) for s in info["shape"]), int(b), int(e))

    def keys(self) -> Iterable[str]:
        return self.tensors.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self.tensors[name][0]

    def read(self, name: str, ranges: tuple[tuple[int, int], ...] | None = None) -> np.ndarray:
        """The block ``tensor[r0[0]:r0[1], r1[0]:r1[1], ...]``; reads only the rows needed."""
        dt, shape, b, _ = self.tensors[name]
        if ranges is None:
            ranges = tuple((0, s) for s in shape)
        if not shape:
            buf = os.pread(self._fd, dt.itemsize, self._data_start + b)
            return np.frombuffer(buf, dt).reshape(())
        row = int(np.prod(shape[1:], dtype=np.int64)) * dt.itemsize
        r0, r1 = ranges[0]
        nbytes = (r1 - r0) * row
        out = aligned_empty(((r1 - r0),) + tuple(shape[1:]), dt)
        view = memoryview(out.reshape(-1).view(np.uint8))
        off, got = self._data_start + b + r0 * row, 0
        while got < nbytes:
            n = os.preadv(self._fd, [view[got:]], off + got)
            if n <= 0:
                raise ValueError(f"{self.path} is truncated: tensor {name!r} could not be read")
            got += n
        rest = tuple(slice(lo, hi) for lo, hi in ranges[1:])
        if any(s.start != 0 or s.stop != full for s, full in zip(rest, shape[1:])):
            sub = out[(slice(None),) + rest]
            out = aligned_empty(sub.shape, dt)
            out[...] = sub
        return out

    def close(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def write_safetensors(path, tensors: list[tuple[str, tuple[int, ...], np.dtype, callable]],
                      metadata: dict[str, str] | None = None) -> None:
    """Write tensors one at a time: ``tensors`` is ``[(name, shape, dtype, produce)]`` where
    ``produce()`` returns the array (called once, in order, so only one is alive at a time)."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    off = 0
    for name, shape, dt, _ in tensors:
        dt = np.dtype(dt)
        if dt not in _NAMES:
            raise ValueError(f"cannot save tensor {name!r}: dtype {dt} has no safetensors name")
        n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        header[name] = {"dtype": _NAMES[dt], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * (-len(hb) % 8)
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, shape, dt, produce in tensors:
            a = np.ascontiguousarray(produce(), dtype=np.dtype(dt))
            if a.shape != tuple(shape):
                raise ValueError(f"tensor {name!r}: produced shape {a.shape}, declared {tuple(shape)}")
            f.write(a.tobytes())
    os.replace(tmp, path)
