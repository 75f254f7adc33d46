"""Batched greedy generation of texts for the ROUGE metrics.

Prompts are sorted by length, grouped into fixed-size batches (the last one filled
with copies of a real prompt, which are not decoded further), left-padded to a length
bucket and decoded greedily with a KV cache (:func:`ngdiff_jax.evaluation.engine.generate`,
the same algorithm as ``ngdiff_jax.models.generate``); the prefix common to every prompt
of a batch (a chat template's system prompt, MUSE KnowMem's in-context examples) is
encoded once for the whole batch. Each generation is decoded with special tokens
skipped and tokenization spaces cleaned up (:func:`~ngdiff_jax.evaluation.metrics.decode_text`),
cut at the stop strings and stripped, as open-unlearning does (it also cuts at the EOS
token's text; here the tokens from the first EOS on are dropped before decoding).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ngdiff_jax.backends import kv_cache_budget
from ngdiff_jax.evaluation import engine
from ngdiff_jax.evaluation.batching import Timings, bucket_length, length_sorted_batches
from ngdiff_jax.evaluation.metrics import cut_at_stop_strings, decode_text

#: shortest common prompt prefix encoded once per batch
MIN_SHARED_PREFIX = 16
#: most bytes of KV cache one generation batch may hold (bounds the batch on long prompts); None:
#: the device's (`ngdiff_jax.backends.kv_cache_budget`: 1 GiB on CPU, a quarter of the free memory
#: of an accelerator)
CACHE_BUDGET: int | None = None


def _new_tokens_bucket(n: int) -> int:
    b = 8
    while b < n and b < 256:
        b *= 2
    return b if b >= n else -(-n // 256) * 256


def _common_prefix_len(rows) -> int:
    first = rows[0]
    n = min(len(r) for r in rows)
    for r in rows[1:]:
        k = 0
        while k < n and r[k] == first[k]:
            k += 1
        n = k
    return n


def _eos_ids(model, tokenizer) -> list[int]:
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    cfg = getattr(model, "config", None)
    cfg_eos = getattr(cfg, "eos_ids", None) or getattr(cfg, "eos_token_id", None)  # with generation_config.json
    if cfg_eos is not None:
        ids.extend(int(e) for e in (cfg_eos if isinstance(cfg_eos, (list, tuple)) else [cfg_eos]))
    ids = sorted(set(ids))
    if not ids:
        raise ValueError("Generation needs an EOS token: set tokenizer.eos_token or the model config's eos_token_id.")
    return ids


def generate_texts(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    stop_strings: Sequence[str] = (),
    buckets: Sequence[int] | None = None,
    max_length: int | None = None,
    timings: Timings | None = None,
    phase: str = "generate",
    cut_counts: dict | None = None,
    share_prefix: bool = True,
    decode=None,
    teach: Sequence[Sequence[int] | None] | None = None,
):
    """Greedy continuations of token-id ``prompts``, as cleaned strings in input order.

    Args:
      model: a ``CausalLM``; or :class:`~ngdiff_jax.evaluation.members.Members`, decoded by one
        program, giving one list of strings per member.
      tokenizer: decodes the new tokens (``metrics.decode_text``: special tokens skipped, cleaned up).
      max_new_tokens: tokens generated per prompt (TOFU 200, MUSE VerbMem 128, KnowMem 32).
      stop_strings: cut each text at these (MUSE KnowMem: ``"\\n\\n"``, ``"\\nQuestion"``, ``"Question:"``).
      max_length: context size (default the model's ``max_position_embeddings``); a prompt
        longer than ``max_length - max_new_tokens`` keeps only its last tokens.
      timings: first call per new shape is counted as compile time, the rest as run time.
      cut_counts: if given, ``cut_counts[phase]`` is increased by the number of prompts cut
        to fit the context (reported in the result's ``meta``, like scoring cuts).
      share_prefix: encode a prefix common to a batch's prompts once for the batch.
      decode: ``token ids -> str`` for the new tokens (before the first EOS), returned as it gives
        them (cut at ``stop_strings`` and stripped only when some are given); default
        open-unlearning's (``metrics.decode_text``: special tokens skipped, cleaned up, stripped).
      teach: per prompt, ``None`` or a given continuation's token ids, teacher-forced on the
        prompt's KV cache in the same program (MUSE's ``extraction_strength`` on VerbMem: the
        prompt is encoded once for both). The result is then ``(texts, forced)``, ``forced`` per
        prompt ``None`` (none given, or the prompt was cut to fit) or ``(logp, correct)``: the
        continuation tokens' log-probs and greedy-match flags (for ``Members``, per member).
    """
    from ngdiff_jax.evaluation.members import split_model

    graphdef, state, members = split_model(model)
    if not prompts:
        return [[] for _ in range(members)] if members is not None else []
    if max_length is None:
        max_length = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    room = None if max_length is None else max_length - max_new_tokens
    if room is not None and room < 1:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
            f"context of {max_length} tokens; lower max_new_tokens."
        )
    rows = [list(p)[-room:] if room is not None else list(p) for p in prompts]
    if cut_counts is not None:
        n_cut = sum(1 for p in prompts if room is not None and len(p) > room)
        cut_counts[phase] = cut_counts.get(phase, 0) + n_cut
    if any(len(r) == 0 for r in rows):
        raise ValueError("Every prompt needs at least one token.")
    timings = timings if timings is not None else Timings()
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    n_buf = _new_tokens_bucket(max_new_tokens)
    if teach is not None:
        if len(teach) != len(prompts):
            raise ValueError(f"teach has {len(teach)} entries for {len(prompts)} prompts; give one (or None) each.")
        fits = [t is not None and len(t) > 0 and len(r) == len(p)
                and (max_length is None or len(p) + len(t) <= max_length)
                for t, r, p in zip(teach, rows, prompts)]  # fmt: skip
        g_max = max((len(t) for t, f in zip(teach, fits) if f), default=0)
    else:
        fits, g_max = [False] * len(rows), 0
    forced: list = [[None] * len(rows) for _ in range(members or 1)]
    # as few batches as batch_size allows, of equal size (multiples of 8): 70 prompts at 64 are two
    # batches of 40, not 64 + 64 with 58 filler rows
    n_batches = -(-len(rows) // int(batch_size))
    B = min(int(batch_size), -(-len(rows) // (8 * n_batches)) * 8)
    cfg = getattr(model, "config", None)
    if cfg is not None:  # keep a batch's KV cache within CACHE_BUDGET bytes
        per_row = (bucket_length(max(len(r) for r in rows)) + n_buf + (2 * _new_tokens_bucket(g_max) if g_max else 0))
        per_row *= cfg.num_layers * 2 * cfg.num_kv_heads
        per_row *= cfg.head_dim * np.dtype(getattr(model, "dtype", None) or np.float32).itemsize * (members or 1)
        B = max(1, min(B, (kv_cache_budget() if CACHE_BUDGET is None else CACHE_BUDGET) // per_row))
    out: list = [[None] * len(rows) for _ in range(members or 1)]
    for batch in length_sorted_batches([len(r) for r in rows], B):
        real = [rows[i] for i in batch]
        shared = min(_common_prefix_len(real), min(len(r) for r in real) - 1) if share_prefix else 0
        if shared < MIN_SHARED_PREFIX:
            shared = 0
        s0 = bucket_length(shared, buckets=buckets) if shared else 0
        rest = [r[shared:] for r in real]
        t = bucket_length(max(len(r) for r in rest), buckets=buckets)
        if room is not None:
            t = min(t, room)
        shared_ids = np.zeros((1, s0), np.int32)
        shared_ids[0, :shared] = real[0][:shared]
        ids = np.full((B, t), pad, np.int32)
        mask = np.zeros((B, t), np.int32)
        for r in range(B):
            x = rest[min(r, len(batch) - 1)]  # filler rows repeat the last prompt
            ids[r, t - len(x) :] = x
            mask[r, t - len(x) :] = 1
        teach_ids = None
        if any(fits[i] for i in batch):  # a batch's continuations, right-padded (IGNORE_INDEX)
            teach_ids = np.full((B, _new_tokens_bucket(max(len(teach[i]) for i in batch if fits[i]))), -100, np.int32)
            for r, i in enumerate(batch):
                if fits[i]:
                    teach_ids[r, : len(teach[i])] = teach[i]
        new = engine.generate(
            graphdef, state, shared_ids, shared, ids, mask, np.arange(B) < len(batch),
            max_new_tokens=max_new_tokens, pad_id=int(pad), eos=eos, n_buf=n_buf, timings=timings, phase=phase,
            members=members, teach=teach_ids,
        )  # fmt: skip
        if teach_ids is not None:
            new, f_logp, f_mask, f_correct = new
            f = [np.asarray(x) if members is not None else np.asarray(x)[None] for x in (f_logp, f_mask, f_correct)]
            for m in range(members or 1):
                for r, i in enumerate(batch):
                    if fits[i]:
                        keep = f[1][m, r] > 0
                        forced[m][i] = (f[0][m, r][keep].astype(np.float64), f[2][m, r][keep].astype(bool))
        new = np.asarray(new) if members is not None else np.asarray(new)[None]
        for m, rows_m in enumerate(new):
            for r, i in enumerate(batch):
                toks = [int(x) for x in rows_m[r][:max_new_tokens]]
                for j, tok in enumerate(toks):
                    if tok in eos:
                        toks = toks[:j]
                        break
                if decode is not None:  # the caller's decoding, as it gives it
                    out[m][i] = cut_at_stop_strings(decode(toks), stop_strings) if stop_strings else decode(toks)
                    continue
                # as open-unlearning: special tokens skipped, cleaned up, cut at the stop strings, stripped
                out[m][i] = cut_at_stop_strings(decode_text(tokenizer, toks), stop_strings)
    if teach is not None:
        return (out, forced) if members is not None else (out[0], forced[0])
    return out if members is not None else out[0]
