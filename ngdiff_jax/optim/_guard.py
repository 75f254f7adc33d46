"""Checks that keep a two-task chain from being misused silently.

A two-task optimizer gets the retain gradient as optax's ``updates`` and the forget gradient as
the extra argument ``forget_grads``. Generic optax wrappers only know ``updates``, so some
compositions would quietly treat the two tasks differently. These checks run when the update is
traced (Python-side, no cost in the compiled step) and raise instead:

* a combiner called (directly or through its chain) by ``optax.MultiSteps`` (accumulates only
  ``retain_grads``; ``forget_grads`` would come from the last micro-batch) or by
  ``optax.apply_if_finite`` (checks only ``retain_grads``);
* a combiner after another combiner (it would add ``forget_grads`` a second time);
* a combiner that is not the first member of an ``optax.chain`` (the members before it saw only
  ``retain_grads``: ``optax.clip_by_global_norm`` there would clip only the retain gradient);
* inside `two_task`: a combiner that received something else than the ``retain_grads`` given to
  the chain (a wrapper changed it), or a chain in which no combiner ran at all (``forget_grads``
  would be ignored, as with ``optax.sgd``).
"""

from __future__ import annotations

import contextvars
import sys
from dataclasses import dataclass, field

import jax
import optax

#: Attribute set on the ``update`` function of two-task-aware transformations.
MARK = "_ngdiff_two_task"


@dataclass
class _Call:
    retain_ids: set[int]
    seen: list[str] = field(default_factory=list)


_call: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("ngdiff_two_task_call", default=None)

_MULTISTEPS = (
    "{name}: optax.MultiSteps accumulates only retain_grads (forget_grads would be the last "
    "micro-batch's); accumulate both tasks in the step instead: run.micro_batches=k in an unlearning "
    "config (the step sums both tasks' gradients over k micro-batches before one optimizer update)."
)
_APPLY_IF_FINITE = (
    "{name}: optax.apply_if_finite checks only retain_grads (a NaN/Inf in forget_grads would go "
    "through); use ngdiff_jax.optim.skip_if_nonfinite, which checks both (unlearning_optimizer "
    "wraps its chain in it by default)."
)
_NOT_FIRST = (
    "{name}: the combiner must be the first member of the chain: the transformations before it "
    "received only retain_grads (e.g. optax.clip_by_global_norm there clips only the retain "
    "gradient). Put single-task transformations after the combiner; for per-task clipping use "
    "the combiner's clip_norm= option."
)

_TWICE = (
    "{name}: a second combiner after a combiner in one chain; the first already combined both tasks "
    "(its output is one direction), so this one would add forget_grads again. Use one combiner per chain."
)


def mark(tx: optax.GradientTransformation, kind: str) -> optax.GradientTransformation:
    """Marks ``tx`` as two-task aware (``kind``: "combiner" or "wrapper")."""
    setattr(tx.update, MARK, kind)
    return tx


def kind_of(tx) -> str | None:
    """``"combiner"``/``"wrapper"`` for a marked transformation, else ``None``."""
    return getattr(getattr(tx, "update", None), MARK, None)


def check_callers(name: str) -> None:
    """Refuses optax wrappers that would handle only ``retain_grads`` (see module doc)."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        qual = getattr(code, "co_qualname", code.co_name)
        fname = code.co_filename.replace("\\", "/")
        if "/optax/" in fname:
            if qual.startswith("MultiSteps."):
                raise ValueError(_MULTISTEPS.format(name=name))
            if qual.startswith("apply_if_finite."):
                raise ValueError(_APPLY_IF_FINITE.format(name=name))
            if qual in ("chain.<locals>.update_fn", "named_chain.<locals>.update_fn"):
                _check_chain_position(frame, name)
        frame = frame.f_back


def _check_chain_position(frame, name: str) -> None:
    loc = frame.f_locals
    fns, fn = loc.get("update_fns"), loc.get("fn")
    if fns is None or fn is None:
        return
    fns = [f[1] if isinstance(f, tuple) else f for f in fns]  # named_chain: (name, fn)
    fn = fn[1] if isinstance(fn, tuple) else fn
    for prev in fns:
        if prev is fn:
            return
        if getattr(prev, MARK, None) is None:
            raise ValueError(_NOT_FIRST.format(name=name))
        if getattr(prev, MARK, None) == "combiner":
            raise ValueError(_TWICE.format(name=name))


def combiner_called(name: str, retain_grads) -> None:
    """Called by a combiner's update (at trace time)."""
    check_callers(name)
    call = _call.get()
    if call is None:
        return
    ids = {id(x) for x in jax.tree.leaves(retain_grads)}
    if not ids <= call.retain_ids:
        raise ValueError(
            f"{name}: the combiner received a retain gradient that a wrapper or an earlier "
            "transformation changed without changing forget_grads alike (optax.MultiSteps, "
            "clip_by_global_norm, ...); put single-task transformations after the combiner, "
            "use the combiner's clip_norm= for per-task clipping and run.micro_batches=k for "
            "accumulation."
        )
    if call.seen:
        raise ValueError(_TWICE.format(name=name))
    call.seen.append(name)


def two_task(tx: optax.GradientTransformation, name: str = "two_task") -> optax.GradientTransformationExtraArgs:
    """``tx`` (a chain starting with a two-task combiner) with the calling convention checked.

    ``update(retain_grads, state, params=None, *, forget_grads, **extra_args)`` refuses a call
    without ``forget_grads``, a chain in which no combiner runs (``forget_grads`` would be
    ignored), a combiner that received a changed ``retain_grads`` and the optax wrappers listed
    in the module doc. The state is ``tx``'s own. Already wrapped transformations are returned
    as they are. `unlearning_optimizer` returns a wrapped chain; ``make_unlearn_step`` wraps
    what it is given.
    """
    if kind_of(tx) == "wrapper":
        return tx
    inner = optax.with_extra_args_support(tx)

    def update_fn(retain_grads, state, params=None, *, forget_grads=None, **extra_args):
        check_callers(name)
        if forget_grads is None:
            raise ValueError(
                f"{name}.update needs the forget gradients: call update(retain_grads, state, params, "
                "forget_grads=forget_grads, ...)."
            )
        call = _Call({id(x) for x in jax.tree.leaves(retain_grads)})
        token = _call.set(call)
        try:
            out = inner.update(retain_grads, state, params, forget_grads=forget_grads, **extra_args)
        finally:
            _call.reset(token)
        if not call.seen:
            raise ValueError(
                f"{name}: no two-task combiner ran, so forget_grads were ignored; start the chain with "
                "ngdiff_jax.optim.ngdiff() (or gdiff, mgda, pcgrad), e.g. "
                "optax.chain(ngdiff(), optax.adam(1e-5))."
            )
        return out

    return mark(optax.GradientTransformationExtraArgs(inner.init, update_fn), "wrapper")
