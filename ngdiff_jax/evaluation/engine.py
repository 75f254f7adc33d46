"""The compiled programs behind the evaluation runners, and their cache.

* :func:`score_plain`: teacher-forced scoring of right-padded rows (MUSE PrivLeak texts,
  single answers): per row the mean NLL over the scored tokens, every scored token's
  log-prob and whether it was the greedy (argmax) prediction.
* :func:`score_with_prefix`: the same for several answers that share one prompt (TOFU: the
  answer, the paraphrased and the perturbed answers of a question). The prompt is encoded
  once into a KV cache; every answer is then run against the cached prompt, so the prompt's
  tokens are computed once per question instead of once per answer, and the LM head runs
  only on answer positions.
* :func:`generate`: batched greedy decoding (KV cache, stops when every row has emitted EOS)
  from left-padded prompts; a prefix common to every prompt of the batch (a chat template's
  system prompt, MUSE KnowMem's in-context examples) is encoded once and shared by all rows.

The LM head runs in chunks of positions (at most :data:`HEAD_TOKENS` rows x positions at a
time), so a batch of 2048-token texts never holds its full ``[B, T, vocab]`` logits.

Every program is compiled ahead of time once per (model structure, padded shapes) and kept
in a module-level cache shared by every split, phase and model of the same architecture
(checkpoints of one run, the target and the retain model); the first use of a shape is
counted as compile time in :class:`~ngdiff_jax.evaluation.batching.Timings`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ngdiff_jax.backends import for_platform as backend_defaults
from ngdiff_jax.evaluation.batching import Stopwatch, Timings
from ngdiff_jax.models.logprobs import IGNORE_INDEX

#: rows x positions of logits materialized at once by the chunked LM head; None: the backend's
#: (`ngdiff_jax.backends`: 2048 on CPU, ~400 MB at a 49k vocabulary; 16384 on accelerators)
HEAD_TOKENS: int | None = None

#: rows scored whole and generation prompts longer than this are encoded in causal blocks of this many
#: positions (``_score_plain``, ``_prefill``); 0: one block; None: the backend's
#: (`ngdiff_jax.backends.Backend.eval_attention_block`: 256 on CPU, one block on accelerators)
ATTENTION_BLOCK: int | None = None


def _attention_block() -> int | None:
    block = backend_defaults().eval_attention_block if ATTENTION_BLOCK is None else ATTENTION_BLOCK
    return block or None

# (program name, graphdef, shapes/statics) -> compiled executable
_COMPILED: dict = {}


def clear_cache() -> None:
    """Forget every compiled program (tests, or to free memory)."""
    _COMPILED.clear()


def _token_stats(model, hidden, labels, head_tokens):
    """``(nll [B], logp [B, T-1], mask [B, T-1], correct [B, T-1])`` from last-block hidden states
    (the LM head on at most ``head_tokens`` rows x positions at a time)."""
    B, T, _ = hidden.shape
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    safe = jnp.where(mask, targets, 0)
    h = hidden[:, :-1]
    chunk = max(1, head_tokens // B)
    logps, cors = [], []
    for a in range(0, T - 1, chunk):
        b = min(T - 1, a + chunk)
        logits = model.head(h[:, a:b])
        logz = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, safe[:, a:b, None], axis=-1)[..., 0]
        logps.append(picked - logz)
        cors.append(jnp.argmax(logits, axis=-1) == targets[:, a:b])
    logp = jnp.where(mask, jnp.concatenate(logps, axis=1), 0.0)
    correct = jnp.concatenate(cors, axis=1)
    maskf = mask.astype(jnp.float32)
    nll = -logp.sum(-1) / jnp.maximum(maskf.sum(-1), 1.0)
    return nll, logp, maskf, correct


def _lengths_mask(lengths, T):
    return (jnp.arange(T, dtype=jnp.int32)[None, :] < lengths[:, None]).astype(jnp.int32)


def _score_plain(graphdef, state, ids, lengths, labels, *, head_tokens, chunk=None):
    model = nnx.merge(graphdef, state)
    B, T = ids.shape
    valid = _lengths_mask(lengths, T)
    if chunk is None or T <= chunk:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        hidden, _ = model.forward(ids, positions, valid, return_hidden=True)
        return _token_stats(model, hidden, labels, head_tokens)
    # causal blocks: the rows are encoded ``chunk`` positions at a time, each block attending to the
    # keys of the blocks before it (a KV cache that grows by one block) and causally to its own: the
    # masked upper triangle of the [T, T] scores is never computed (about half of it is skipped)
    hs, cache = [], None
    for a in range(0, T, chunk):
        b = min(T, a + chunk)
        grow = model.init_cache(B, b - a)
        cache = grow if cache is None else [
            (jnp.concatenate([k, gk], 1), jnp.concatenate([v, gv], 1)) for (k, v), (gk, gv) in zip(cache, grow)
        ]
        pos = jnp.broadcast_to(jnp.arange(a, b, dtype=jnp.int32), (B, b - a))
        h, cache = model.forward(ids[:, a:b], pos, valid[:, :b], cache, a, return_hidden=True)
        hs.append(h)
    return _token_stats(model, jnp.concatenate(hs, axis=1), labels, head_tokens)


def _score_prefix(graphdef, state, pre_ids, pre_len, ids, lengths, labels, owner, *, head_tokens):
    model = nnx.merge(graphdef, state)
    Bp, P = pre_ids.shape
    B, T = ids.shape
    pre_mask = _lengths_mask(pre_len, P)
    pre_pos = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (Bp, P))
    _, cache = model.forward(pre_ids, pre_pos, pre_mask, model.init_cache(Bp, P), 0,
                             last_only=True, return_hidden=True)  # fmt: skip
    k0 = cache[0][0]
    pad = jnp.zeros((B, T) + k0.shape[2:], k0.dtype)
    rows = [(jnp.concatenate([k[owner], pad], 1), jnp.concatenate([v[owner], pad], 1)) for k, v in cache]
    kv_valid = jnp.concatenate([pre_mask[owner], _lengths_mask(lengths, T)], axis=1)
    positions = pre_len[owner][:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    # padding past the end may run beyond a learned position table (real tokens never do)
    positions = jnp.minimum(positions, model.config.max_position_embeddings - 1)
    hidden, _ = model.forward(ids, positions, kv_valid, rows, P, return_hidden=True)
    return _token_stats(model, hidden, labels, head_tokens)


def _prefill(model, ids, positions, kv_valid, cache, start, block):
    """``model.forward(ids, ..., cache, start, last_only=True)`` over the prompts ``ids [B, R]``; prompts
    longer than ``block`` are encoded in causal blocks, each attending only to the cache slots up to its
    own end (the scores of later, masked slots are never computed)."""
    R = ids.shape[1]
    if block is None or R <= block:
        return model.forward(ids, positions, kv_valid, cache, start, last_only=True)
    for a in range(0, R, block):
        b = min(R, a + block)
        end = start + b
        part = [(k[:, :end], v[:, :end]) for k, v in cache]
        out, part = model.forward(ids[:, a:b], positions[:, a:b], kv_valid[:, :end], part, start + a,
                                  last_only=True, return_hidden=b < R)  # fmt: skip
        cache = [
            (jax.lax.dynamic_update_slice(k, pk, (0, 0, 0, 0)), jax.lax.dynamic_update_slice(v, pv, (0, 0, 0, 0)))
            for (k, v), (pk, pv) in zip(cache, part)
        ]
    return out, cache


def _generate(graphdef, state, shared_ids, shared_len, ids, mask, row_valid, max_new, pad_id, *, eos, n_buf,
              block=None):  # fmt: skip
    model = nnx.merge(graphdef, state)
    B, R = ids.shape
    S0 = shared_ids.shape[1]
    S = S0 + R + n_buf
    mask = mask.astype(jnp.int32)
    if S0:
        smask = _lengths_mask(shared_len[None], S0)  # [1, S0]
        kv1 = jnp.concatenate([smask, jnp.zeros((1, R + n_buf), jnp.int32)], axis=1)
        spos = jnp.arange(S0, dtype=jnp.int32)[None]
        _, cache = model.forward(shared_ids, spos, kv1, model.init_cache(1, S), 0, last_only=True, return_hidden=True)
        cache = [(jnp.broadcast_to(k, (B,) + k.shape[1:]), jnp.broadcast_to(v, (B,) + v.shape[1:])) for k, v in cache]
        base_valid = jnp.broadcast_to(smask, (B, S0))
        base_pos = shared_len
    else:
        cache = model.init_cache(B, S)
        base_valid = jnp.zeros((B, 0), jnp.int32)
        base_pos = jnp.int32(0)
    positions = (base_pos + jnp.where(mask == 1, jnp.cumsum(mask, axis=-1) - 1, 0)).astype(jnp.int32)
    kv_valid = jnp.concatenate([base_valid, mask, jnp.zeros((B, n_buf), jnp.int32)], axis=1)
    eos_arr = jnp.asarray(eos if eos else (-1,), jnp.int32)

    logits, cache = _prefill(model, ids, positions, kv_valid, cache, S0, block)
    tok = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    done = jnp.isin(tok, eos_arr) | ~row_valid
    out = jnp.full((B, n_buf), pad_id, jnp.int32).at[:, 0].set(tok)
    last_pos = positions[:, -1]

    def cond(carry):
        i, _, done, _, _, _ = carry
        return (i + 1 < max_new) & ~jnp.all(done)

    def body(carry):
        i, tok, done, cache, kv_valid, out = carry
        slot = S0 + R + i
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


#: the programs: name -> (function of (graphdef, state, *arrays, **statics), static argument names)
_PROGRAMS = {
    "score": (_score_plain, ("chunk", "head_tokens")),
    "score_prefix": (_score_prefix, ("head_tokens",)),
    "generate": (_generate, ("eos", "n_buf", "block")),
}


def _over_members(fn):
    """``fn`` for a state with a leading member axis: the same rows for every member (``vmap``)."""

    def run(graphdef, state, *args, **statics):
        return jax.vmap(lambda st: fn(graphdef, st, *args, **statics))(state)

    return run


_JITTED: dict = {}


def _program(name: str, members: bool):
    if (name, members) not in _JITTED:
        fn, statics = _PROGRAMS[name]
        _JITTED[name, members] = jax.jit(_over_members(fn) if members else fn, static_argnums=0,
                                         static_argnames=statics)  # fmt: skip
    return _JITTED[name, members]


def placement(tree) -> tuple:
    """Where ``tree``'s arrays live (their shardings): part of a compiled program's key, so a model
    sharded over a mesh never runs a program compiled for one device (or the reverse)."""
    return tuple(getattr(x, "sharding", None) for x in jax.tree_util.tree_leaves(tree))


def _compiled(name, graphdef, args, statics, timings: Timings, phase: str, members: int | None = None):
    key = (name, graphdef, members, tuple(getattr(a, "shape", None) for a in args[1:]),
           tuple(sorted(statics.items())), placement(args[0]))  # fmt: skip
    fn = _COMPILED.get(key)
    if fn is None:
        with Stopwatch() as sw:
            fn = _program(name, members is not None).lower(graphdef, *args, **statics).compile()
        _COMPILED[key] = fn
        timings.add(phase, sw.seconds, compile=True)
    dims = [int(d) for a in args[1:] for d in np.shape(a)]
    timings.add_shape(name, dims + ([statics["n_buf"]] if "n_buf" in statics else []))
    return fn


def _head_tokens(members: int | None) -> int:
    """The LM head's chunk for ``members`` models at once: the members share :data:`HEAD_TOKENS`
    (a batched head materializes every member's logits chunk together)."""
    total = backend_defaults().eval_head_tokens if HEAD_TOKENS is None else HEAD_TOKENS
    return max(1, total // (members or 1))


def _run(fn, args, timings: Timings, phase: str):
    with Stopwatch() as sw:
        out = jax.device_get(fn(*args))
    timings.add(phase, sw.seconds, compile=False)
    return out


def score_plain(graphdef, state, ids, lengths, labels, *, timings: Timings, phase: str, members: int | None = None):
    """Stats of right-padded rows ``ids [B, T]`` (``lengths`` real tokens each; ``labels`` -100 = not scored).
    ``members``: ``state`` holds that many models (a leading axis), every output gains that axis."""
    args = (state, jnp.asarray(ids, jnp.int32), jnp.asarray(lengths, jnp.int32), jnp.asarray(labels, jnp.int32))
    fn = _compiled("score", graphdef, args, {"chunk": _attention_block(), "head_tokens": _head_tokens(members)},
                   timings, phase, members)  # fmt: skip
    return _run(fn, args, timings, phase)


def score_with_prefix(graphdef, state, pre_ids, pre_len, ids, lengths, labels, owner, *, timings: Timings, phase: str,
                      members: int | None = None):  # fmt: skip
    """Stats of answer rows ``ids [B, T]`` continuing the right-padded prompts ``pre_ids [Bp, P]``
    (row ``i`` continues prompt ``owner[i]``; ``pre_len`` real prompt tokens each)."""
    args = (state, *(jnp.asarray(a, jnp.int32) for a in (pre_ids, pre_len, ids, lengths, labels, owner)))
    fn = _compiled("score_prefix", graphdef, args, {"head_tokens": _head_tokens(members)}, timings, phase, members)
    return _run(fn, args, timings, phase)


def generate(graphdef, state, shared_ids, shared_len, ids, mask, row_valid, *, max_new_tokens, pad_id, eos,
             n_buf, timings: Timings, phase: str, members: int | None = None) -> np.ndarray:
    """Greedy tokens ``[B, n_buf]`` (first ``max_new_tokens`` meaningful) after ``shared + ids[b]``.

    ``shared_ids [1, S0]`` (``shared_len`` real tokens, right-padded; ``S0 = 0`` for none) is the
    prefix common to every row; ``ids``/``mask [B, R]`` the rest of each prompt, left-padded.
    """
    args = (
        state, jnp.asarray(shared_ids, jnp.int32), jnp.int32(shared_len), jnp.asarray(ids, jnp.int32),
        jnp.asarray(mask, jnp.int32), jnp.asarray(row_valid, bool), jnp.int32(max_new_tokens), jnp.int32(pad_id),
    )  # fmt: skip
    statics = {"eos": tuple(eos), "n_buf": int(n_buf), "block": _attention_block()}
    fn = _compiled("generate", graphdef, args, statics, timings, phase, members)
    return _run(fn, args, timings, phase)
