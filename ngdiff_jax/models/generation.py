"""Batched greedy generation with a KV cache, matching transformers' greedy ``generate``.

One jitted program per (batch bucket, prompt-length bucket, new-token bucket, eos ids):
prefill writes the (left-padded) prompt into a fixed-size cache and picks the first
token from the last position; a ``lax.while_loop`` then decodes one token per step and
stops early once every row has emitted EOS. As in transformers:

* positions are ``cumsum(attention_mask) - 1`` with 0 at pads, then ``last + 1`` per step;
* a row that has emitted EOS gets ``pad_token_id`` from then on (still fed to the model,
  which does not affect other rows).

Prompts are left-padded further to the bucket length (extra masked slots change nothing)
so repeated calls with different lengths reuse compiled code.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ngdiff_jax.models.modeling import CausalLM


def _bucket(n: int, minimum: int = 8) -> int:
    n = max(int(n), 1)
    if n <= 256:
        b = minimum
        while b < n:
            b *= 2
        return b
    return -(-n // 256) * 256


@partial(jax.jit, static_argnames=("graphdef", "eos", "n_buf"))
def _generate_jit(graphdef, state, input_ids, attention_mask, row_valid, max_new, pad_id, *, eos, n_buf):
    model: CausalLM = nnx.merge(graphdef, state)
    B, P = input_ids.shape
    S = P + n_buf
    mask = attention_mask.astype(jnp.int32)
    positions = jnp.where(mask == 1, jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)
    cache = model.init_cache(B, S)
    kv_valid = jnp.concatenate([mask, jnp.zeros((B, n_buf), jnp.int32)], axis=1)
    logits, cache = model.forward(input_ids, positions, kv_valid, cache, 0, last_only=True)
    return greedy_decode(model, logits[:, -1], cache, kv_valid, positions[:, -1], P, row_valid, max_new, pad_id,
                         eos=eos, n_buf=n_buf)  # fmt: skip


def greedy_decode(model: CausalLM, first_logits, cache, kv_valid, last_pos, start, row_valid, max_new, pad_id, *,
                  eos: tuple, n_buf: int):  # fmt: skip
    """The greedy decode loop after a prefill: tokens ``[B, n_buf]``, the first ``max_new`` meaningful.

    ``first_logits [B, V]`` are the prompts' last logits; ``cache`` holds them in its first ``start``
    slots (``kv_valid [B, S]``, later slots 0) and has ``n_buf`` free slots after them; ``last_pos``
    is each row's last prompt position. A ``lax.while_loop`` feeds one token per step and stops
    once every row has emitted an ``eos`` id (rows with ``row_valid`` False count as done); a row
    that has emitted EOS gets ``pad_id`` from then on, as transformers' greedy ``generate``. The one
    decode loop of the library (`ngdiff_jax.evaluation.engine` prefills its own way and calls it)."""
    B = first_logits.shape[0]
    eos_arr = jnp.asarray(eos if eos else (-1,), jnp.int32)
    tok = jnp.argmax(first_logits, axis=-1).astype(jnp.int32)
    done = jnp.isin(tok, eos_arr) | ~row_valid
    out = jnp.full((B, n_buf), pad_id, jnp.int32).at[:, 0].set(tok)

    def cond(carry):
        i, _, done, _, _, _ = carry
        return (i + 1 < max_new) & ~jnp.all(done)

    def body(carry):
        i, tok, done, cache, kv_valid, out = carry
        slot = start + i
        kv_valid = jax.lax.dynamic_update_slice(kv_valid, jnp.ones((B, 1), jnp.int32), (0, slot))
        pos = (last_pos + 1 + i)[:, None]
        logits, cache = model.forward(tok[:, None], pos, kv_valid, cache, slot, last_only=True)
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        nxt = jnp.where(done, pad_id, nxt)
        done = done | jnp.isin(nxt, eos_arr)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i + 1))
        return i + 1, nxt, done, cache, kv_valid, out

    carry = jax.lax.while_loop(cond, body, (jnp.int32(0), tok, done, cache, kv_valid, out))
    return carry[-1]


def generate(model: CausalLM, input_ids, attention_mask=None, *, max_new_tokens: int,
             eos_token_id=None, pad_token_id: int | None = None) -> np.ndarray:
    """Greedy continuation ``[B, max_new_tokens]`` of left-padded prompts (int32 numpy).

    ``eos_token_id`` (int or list; default the model config's) stops a row; positions after
    it hold ``pad_token_id`` (default the config's, else the first EOS id, else 0).
    """
    ids = np.asarray(input_ids, dtype=np.int32)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, time], got shape {ids.shape}")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int32)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} does not match input_ids shape {ids.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if (mask[:, -1] == 0).any():
        raise ValueError("generation prompts must be left-padded: the last column of attention_mask has zeros")
    cfg = model.config
    if eos_token_id is None:
        eos = cfg.eos_ids
    elif isinstance(eos_token_id, (int, np.integer)):
        eos = (int(eos_token_id),)
    else:
        eos = tuple(int(e) for e in eos_token_id)
    if pad_token_id is None:
        pad_token_id = cfg.pad_id if cfg.pad_id is not None else (eos[0] if eos else 0)
    B, T = ids.shape
    Bb, Tb, Nb = _bucket(B, 1) if B <= 8 else -(-B // 8) * 8, _bucket(T), _bucket(max_new_tokens)
    pos_limit = cfg.max_position_embeddings if cfg.position_embedding == "learned" else None
    if pos_limit is not None and int(mask.sum(1).max()) + max_new_tokens > pos_limit:
        raise ValueError(f"prompt + max_new_tokens exceeds max_position_embeddings={pos_limit}")
    fill = pad_token_id
    ids_p = np.full((Bb, Tb), fill, np.int32)
    mask_p = np.zeros((Bb, Tb), np.int32)
    ids_p[:B, Tb - T:] = ids
    mask_p[:B, Tb - T:] = mask
    if Bb > B:  # dummy rows: one real token so they are well defined
        mask_p[B:, -1] = 1
    graphdef, state = nnx.split(model)
    row_valid = jnp.asarray(np.arange(Bb) < B)
    out = _generate_jit(graphdef, state, jnp.asarray(ids_p), jnp.asarray(mask_p), row_valid,
                        jnp.int32(max_new_tokens), jnp.int32(pad_token_id), eos=eos, n_buf=Nb)
    return np.asarray(out)[:B, :max_new_tokens]
