"""Shared machinery of the task-gradient combiners.

Every combiner in this package maps the gradients of k >= 2 tasks, a
:class:`~ngdiff_jax.optim.TaskGrads` (e.g. ``(g_r, g_f)``: the retain loss and the
forget objective, both *minimized*), to one direction

.. math::

  d = \\sum_i w_i \\, g_i

with scalar weights computed from a handful of global reductions (norms and
inner products over all leaves). This module holds what they share:

* :class:`CombinerState`, the typed state (skipped-step counter, last norms and
  weights per task, for logging through :func:`ngdiff_jax.optim.inject_stats`);
* numerically robust tree reductions: global norms and inner products are
  computed on ``g / max|g|`` and rescaled, so they neither overflow for a
  gradient-ascent forget gradient of norm ``1e20`` nor underflow for a tiny
  retain gradient, and are accumulated in at least float32 for bf16 inputs;
* :func:`task_combiner`, which turns a weight rule into an
  ``optax.experimental.aggregating.Aggregator`` (``TaskGrads`` in, one direction
  out) with input validation and the non-finite guard (any NaN/Inf in any task
  gives an all-zero direction and increments ``state.skipped``), plus
  the options every combiner shares: ``clip_norm`` (per-task clipping) and
  ``axis_name`` (global reductions over sharded gradients).

Sharding: under ``jax.shard_map`` (or ``pmap``) with gradients split over a
mesh axis, every norm and inner product must be summed over the shards. Pass
that axis as ``axis_name=`` (as optax.contrib's SAM takes ``batch_axis_name``):
max-abs scales are ``pmax``-ed and sums ``psum``-ed over it (`shard_sum`: under
``shard_map``, whose values say which axes they vary over, a leaf that is the
same on every shard counts once), so every shard computes the same weights as
the unsharded combiner. Leave it ``None`` for replicated gradients and under
``jit`` with sharded arrays (GSPMD reduces globally by itself).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
from optax.experimental import aggregating

from ngdiff_jax.optim.tasks import TWO_TASKS, check_task_grads, task_names

AxisName = Any  # a mesh axis name (str) or tuple of names, as jax.lax.psum takes

__all__ = [
    "CombinerState",
    "TaskWeights",
    "gram",
    "tree_max_abs",
    "tree_scaled_norm",
    "tree_scaled_vdot",
    "psum",
    "shard_sum",
    "shared_reductions",
    "task_combiner",
]


class CombinerState(NamedTuple):
    """State of a combiner.

    Attributes:
      skipped: number of steps whose inputs held a NaN or Inf (int32 scalar); those
        steps returned an all-zero direction.
      norms: ``{task: global L2 norm of its last gradient}`` (float32 scalars).
      weights: ``{task: its last weight w_i}`` in ``d = sum_i w_i g_i``.
    """

    skipped: jax.Array
    norms: dict
    weights: dict


class TaskWeights(NamedTuple):
    """What a weight rule returns: ``d = sum_i weights[i] * g_i`` and each task's norm (tuples in
    the order of the tasks)."""

    weights: tuple
    norms: tuple


def acc_dtype(x: jax.Array) -> jnp.dtype:
    return jnp.promote_types(jnp.asarray(x).dtype, jnp.float32)


_shared: contextvars.ContextVar[dict | None] = contextvars.ContextVar("ngdiff_shared_reductions", default=None)


@contextlib.contextmanager
def shared_reductions():
    """Within this block, the reductions of an array (`tree_max_abs`, `tree_scaled_norm`) are
    computed once per array and trace and reused: a step that logs a gradient's norm and then
    hands the gradient to a combiner reads each leaf once.

    XLA does not merge two reductions of the same leaf (not even identical ones): each reads the
    leaf again (memory traffic on any device), and two reductions of one bfloat16 leaf may share
    its float32 conversion, alive from the first reduction to the last: a float32 copy of the
    whole gradient tree (measured on CPU, SmolLM2 in bfloat16, the forget gradient's norm taken
    before the retain pass: 425 MB through that pass). It holds no platform choice: a cache of
    values computed in this trace. `ngdiff_jax.training.make_unlearn_step` runs its step inside
    this block."""
    token = _shared.set({})
    try:
        yield
    finally:
        _shared.reset(token)


def _leaf_moments(x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """``(max_i |x_i|, (small, medium, big))`` of one leaf: the max-abs and Blue's three scaled
    sums of squares (see `tree_scaled_norm`) in >= float32, in one pass; computed once per leaf
    inside `shared_reductions`."""
    cache = _shared.get()
    if cache is None:
        return _moments(x)
    trace = jax.extend.core.get_opaque_trace_state(convention="ngdiff")
    hit = cache.get(id(x))
    if hit is not None and hit[0] is x and hit[1] == trace:
        return hit[2]
    out = _moments(x)
    cache[id(x)] = (x, trace, out)  # holds x: its id is not reused while the block lasts
    return out


def _blue(dt):
    """Blue's constants for ``dt`` (LAPACK's ``dnrm2``, Anderson 2017): squares of entries in
    ``[t_small, t_big]`` are neither subnormal nor overflowing; smaller ones are summed times
    ``s_small``^2, larger ones times ``s_big``^2."""
    fi = jnp.finfo(dt)  # Fortran's MINEXPONENT is numpy's minexp + 1
    lo, hi, digits = int(fi.minexp) + 1, int(fi.maxexp), int(fi.nmant) + 1
    return (2.0 ** math.ceil((lo - 1) / 2), 2.0 ** math.floor((hi - digits + 1) / 2),
            2.0 ** -math.floor((lo - digits) / 2), 2.0 ** -math.ceil((hi + digits - 1) / 2))  # fmt: skip


def _moments(x: jax.Array):
    dt = acc_dtype(x)
    n = jnp.size(x)
    zero = jnp.zeros((), dt)
    if not n:
        return zero, (zero, zero, zero)
    t_small, t_big, s_small, s_big = _blue(dt)
    # Two stages: the pass over the leaf reduces rows of (at most) 128 entries, the partial
    # results (1/128 of the leaf) are reduced apart. A compiler may run a variadic reduction of a
    # whole array as one sequential sum (relative error ~1e-4 at 5e5 entries, as measured on CPU);
    # per row it stays ~1e-7 wherever it runs.
    row = next(k for k in (128, 64, 32, 16, 8, 4, 2, 1) if n % k == 0)
    ax = jnp.abs(jnp.asarray(x).astype(dt).reshape(n // row, row))
    small, big = ax < t_small, ax > t_big
    terms = (ax, jnp.where(small, jnp.square(ax * s_small), 0), jnp.where(small | big, 0, jnp.square(ax)),
             jnp.where(big, jnp.square(ax * s_big), 0))  # fmt: skip

    def combine(a, b):
        return jnp.maximum(a[0], b[0]), a[1] + b[1], a[2] + b[2], a[3] + b[3]

    parts = jax.lax.reduce(terms, (zero,) * 4, combine, (1,))
    return jnp.max(parts[0]), tuple(jnp.sum(p) for p in parts[1:])


def _narrow(x: jax.Array) -> bool:
    """Whether ``x`` is reduced in a wider dtype (bfloat16, float16): its reductions then read a
    conversion, which must happen once (`_leaf_moments`); a float32 leaf is read as it is."""
    return acc_dtype(x) != jnp.asarray(x).dtype


def _leaf_max_abs(x: jax.Array) -> jax.Array:
    if _narrow(x):
        return _leaf_moments(x)[0].astype(jnp.float32)
    return jnp.max(jnp.abs(x)).astype(jnp.float32) if jnp.size(x) else jnp.zeros((), jnp.float32)


def tree_max_abs(tree: Any, axis_name: AxisName = None) -> jax.Array:
    """``max_i |x_i|`` over all leaves as float32; NaN if any leaf holds a NaN.
    With ``axis_name``, over all shards of that mapped axis too.

    Because NaN propagates through ``max`` and ``|Inf| = Inf``, the result is
    finite exactly when every entry of every leaf is finite, so one reduction
    gives both the scale used by the robust norms and the finiteness check.
    """
    leaves = jax.tree.leaves(tree)
    if not leaves:
        m = jnp.zeros((), jnp.float32)
    else:
        m = jnp.max(jnp.stack([_leaf_max_abs(x) for x in leaves]))
    if axis_name is not None:
        # "some shard is not finite" is reduced separately, so the result is NaN exactly then.
        bad = jax.lax.pmax(jnp.where(jnp.isfinite(m), 0.0, 1.0), axis_name)
        m = jnp.where(bad > 0, jnp.nan, jax.lax.pmax(jnp.where(jnp.isfinite(m), m, 0.0), axis_name))
    return m


def safe_scale(max_abs: jax.Array) -> jax.Array:
    """The max-abs value itself where it is usable as a divisor, else 1."""
    ok = jnp.isfinite(max_abs) & (max_abs > 0)
    return jnp.where(ok, max_abs, jnp.ones_like(max_abs))


def tree_scaled_vdot(a: Any, b: Any, a_scale: jax.Array, b_scale: jax.Array,
                     axis_name: AxisName = None) -> jax.Array:
    """``sum_i (a_i / a_scale) * (b_i / b_scale)`` over all leaves, in >= float32 (and over
    the shards of ``axis_name``)."""

    def leaf(x, y):
        dt = jnp.promote_types(acc_dtype(x), acc_dtype(y))
        xs = x.astype(dt) / a_scale.astype(dt)
        ys = y.astype(dt) / b_scale.astype(dt)
        return jnp.sum(xs * ys).astype(jnp.float32)

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    parts = [leaf(x, y) for x, y in zip(la, lb)]
    return shard_sum(parts, list(zip(la, lb)), axis_name, jnp.zeros((), jnp.float32))


def gram(grads: tuple, maxes: tuple, axis_name: AxisName = None) -> tuple[jax.Array, jax.Array]:
    """``(s, G)``: each task's scale ``s_i`` (its max-abs, or 1 where that is 0) and the Gram matrix
    ``G_ij = (g_i / s_i) . (g_j / s_j)`` of the rescaled gradients (float32, k x k), so that
    ``g_i . g_j = s_i s_j G_ij`` without overflow or underflow."""
    k = len(grads)
    scales = jnp.stack([safe_scale(m) for m in maxes])
    rows = [[None] * k for _ in range(k)]
    for i in range(k):
        for j in range(i, k):
            rows[i][j] = rows[j][i] = tree_scaled_vdot(grads[i], grads[j], scales[i], scales[j], axis_name)
    return scales, jnp.stack([jnp.stack(r) for r in rows])


def psum(x: jax.Array, axis_name: AxisName) -> jax.Array:
    """``jax.lax.psum(x, axis_name)``, or ``x`` for ``axis_name=None``."""
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def axis_names(axis_name: AxisName) -> tuple:
    """``axis_name`` as a tuple of mapped-axis names (``()`` for None)."""
    if axis_name is None:
        return ()
    return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


def varying_axes(x) -> frozenset:
    """The mapped axes over which ``x`` may differ between shards (``shard_map`` tracks them;
    empty outside it, under ``pmap`` and with ``check_vma=False``)."""
    try:
        t = jax.typeof(x)
    except TypeError:
        return frozenset()
    mat = getattr(t, "manual_axis_type", None)  # newer JAX; older versions call it `vma`
    return frozenset(mat.varying) if mat is not None else frozenset(getattr(t, "vma", ()) or ())


def tracks_varying(axis_name: AxisName) -> bool:
    """Whether values here say which of ``axis_name``'s axes they vary over (``shard_map`` with
    ``check_vma``, JAX's default); under ``pmap`` or ``check_vma=False`` nothing is known."""
    return all(a in varying_axes(jax.lax.axis_index(a)) for a in axis_names(axis_name))


def shard_sum(parts: list, leaves: list, axis_name: AxisName, zero: jax.Array) -> jax.Array:
    """``sum(parts)`` where ``parts[i]`` is a partial sum over ``leaves[i]`` (a tuple of arrays), summed
    over the shards of the axes of ``axis_name`` that those leaves vary over. A leaf replicated over
    an axis (a gradient of replicated params, which ``jax.grad`` already reduced) counts once, not
    once per shard;
    where variation is not tracked (``pmap``), every part is summed over every axis."""
    axes = axis_names(axis_name)
    tracked = bool(axes) and tracks_varying(axis_name)
    groups: dict[tuple, jax.Array] = {}
    for part, xs in zip(parts, leaves):
        if not tracked:
            over = axes
        else:
            vary = frozenset().union(*(varying_axes(x) for x in xs))
            over = tuple(a for a in axes if a in vary)
        groups[over] = groups.get(over, zero) + part
    total = zero
    for over, part in groups.items():
        total = total + (jax.lax.psum(part, over) if over else part)
    return total


def tree_scaled_norm(tree: Any, max_abs: jax.Array | None = None, axis_name: AxisName = None) -> jax.Array:
    """Global L2 norm, exact to rounding over the whole float32 range: neither a gradient-ascent
    forget gradient of norm ``1e20`` overflows nor a tiny retain gradient underflows. Non-finite
    input gives a non-finite norm (``max_abs``, default computed, decides).

    float32 (and wider) leaves: ``s * ||x / s||`` with ``s = max|x|``. Narrower leaves
    (bfloat16): Blue's algorithm (as LAPACK's ``dnrm2``: entries too small or too large for a
    float32 square are summed in two scaled accumulators), from the same single pass over the
    leaf as its max-abs (`_leaf_moments`). The two parts are combined as a hypotenuse.
    """
    if max_abs is None:
        max_abs = tree_max_abs(tree, axis_name)
    leaves = jax.tree.leaves(tree)
    wide = [x for x in leaves if not _narrow(x)]
    narrow = [x for x in leaves if _narrow(x)]
    s = safe_scale(max_abs)
    norm_wide = s * jnp.sqrt(tree_scaled_vdot(wide, wide, s, s, axis_name)) if wide else None
    norm = _hypot(norm_wide, _blue_norm(narrow, axis_name)) if narrow else norm_wide
    if norm is None:
        norm = jnp.zeros((), jnp.float32)
    return jnp.where(jnp.isfinite(max_abs), norm, max_abs)


def _root(v: jax.Array) -> jax.Array:
    """``sqrt(v)`` for ``v > 0``; 1 otherwise, so that no branch that `jnp.where` discards
    differentiates ``sqrt`` at 0 (meta-gradients through the norms)."""
    return jnp.sqrt(jnp.where(v > 0, v, 1.0))


def _hypot(a: jax.Array | None, b: jax.Array) -> jax.Array:
    if a is None:
        return b
    hi, lo = jnp.maximum(a, b), jnp.minimum(a, b)
    return hi * jnp.sqrt(1 + jnp.square(lo / jnp.where(hi > 0, hi, 1.0)))


def _blue_norm(leaves: list, axis_name: AxisName) -> jax.Array:
    """The L2 norm of ``leaves`` from Blue's accumulators (LAPACK's ``dnrm2`` combination)."""
    _, _, s_small, s_big = _blue(jnp.float32)
    parts = [jnp.stack([p.astype(jnp.float32) for p in _leaf_moments(x)[1]]) for x in leaves]
    small, medium, big = shard_sum(parts, [(x,) for x in leaves], axis_name, jnp.zeros((3,), jnp.float32))
    # big dominates medium; small and medium are merged with care
    big_norm = _root(big + (medium * s_big) * s_big) / s_big
    m = jnp.where(medium > 0, _root(medium), 0.0)
    sm = _root(small) / s_small
    norm_small_medium = jnp.where(medium > 0, _hypot(m, sm), sm)
    return jnp.where(big > 0, big_norm, jnp.where(small > 0, norm_small_medium, m))


def _require_leaves(tree: Any, name: str, what: str) -> None:
    """A tree with no arrays would train nothing, silently (e.g. an NNX filter that selects nothing)."""
    if tree is not None and not jax.tree.leaves(tree):
        raise ValueError(
            f"{name}: {what} holds no arrays, so nothing would be trained. With Flax NNX check the filter: the "
            "LoRA adapters of ngdiff_jax.models.lora are lora.LoraParam (nnx.Optimizer(model, tx, "
            "wrt=lora.LoraParam), nnx.DiffState(0, lora.LoraParam)); nnx.LoRAParam selects nothing in our models."
        )


def _check_shards(grads: tuple, axis_name: AxisName, name: str) -> None:
    """Inside ``shard_map``, gradients that differ between shards (a gradient cut into shards)
    need ``axis_name``: without it every norm and inner product would be one shard's. (Gradients
    of replicated params are summed over the shards by ``jax.grad`` itself and vary nowhere.)"""
    leaves = [x for g in grads for x in jax.tree.leaves(g)]
    vary = frozenset().union(*(varying_axes(g) for g in leaves)) if leaves else frozenset()
    missing = sorted(vary - set(axis_names(axis_name)))
    if missing:
        raise ValueError(
            f"{name}: the gradients differ between the shards of the mapped axes {missing} (inside shard_map), but "
            f"axis_name={axis_name!r}: the norms and inner products would be one shard's. Pass axis_name="
            f"{missing[0]!r} (the combiner sums them over the shards of the leaves that vary there)."
        )


def _clip(tree: Any, max_abs: jax.Array, clip_norm: float, axis_name: AxisName):
    """``tree * min(1, clip_norm / ||tree||)`` (as ``optax.clip_by_global_norm``) and its new max-abs."""
    norm = tree_scaled_norm(tree, max_abs, axis_name)
    factor = jnp.where(norm > clip_norm, clip_norm / jnp.where(norm > 0, norm, 1.0), 1.0)
    clipped = jax.tree.map(lambda x: (x * factor.astype(acc_dtype(x))).astype(jnp.result_type(x)), tree)
    return clipped, max_abs * factor


def concrete(x) -> bool:
    """Whether ``x`` is a value (not a tracer): settings are range-checked when concrete; a traced
    setting (``vmap`` over a population's settings, ``inject_hyperparams`` under ``jit``) passes."""
    return not isinstance(x, jax.core.Tracer)


def task_combiner(
    weight_fn: Callable[..., TaskWeights],
    name: str,
    *,
    tasks: Sequence[str] = TWO_TASKS,
    clip_norm: float | None = None,
    axis_name: AxisName = None,
) -> aggregating.Aggregator:
    """Builds a combiner from a weight rule.

    Args:
      weight_fn: ``weight_fn(grads, max_abs, axis_name) -> TaskWeights``, with ``grads`` the
        task trees and ``max_abs`` their global ``max |g|`` (tuples, in task order; finite
        when it is called for real: on a skipped step its result is discarded). Its
        reductions must pass ``axis_name`` on (`tree_scaled_norm`, `tree_scaled_vdot`,
        `shard_sum`).
      name: used in error messages.
      tasks: the task names of the :class:`~ngdiff_jax.optim.TaskGrads` it combines, in
        order (at least two); they name the state's norms and weights.
      clip_norm: if set, each task's gradient is first clipped to this global L2 norm,
        separately (``optax.clip_by_global_norm`` per task); the state's norms are those
        before clipping.
      axis_name: mapped axis over which the gradients are sharded (see the module doc);
        ``None`` for whole gradients.

    Returns:
      An ``optax.experimental.aggregating.Aggregator`` (an
      ``optax.GradientTransformationExtraArgs``): ``update(task_grads, state, params=None,
      **extra_args)`` returns ``d = sum_i w_i g_i`` (params' structure, each leaf in its dtype),
      or zeros, counted in ``state.skipped``, when a task gradient is not finite. Extra
      arguments meant for later members of a chain (GeN's ``value_fn``) are ignored.
    """
    tasks = task_names(tasks, name)
    if clip_norm is not None and concrete(clip_norm) and not float(clip_norm) > 0:
        raise ValueError(f"{name}: clip_norm must be > 0 or None, got {clip_norm!r}.")

    def init_fn(params):
        _require_leaves(params, name, "params")
        # One buffer per field: a state whose leaves share a buffer cannot be
        # donated to a jitted step ("donate the same buffer twice").
        return CombinerState(
            skipped=jnp.zeros((), jnp.int32),
            norms={t: jnp.zeros((), jnp.float32) for t in tasks},
            weights={t: jnp.zeros((), jnp.float32) for t in tasks},
        )

    def update_fn(task_grads, state, params=None, **extra_args):
        del params
        if "forget_grads" in extra_args:
            raise ValueError(
                f"{name}: forget_grads= is gone; the task gradients travel as one value: "
                "tx.update(TaskGrads(retain=g_r, forget=g_f), state, params) (ngdiff_jax.optim.TaskGrads)."
            )
        grads = check_task_grads(task_grads, tasks, name).grads
        _require_leaves(grads[0], name, f"the {tasks[0]} gradient")
        _check_shards(grads, axis_name, name)
        maxes = [tree_max_abs(g, axis_name) for g in grads]
        finite = functools.reduce(jnp.logical_and, [jnp.isfinite(m) for m in maxes])
        if clip_norm is not None:
            norms0 = [tree_scaled_norm(g, m, axis_name) for g, m in zip(grads, maxes)]
            clipped = [_clip(g, m, clip_norm, axis_name) for g, m in zip(grads, maxes)]
            grads, maxes = [c[0] for c in clipped], [c[1] for c in clipped]
        w = weight_fn(tuple(grads), tuple(maxes), axis_name)
        norms = norms0 if clip_norm is not None else w.norms
        ws = [jnp.where(finite, x, 0.0).astype(jnp.float32) for x in w.weights]

        def leaf(*xs):
            dt = functools.reduce(jnp.promote_types, [acc_dtype(x) for x in xs])
            d = functools.reduce(operator.add, [wi.astype(dt) * x.astype(dt) for wi, x in zip(ws, xs)])
            d = jnp.where(finite, d, jnp.zeros_like(d))
            return d.astype(jnp.result_type(xs[0]))

        direction = jax.tree.map(leaf, *grads)
        new_state = CombinerState(
            skipped=state.skipped + jnp.where(finite, 0, 1).astype(jnp.int32),
            norms={t: jnp.asarray(n, jnp.float32) for t, n in zip(tasks, norms)},
            weights=dict(zip(tasks, ws)),
        )
        return direction, new_state

    return aggregating.Aggregator(init_fn, update_fn)
