"""GeN: the generalized-Newton adaptive learning rate (Bu & Xu, 2024).

"Automatic gradient descent with generalized Newton's method" picks the
learning rate by fitting the loss along the update direction with a parabola.
Let ``u`` be the update per unit rate (optax's sign convention: the step is
``params + lr * u``) and :math:`\\ell(x) = L(\\theta + x u)`. Every ``every``
steps GeN evaluates :math:`\\ell` at :math:`x \\in \\{-\\eta, 0, +\\eta\\}`
(:math:`\\eta` the current rate; forward passes only), fits
:math:`\\ell(x) \\approx L_0 + b x + a x^2 / 2`,

.. math::

  b = \\frac{\\ell(\\eta) - \\ell(-\\eta)}{2\\eta}, \\qquad
  a = \\frac{\\ell(\\eta) - 2\\ell(0) + \\ell(-\\eta)}{\\eta^2}, \\qquad
  x^* = -\\frac{b}{a},

and updates the rate

.. math::

  \\eta \\leftarrow s\\,\\eta + (1 - s)\\,\\mathrm{clip}(x^*, \\eta / c, \\eta c)

(``s = smoothing``, ``c = clip_factor``). Where the fit is useless (``a <= 0``:
not convex along ``u``; ``b >= 0``: ``u`` is not a descent direction; or any
value is non-finite) the rate is kept. On a quadratic the fit is exact and
:math:`x^* = -(g \\cdot u)/(u^\\top A u)`, the exact line minimizer.

``scale_by_gen`` goes **last** in a chain and returns ``eta * u`` with the new
rate. Unlike the published PyTorch code, which steps Adam twice on probing
steps, the probes here only *read* ``u``, the final update of this step, so
every earlier member of the chain advances its state exactly once per step.
Non-probing steps do not run the probes (``lax.cond``; note that under
``vmap`` a ``cond`` becomes a ``select`` and both branches run).

Composition: the adapted rate lives in the state (``GeNState.learning_rate``,
an array), so ``scale_by_gen`` works under ``jit``, ``vmap`` (e.g. over initial
rates: ``jax.vmap(lambda lr: scale_by_gen(lr).init(params))``) and
``optax.inject_hyperparams``; ``optax.tree.set(state, learning_rate=x)`` sets
the live rate. (Under ``inject_hyperparams`` the injected ``learning_rate`` is
the *initial* rate, read by ``init``; ``tree.set`` sets it and the live rate
together. Inject ``rate_multiplier`` to schedule the step.) A schedule may
*multiply* the adapted rate, as the learning rate of ``optax.contrib.prodigy``
and ``dog`` multiplies theirs: ``rate_multiplier=`` (a number or
``count -> factor``); the probes use the adapted rate itself. With
data sharded over a mapped axis (``shard_map``/``pmap``) pass ``axis_name=``:
the probe losses are averaged over it, so every shard adapts the same rate.

Example:

  >>> import jax, jax.numpy as jnp, optax
  >>> from ngdiff_jax.optim import scale_by_gen
  >>> loss = lambda p: 0.5 * jnp.sum(jnp.array([1.0, 3.0]) * p["w"] ** 2)
  >>> params = {"w": jnp.array([1.0, 1.0])}
  >>> tx = optax.chain(optax.scale(-1.0), scale_by_gen(0.1, smoothing=0.0, clip_factor=100.0))
  >>> state = tx.init(params)
  >>> updates, state = tx.update(jax.grad(loss)(params), state, params, value_fn=loss)
  >>> round(float(state[1].learning_rate), 4)  # (g.g)/(g'Ag) = 10/28
  0.3571
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ngdiff_jax.backends import Backend, resolve
from ngdiff_jax.optim._base import concrete, tracks_varying, varying_axes
from ngdiff_jax.shifted import Shifted, accepts_shifted

__all__ = ["GeNState", "GivenRateGeNState", "gen_rate_estimate", "scale_by_gen"]


class GeNState(NamedTuple):
    """State of :func:`scale_by_gen`.

    Attributes:
      count: number of updates done so far (int32); probes run when
        ``count % every == 0`` (so on the first step).
      learning_rate: the current rate (float32).
    """

    count: jax.Array
    learning_rate: jax.Array


def _bound_axes() -> tuple:
    """The names of the mapped axes (``pmap``, ``shard_map``, named ``vmap``) being traced under."""
    try:
        from jax._src import core  # no public accessor; without it the check below is skipped

        return tuple(core.get_axis_env().axis_names())
    except Exception:
        return ()


def _vmapped(axis) -> bool:
    """Whether ``axis`` is a ``vmap`` axis (independent computations: each its own rate is right)."""
    return type(jax.lax.axis_index(axis)).__name__ == "BatchTracer"


def _refuse_unnamed_mapped_axes(member_axis) -> None:
    """GeN with no ``axis_name`` under a device axis whose values do not say whether they differ
    between its shards (``pmap``, ``shard_map`` without ``check_vma``): each replica would adapt
    its own rate and the replicas of one model would part silently. A ``vmap`` axis is left alone
    (independent runs, each its own rate; ``member_axis`` makes that cheaper), and under
    ``shard_map`` with ``check_vma`` the loss's type decides (see ``reduce``)."""
    names = [a for a in _bound_axes() if a != member_axis and not _vmapped(a) and not tracks_varying(a)]
    if names:
        raise ValueError(
            f"scale_by_gen runs under the mapped axes {names} with axis_name=None: each shard or replica would "
            f"adapt its own rate and the replicas of one model would part. Pass axis_name={names[0]!r} (data "
            "parallelism: GeN averages its probe losses over the replicas and all adapt one rate)."
        )


class GivenRateGeNState(NamedTuple):
    """State of :func:`scale_by_gen` given its rate as an array (``optax.inject_hyperparams``, a
    population's traced setting): :class:`GeNState`'s fields and ``given``, the rate it was given
    last; a different value given later replaces the adapted rate."""

    count: jax.Array
    learning_rate: jax.Array
    given: jax.Array


def _shifted(params: Any, updates: Any, step: jax.Array, lazy: bool = False) -> Any:
    point = Shifted(params, updates, step)
    return point if lazy else point.materialize()


def _scalar(v: Any, what: str) -> jax.Array:
    v = jnp.asarray(v)
    if v.shape != ():
        raise ValueError(
            f"scale_by_gen: {what} must be a scalar loss, got shape {v.shape}; "
            f"reduce it (e.g. with .mean()) inside value_fn."
        )
    return v.astype(jnp.float32)


def gen_rate_estimate(
    loss_minus: jax.Array,
    loss_zero: jax.Array,
    loss_plus: jax.Array,
    learning_rate: jax.Array,
    *,
    smoothing: float,
    clip_factor: float,
) -> jax.Array:
    """The GeN rate update from the three probe losses (a pure function).

    Args:
      loss_minus, loss_zero, loss_plus: the loss at ``params + r * lr * u`` for
        ``r = -1, 0, +1``.
      learning_rate: the current rate ``lr`` (> 0).
      smoothing: weight of the old rate in the moving average.
      clip_factor: ``x*`` is clipped to ``[lr / clip_factor, lr * clip_factor]``.

    Returns:
      The new rate, or ``learning_rate`` unchanged where the fit is not usable.
    """
    lr = jnp.asarray(learning_rate, jnp.float32)
    slope = loss_plus - loss_minus  # 2 * lr * b
    curvature = loss_plus - 2.0 * loss_zero + loss_minus  # lr^2 * a
    ok = jnp.isfinite(slope) & jnp.isfinite(curvature) & (curvature > 0) & (slope < 0)
    x_star = -0.5 * lr * slope / jnp.where(ok, curvature, 1.0)
    x_star = jnp.clip(x_star, lr / clip_factor, lr * clip_factor)
    new_lr = smoothing * lr + (1.0 - smoothing) * x_star
    return jnp.where(ok & jnp.isfinite(new_lr), new_lr, lr)


def scale_by_gen(
    learning_rate: float,
    *,
    every: int = 4,
    smoothing: float = 0.9,
    clip_factor: float = 2.0,
    rate_multiplier: optax.ScalarOrSchedule = 1.0,
    axis_name=None,
    member_axis=None,
    backend: Backend | str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Scales updates by the GeN adaptive learning rate.

    Args:
      learning_rate: initial rate (a positive number or scalar array, not a
        schedule: GeN is the schedule; see ``rate_multiplier``).
      every: probe (3 forward passes, 2 with ``value=``) every ``every`` steps.
      smoothing: moving-average weight of the old rate, in ``[0, 1)``; 0 jumps
        straight to the (clipped) estimate.
      clip_factor: the estimate is clipped to ``[lr / clip_factor,
        lr * clip_factor]`` (>= 1), so one probe changes the rate by at most that
        factor.
      rate_multiplier: a number or schedule ``count -> factor`` multiplying the
        adapted rate in the update (warm-up, decay); the probes and the state
        use the adapted rate alone.
      axis_name: mapped axis over which ``value_fn``'s batch is sharded; the
        probe losses are ``pmean``-ed over it.
      member_axis: the ``vmap`` axis name of a population of independent runs
        (``jax.vmap(..., axis_name=member_axis)``, see ``ngdiff_jax.population``).
        Under ``vmap`` a ``lax.cond`` whose predicate differs per member becomes
        a ``select`` that runs the probes on every step; with ``member_axis`` the
        probes run on the steps where any member's schedule asks for them (all
        steps share one schedule unless ``every`` itself differs per member), and
        each member adopts its new rate only on its own probing steps, so every
        member's result is that of its own run.
      backend: the `ngdiff_jax.backends.Backend` (or its name) that orders the two probes
        (`Backend.after`: one shifted point at a time) and carries the parameters and update
        through the probing ``lax.cond`` (`Backend.carry`); ``None``: the default platform's,
        chosen here. The values do not depend on it.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with
      ``update(updates, state, params, *, value_fn, value=None, **extra_args)``.
      ``value_fn(params) -> scalar loss`` (close over the batch; it receives the
      ``params`` given to ``update`` shifted along ``updates``, same structure;
      a ``value_fn`` marked with `ngdiff_jax.shifted.takes_shifted` receives that
      point as a `ngdiff_jax.shifted.Shifted` and computes each weight itself,
      e.g. one layer at a time, so the point is never a whole tree);
      ``value`` is optional and must equal ``value_fn(params)`` if given (saves
      one forward pass). Returns ``(lr * updates, GeNState)``.
    """
    if callable(learning_rate):
        raise TypeError(
            "scale_by_gen: learning_rate must be a positive number (the initial "
            "rate); GeN adapts it itself, so schedules are not accepted. Use "
            "unlearning_optimizer(..., gen=False) for a scheduled rate."
        )
    # Checked when concrete; traced values (inject_hyperparams under jit, vmap over rates) pass.
    if concrete(learning_rate) and not float(learning_rate) > 0:
        raise ValueError(f"scale_by_gen: learning_rate must be > 0, got {learning_rate!r}.")
    if concrete(every) and (int(every) != every or every < 1):
        raise ValueError(f"scale_by_gen: every must be an integer >= 1, got {every!r}.")
    if concrete(smoothing) and not 0.0 <= float(smoothing) < 1.0:
        raise ValueError(f"scale_by_gen: smoothing must be in [0, 1), got {smoothing!r}.")
    if concrete(clip_factor) and not float(clip_factor) >= 1.0:
        raise ValueError(f"scale_by_gen: clip_factor must be >= 1, got {clip_factor!r}.")
    if isinstance(every, (int, float)):
        every = int(every)
    backend = resolve(backend)

    def multiplier(count):
        m = rate_multiplier(count) if callable(rate_multiplier) else rate_multiplier
        return jnp.asarray(m, jnp.float32)

    def reduce(loss):
        if axis_name is not None:
            return jax.lax.pmean(loss, axis_name)
        vary = sorted(varying_axes(loss))
        if vary:  # each shard would fit its own rate from its own batch, and the rates would part
            raise ValueError(
                f"scale_by_gen: value_fn's loss differs between the shards of the mapped axes {vary} (a batch "
                f"sharded inside shard_map), but axis_name=None: pass axis_name={vary[0]!r} so that GeN "
                "averages its probe losses over the shards and every shard adapts the same rate."
            )
        return loss

    # A rate given as an array (optax.inject_hyperparams' value, a population's setting) may be
    # changed between updates: the state then also keeps the value it was given last, and a new
    # value replaces the adapted rate (as setting it in the state does). A number cannot change.
    given = not isinstance(learning_rate, (int, float))

    def init_fn(params):
        del params
        lr0 = jnp.asarray(learning_rate, jnp.float32) + jnp.zeros((), jnp.float32)
        if given:
            # `given` its own buffer: a state whose leaves share one cannot be donated
            return GivenRateGeNState(count=jnp.zeros((), jnp.int32), learning_rate=lr0, given=lr0 + 0.0)
        return GeNState(count=jnp.zeros((), jnp.int32), learning_rate=lr0)

    def update_fn(
        updates,
        state: GeNState,
        params=None,
        *,
        value_fn: Callable[[Any], jax.Array] | None = None,
        value: jax.Array | None = None,
        **extra_args,
    ):
        del extra_args
        if value_fn is None:
            raise ValueError(
                "scale_by_gen needs value_fn: call update(updates, state, params, "
                "value_fn=loss_of_params) where loss_of_params(params) returns the "
                "scalar loss on the current batch (close over the batch)."
            )
        if not callable(value_fn):
            raise TypeError(
                f"scale_by_gen: value_fn must be callable, got {type(value_fn).__name__}."
            )
        if params is None:
            raise ValueError(
                "scale_by_gen needs params: call update(updates, state, params, value_fn=...)."
            )
        masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
        if any(masked(x) for x in jax.tree.leaves(params, is_leaf=masked)):
            raise ValueError(
                "scale_by_gen under optax.masked / optax.multi_transform: the params it would pass "
                "to value_fn lack the masked-out leaves, so the loss cannot be evaluated; keep GeN "
                "outside the mask (mask the transformations inside the chain, e.g. "
                "unlearning_optimizer(..., optimizer=optax.multi_transform(...))) or use gen=False."
            )
        if axis_name is None:
            _refuse_unnamed_mapped_axes(member_axis)
        lr = jnp.asarray(state.learning_rate, jnp.float32)
        if given:
            new_given = jnp.asarray(learning_rate, jnp.float32)
            lr = jnp.where(new_given != state.given, new_given, lr)
        # The branches read the parameters and the update as the backend carries them through a
        # `lax.cond` (the CPU backend: bfloat16 as bits, which a cond does not copy; the update
        # carried after `lr` is one buffer, read by the cond and after it).
        carried = jax.tree.map(backend.carry, params)
        carried_updates = jax.tree.map(lambda u: backend.carry(u, lr), updates)

        # A value_fn marked `takes_shifted` gets the probe point unmade (ngdiff_jax.shifted) and
        # makes each weight where it reads it: no parameter-sized probe point.
        lazy = accepts_shifted(value_fn)

        def probe():
            params, updates = jax.tree.map(backend.uncarry, (carried, carried_updates))
            loss_minus = reduce(_scalar(value_fn(_shifted(params, updates, -lr, lazy)), "value_fn(params)"))
            # The second probe waits for the first (`Backend.after`): one shifted copy of the
            # parameters at a time instead of two.
            loss_plus = reduce(_scalar(value_fn(_shifted(params, updates, backend.after(lr, loss_minus), lazy)),
                                       "value_fn(params)"))
            if value is None:
                loss_zero = reduce(_scalar(value_fn(params), "value_fn(params)"))
            else:
                loss_zero = reduce(_scalar(value, "value"))
            return gen_rate_estimate(
                loss_minus,
                loss_zero,
                loss_plus,
                lr,
                smoothing=smoothing,
                clip_factor=clip_factor,
            )

        leaves, tree = jax.tree.flatten(carried_updates)
        dtypes = [u.dtype for u in jax.tree.leaves(updates)]
        bits = [c.dtype != dt for c, dt in zip(leaves, dtypes)]  # the leaves carried in another form

        def scaled(rate, which):  # made where it is called: inside a branch, or after the cond
            step = rate * multiplier(state.count)
            return [step.astype(dt) * backend.uncarry(c) for c, dt, b in zip(leaves, dtypes, bits) if b == which]

        # Other leaves are scaled inside each branch: made after the cond, XLA recomputed them
        # from the previous member's output (e.g. Adam's m / (sqrt(v) + eps)) and kept that alive
        # through the probes, a parameter-sized tree more (SmolLM2 float32 with remat: step
        # temporaries 1546 -> 1133 MB). Leaves carried in another form (bfloat16 bits) are scaled
        # after it, from that form: as the cond's output they were a tree next to the update
        # (SmolLM2: 257 MiB).
        def probing():
            rate = probe()
            return rate, scaled(rate, False)

        due = state.count % every == 0
        if member_axis is None:
            new_lr, inside = jax.lax.cond(due, probing, lambda: (lr, scaled(lr, False)))
        else:  # one branch for the population; each member keeps its rate off its own schedule
            def probing_members():
                rate = jnp.where(due, probe(), lr)
                return rate, scaled(rate, False)

            anyone = jax.lax.pmax(due.astype(jnp.int32), member_axis) > 0
            new_lr, inside = jax.lax.cond(anyone, probing_members, lambda: (lr, scaled(lr, False)))
        after, inside = iter(scaled(new_lr, True)), iter(inside)
        new_updates = tree.unflatten([next(after) if b else next(inside) for b in bits])
        count = optax.safe_increment(state.count)
        new_state = GivenRateGeNState(count, new_lr, new_given) if given else GeNState(count, new_lr)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
