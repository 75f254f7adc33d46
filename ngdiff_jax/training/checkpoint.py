"""Orbax checkpoints of the training state: params, optimizer state, RNG, step, data position.

Layout (one directory per saved step, managed by ``ocp.CheckpointManager``)::

    <dir>/<step>/state/   params, opt_state, rng  (StandardSave: arrays, exact dtypes)
    <dir>/<step>/meta/    step, data positions, anything JSON-able (JsonSave)

Saves are atomic: orbax writes into ``<step>.orbax-checkpoint-tmp*`` and renames
the directory when complete, so a killed process leaves either a finished
checkpoint or a temporary directory that ``latest_step`` ignores (and that is
cleaned up on the next start). Saves are synchronous here so that a
checkpoint reported as saved is on disk.

Fallback: :meth:`Checkpointer.restore_newest_valid` tries the checkpoints newest
first; one that cannot be restored (a truncated or deleted file, garbage metadata)
is reported with the reason, moved to ``<dir>.damaged/<step>-<time>`` (never
deleted) and the next older one is tried.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from ngdiff_jax.config_loader import to_dict
from ngdiff_jax.training.method_config import MethodConfig

__all__ = ["Checkpointer", "flat_settings", "settings_diff"]


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
        """Save ``state`` (pytree of arrays) and ``meta`` (JSON-able) as checkpoint ``step``.

        A disk without room for it fails before orbax writes anything (``ENOSPC``, one line at
        the CLI): a write that runs out of space midway ends in orbax's and tensorstore's writer
        threads printing hundreds of lines of tracebacks."""
        need = sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(state))
        free = shutil.disk_usage(self.directory).free
        if free < need + need // 20 + (1 << 20):
            raise OSError(errno.ENOSPC, f"checkpoint step {step} needs ~{need / 2**20:.1f} MiB, "
                          f"{free / 2**20:.1f} MiB free", str(self.directory))  # fmt: skip
        try:
            self._manager.save(
                int(step),
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                force=True,
            )
            self._manager.wait_until_finished()
        except BaseException:
            # a failed write (a full disk): stop orbax's writer threads now, so that they do not
            # print their own tracebacks at exit after the one-line error
            with contextlib.suppress(Exception):
                self._manager.close()
            raise

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

    def restore_newest_valid(
        self, target: Any, *, check_meta: Callable[[dict], None] | None = None
    ) -> tuple[int, Any, dict[str, Any]] | None:
        """``(step, state, meta)`` of the newest checkpoint that restores, or None when there is none.

        ``check_meta(meta)`` is called before the state is restored; what it raises (e.g. a
        settings mismatch) propagates: that checkpoint is fine, the run is not. A checkpoint
        whose meta or state cannot be read is reported on stderr, moved aside to
        ``<dir>.damaged/`` and the next older one is tried. If every checkpoint is damaged
        the run stops (run it again to start from step 0).
        """
        from ngdiff_jax.errors import NgdiffError

        steps = sorted(self.all_steps(), reverse=True)
        moved = []
        for step in steps:
            try:
                args = ocp.args.Composite(meta=ocp.args.JsonRestore())
                meta = dict(self._manager.restore(int(step), args=args)["meta"])
                if not isinstance(meta.get("step"), int):
                    raise ValueError(f"its meta has no integer 'step' (keys: {sorted(meta)})")
                if meta["step"] != int(step):  # a directory renamed or a meta copied from another step
                    raise ValueError(f"its meta says step {meta['step']}, its directory step {step}")
            except Exception as e:
                moved.append(self._set_aside(step, e))
                continue
            if check_meta is not None:
                check_meta(meta)
            try:
                state, meta = self.restore(step, target)
            except Exception as e:
                moved.append(self._set_aside(step, e))
                continue
            if moved:
                print(f"note: resuming from checkpoint step {step} of {self.directory} instead.", file=sys.stderr)
            return int(step), state, meta
        if moved:
            raise NgdiffError(
                f"none of the checkpoints in {self.directory} can be restored (moved to {', '.join(moved)}); "
                "run the same command again to start over from step 0."
            )
        return None

    def _set_aside(self, step: int, error: BaseException) -> str:
        from ngdiff_jax.errors import one_line

        src = self.directory / str(step)
        aside = self.directory.with_name(self.directory.name + ".damaged")
        dst = aside / f"{step}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        if jax.process_index() == 0 and src.exists():
            aside.mkdir(parents=True, exist_ok=True)
            shutil.move(str(src), str(dst))
        self._manager.reload()
        why = one_line(f"{type(error).__name__}: {error}", 300)
        print(f"warning: checkpoint step {step} in {self.directory} cannot be restored ({why}); moved it to {dst}.",
              file=sys.stderr)  # fmt: skip
        return str(dst)

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
COSMETIC_RUN_KEYS = ("progress", "log_every", "eval_every", "max_checkpoints", "max_skipped_fraction")


def resume_settings(cfg, *, ignore: Sequence[str] = ()) -> dict:
    """The config as a dict of what must match for a resume: everything but the cosmetic
    ``run`` keys and the top-level sections named in ``ignore``. Local paths (``*_path``,
    ``tokenizer``, ``data.source``, ``run.output_dir``) are resolved, so ``./x`` and ``x`` match."""
    d = to_dict(cfg)
    for key in ignore:
        d.pop(key, None)
    d["run"] = {k: v for k, v in d["run"].items() if k not in COSMETIC_RUN_KEYS}
    prec = d.get("precision")
    if isinstance(prec, dict) and prec.get("compute") is None and hasattr(cfg, "precision"):
        # `compute: null` is the backend's default (float32 on CPU, bfloat16 on GPU/TPU): record what it
        # resolved to, so a run started on one platform is not resumed on another in another dtype
        import jax.numpy as jnp

        prec["compute"] = jnp.dtype(cfg.precision.jnp("compute")).name
    return _resolve_paths(d)


def _resolve_paths(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            v = _resolve_paths(v)
        elif isinstance(v, str) and (k.endswith("_path") or k in ("tokenizer", "source", "output_dir")):
            p = Path(os.path.expanduser(v))
            if k == "output_dir" or p.exists():
                v = str(Path(os.path.abspath(p)).resolve())
        out[k] = v
    return out


# -- a run's settings, compared on resume ---------------------------------------------------

#: Settings that may differ between a run and its resume: a run directory moved or copied
#: elsewhere (as the disk-full advice suggests) is the same run.
_MOVABLE = frozenset({"run.output_dir"})


def flat_settings(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested settings dict as ``{"dotted.key": value}``."""
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flat_settings(v, f"{prefix}{k}."))
    return out


#: keys an earlier version saved -> the keys that replaced them (the flat method settings, now
#: typed sections: `ngdiff_jax.training.method_config.MethodConfig.RENAMED`); compared under the new names
RENAMED_SETTINGS: dict[str, tuple[str, ...]] = {
    **{f"method.{old}": tuple(f"method.{n}" for n in new) for old, new in MethodConfig.RENAMED.items()},
    "method.combiner": ("method.combiner.type",),
}


def settings_diff(saved: dict, current: dict) -> list[str]:
    """Dotted keys whose values differ. A key only one side has is not a difference: it was
    added or removed by another ngdiff version (its value then is the default of the version
    that has it), so runs stay resumable across versions; so is a saved ``precision.compute: null``
    (recorded before versions resolved it to the backend's dtype). A saved key that a later
    version renamed (`RENAMED_SETTINGS`) is compared under its new name: a run started with
    ``method.beta=0.1`` differs from one asked for ``method.forget.beta=0.5``."""
    saved = dict(saved)
    for old, new in RENAMED_SETTINGS.items():
        if old in saved and old not in current:
            value = saved.pop(old)
            saved.update({n: value for n in new if n not in saved})
    unresolved = {"precision.compute"} if saved.get("precision.compute", "") is None else set()
    return sorted(k for k in set(saved) & set(current)
                  if saved[k] != current[k] and k not in _MOVABLE and k not in unresolved)  # fmt: skip
