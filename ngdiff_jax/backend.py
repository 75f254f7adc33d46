"""Per-platform defaults, in one place: what a setting left at ``None`` becomes on CPU, GPU or TPU.

`defaults` gives a `BackendDefaults` for a platform (``jax.default_backend()`` when none is
named). Code that builds a model or a loop reads it once, at construction, and stores the
resolved value (a model's ``attention``, ``kernels`` and ``head_chunk_elements`` are static
attributes); nothing reads the platform while tracing.

============================  ======================  ==========================================
setting                       CPU                     GPU / TPU
============================  ======================  ==========================================
``attention``                 ``"einsum"``            ``"cudnn"`` on GPU for 16-bit compute,
                                                      ``"xla"`` otherwise
``kernels``                   ``"cpu_fast"``          ``"xla"``
``head_chunk_elements``       2**22 (16 MiB float32   2**27 (512 MiB: 1,024 tokens at a 128k
                              logits: a CPU cache)    vocabulary)
``log_every``                 1 (the device is the    10 (each logged step waits for the device)
                              host: free)
evaluation: attention block  256 positions (XLA:CPU    one block
                              computes masked scores)
evaluation: head tokens       2048                    16384
evaluation: KV-cache budget   1 GiB                   a quarter of the free device memory
                                                      (`kv_cache_budget`)
``precision.compute``         float32 (XLA:CPU        bfloat16 (parameters and moments stay
                              computes bfloat16 in    float32)
                              float32, converting)
============================  ======================  ==========================================

>>> defaults("cpu").head_chunk_elements == 1 << 22
True
>>> defaults("gpu").attention("bfloat16"), defaults("gpu").attention("float32"), defaults("tpu").log_every
('cudnn', 'xla', 10)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

__all__ = ["BackendDefaults", "defaults", "kv_cache_budget"]


@dataclasses.dataclass(frozen=True)
class BackendDefaults:
    platform: str
    kernels: str
    head_chunk_elements: int
    log_every: int
    compute: str
    eval_attention_block: int | None
    eval_head_tokens: int

    def attention(self, dtype) -> str:
        """The attention implementation (`ngdiff_jax.models.attention`) for a compute ``dtype``."""
        if self.platform == "cpu":
            return "einsum"
        if self.platform in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            return "cudnn"
        return "xla"


def defaults(platform: str | None = None) -> BackendDefaults:
    """The defaults of ``platform`` (``"cpu"``, ``"gpu"``/``"cuda"``, ``"tpu"``, ...; ``None``:
    ``jax.default_backend()``)."""
    platform = platform or jax.default_backend()
    if platform == "cpu":
        return BackendDefaults(platform, kernels="cpu_fast", head_chunk_elements=1 << 22, log_every=1,
                               compute="float32", eval_attention_block=256, eval_head_tokens=2048)  # fmt: skip
    return BackendDefaults(platform, kernels="xla", head_chunk_elements=1 << 27, log_every=10, compute="bfloat16",
                           eval_attention_block=None, eval_head_tokens=16384)  # fmt: skip


def kv_cache_budget(device=None) -> int:
    """Bytes of KV cache one generation batch may hold: 1 GiB on CPU; on an accelerator a quarter
    of what its ``memory_stats()`` reports free (``bytes_limit - bytes_in_use``), at least 1 GiB
    (4 GiB where the device reports no statistics)."""
    device = device or jax.local_devices()[0]
    if device.platform == "cpu":
        return 1 << 30
    stats = device.memory_stats() or {}
    free = stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0)
    return max(1 << 30, free // 4) if free > 0 else 4 << 30
