"""The in-loop evaluation hook: mean answer probability per fixed set of batches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np


def qa_probability_eval(apply_fn, sets: Mapping[str, Sequence[Mapping[str, np.ndarray]]], *, members: bool = False):
    """An ``eval_fn(step, params)`` hook: mean answer probability ``exp(-mean token NLL)`` per set.

    ``sets`` maps a name (``forget``, ``retain``) to fixed batches; the hook returns
    ``{"<name>_prob": mean, "<name>_nll": mean}`` over the real (non-padding) rows. With
    ``members`` the parameters carry a leading member axis (a population) and every value is a
    list with one entry per member, from one program ``vmap``-ed over the members.
    """
    from ngdiff_jax.models.logprobs import sequence_nll

    def one(params, batch):
        return sequence_nll(apply_fn(params, batch["input_ids"], batch["attention_mask"]), batch["labels"])

    nll = jax.jit(jax.vmap(one, in_axes=(0, None)) if members else one)

    def per_sample(params, batches):
        vals = []
        for b in batches:
            real = np.asarray(b["attention_mask"]).sum(-1) > 0
            vals.append(np.asarray(nll(params, b))[..., real])
        return np.concatenate(vals, axis=-1)

    def eval_fn(step: int, params) -> dict[str, Any]:
        out = {}
        for name, batches in sets.items():
            v = per_sample(params, batches)
            prob, mean = np.mean(np.exp(-v), axis=-1), np.mean(v, axis=-1)
            out[f"{name}_prob"] = prob.tolist() if members else float(prob)
            out[f"{name}_nll"] = mean.tolist() if members else float(mean)
        return out

    return eval_fn
