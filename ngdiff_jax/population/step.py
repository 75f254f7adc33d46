"""The population step: one two-task step ``vmap``-ed over a leading member axis.

``population_step(build)`` takes ``build(values) -> step``, a function that makes a single
run's step (``step(params, opt_state, forget_batch, retain_batch, rng, *extra) -> (params,
opt_state, metrics)``, e.g. ``make_unlearn_step`` over ``make_optimizer``) from the member's
settings, and returns

    pop_step(params, state, (forget_batch, retain_batch), rng, values, *extra)
        -> (params, state, metrics)

where every leaf of ``params``, ``state.opt_state``, the batches and ``values`` has a leading
member axis ``K`` and every metric is ``[K]``. Member ``k`` computes exactly the step of its
own run: its settings reach the optimizer and the losses as traced scalars, its RNG key
advances as a single run's (``state.key``, split once per step), and its batches are its own
seed's. ``extra`` arguments (the reference model of NPO/KL, a LoRA run's frozen base) are
shared by all members unless ``extra_axes`` maps them (e.g. each member's reference adapters).

A member whose weights become non-finite, or whose skipped (non-finite) steps pass
``max_skipped`` (a single run would be declared diverged), is *stopped*: from that step on
its parameters and optimizer state are kept as they were (``state.alive[k]`` false,
``state.stopped_at[k]`` the step), while the other members go on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["MEMBER_AXIS", "MemberState", "init_member_state", "population_step"]

#: The ``vmap`` axis name of a population (GeN's shared probing steps read it).
MEMBER_AXIS = "member"


class MemberState(NamedTuple):
    """What a population carries besides its parameters (leading member axis ``K``).

    Attributes:
      opt_state: every member's optimizer state.
      key: ``[K]`` RNG keys, each the sequence of its member's single run.
      alive: ``[K]`` whether a member is still updated.
      stopped_at: ``[K]`` the step at which a member was stopped (0: never).
      count: steps done (a scalar).
    """

    opt_state: Any
    key: jax.Array
    alive: jax.Array
    stopped_at: jax.Array
    count: jax.Array


def init_member_state(init: Callable[[Any], Callable], params, values, seeds, *, member_axis=MEMBER_AXIS):
    """The initial :class:`MemberState`: ``init(values_k)(params_k)`` per member (``init`` builds a
    member's optimizer, e.g. ``lambda v: make_optimizer(...).init``), keys ``PRNGKey(seed_k)``."""
    opt_state = jax.vmap(lambda v, p: init(v)(p), axis_name=member_axis)(values, params)
    seeds = jnp.asarray(seeds, jnp.uint32)
    k = seeds.shape[0]
    return MemberState(
        opt_state=opt_state,
        key=jax.vmap(jax.random.PRNGKey)(seeds),
        alive=jnp.ones((k,), bool),
        stopped_at=jnp.zeros((k,), jnp.int32),
        count=jnp.zeros((), jnp.int32),
    )


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


def _keep(alive, new, old):
    """``new`` where ``alive[k]``, else ``old``, leaf by leaf along the member axis."""
    def leaf(n, o):
        return jnp.where(alive.reshape(alive.shape + (1,) * (n.ndim - 1)), n, o)

    return jax.tree.map(leaf, new, old)


def population_step(
    build: Callable[[dict], Callable],
    *,
    max_skipped: int | None = None,
    member_axis: str = MEMBER_AXIS,
    extra_axes: Sequence[int | None] = (),
):
    """The population step of ``build`` (see the module doc).

    Args:
      build: ``build(values) -> step``; ``values`` maps each swept setting to the member's
        (traced) value.
      max_skipped: a member is stopped once more of its steps than this were skipped for
        non-finite gradients (None: never for that reason; non-finite weights always stop it).
      member_axis: the ``vmap`` axis name (GeN's ``member_axis``).
      extra_axes: for each trailing ``extra`` argument, 0 if it has a member axis, None if shared
        (missing entries: shared).
    """

    def member(params, opt_state, key, forget_batch, retain_batch, values, *extra):
        key, sub = jax.random.split(key)
        params, opt_state, metrics = build(values)(params, opt_state, forget_batch, retain_batch, sub, *extra)
        return params, opt_state, key, metrics

    def step(params, state: MemberState, batches, rng, values, *extra):
        del rng  # each member's key is in the state
        forget_batch, retain_batch = batches
        axes = tuple(extra_axes) + (None,) * (len(extra) - len(extra_axes))
        mapped = jax.vmap(member, in_axes=(0, 0, 0, 0, 0, 0, *axes), axis_name=member_axis)
        new_params, new_opt, new_key, metrics = mapped(params, state.opt_state, state.key, forget_batch,
                                                       retain_batch, values, *extra)  # fmt: skip
        ok = jax.vmap(_all_finite)(new_params)
        if max_skipped is not None and "skipped" in metrics:
            ok = ok & (metrics["skipped"] <= max_skipped)
        alive = state.alive & ok
        count = state.count + 1
        new_state = MemberState(
            opt_state=_keep(alive, new_opt, state.opt_state),
            key=new_key,
            alive=alive,
            stopped_at=jnp.where(state.alive & ~alive, count, state.stopped_at),
            count=count,
        )
        metrics = {**metrics, "alive": alive}
        return _keep(alive, new_params, params), new_state, metrics

    return step
