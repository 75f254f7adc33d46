"""Sharded model and state I/O.

- :func:`load_sharded`: a Hugging Face checkpoint streamed onto a mesh; each process
  reads only the blocks of its own devices (``models.from_pretrained(mesh=...)``).
- :func:`save_sharded` / :func:`restore_sharded`: orbax checkpoints of sharded state
  (every process writes its shards); restoring onto other shardings (another mesh or
  preset) only needs an abstract target from :func:`abstract_state`.
- :func:`save_pretrained_gathered`: gathers the parameters and process 0 writes the
  Hugging Face export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

__all__ = [
    "abstract_state",
    "gather_to_host",
    "load_sharded",
    "restore_sharded",
    "save_pretrained_gathered",
    "save_sharded",
]


def load_sharded(path, mesh, rules, **kwargs):
    """``(model, apply_fn, params)`` with the parameters on ``mesh`` per ``rules``
    (extra keyword arguments go to ``models.from_pretrained``: ``dtype``, ``param_dtype``)."""
    from ngdiff_jax import models
    from ngdiff_jax.parallel.mesh import resolve_rules

    model = models.from_pretrained(path, mesh=mesh, rules=resolve_rules(rules), **kwargs)
    apply_fn, params = models.functional(model)
    return model, apply_fn, params


def abstract_state(tree, shardings) -> Any:
    """``ShapeDtypeStruct``s of ``tree`` (arrays or structs) carrying ``shardings``: the
    target that restores a checkpoint onto those shardings."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=s), tree, shardings
    )


def save_sharded(
    directory, step: int, state, meta: dict | None = None, *, max_to_keep: int | None = 2
) -> None:
    """Save ``state`` (a pytree of possibly sharded arrays) as checkpoint ``step`` with orbax.
    Call it on every process with the same arguments; each writes its own shards."""
    from ngdiff_jax.training.checkpoint import Checkpointer

    with Checkpointer(directory, max_to_keep=max_to_keep) as ck:
        ck.save(step, state, dict(meta or {}))


def restore_sharded(directory, target, step: int | None = None) -> tuple[Any, dict]:
    """Restore checkpoint ``step`` (default: latest) onto ``target``'s shardings.

    ``target`` is a pytree like the saved state of arrays or ``ShapeDtypeStruct``s with
    shardings (see :func:`abstract_state`); they may differ from the shardings it was
    saved with. Returns ``(state, meta)``.
    """
    from ngdiff_jax.training.checkpoint import Checkpointer

    if not Path(directory).is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist.")
    with Checkpointer(directory, max_to_keep=None) as ck:
        return ck.restore(step, target)


def gather_to_host(tree) -> Any:
    """The full value of every array as numpy, on every process (all-gathers shards
    held by other processes)."""

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree_util.tree_map(get, tree)


def save_pretrained_gathered(model, params, path, *, tokenizer=None, dtype=None, **kwargs) -> Path | None:
    """Export ``params`` (possibly sharded across processes) in ``model``'s architecture with
    ``models.save_pretrained`` (in ``dtype``, default the parameters' own): every process takes
    part in the gather, process 0 writes. Returns the path on process 0, None elsewhere."""
    from ngdiff_jax import models

    host = gather_to_host(params)
    if dtype is not None:
        host = jax.tree_util.tree_map(
            lambda x: x.astype(dtype, copy=False) if jnp.issubdtype(x.dtype, jnp.floating) else x, host
        )
    out = None
    if jax.process_index() == 0:
        out = Path(path)
        models.save_pretrained(models.with_params(model, host), out, tokenizer=tokenizer, **kwargs)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"save_pretrained:{path}")
    return out
