"""The backend boundary: one object, chosen once per platform and passed in, holds what differs.

A `Backend` is two things:

* **the platform's defaults** for settings left at ``None`` (table below);
* **the model's compute primitives** (`Backend.einsums`, `gated_down`, `lookup`, `head_logprobs`,
  `remat_block`, `remat_scan`) and **the step's ordering and carriage** (`Backend.after`,
  `carry` / `uncarry`: how the step, GeN and the layer scan order their work and pass arrays
  through conditionals, loops and the jit boundary), written here once against ``jnp`` / ``lax`` /
  ``jax.checkpoint``: every transform works, forward-mode autodiff included.

`for_platform` picks the object from a platform name (``jax.default_backend()`` by default);
`resolve` takes what a user passes (``None``, a name, or a `Backend`). A model stores its
backend at construction (``CausalLM(..., backend=)``, a static attribute of every module that
computes), and so do the step (`ngdiff_jax.training.make_unlearn_step`), the optimizer
(`ngdiff_jax.optim.unlearning_optimizer`, `scale_by_gen`) and the sharded step (``backend=``;
``None`` is `for_platform`'s at construction), so nothing reads the platform or a context
variable while tracing.

The XLA:CPU workarounds live in one package, `ngdiff_jax.backends.cpu`: its ``CPUFast`` subclass
overrides the primitives with hand-written ``custom_vjp`` kernels (reverse mode only; under
forward-mode autodiff each falls back to the portable method). Deleting that package leaves a
correct, slower library: `for_platform("cpu")` then gives the portable backend.

============================  ======================  ==========================================
setting                       CPU (``CPUFast``)        GPU / TPU (portable)
============================  ======================  ==========================================
``name`` (``model.kernels``)  ``"cpu_fast"``          ``"xla"``
``attention``                 ``"einsum"``            ``"cudnn"`` on GPU for 16-bit compute,
                                                      ``"xla"`` otherwise
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

``NGDIFF_KERNELS=xla`` makes the default backend the portable one on any platform.

>>> for_platform("cpu").head_chunk_elements == 1 << 22
True
>>> for_platform("gpu").attention("bfloat16"), for_platform("gpu").attention("float32"), for_platform("tpu").log_every
('cudnn', 'xla', 10)
>>> resolve("fast")
Traceback (most recent call last):
...
ValueError: backend='fast' is not one of 'xla', 'cpu_fast' (or a Backend, or None for the platform's)
"""

from __future__ import annotations

import os

import jax

from ngdiff_jax.backends.base import ENV_VAR, NAMES, Backend, forward_mode

__all__ = ["ENV_VAR", "NAMES", "Backend", "for_platform", "forward_mode", "kv_cache_budget", "resolve"]

def _cpu():
    try:
        from ngdiff_jax.backends.cpu import CPUFast
    except ImportError:  # the CPU package deleted: the portable backend with CPU sizes
        return None
    return CPUFast()


def for_platform(platform: str | None = None) -> Backend:
    """The backend of ``platform`` (``"cpu"``, ``"gpu"``/``"cuda"``, ``"tpu"``, ...; ``None``:
    ``jax.default_backend()``), honoring ``$NGDIFF_KERNELS``."""
    platform = platform or jax.default_backend()
    env = os.environ.get(ENV_VAR)
    if env and env not in NAMES:
        raise ValueError(f"{ENV_VAR}={env!r} is not one of 'xla', 'cpu_fast' (unset it for the backend default)")
    if platform == "cpu":
        cpu = _cpu()
        if cpu is None:
            return Backend("cpu", head_chunk_elements=1 << 22, log_every=1, compute="float32",
                           eval_attention_block=256, eval_head_tokens=2048)  # fmt: skip
        return cpu.portable() if env == "xla" else cpu
    if env == "cpu_fast":
        raise ValueError(f"{ENV_VAR}=cpu_fast runs on the CPU backend only (this is {platform!r}); unset it.")
    return Backend(platform)


def resolve(backend: Backend | str | None, platform: str | None = None) -> Backend:
    """A `Backend` from ``None`` (`for_platform`), a name (``"xla"``: the portable primitives with
    the platform's defaults; ``"cpu_fast"``: the XLA:CPU kernels) or a `Backend` (as is)."""
    if isinstance(backend, Backend):
        return backend
    if backend is None:
        return for_platform(platform)
    if backend == "xla":
        return for_platform(platform).portable()
    if backend == "cpu_fast":
        cpu = _cpu()
        if cpu is None:
            raise ValueError("backend='cpu_fast' needs the package ngdiff_jax.backends.cpu, which is not installed; "
                             "use backend='xla'.")  # fmt: skip
        return cpu
    raise ValueError(f"backend={backend!r} is not one of 'xla', 'cpu_fast' (or a Backend, or None for the platform's)")


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
