"""Batched greedy generation of texts for the ROUGE metrics.

Prompts are sorted by length, grouped into fixed-size batches (the last one filled
with copies of a real prompt), left-padded to a length bucket and decoded with
``ngdiff_jax.models.generate`` (greedy, KV cache). Each generation is decoded with
special tokens skipped, cut at the stop strings and stripped, as open-unlearning
does (it also cuts at the EOS token's text; here tokens after EOS are already pad).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ngdiff_jax.evaluation.batching import Stopwatch, Timings, bucket_length, length_sorted_batches
from ngdiff_jax.evaluation.metrics import cut_at_stop_strings


def _eos_ids(model, tokenizer) -> list[int]:
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    cfg_eos = getattr(getattr(model, "config", None), "eos_token_id", None)
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
) -> list[str]:
    """Greedy continuations of token-id ``prompts``, as cleaned strings in input order.

    Args:
      model: a ``CausalLM``; ``ngdiff_jax.models.generate`` runs it.
      tokenizer: decodes the new tokens (``skip_special_tokens=True``).
      max_new_tokens: tokens generated per prompt (TOFU 200, MUSE VerbMem 128, KnowMem 32).
      stop_strings: cut each text at these (MUSE KnowMem: ``"\\n\\n"``, ``"\\nQuestion"``, ``"Question:"``).
      max_length: context size (default the model's ``max_position_embeddings``); a prompt
        longer than ``max_length - max_new_tokens`` keeps only its last tokens.
      timings: first call per new shape is counted as compile time, the rest as run time.
      cut_counts: if given, ``cut_counts[phase]`` is increased by the number of prompts cut
        to fit the context (reported in the result's ``meta``, like scoring cuts).
    """
    from ngdiff_jax.models import generate

    if not prompts:
        return []
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
    out: list = [None] * len(rows)
    for batch in length_sorted_batches([len(r) for r in rows], batch_size):
        t = bucket_length(max(len(rows[i]) for i in batch), buckets=buckets)
        if room is not None:
            t = min(t, room)
        ids = np.full((batch_size, t), pad, np.int32)
        mask = np.zeros((batch_size, t), np.int32)
        for r in range(batch_size):
            x = rows[batch[min(r, len(batch) - 1)]]  # filler rows repeat the last prompt
            ids[r, t - len(x) :] = x
            mask[r, t - len(x) :] = 1
        shape = [batch_size, t, max_new_tokens]
        first = shape not in timings.shapes.get("generate", [])
        with Stopwatch() as sw:
            new = np.asarray(
                generate(
                    model,
                    ids,
                    mask,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=eos if len(eos) > 1 else eos[0],
                    pad_token_id=int(pad),
                )
            )
        timings.add(phase, sw.seconds, compile=first)
        timings.add_shape("generate", shape)
        for r, i in enumerate(batch):
            toks = [int(x) for x in new[r]]
            for j, tok in enumerate(toks):
                if tok in eos:
                    toks = toks[:j]
                    break
            text = tokenizer.decode(toks, skip_special_tokens=True)
            out[i] = cut_at_stop_strings(text, stop_strings)
    return out
