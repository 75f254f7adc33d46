"""Host-memory housekeeping for CPU runs: :func:`owned` and :func:`release_freed_memory`.

Two effects of running on the host that cost a training step memory it does not need:

* jax's CPU client adopts an aligned NumPy buffer without a copy (`ngdiff_jax.models.hf` loads
  weights that way, so loading holds one copy), but an adopted buffer cannot be donated to a
  jitted step: the first step would allocate its new parameters next to the loaded ones.
  :func:`owned` gives an array in a buffer XLA allocated (one array's worth of extra memory at a
  time); it is a no-op off the CPU.
* Compiling a large step frees most of the compiler's memory, but glibc keeps the freed pages
  mapped, so the process's resident memory during the first step is the step's plus the
  compiler's. :func:`release_freed_memory` (``malloc_trim``) returns them to the system; it
  does nothing where the C library has no ``malloc_trim``. ``ShardedStep`` also calls it before
  each step (through `CPUFast.release_host_memory`): the host's and the last step's freed pages
  would otherwise stay resident under the step's temporaries, which XLA:CPU maps afresh for every
  call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import jax

__all__ = ["owned", "release_freed_memory"]


def owned(x: jax.Array) -> jax.Array:
    """``x`` in a buffer XLA allocated (donatable); ``x`` itself off the CPU backend."""
    if not isinstance(x, jax.Array) or any(d.platform != "cpu" for d in x.devices()):
        return x
    return x.copy()


@functools.cache
def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """Return freed heap pages to the system (glibc ``malloc_trim(0)``); whether it ran."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
