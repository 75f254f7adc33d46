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

``at_once`` trades speed for memory: members are computed ``at_once`` at a time (``vmap``), the
groups one after the other in a loop that updates the carried state in place, so activations
and temporaries are those of ``at_once`` members while the state is every member's.
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


def population_step(
    build: Callable[[dict], Callable],
    *,
    max_skipped: int | None = None,
    member_axis: str = MEMBER_AXIS,
    extra_axes: Sequence[int | None] = (),
    at_once: int | None = None,
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
      at_once: members computed together (``vmap``); the ``K / at_once`` groups run one after the
        other in a loop (None: all ``K`` at once). Activations and temporaries scale with
        ``at_once``, the carried state with ``K``: with LoRA on a large model the population then
        costs little more memory than one run. ``at_once`` must divide ``K``; group ``i`` holds
        members ``i, i + K/at_once, ...`` (members spread over devices stay on their device).
    """

    def member(params, opt_state, key, alive, forget_batch, retain_batch, values, *extra):
        key, sub = jax.random.split(key)
        new_params, new_opt, metrics = build(values)(params, opt_state, forget_batch, retain_batch, sub, *extra)
        ok = _all_finite(new_params)
        if max_skipped is not None and "skipped" in metrics:
            ok = ok & (metrics["skipped"] <= max_skipped)
        keep = alive & ok
        new_params = jax.tree.map(lambda n, o: jnp.where(keep, n, o), new_params, params)
        new_opt = jax.tree.map(lambda n, o: jnp.where(keep, n, o), new_opt, opt_state)
        return new_params, new_opt, key, keep, metrics

    def step(params, state: MemberState, batches, rng, values, *extra):
        del rng  # each member's key is in the state
        forget_batch, retain_batch = batches
        axes = tuple(extra_axes) + (None,) * (len(extra) - len(extra_axes))
        mapped = jax.vmap(member, in_axes=(0, 0, 0, 0, 0, 0, 0, *axes), axis_name=member_axis)
        args = (params, state.opt_state, state.key, state.alive, forget_batch, retain_batch, values)
        k = state.alive.shape[0]
        if at_once is None or at_once >= k:
            new_params, new_opt, new_key, alive, metrics = mapped(*args, *extra)
        else:
            new_params, new_opt, new_key, alive, metrics = _in_groups(mapped, args, extra, axes, k, at_once)
        count = state.count + 1
        new_state = MemberState(
            opt_state=new_opt,
            key=new_key,
            alive=alive,
            stopped_at=jnp.where(state.alive & ~alive, count, state.stopped_at),
            count=count,
        )
        return new_params, new_state, {**metrics, "alive": alive}

    return step


def _in_groups(mapped, args, extra, axes, k: int, g: int):
    """``mapped`` over ``k`` members, ``g`` at a time: a loop over ``k // g`` groups whose carried
    outputs are updated in place, group by group."""
    if k % g:
        raise ValueError(f"population: {g} members at once do not divide the {k} members of the step.")
    n = k // g

    def view(x):  # member j * n + i -> [j, i]: group i takes one member of every block of n
        return x.reshape((g, n) + x.shape[1:])

    def take(tree, i):
        return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, axis=1, keepdims=False), tree)

    def put(tree, part, i):
        return jax.tree.map(lambda x, y: jax.lax.dynamic_update_index_in_dim(x, y, i, axis=1), tree, part)

    carried, read = jax.tree.map(view, args[:4]), jax.tree.map(view, args[4:])
    extra_v = tuple(jax.tree.map(view, e) if a == 0 else e for e, a in zip(extra, axes))

    def group_args(i, carry):
        ex = tuple(take(e, i) if a == 0 else e for e, a in zip(extra_v, axes))
        return (*take(carry, i), *take(read, i), *ex)

    shapes = jax.eval_shape(lambda c: mapped(*group_args(0, c)), carried)
    metrics0 = jax.tree.map(lambda s: jnp.zeros((g, n) + s.shape[1:], s.dtype), shapes[4])

    def body(i, state):
        carry, metrics = state
        p, o, key, alive, m = mapped(*group_args(i, carry))
        return put(carry, (p, o, key, alive), i), put(metrics, m, i)

    carry, metrics = jax.lax.fori_loop(0, n, body, (carried, metrics0))
    unview = lambda x: x.reshape((k,) + x.shape[2:])  # noqa: E731
    p, o, key, alive = jax.tree.map(unview, carry)
    return p, o, key, alive, jax.tree.map(unview, metrics)
