"""Divergence is a failure: a run whose updates were mostly skipped, whose final losses are not
finite, or whose weights are not finite exits non-zero and its export is refused.

:func:`check_run` is called after the loop and before the export. The optimizer counts
skipped steps (non-finite gradients: ``skip_if_nonfinite`` / the combiners' ``skipped``
counter, restored with the optimizer state on resume); more than
``run.max_skipped_fraction`` of the steps skipped is a divergence. The first step that
went wrong is found in ``<out>/log.jsonl``. A diverged run writes ``<out>/diverged.json``
(the verdict, the step, the counts) and raises :class:`~ngdiff_jax.errors.DivergedError`
(exit code 1); its checkpoints are kept, ``<out>/model`` is not written.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from ngdiff_jax.errors import DivergedError, NgdiffError

__all__ = ["UnchangedError", "check_changed", "check_run", "first_bad_range", "first_bad_step", "fingerprint",
           "params_finite"]


class UnchangedError(NgdiffError):
    """The run's weights did not move (exit code 1): its export was refused."""


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


#: Unsigned type of each float width; 8-byte floats are read as two uint32 words (no bit dropped).
_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}


@jax.jit
def fingerprint_array(tree) -> jax.Array:
    total = jnp.zeros((), jnp.uint32)
    for x in jax.tree.leaves(tree):
        if jnp.issubdtype(x.dtype, jnp.inexact):
            x = jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize])
        elif not jnp.issubdtype(x.dtype, jnp.integer):
            continue
        total = total + jnp.sum(x.astype(jnp.uint32), dtype=jnp.uint32)  # wraps: a checksum
    return total


def fingerprint(params: Any) -> int:
    """A checksum of the numeric leaves of ``params`` (weights stored as bits included): the sum of
    their bit patterns modulo 2**32, independent of the leaves' layout; equal before and after a
    run only if no weight moved (barring a 2**-32 coincidence)."""
    return int(fingerprint_array(params))


def check_changed(before: int, result, out_dir: str | Path, cfg) -> None:
    """Raise :class:`UnchangedError` if the trained weights are bit-identical to the initial ones
    (``before`` = :func:`fingerprint` of the initial params): e.g. a rate so small that every update
    rounds away. An unchanged model is never exported as a result."""
    if int(result.step) < 1 or fingerprint(result.params) != before:
        return
    lr = cfg.optim.lr
    raise UnchangedError(
        f"the run left every weight bit-identical to the input after {int(result.step)} steps "
        f"(optim.lr={lr:g}): each update rounded away, so there is nothing to export to {Path(out_dir) / 'model'}; "
        f"raise optim.lr (e.g. optim.lr={lr * 1000:g}) and use a new run.output_dir."
    )


def params_finite(params: Any) -> bool:
    """Whether every floating-point leaf of ``params`` is finite (one fused reduction)."""
    return bool(_all_finite(params))


def _finite(v) -> bool:
    return not isinstance(v, float) or math.isfinite(v)


def first_bad_step(log_path: str | Path) -> int | None:
    """The first logged step with a skipped update or a non-finite loss, or None (with
    ``run.log_every > 1`` the first bad step lies after the logged step before it: see
    `first_bad_range`)."""
    return first_bad_range(log_path)[1]


def first_bad_range(log_path: str | Path) -> tuple[int | None, int | None]:
    """``(first, last)``: the first bad step (a skipped update or a non-finite loss) is one of the
    steps ``first..last``, where ``last`` is the first logged step that shows it and ``first`` the
    step after the logged step before it (``first == last`` when every step is logged);
    ``(None, None)`` when no logged step shows one."""
    p = Path(log_path)
    if not p.is_file():
        return None, None
    prev = 0
    for line in p.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        step = int(rec.get("step", 0))
        if rec.get("skipped", 0) > 0 or any("loss" in k and not _finite(v) for k, v in rec.items()):
            return min(prev + 1, step), step
        prev = step
    return None, None


def check_run(result, out_dir: str | Path, cfg, *, params: Any | None = None) -> None:
    """Raise :class:`DivergedError` (after writing ``<out>/diverged.json``) if the run diverged."""
    out = Path(out_dir)
    steps = max(int(result.step), 1)
    metrics = dict(result.last_metrics or {})
    limit = float(getattr(cfg.run, "max_skipped_fraction", 0.1))
    reasons = []
    skipped = int(metrics.get("skipped", 0) or 0)
    if skipped / steps > limit:
        reasons.append(f"{skipped} of {steps} steps were skipped for non-finite gradients "
                       f"(more than run.max_skipped_fraction={limit:g})")  # fmt: skip
    bad_losses = {k: v for k, v in metrics.items() if "loss" in k and not _finite(v)}
    if bad_losses:
        reasons.append("the final " + ", ".join(f"{k}={v}" for k, v in sorted(bad_losses.items())))
    if params is not None and not params_finite(params):
        reasons.append("the weights hold NaN/Inf")
    if not reasons:
        return
    lo, hi = first_bad_range(out / "log.jsonl")
    lr = cfg.optim.lr
    # the exact step where every step is logged; with run.log_every > 1 the steps it lies between
    verdict = {"diverged": True, "reasons": reasons, "first_bad_step": hi if lo == hi else None,
               "first_bad_between": None if hi is None else [lo, hi], "steps": steps, "skipped": skipped,
               "optim.lr": lr}  # fmt: skip
    if jax.process_index() == 0:
        (out / "diverged.json").write_text(json.dumps(verdict, indent=2, default=str))
    at = "" if hi is None else f", first at step {hi}" if lo == hi else (
        f", first between steps {lo} and {hi} (logged every run.log_every steps)")
    raise DivergedError(
        f"the run diverged{at}: {'; '.join(reasons)}. The export to {out / 'model'} was refused "
        f"(details in {out / 'diverged.json'}, checkpoints kept); lower the rate (optim.lr={lr:g}, "
        f"try optim.lr={lr / 10:g}) and use a new run.output_dir."
    )
