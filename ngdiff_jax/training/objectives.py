"""What a task loss is made of: the :class:`Objective` and the helpers that build one.

An objective is ``loss(model, params, batch, ref) -> (loss, nll)`` where ``model`` is a
`ngdiff_jax.models.ModelView`: it runs the model itself (``model(params, ids, mask)`` for the
logits, ``model.logprobs(params, ids, labels, mask)``, or ``model.hidden(params, ids, mask,
layer=...)`` for RMU), so it can read a second answer of each question (``alt_*``
arrays: DPO/IdkNLL) or a hidden state. ``ref`` holds what the frozen reference model
contributes, made by ``reference(model, ref_params, batch)`` (``ref_logp_sum [B]`` for NPO,
``ref_logits`` for KL and UNDIAL, ...) or read from precomputed batch entries. ``nll`` is the
plain mean NLL of the batch, logged alongside. The objectives themselves are the registered
dataclasses of `ngdiff_jax.training.method_config`; the helpers here build them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax

from ngdiff_jax import losses
from ngdiff_jax.models.view import ModelView

__all__ = [
    "ALT_KEYS", "BATCH_KEYS", "Objective", "hidden", "logit_objective", "logits", "logprob_objective", "logprobs",
    "nll", "ref_logits", "ref_logp_sum",
]

BATCH_KEYS = ("input_ids", "attention_mask", "labels")
ALT_KEYS = ("alt_input_ids", "alt_attention_mask", "alt_labels")


@dataclass(frozen=True)
class Objective:
    """A task loss. ``loss(model, params, batch, ref) -> (loss, nll)``; ``reference(model,
    ref_params, batch) -> ref`` (None: needs no reference); ``precomputed``: batch keys that
    may stand in for ``reference`` (e.g. ``ref_logp_sum``); ``batch_keys``: the batch
    entries the loss reads."""

    loss: Callable[[ModelView, Any, dict, dict], tuple[jax.Array, jax.Array]]
    reference: Callable[[ModelView, Any, dict], dict] | None = None
    precomputed: tuple[str, ...] = ()
    batch_keys: tuple[str, ...] = BATCH_KEYS


def nll(logits_or_logprobs, labels):
    """The batch's token-mean NLL (`ngdiff_jax.losses.nll`)."""
    return losses.nll(logits_or_logprobs, labels)


def logits(model: ModelView, params, batch, prefix: str = ""):
    return model(params, batch[prefix + "input_ids"], batch[prefix + "attention_mask"])


def logprobs(model: ModelView, params, batch, prefix: str = ""):
    """The labels' log-probs (a `TokenLogprobs`, accepted by the log-prob losses in place of logits)."""
    return model.logprobs(params, batch[prefix + "input_ids"], batch[prefix + "labels"],
                          batch[prefix + "attention_mask"])


def hidden(model: ModelView, params, batch, layer: int):
    return model.hidden(params, batch["input_ids"], batch["attention_mask"], layer=layer)


def ref_logp_sum(prefix: str = ""):
    """A ``reference`` function: the reference model's summed log-prob of each row's answer."""

    def reference(model, ref_params, batch):
        lp = logprobs(model, ref_params, batch, prefix)
        return {f"{prefix}ref_logp_sum": losses.sequence_logprob_sum(lp, batch[prefix + "labels"])}

    return reference


def ref_logits(model, ref_params, batch):
    """A ``reference`` function: the reference model's logits of the batch."""
    return {"ref_logits": logits(model, ref_params, batch)}


def logit_objective(fn, **kw) -> Objective:
    """An objective of the batch's logits only: ``fn(logits, batch, ref) -> loss``."""

    def loss(model, params, batch, ref):
        lg = logits(model, params, batch)
        return fn(lg, batch, ref), nll(lg, batch["labels"])

    return Objective(loss, **kw)


def logprob_objective(fn, **kw) -> Objective:
    """An objective of the labels' log-probs only: ``fn(token_logprobs, batch, ref) -> loss``
    (the chunked head: no vocabulary-sized activations)."""

    def loss(model, params, batch, ref):
        lp = logprobs(model, params, batch)
        return fn(lp, batch, ref), nll(lp, batch["labels"])

    return Objective(loss, **kw)
