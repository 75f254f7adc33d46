"""Orbax checkpoints of the training state: params, optimizer state, RNG, step, data position.

Layout (one directory per saved step, managed by ``ocp.CheckpointManager``)::

    <dir>/<step>/state/   params, opt_state, rng  (StandardSave: arrays, exact dtypes)
    <dir>/<step>/meta/    step, data positions, anything JSON-able (JsonSave)

Saves are atomic: orbax writes into ``<step>.orbax-checkpoint-tmp*`` and renames
the directory when complete, so a killed process leaves either a finished
checkpoint or a temporary directory that ``latest_step`` ignores (and that is
cleaned up on the next start). Saves are synchronous here so that a
checkpoint reported as saved is on disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from ngdiff_jax.config_loader import to_dict

__all__ = ["Checkpointer"]


class Checkpointer:
    """A thin wrapper around ``ocp.CheckpointManager`` for ``(state pytree, meta dict)`` pairs."""

    def __init__(self, directory: str | Path, *, max_to_keep: int | None = 2):
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_names=("state", "meta"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                create=True,
                cleanup_tmp_directories=True,
                enable_async_checkpointing=False,
            ),
        )

    def latest_step(self) -> int | None:
        """The newest finished checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Save ``state`` (pytree of arrays) and ``meta`` (JSON-able) as checkpoint ``step``."""
        self._manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        self._manager.wait_until_finished()

    def restore(self, step: int | None, target: Any) -> tuple[Any, dict[str, Any]]:
        """Restore checkpoint ``step`` (default: latest) into the structure of ``target``.

        ``target`` is a pytree with the same structure as the saved state (e.g. the
        freshly initialized state); it fixes the tree structure, shapes and dtypes.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no finished checkpoint in {self.directory} to restore from.")
        abstract = jax.tree_util.tree_map(_abstract, target)
        out = self._manager.restore(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
        )
        return out["state"], dict(out["meta"])

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _abstract(x):
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, np.ndarray):
        return jax.ShapeDtypeStruct(x.shape, x.dtype)
    return x


#: Run settings that may change between a run and its resume (display and bookkeeping only).
COSMETIC_RUN_KEYS = ("progress", "log_every", "eval_every", "max_checkpoints")


def resume_settings(cfg, *, ignore: Sequence[str] = ()) -> dict:
    """The config as a dict of what must match for a resume: everything but the cosmetic
    ``run`` keys and the top-level sections named in ``ignore``."""
    d = to_dict(cfg)
    for key in ignore:
        d.pop(key, None)
    d["run"] = {k: v for k, v in d["run"].items() if k not in COSMETIC_RUN_KEYS}
    return d
