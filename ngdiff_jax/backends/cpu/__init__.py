"""XLA:CPU's backend: every workaround for XLA:CPU, behind one object (`CPUFast`).

`CPUFast` is the CPU platform's `ngdiff_jax.backends.Backend`: the CPU defaults (cache-sized
head chunks, a sync per logged step is free, float32 compute, 256-position attention blocks in
evaluation) and the hand-written kernels of `ngdiff_jax.backends.cpu.kernels` (2-D token matmuls
with row-major weight gradients, a SwiGLU down projection that recomputes its product, an
embedding lookup and an LM head whose gradients hold no float32 ``[V, E]`` buffers, remat whose
recomputation waits for its cotangent, a layer scan whose weights cross the loops as bits) and
the carriage of `ngdiff_jax.backends.cpu.ordering` (bfloat16 across GeN's conditional, the layer
scan and the jit boundary as bits).
docs/PERFORMANCE.md measures each. They are ``custom_vjp``s: under forward-mode autodiff
(``jax.jvp``, ``jacfwd``, Hessian-vector products) every method falls back to the portable one
(the same values), so forward mode works by default.

Deleting this package leaves a correct, slower library (`ngdiff_jax.backends.for_platform`
then gives the portable backend on CPU).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ngdiff_jax.backends.base import Backend, forward_mode
from ngdiff_jax.backends.cpu import host_memory, kernels, ordering
from ngdiff_jax.bits import from_bits

__all__ = ["CPUFast"]


@dataclasses.dataclass(frozen=True)
class CPUFast(Backend):
    platform: str = "cpu"
    name: str = "cpu_fast"
    head_chunk_elements: int = 1 << 22
    log_every: int = 1
    compute: str = "float32"
    eval_attention_block: int | None = 256
    eval_head_tokens: int = 2048
    bits_params: bool = True

    def einsums(self, eqs, x, ws, preferred_element_type=None, *, late: bool = True):
        if forward_mode(x, ws):
            return super().einsums(eqs, x, ws, preferred_element_type)
        return kernels.token_einsums(eqs, x, ws, preferred_element_type, late=late)

    def gated_down(self, act, gate, up, w):
        if act is not jax.nn.silu or forward_mode(gate, up, w):
            return super().gated_down(act, gate, up, w)
        B, T, M = gate.shape
        return kernels.swiglu_down(gate.reshape(B * T, M), up.reshape(B * T, M), w).reshape(B, T, -1)

    def lookup(self, table, ids):
        if table.ndim != 2 or jnp.dtype(table.dtype).itemsize >= 4 or forward_mode(table):
            return super().lookup(table, ids)
        return kernels.lookup(table, ids)

    def head_logprobs(self, x, w, bias, targets, *, vocab_major, token_chunk, chunk_elements, compute_dtype):
        # bfloat16 only: for a float32 head it saved 58 MB without remat but cost 195 MB with remat
        if jnp.dtype(compute_dtype) != jnp.dtype(jnp.bfloat16) or forward_mode(x, w, bias):
            return None
        return kernels.head_logprobs(x, w, bias, targets, vocab_major=vocab_major, token_chunk=token_chunk,
                                     chunk_elements=chunk_elements)  # fmt: skip

    def remat_block(self, run, state, x, positions, kv_valid):
        if forward_mode(state, x):
            return run(state, x, positions, kv_valid)
        return kernels.recompute_late(run, state, x, positions, kv_valid)

    def remat_scan(self, block, trained, frozen, x, aux):
        if forward_mode(trained, x):
            return None
        return kernels.remat_scan(block, trained, frozen, x, aux)

    def settle_tied_embedding(self, w):
        return w if forward_mode(w) else ordering.settled(w)

    def carry(self, x, dep=None):
        if forward_mode(x):  # bits carry no derivative
            return x
        return ordering.carry(x, dep)

    def uncarry(self, x):
        return from_bits(x)

    def owned(self, x):
        return host_memory.owned(x)

    def release_host_memory(self):
        host_memory.release_freed_memory()
