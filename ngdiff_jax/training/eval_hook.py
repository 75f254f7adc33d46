"""The in-loop evaluation hook: mean answer probability per fixed set of batches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np


def qa_probability_eval(apply_fn, sets: Mapping[str, Sequence[Mapping[str, np.ndarray]]]):
    """An ``eval_fn(step, params)`` hook: mean answer probability ``exp(-mean token NLL)`` per set.

    ``sets`` maps a name (``forget``, ``retain``) to fixed batches; the hook returns
    ``{"<name>_prob": mean, "<name>_nll": mean}`` over the real (non-padding) rows.
    """
    from ngdiff_jax.models.logprobs import sequence_nll

    @jax.jit
    def nll(params, batch):
        return sequence_nll(apply_fn(params, batch["input_ids"], batch["attention_mask"]), batch["labels"])

    def per_sample(params, batches):
        vals = []
        for b in batches:
            real = np.asarray(b["attention_mask"]).sum(-1) > 0
            vals.append(np.asarray(nll(params, b))[real])
        return np.concatenate(vals)

    def eval_fn(step: int, params) -> dict[str, Any]:
        out = {}
        for name, batches in sets.items():
            v = per_sample(params, batches)
            out[f"{name}_prob"] = float(np.mean(np.exp(-v)))
            out[f"{name}_nll"] = float(np.mean(v))
        return out

    return eval_fn
