"""The portable backend: the `Backend` class (plain JAX primitives and the accelerator defaults)
and `forward_mode`. The platform packages (`ngdiff_jax.backends.cpu`) build on it; the dispatch
(`ngdiff_jax.backends.for_platform`, `resolve`) lives in the package and imports them."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

__all__ = ["Backend", "ENV_VAR", "NAMES", "forward_mode"]

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
    #: `ngdiff eval` runs the blocks as one scan (``CausalLM(scan_layers=True)``): one block compiled
    #: instead of one per layer, but on XLA:CPU each decoded token takes 1.54x as long (docs/PERFORMANCE.md),
    #: so off until measured better on a backend
    eval_scan_layers: bool = False
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
