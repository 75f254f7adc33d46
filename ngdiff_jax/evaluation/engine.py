"""The compiled programs behind the evaluation runners, and their cache.

* :func:`score_plain`: teacher-forced scoring of right-padded rows (MUSE PrivLeak texts,
  single answers): per row the mean NLL over the scored tokens, every scored token's
  log-prob and whether it was the greedy (argmax) prediction.
* :func:`score_packed`: the same for short examples packed several to a row, those that share
  a prompt (TOFU: a question's answer, paraphrased and perturbed answers) after one copy of it,
  each continuation attending to the prompt and to itself only (:func:`packed_mask`). The prompt's
  tokens are computed once per question instead of once per answer, and rows carry little
  padding, whatever the lengths of their examples: one compiled shape for a whole evaluation.
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

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ngdiff_jax.backends import for_platform as backend_defaults
from ngdiff_jax.evaluation.batching import Stopwatch, Timings
from ngdiff_jax.models import kv_cache
from ngdiff_jax.models.generation import greedy_decode
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


def distribution_stats(logits):
    """Per position, the mean ``mu = E_v[log p(v)]`` and variance ``sigma = E_v[log p(v)^2] - mu^2``
    of the log-prob under the model's next-token distribution (Min-K%++'s normalizers), in float32.
    As open-unlearning computes them (its uncentered variance carries ~1e-5 of float32 cancellation)."""
    lsm = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    p = jnp.exp(lsm)
    mu = (p * lsm).sum(-1)
    return mu, (p * jnp.square(lsm)).sum(-1) - jnp.square(mu)


def _position_stats(model, hidden, targets, head_tokens, dist=False):
    """``(logp, mask, correct)``, each ``[B, T]``, of hidden states ``[B, T, E]`` whose position ``t``
    predicts ``targets[:, t]`` (``IGNORE_INDEX``: not scored): the LM head on at most ``head_tokens``
    rows x positions at a time. ``dist``: also ``mu``, ``sigma`` (:func:`distribution_stats`, for the
    Min-K%++ attack; several passes over the logits, so only when asked)."""
    B, T, _ = hidden.shape
    mask = targets != IGNORE_INDEX
    safe = jnp.where(mask, targets, 0)
    chunk = max(1, head_tokens // B)
    logps, cors, mus, sigmas = [], [], [], []
    for a in range(0, T, chunk):
        b = min(T, a + chunk)
        logits = model.head(hidden[:, a:b]).astype(jnp.float32)
        logz = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, safe[:, a:b, None], axis=-1)[..., 0]
        logps.append(picked - logz)
        cors.append(jnp.argmax(logits, axis=-1) == targets[:, a:b])
        if dist:
            mu, sigma = distribution_stats(logits)
            mus.append(mu)
            sigmas.append(sigma)
    logp = jnp.where(mask, jnp.concatenate(logps, axis=1), 0.0)
    cat = partial(jnp.concatenate, axis=1)
    out = (logp, mask.astype(jnp.float32), cat(cors))
    return out + (cat(mus), cat(sigmas)) if dist else out


def _token_stats(model, hidden, labels, head_tokens, dist=False):
    """``(nll [B], logp, mask, correct[, mu, sigma])`` (all but ``nll`` ``[B, T-1]``) of right-padded
    rows from their last-block hidden states and ``labels`` aligned with the inputs."""
    out = _position_stats(model, hidden[:, :-1], labels[:, 1:], head_tokens, dist)
    nll = -out[0].sum(-1) / jnp.maximum(out[1].sum(-1), 1.0)
    return (nll, *out)


def packed_mask(group, part, positions, sliding_window=None):
    """The attention mask ``[B, T, T]`` of packed rows: position ``t`` attends to ``s <= t`` of the
    same ``group`` (a shared prompt and its continuations) that is either the group's prompt
    (``part == 0``) or its own continuation (the same ``part``); every position attends to itself
    (padding included, so no row of the mask is empty). ``sliding_window``: also ``positions[t] -
    positions[s] < window`` (the positions each token has in its own, unpacked example)."""
    T = group.shape[1]
    causal = jnp.arange(T)[None, :] <= jnp.arange(T)[:, None]
    same = group[:, :, None] == group[:, None, :]
    own = (part[:, None, :] == 0) | (part[:, None, :] == part[:, :, None])
    mask = same & own & causal[None]
    if sliding_window is not None:
        mask = mask & (positions[:, :, None] - positions[:, None, :] < sliding_window)
    return mask | jnp.eye(T, dtype=bool)[None]


def _lengths_mask(lengths, T):
    return (jnp.arange(T, dtype=jnp.int32)[None, :] < lengths[:, None]).astype(jnp.int32)


def _score_plain(graphdef, state, ids, lengths, labels, *, head_tokens, chunk=None, dist=False):
    model = nnx.merge(graphdef, state)
    B, T = ids.shape
    valid = _lengths_mask(lengths, T)
    if chunk is None or T <= chunk:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        hidden, _ = model.forward(ids, positions, valid, return_hidden=True)
        return _token_stats(model, hidden, labels, head_tokens, dist)
    # causal blocks: the rows are encoded ``chunk`` positions at a time, each block attending to the
    # keys of the blocks before it (a KV cache that grows by one block) and causally to its own: the
    # masked upper triangle of the [T, T] scores is never computed (about half of it is skipped)
    hs, cache = [], None
    for a in range(0, T, chunk):
        b = min(T, a + chunk)
        grow = model.init_cache(B, b - a)
        cache = grow if cache is None else kv_cache.concat(cache, grow)
        pos = jnp.broadcast_to(jnp.arange(a, b, dtype=jnp.int32), (B, b - a))
        h, cache = model.forward(ids[:, a:b], pos, valid[:, :b], cache, a, return_hidden=True)
        hs.append(h)
    return _token_stats(model, jnp.concatenate(hs, axis=1), labels, head_tokens, dist)


def _score_packed(graphdef, state, ids, positions, group, part, targets, *, head_tokens, dist=False):
    model = nnx.merge(graphdef, state)
    mask = packed_mask(group, part, positions, model.config.sliding_window)
    hidden, _ = model.forward(ids, positions, mask, return_hidden=True)
    return _position_stats(model, hidden, targets, head_tokens, dist)


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
        part = kv_cache.slots(cache, end)
        out, part = model.forward(ids[:, a:b], positions[:, a:b], kv_valid[:, :end], part, start + a,
                                  last_only=True, return_hidden=b < R)  # fmt: skip
        cache = kv_cache.write(cache, part)
    return out, cache


def _teacher_forced(model, last_logits, cache, kv_valid, last_pos, teach, start, pad_id, head_tokens):
    """``(logp, mask, correct)``, each ``[B, G]``, of the tokens ``teach [B, G]`` (``IGNORE_INDEX``
    padding) continuing prompts whose last logits are ``last_logits [B, V]`` and whose KV cache fills
    ``cache``'s first ``start`` slots (``kv_valid [B, start]``): the prompt is not encoded again."""
    B, G = teach.shape
    valid = teach != IGNORE_INDEX
    safe0 = jnp.where(valid[:, 0], teach[:, 0], 0)
    lp0 = jnp.take_along_axis(last_logits, safe0[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(last_logits, axis=-1)
    first = (jnp.where(valid[:, 0], lp0, 0.0), valid[:, 0].astype(jnp.float32),
             jnp.argmax(last_logits, axis=-1) == teach[:, 0])  # fmt: skip
    if G == 1:
        return tuple(x[:, None] for x in first)
    inputs = jnp.where(valid[:, :-1], teach[:, :-1], pad_id)
    part = kv_cache.padded(cache, start, G - 1)
    kvv = jnp.concatenate([kv_valid, jnp.ones((B, G - 1), jnp.int32)], axis=1)
    pos = last_pos[:, None] + 1 + jnp.arange(G - 1, dtype=jnp.int32)[None, :]
    pos = jnp.minimum(pos, model.config.max_position_embeddings - 1)  # padding past a learned position table
    hidden, _ = model.forward(inputs, pos, kvv, part, start, return_hidden=True)
    logp, mask, correct = _position_stats(model, hidden, teach[:, 1:], head_tokens)
    return tuple(jnp.concatenate([a[:, None], b], axis=1) for a, b in zip(first, (logp, mask, correct)))


def _generate(graphdef, state, shared_ids, shared_len, ids, mask, row_valid, max_new, pad_id, teach=None, *, eos,
              n_buf, block=None, head_tokens=None):  # fmt: skip
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
        cache = kv_cache.broadcast(cache, B)
        base_valid = jnp.broadcast_to(smask, (B, S0))
        base_pos = shared_len
    else:
        cache = model.init_cache(B, S)
        base_valid = jnp.zeros((B, 0), jnp.int32)
        base_pos = jnp.int32(0)
    positions = (base_pos + jnp.where(mask == 1, jnp.cumsum(mask, axis=-1) - 1, 0)).astype(jnp.int32)
    kv_valid = jnp.concatenate([base_valid, mask, jnp.zeros((B, n_buf), jnp.int32)], axis=1)

    logits, cache = _prefill(model, ids, positions, kv_valid, cache, S0, block)
    last_pos = positions[:, -1]
    forced = None
    if teach is not None:  # the given continuations teacher-forced on the prompts' cache (MUSE VerbMem)
        forced = _teacher_forced(model, logits[:, -1].astype(jnp.float32), cache, kv_valid[:, : S0 + R], last_pos,
                                 teach, S0 + R, pad_id, head_tokens)  # fmt: skip
    out = greedy_decode(model, logits[:, -1], cache, kv_valid, last_pos, S0 + R, row_valid, max_new, pad_id,
                        eos=eos, n_buf=n_buf)  # fmt: skip
    return out if forced is None else (out, *forced)


#: the programs: name -> (function of (graphdef, state, *arrays, **statics), static argument names)
_PROGRAMS = {
    "score": (_score_plain, ("chunk", "head_tokens", "dist")),
    "score_packed": (_score_packed, ("head_tokens", "dist")),
    "generate": (_generate, ("eos", "n_buf", "block", "head_tokens")),
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


def score_plain(graphdef, state, ids, lengths, labels, *, timings: Timings, phase: str, members: int | None = None,
                dist: bool = False):  # fmt: skip
    """Stats of right-padded rows ``ids [B, T]`` (``lengths`` real tokens each; ``labels`` -100 = not scored):
    ``(nll, logp, mask, correct)``, with ``dist`` also ``(mu, sigma)`` (:func:`distribution_stats`).
    ``members``: ``state`` holds that many models (a leading axis), every output gains that axis."""
    args = (state, jnp.asarray(ids, jnp.int32), jnp.asarray(lengths, jnp.int32), jnp.asarray(labels, jnp.int32))
    statics = {"chunk": _attention_block(), "head_tokens": _head_tokens(members), "dist": bool(dist)}
    fn = _compiled("score", graphdef, args, statics, timings, phase, members)
    return _run(fn, args, timings, phase)


def score_packed(graphdef, state, ids, positions, group, part, targets, *, timings: Timings, phase: str,
                 members: int | None = None, dist: bool = False):  # fmt: skip
    """``(logp, mask, correct)`` (with ``dist`` also ``mu, sigma``), each ``[B, T]``, of packed rows
    ``ids [B, T]``: several examples per row, those sharing a prompt after one copy of it
    (:func:`packed_mask`); ``positions`` each token's position in its own example, ``targets`` the
    token each position predicts."""
    args = (state, *(jnp.asarray(a, jnp.int32) for a in (ids, positions, group, part, targets)))
    statics = {"head_tokens": _head_tokens(members), "dist": bool(dist)}
    fn = _compiled("score_packed", graphdef, args, statics, timings, phase, members)
    return _run(fn, args, timings, phase)


def generate(graphdef, state, shared_ids, shared_len, ids, mask, row_valid, *, max_new_tokens, pad_id, eos,
             n_buf, timings: Timings, phase: str, members: int | None = None, teach=None):  # fmt: skip
    """Greedy tokens ``[B, n_buf]`` (first ``max_new_tokens`` meaningful) after ``shared + ids[b]``.

    ``shared_ids [1, S0]`` (``shared_len`` real tokens, right-padded; ``S0 = 0`` for none) is the
    prefix common to every row; ``ids``/``mask [B, R]`` the rest of each prompt, left-padded.
    ``teach [B, G]`` (right-padded with ``IGNORE_INDEX``): given continuations, teacher-forced on the
    prompts' KV cache; the result is then ``(tokens, logp, mask, correct)``, the last three ``[B, G]``
    for those continuations' tokens.
    """
    args = (
        state, jnp.asarray(shared_ids, jnp.int32), jnp.int32(shared_len), jnp.asarray(ids, jnp.int32),
        jnp.asarray(mask, jnp.int32), jnp.asarray(row_valid, bool), jnp.int32(max_new_tokens), jnp.int32(pad_id),
        None if teach is None else jnp.asarray(teach, jnp.int32),
    )  # fmt: skip
    statics = {"eos": tuple(eos), "n_buf": int(n_buf), "block": _attention_block(),
               "head_tokens": _head_tokens(members)}  # fmt: skip
    fn = _compiled("generate", graphdef, args, statics, timings, phase, members)
    return _run(fn, args, timings, phase)
