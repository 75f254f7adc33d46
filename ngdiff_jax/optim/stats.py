"""Logging helpers: read the optimizer's scalars out of a (nested) optax state.

Example:

  >>> import jax.numpy as jnp
  >>> from ngdiff_jax.optim import unlearning_optimizer, inject_stats
  >>> state = unlearning_optimizer("ngdiff", 1e-3).init({"w": jnp.zeros(3)})
  >>> {k: float(v) for k, v in sorted(inject_stats(state).items())}["learning_rate"]
  0.0010000000474974513
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["STAT_NAMES", "inject_stats"]

#: Field names collected by :func:`inject_stats`. ``skipped`` is summed over
#: all states holding it; the others are taken from the last state (in
#: flattening order) that holds them. A combiner's per-task norms and weights
#: (``CombinerState.norms``/``weights``) are reported as ``<task>_norm`` and
#: ``<task>_weight`` (``retain_norm``, ``forget_weight``, ...).
STAT_NAMES = (
    "learning_rate",
    "skipped",
    "retain_norm",
    "forget_norm",
    "retain_weight",
    "forget_weight",
)

_PER_TASK = {"norms": "norm", "weights": "weight"}


def _name(key: Any) -> str | None:
    for attr in ("name", "key"):
        v = getattr(key, attr, None)
        if isinstance(v, str):
            return v
    return None


def inject_stats(opt_state: Any) -> dict[str, jax.Array]:
    """Collects learning rate, skipped steps and last gradient norms/weights.

    Works on any nesting of optax states (``chain`` tuples, ``inject_hyperparams``
    dicts, :func:`~ngdiff_jax.optim.skip_if_nonfinite`, ``nnx.Optimizer.opt_state``
    with its Variable wrappers), inside ``jit`` (values are scalar arrays) and on
    batched states (from ``vmap``-ed ``init``/``update``: the values then carry
    the batch axes).

    Args:
      opt_state: an optimizer state.

    Returns:
      A dict with those of ``learning_rate``, ``skipped`` and each task's
      ``<task>_norm`` and ``<task>_weight`` (``retain_norm``, ``forget_norm``,
      ``retain_weight``, ``forget_weight`` for two tasks) that were found
      (arrays: scalars, or of the batch shape for a batched state). Keys whose
      state is absent are left out.
    """
    out: dict[str, jax.Array] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        names = [_name(k) for k in path]
        if len(names) > 1 and names[-1] == "value":  # nnx Variable wrapper
            names = names[:-1]
        if len(names) > 1 and names[-2] in _PER_TASK and isinstance(names[-1], str):
            name = f"{names[-1]}_{_PER_TASK[names[-2]]}"
        elif names and names[-1] in STAT_NAMES:
            name = names[-1]
        else:
            continue
        if name == "skipped" and name in out:
            out[name] = out[name] + jnp.asarray(leaf)
        else:
            out[name] = jnp.asarray(leaf)
    return out
