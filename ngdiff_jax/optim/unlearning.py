"""The paper's full unlearning optimizer as one optax chain.

:func:`unlearning_optimizer` builds, in this order,

1. a combiner (NGDiff by default) turning the task gradients
   ``TaskGrads(retain=g_r, forget=g_f)`` into one gradient-like direction ``d``
   (an ``optax.experimental.aggregating.Aggregator``), optionally clipped to a global norm
   (``max_grad_norm``, :func:`clip_by_total_norm`);
2. the inner optimizer's preconditioning of ``d``: Adam
   (``optax.scale_by_adam``) by default, or any single-task optax transform
   given as ``optimizer=`` (``optax.scale_by_lion()``, ``optax.identity()``);
3. optionally decoupled weight decay (``optax.add_decayed_weights``), so that
   the rate scales it as in AdamW;
4. the negation ``u = -(...)`` (optax's sign convention: ``params + lr * u``);
5. the rate: GeN (:func:`~ngdiff_jax.optim.scale_by_gen`) or a fixed or
   scheduled rate (:func:`scale_by_rate`, which records the rate in its state
   for logging);

all wrapped in :func:`skip_if_nonfinite`, which skips the *whole* step
(zero update, every inner state unchanged, Adam moments included) when any task
gradient holds a NaN/Inf, and counts it (see docs/optim.md).
``optax.apply_updates(params, updates)`` then decreases both losses to first
order.

Meta-gradients (``jax.grad`` through unlearning steps) need ``eps_root > 0``:
Adam's ``sqrt(nu)`` has an infinite derivative at ``nu = 0``, which exactly-zero
gradient entries (e.g. embedding rows of tokens absent from the batch) reach.

Calling convention of the chain::

  updates, opt_state = tx.update(TaskGrads(retain=retain_grads, forget=forget_grads),
                                 opt_state, params,
                                 value_fn=loss_of_params,  # GeN only
                                 value=loss_at_params)     # optional

With Flax NNX: ``optimizer = ngdiff_jax.optim.TaskOptimizer(model, tx, wrt=nnx.Param)`` and
``optimizer.update(model, TaskGrads(retain=g_r, forget=g_f), value_fn=...)`` with the
gradients from ``nnx.grad`` as they are. There ``params`` (and so what ``value_fn``
receives) is the pure ``nnx.State`` of the ``wrt`` variables (``nnx.as_pure(nnx.state(model,
nnx.Param))``); rebuild a model inside ``value_fn`` with ``nnx.merge(graphdef, params, rest)``.

Example:

  >>> import jax, jax.numpy as jnp, optax
  >>> from ngdiff_jax.optim import TaskGrads, unlearning_optimizer, inject_stats
  >>> x = jnp.array([[1.0, 2.0], [0.5, -1.0]])
  >>> retain = lambda p: jnp.mean((x @ p["w"] - 1.0) ** 2)
  >>> forget = lambda p: -jnp.mean((x @ p["w"] + 1.0) ** 2)  # ascent, minimized
  >>> params = {"w": jnp.zeros(2)}
  >>> tx = unlearning_optimizer("ngdiff", 1e-2)
  >>> opt_state = tx.init(params)
  >>> grads = TaskGrads(retain=jax.grad(retain)(params), forget=jax.grad(forget)(params))
  >>> updates, opt_state = tx.update(grads, opt_state, params, value_fn=retain)
  >>> params = optax.apply_updates(params, updates)
  >>> sorted(inject_stats(opt_state))
  ['forget_norm', 'forget_weight', 'learning_rate', 'retain_norm', 'retain_weight', 'skipped']
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax.experimental import aggregating

from ngdiff_jax.optim._base import concrete, tree_max_abs, tree_scaled_norm
from ngdiff_jax.optim.gdiff import gdiff
from ngdiff_jax.optim.gen import scale_by_gen
from ngdiff_jax.optim.guarded_adam import is_self_guarded, scale_by_guarded_adam
from ngdiff_jax.optim.mgda import mgda
from ngdiff_jax.optim.ngdiff import ngdiff
from ngdiff_jax.optim.pcgrad import pcgrad
from ngdiff_jax.optim.tasks import TaskGrads

__all__ = [
    "COMBINERS",
    "RateState",
    "SkipNonFiniteState",
    "scale_by_rate",
    "skip_if_nonfinite",
    "unlearning_optimizer",
]

#: Combiner names accepted by :func:`unlearning_optimizer`; ``"none"`` is the
#: plain sum ``g_r + g_f`` (``gdiff(1, 1)``).
COMBINERS = {
    "ngdiff": ngdiff,
    "gdiff": gdiff,
    "mgda": mgda,
    "pcgrad": pcgrad,
    "none": lambda: gdiff(1.0, 1.0),
}


class RateState(NamedTuple):
    """State of :func:`scale_by_rate`: step count and the last rate used."""

    count: jax.Array
    learning_rate: jax.Array


def scale_by_rate(learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
    """``updates -> lr(count) * updates`` (no negation), recording the rate.

    Like ``optax.scale_by_schedule`` but the state keeps the rate used last, so
    :func:`~ngdiff_jax.optim.inject_stats` can report it. A constant given as a number is read
    from the state at each step, so ``optax.tree.set(state, learning_rate=x)`` changes it; a
    schedule (or an array, e.g. from ``optax.inject_hyperparams``) decides the rate itself and
    the state only records it.

    Args:
      learning_rate: a float or an optax schedule ``count -> rate``.
    """

    def rate(count):
        return jnp.asarray(
            learning_rate(count) if callable(learning_rate) else learning_rate, jnp.float32
        )

    def init_fn(params):
        del params
        return RateState(
            count=jnp.zeros((), jnp.int32), learning_rate=rate(jnp.zeros((), jnp.int32))
        )

    def update_fn(updates, state, params=None):
        del params
        if isinstance(learning_rate, (int, float)):  # the state holds the rate (see the docstring)
            lr = jnp.asarray(state.learning_rate, jnp.float32)
        else:
            lr = rate(state.count)
        updates = jax.tree.map(lambda u: lr.astype(jnp.result_type(u)) * u, updates)
        return updates, RateState(count=optax.safe_increment(state.count), learning_rate=lr)

    return optax.GradientTransformation(init_fn, update_fn)


def clip_by_total_norm(max_norm: float, axis_name: Any = None) -> optax.GradientTransformation:
    """Clip the combined direction to global L2 norm ``max_norm`` (Hugging Face Trainer's
    ``max_grad_norm``: open-unlearning clips the gradient of ``gamma * L_f + alpha * L_r``,
    which is the gradient-difference direction, before AdamW).

    ``u -> u * min(1, max_norm / (||u|| + 1e-6))``, as ``torch.nn.utils.clip_grad_norm_``
    (which the Trainer calls; ``optax.clip_by_global_norm`` has no ``1e-6``); the norm is
    :func:`~ngdiff_jax.optim._base.tree_scaled_norm` (no overflow of a large ascent gradient,
    bf16 leaves summed in float32) and, with ``axis_name``, summed over the shards of that
    mapped axis (``shard_map``). A non-finite direction passes unchanged (the step is
    skipped by :func:`skip_if_nonfinite`).

    Args:
      max_norm: the largest global norm of the direction, > 0.
      axis_name: the mapped axis of sharded gradients inside ``shard_map``, or None.
    """
    if concrete(max_norm) and not float(max_norm) > 0:
        raise ValueError(f"clip_by_total_norm: max_norm must be > 0, got {max_norm!r}.")

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        norm = tree_scaled_norm(updates, None, axis_name)
        factor = jnp.where(jnp.isfinite(norm), jnp.minimum(max_norm / (norm + 1e-6), 1.0), 1.0)
        clipped = jax.tree.map(lambda u: (u * factor.astype(jnp.result_type(u))).astype(jnp.result_type(u)), updates)
        return clipped, state

    return optax.GradientTransformation(init_fn, update_fn)


class SkipNonFiniteState(NamedTuple):
    """State of :func:`skip_if_nonfinite`."""

    skipped: jax.Array
    inner_state: Any


def skip_if_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Skips the whole step of ``inner`` when any of its input gradients is not finite.

    ``update(task_grads, state, params=None, **extra)`` runs ``inner`` and, if any
    entry of any task's gradient is NaN/Inf, returns all-zero updates and the
    *previous* inner state (so e.g. Adam's moments and count do not move),
    incrementing ``state.skipped``. ``optax.apply_if_finite`` cannot take its place around
    a combiner chain (its skipped branch returns zeros shaped like its input, a ``TaskGrads``:
    it fails by tree structure). Transformations that guard themselves in place
    (:func:`~ngdiff_jax.optim.scale_by_guarded_adam`) are skipped without a select over their state.
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return SkipNonFiniteState(skipped=jnp.zeros((), jnp.int32), inner_state=inner.init(params))

    def update_fn(grads, state, params=None, **extra_args):
        finite = functools.reduce(jnp.logical_and, [jnp.isfinite(tree_max_abs(g)) for g in _tasks_of(grads)])
        # Transformations that skip themselves in place (scale_by_guarded_adam) read this; their
        # state is left out of the select below, which would keep old and new state alive together.
        extra_args["step_is_finite"] = finite
        updates, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
        updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
        def keep(new, old):
            return new if is_self_guarded(new) else jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        inner_state = jax.tree.map(keep, inner_state, state.inner_state, is_leaf=is_self_guarded)
        skipped = state.skipped + jnp.where(finite, 0, 1).astype(jnp.int32)
        return updates, SkipNonFiniteState(skipped=skipped, inner_state=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _tasks_of(grads) -> list:
    """The task trees of a `TaskGrads` (each checked apart), or ``[grads]``."""
    return list(grads.grads) if isinstance(grads, TaskGrads) else [grads]


def _combiner(combiner, clip_norm, axis_name):
    if isinstance(combiner, str):
        if combiner not in COMBINERS:
            raise ValueError(
                f"unlearning_optimizer: unknown combiner {combiner!r}; use one of "
                f"{sorted(COMBINERS)} or pass a combiner such as ngdiff(eps=1e-8)."
            )
        if combiner == "none":
            return gdiff(1.0, 1.0, clip_norm=clip_norm, axis_name=axis_name)
        return COMBINERS[combiner](clip_norm=clip_norm, axis_name=axis_name)
    if not isinstance(combiner, optax.GradientTransformation):
        raise TypeError(
            f"unlearning_optimizer: combiner must be a name or a combiner, got "
            f"{type(combiner).__name__}."
        )
    if not isinstance(combiner, aggregating.Aggregator):
        raise TypeError(
            "unlearning_optimizer: combiner must be a combiner, an optax.experimental.aggregating.Aggregator "
            "from TaskGrads to one direction (ngdiff, gdiff, mgda, pcgrad, task_combiner(...), or "
            "aggregating.process(per_task(...), combiner, ...)); a single-task transformation such as "
            "optax.sgd does not combine the tasks. Pass the inner optimizer as optimizer= instead."
        )
    if clip_norm is not None:
        raise ValueError(
            "unlearning_optimizer: clip_norm= configures a combiner given by name; pass it to the "
            "combiner itself, e.g. ngdiff(clip_norm=1.0)."
        )
    return combiner  # it carries its own axis_name; unlearning_optimizer's goes to GeN


def unlearning_optimizer(
    combiner: str | optax.GradientTransformation = "ngdiff",
    learning_rate: optax.ScalarOrSchedule = 1e-5,
    *,
    optimizer: optax.GradientTransformation | None = None,
    adam: bool = True,
    gen: bool = True,
    gen_every: int = 4,
    gen_smoothing: float = 0.9,
    gen_clip_factor: float = 2.0,
    b1: float = 0.9,
    b2: float = 0.999,
    adam_eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    clip_norm: float | None = None,
    max_grad_norm: float | None = None,
    axis_name: Any = None,
    member_axis: Any = None,
    skip_nonfinite: bool = True,
    backend: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """The paper's unlearning optimizer: combiner -> optimizer (Adam) -> weight decay -> -(GeN | rate).

    Args:
      combiner: ``"ngdiff"``, ``"gdiff"``, ``"mgda"``, ``"pcgrad"``, ``"none"``
        (plain sum ``g_r + g_f``, same as ``gdiff(1, 1)``), or a two-task
        combiner object (an ``optax.experimental.aggregating.Aggregator``: e.g.
        ``ngdiff(eps=...)``, ``gdiff(1.0, 0.2)``, ``ngdiff(tasks=(...))`` for k tasks).
        A single-task transformation (``optax.sgd(1.0)``) is refused.
      learning_rate: with ``gen=True`` the initial GeN rate (a float); otherwise
        a float or an optax schedule.
      optimizer: the single-task transformation applied to the combined
        direction before the rate, e.g. ``optax.scale_by_adam(b1=0.9,
        eps_root=1e-16)`` or ``optax.scale_by_lion()``; default Adam built from
        ``b1, b2, adam_eps, eps_root, mu_dtype``.
      adam: with ``optimizer=None``, ``False`` leaves the direction
        unpreconditioned (``optax.identity()``).
      gen: adapt the rate with GeN (then ``update`` needs ``value_fn=``).
      gen_every, gen_smoothing, gen_clip_factor: GeN's ``every``, ``smoothing``
        and ``clip_factor`` (see :func:`~ngdiff_jax.optim.scale_by_gen`).
      b1, b2, adam_eps, eps_root, mu_dtype: the default Adam's parameters
        (``optax.scale_by_adam``); ``eps_root > 0`` makes meta-gradients finite.
      weight_decay: decoupled weight decay ``optax.add_decayed_weights(
        weight_decay, weight_decay_mask)`` after the optimizer, scaled by the
        (GeN or fixed) rate as in AdamW.
      clip_norm: per-task clipping of a combiner given by name (see
        :func:`~ngdiff_jax.optim.task_combiner`).
      max_grad_norm: clip the combined direction to this global L2 norm before the
        optimizer (:func:`clip_by_total_norm`; open-unlearning's and Hugging Face
        Trainer's ``max_grad_norm: 1.0``, which clips the gradient of the summed
        loss), or None.
      axis_name: mapped axis of sharded gradients for a combiner given by name
        (a combiner object carries its own) and for GeN's probe losses (see
        docs/optim.md, "Sharding").
      member_axis: the ``vmap`` axis name of a population of independent runs
        (``ngdiff_jax.population``): GeN's members probe on shared steps (see
        :func:`~ngdiff_jax.optim.scale_by_gen`).
      skip_nonfinite: wrap the chain in :func:`skip_if_nonfinite`.
      backend: GeN's `ngdiff_jax.backends.Backend` (or its name; see
        :func:`~ngdiff_jax.optim.scale_by_gen`); ``None``: the default platform's.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; ``update(task_grads,
      state, params, *, value_fn=None, value=None)`` (``task_grads`` a
      :class:`~ngdiff_jax.optim.TaskGrads`) returns updates for ``optax.apply_updates``.
    """
    combine = _combiner(combiner, clip_norm, axis_name)
    if gen and callable(learning_rate):
        raise TypeError(
            "unlearning_optimizer: with gen=True the learning rate is GeN's initial "
            "rate and must be a number; pass gen=False to use a schedule."
        )
    if optimizer is not None and not adam:
        raise ValueError("unlearning_optimizer: optimizer= replaces Adam; do not also pass adam=False.")
    if isinstance(optimizer, aggregating.Aggregator):
        raise ValueError("unlearning_optimizer: optimizer= is the single-task part after the combiner; "
                         "pass the combiner as combiner=.")
    if concrete(weight_decay) and not weight_decay >= 0:
        raise ValueError(f"unlearning_optimizer: weight_decay must be >= 0, got {weight_decay!r}.")
    if optimizer is None:  # optax's Adam; with the guard, the variant that skips in place (same numbers)
        make_adam = scale_by_guarded_adam if skip_nonfinite else optax.scale_by_adam
        optimizer = make_adam(b1=b1, b2=b2, eps=adam_eps, eps_root=eps_root, mu_dtype=mu_dtype) if adam else None
    parts = [combine]
    if max_grad_norm is not None:
        parts.append(clip_by_total_norm(max_grad_norm, axis_name))
    if optimizer is not None:
        parts.append(optimizer)
    # the chain's shape must not depend on the value: an array (inject_hyperparams' init) or a tracer
    # (its update under jit, a population's setting) may be 0 and still gets the member
    if not isinstance(weight_decay, (int, float)) or weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay, weight_decay_mask))
    parts.append(optax.scale(-1.0))
    if gen:
        parts.append(
            scale_by_gen(
                learning_rate, every=gen_every, smoothing=gen_smoothing, clip_factor=gen_clip_factor,
                axis_name=axis_name, member_axis=member_axis, backend=backend,
            )
        )
    else:
        parts.append(scale_by_rate(learning_rate))
    tx = optax.chain(*parts)
    if skip_nonfinite:
        tx = skip_if_nonfinite(tx)
    return tx
