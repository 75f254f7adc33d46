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

import dataclasses
import os

import jax
import jax.numpy as jnp

__all__ = ["Backend", "NAMES", "for_platform", "forward_mode", "kv_cache_budget", "resolve"]

Array = jax.Array
NAMES = ("xla", "cpu_fast")
ENV_VAR = "NGDIFF_KERNELS"


def forward_mode(*trees) -> bool:
    """Whether forward-mode autodiff (``jax.jvp``, ``jacfwd``, a Hessian-vector product) traces
    any array of ``trees``: ``custom_vjp`` kernels support reverse mode only."""
    for x in jax.tree.leaves(trees):
        depth = 0
        while isinstance(x, jax.core.Tracer) and depth < 16:
            if type(x).__name__ == "JVPTracer":
                return True
            x = getattr(x, "primal", getattr(x, "val", None))
            depth += 1
    return False


@dataclasses.dataclass(frozen=True)
class Backend:
    """The portable backend: plain JAX primitives and the accelerator defaults (module docstring)."""

    platform: str = "gpu"
    name: str = "xla"
    head_chunk_elements: int = 1 << 27
    log_every: int = 10
    compute: str = "bfloat16"
    eval_attention_block: int | None = None
    eval_head_tokens: int = 16384
    #: bfloat16 parameters cross a donated jitted step's boundary as their bits (`ShardedStep`)
    bits_params: bool = False

    # ------------------------------------------------------------------ defaults
    def attention(self, dtype) -> str:
        """The attention implementation (`ngdiff_jax.models.attention`) for a compute ``dtype``."""
        if self.platform == "cpu":
            return "einsum"
        if self.platform in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            return "cudnn"
        return "xla"

    def portable(self) -> Backend:
        """This platform's defaults with the portable primitives (what forward-mode autodiff runs)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(Backend)}
        return Backend(**{**fields, "name": "xla"})

    # ------------------------------------------------------------------ the model's primitives
    def einsums(self, eqs, x: Array, ws, preferred_element_type=None, *, late: bool = True) -> list[Array]:
        """``[jnp.einsum(eq, x, w, preferred_element_type=...) for eq, w in zip(eqs, ws)]``: the
        projections that read the same ``x`` (``late``: a hint for backends that schedule weight
        conversions; unused here)."""
        del late
        return [jnp.einsum(eq, x, w, preferred_element_type=preferred_element_type) for eq, w in zip(eqs, ws)]

    def gated_down(self, act, gate: Array, up: Array, w: Array) -> Array:
        """``einsum("btm,me->bte", act(gate) * up, w)``: a gated MLP's down projection."""
        return jnp.einsum("btm,me->bte", act(gate) * up, w)

    def lookup(self, table: Array, ids: Array) -> Array:
        """``jnp.take(table, ids, axis=0)``; the gradient sums the rows of repeated ids in float32
        for a 16-bit table (a lookup in a float32 view, rounded to the table's dtype once)."""
        if jnp.dtype(table.dtype).itemsize >= 4:
            return jnp.take(table, ids, axis=0)
        return jnp.take(table.astype(jnp.float32), ids, axis=0).astype(table.dtype)

    def head_logprobs(self, x, w, bias, targets, *, vocab_major, token_chunk, chunk_elements, compute_dtype):
        """A fused LM-head log-prob kernel, or None for the model's own chunked loop (here)."""
        return None

    def remat_block(self, run, state, x: Array, positions: Array, kv_valid: Array) -> Array:
        """``run(state, x, positions, kv_valid)``: one ``jax.checkpoint``-ed decoder block."""
        return run(state, x, positions, kv_valid)

    def remat_scan(self, block, trained, frozen, x: Array, aux):
        """A fully rematerialized scan over stacked blocks, or None for ``lax.scan`` over
        ``jax.checkpoint`` (here)."""
        return None

    def settle_tied_embedding(self, w: Array) -> Array:
        """The tied embedding of a stacked-layout model before it is read twice (lookup and head)."""
        return w

    # ------------------------------------------------------------------ the step's order and carriage
    def after(self, tree, done: Array):
        """``tree``, unchanged in value, computed from only once the scalar ``done`` is: the step
        runs its second task after the first task's gradient norm (one task's activations alive at
        a time), GeN its second probe after the first (one shifted point at a time).

        A data dependency: every numeric leaf plus ``where(done < -inf, 1, 0)`` (never true, NaN
        included), which no compiler can reorder or drop. An ``optimization_barrier`` is not
        enough: XLA:CPU drops it before scheduling (the step's temporaries: 252 MB with it or
        without any ordering, 126 MB with this; tests/test_memory_lean.py), and what a GPU
        compiler does with it has not been measured."""
        dep = done < -jnp.inf

        def leaf(x):
            x = jnp.asarray(x)
            return x + jnp.where(dep, 1, 0).astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.number) else x

        return jax.tree.map(leaf, tree)

    def carry(self, x: Array, dep: Array | None = None) -> Array:
        """``x`` as it crosses a ``lax.cond``, a loop or a jit boundary (here: as it is). A backend
        may change its representation (the CPU backend: a bfloat16 array as its bits, made after
        ``dep`` where given); `uncarry` undoes it."""
        return x

    def uncarry(self, x: Array) -> Array:
        """`carry`'s inverse (here: ``x`` as it is)."""
        return x

    # ------------------------------------------------------------------ host-side hooks
    def owned(self, x: Array) -> Array:
        """``x`` in a buffer a jitted step can donate (loaded weights)."""
        return x

    def release_host_memory(self) -> None:
        """Between compiling and running a step, and between steps: return freed host memory."""


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
