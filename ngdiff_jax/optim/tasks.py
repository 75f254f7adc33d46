"""Per-task gradients as one value: what a combiner aggregates.

An unlearning update has several gradients, one per task: the retain loss and one forget
objective (or several forget sets). They travel through optax as **one** pytree, a
:class:`TaskGrads`, in the place of ``updates``:

.. code-block:: python

  grads = TaskGrads(retain=jax.grad(retain_loss)(params), forget=jax.grad(forget_obj)(params))
  updates, state = tx.update(grads, state, params)        # tx = optax.chain(ngdiff(), ...)

A combiner (:func:`~ngdiff_jax.optim.ngdiff`, ``gdiff``, ``mgda``, ``pcgrad``) is an
``optax.experimental.aggregating.Aggregator``: ``TaskGrads`` in, one direction with the params'
structure out; what follows it in a chain is single-task optax. A generic optax wrapper
around the chain sees every task, because it sees ``updates``: ``optax.apply_if_finite`` checks
all of them, ``optax.clip_by_global_norm`` in front of the combiner clips them jointly, and
wrappers that need ``updates`` to look like the params (``optax.MultiSteps``, ``optax.masked``,
``optax.multi_transform``) fail on the tree structure instead of treating one task alone.
:func:`per_task` applies a single-task transformation to each task separately (per-task
clipping), as ``process(per_task(...), combiner, postprocessor)`` or at the head of a chain.

Example:

  >>> import jax.numpy as jnp, optax
  >>> from ngdiff_jax.optim import TaskGrads, ngdiff, per_task
  >>> params = {"w": jnp.zeros(2)}
  >>> grads = TaskGrads(retain={"w": jnp.array([3.0, 4.0])}, forget={"w": jnp.array([0.0, -1e6])})
  >>> grads.names
  ('retain', 'forget')
  >>> tx = optax.chain(per_task(optax.clip_by_global_norm(1.0)), ngdiff(), optax.sgd(0.1))
  >>> updates, state = tx.update(grads, tx.init(params), params)
  >>> [round(float(x), 4) for x in updates["w"]]
  [-0.06, 0.02]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import optax

__all__ = ["TaskGrads", "PerTaskState", "per_task", "check_task_grads", "task_names"]

#: The two tasks of unlearning, in the order a combiner's weights and norms are reported.
TWO_TASKS = ("retain", "forget")


@jax.tree_util.register_pytree_with_keys_class
class TaskGrads:
    """One gradient tree per named task: ``TaskGrads(retain=g_r, forget=g_f)``, or more tasks
    (``TaskGrads(retain=g_r, forget_a=g_a, forget_b=g_b)``), in keyword order.

    A pytree whose children are the task trees (key paths ``.retain``, ``.forget``, ...), so
    ``jax.tree.map``, ``jit``, ``vmap`` and sharding see every task. Read a task as an attribute
    (``grads.forget``) or by name (``grads["forget"]``); ``names`` is the tuple of task names.
    All tasks must be gradients with respect to the same params (same tree structure and leaf
    shapes); combiners check it.
    """

    __slots__ = ("_names", "_grads")

    def __init__(self, **tasks: Any):
        reserved = sorted(n for n in tasks if n.startswith("_") or hasattr(TaskGrads, n))
        if reserved:
            raise ValueError(f"TaskGrads: {reserved} cannot name a task (an attribute of TaskGrads); rename it.")
        if len(tasks) < 2:
            raise ValueError(
                f"TaskGrads needs at least two tasks, e.g. TaskGrads(retain=g_r, forget=g_f); got {sorted(tasks)}."
            )
        object.__setattr__(self, "_names", tuple(tasks))
        object.__setattr__(self, "_grads", tuple(tasks.values()))

    @property
    def names(self) -> tuple[str, ...]:
        return self._names

    @property
    def grads(self) -> tuple:
        """The task trees, in the order of :attr:`names`."""
        return self._grads

    def __getattr__(self, name: str):
        if name.startswith("_"):  # unset slots (copy, pickle) must not recurse into the lookup below
            raise AttributeError(name)
        try:
            return self._grads[self._names.index(name)]
        except ValueError:
            raise AttributeError(f"TaskGrads has no task {name!r}; its tasks are {self._names}.") from None

    def __getitem__(self, name: str):
        return self.__getattr__(name)

    def __setattr__(self, name, value):
        raise AttributeError("TaskGrads is immutable; build a new one.")

    def __len__(self) -> int:
        return len(self._names)

    def items(self):
        return zip(self._names, self._grads)

    def replace(self, **tasks: Any) -> TaskGrads:
        unknown = sorted(set(tasks) - set(self._names))
        if unknown:
            raise ValueError(f"TaskGrads.replace: no task {unknown}; its tasks are {self._names}.")
        return TaskGrads(**{n: tasks.get(n, g) for n, g in self.items()})

    def __repr__(self) -> str:
        return "TaskGrads(" + ", ".join(f"{n}={g!r}" for n, g in self.items()) + ")"

    def __reduce__(self):  # copy and pickle rebuild it as JAX does (its slots are read-only)
        return TaskGrads.tree_unflatten, (self._names, self._grads)

    def tree_flatten_with_keys(self):
        return [(jax.tree_util.GetAttrKey(n), g) for n, g in self.items()], self._names

    @classmethod
    def tree_unflatten(cls, names, children):
        obj = object.__new__(cls)  # children may be anything jax puts there (None, sentinels)
        object.__setattr__(obj, "_names", tuple(names))
        object.__setattr__(obj, "_grads", tuple(children))
        return obj


def check_task_grads(grads: Any, tasks: Sequence[str], name: str) -> TaskGrads:
    """``grads`` if it is a :class:`TaskGrads` with exactly the tasks ``tasks`` (in that order) whose
    trees are gradients with respect to the same params; a ``ValueError`` naming the fix otherwise."""
    if not isinstance(grads, TaskGrads):
        raise ValueError(
            f"{name}: expects the task gradients as one value, TaskGrads({', '.join(f'{t}=...' for t in tasks)}) "
            f"(ngdiff_jax.optim.TaskGrads), got {type(grads).__name__}. Call tx.update(TaskGrads(retain=g_r, "
            "forget=g_f), state, params); a combiner after another combiner, or after a transformation that "
            "returns one tree, receives a single direction instead."
        )
    if grads.names != tuple(tasks):
        raise ValueError(
            f"{name}: was built for the tasks {tuple(tasks)} but received TaskGrads with {grads.names}; "
            f"pass the tasks in that order, or build the combiner with tasks={grads.names}."
        )
    first = jax.tree.structure(grads.grads[0])
    for task, g in list(grads.items())[1:]:
        if jax.tree.structure(g) != first:
            raise ValueError(
                f"{name}: task {task!r} has the tree structure {jax.tree.structure(g)} but {tasks[0]!r} has "
                f"{first}; every task gradient is taken with respect to the same params."
            )
        for a, b in zip(jax.tree.leaves(grads.grads[0]), jax.tree.leaves(g)):
            if jax.numpy.shape(a) != jax.numpy.shape(b):
                raise ValueError(
                    f"{name}: task {task!r} has a leaf of shape {jax.numpy.shape(b)} where {tasks[0]!r} has "
                    f"{jax.numpy.shape(a)}; every task gradient is taken with respect to the same params."
                )
    return grads


def task_names(tasks: Sequence[str], name: str) -> tuple[str, ...]:
    """``tasks`` as a tuple of >= 2 distinct names; a ``ValueError`` naming the fix otherwise (a bare
    string would otherwise be read as one task per character)."""
    names = () if isinstance(tasks, str) else tuple(tasks)  # read once: an iterator is read once
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"{name}: tasks must be a tuple of >= 2 distinct names, e.g. ('retain', 'forget'); "
                         f"got {tasks!r}.")  # fmt: skip
    return names


class PerTaskState(NamedTuple):
    """State of :func:`per_task`: the inner transformation's state for each task, by name."""

    tasks: dict


def per_task(
    tx: optax.GradientTransformation, tasks: Sequence[str] = TWO_TASKS
) -> optax.GradientTransformationExtraArgs:
    """``tx`` applied to each task's gradient separately, with a state per task.

    The preprocessing half of ``optax.experimental.aggregating.process(per_task(tx), combiner,
    postprocessor)`` (or the head of an ``optax.chain`` before the combiner): e.g.
    ``per_task(optax.clip_by_global_norm(1.0))`` clips each task to norm 1 on its own.

    Args:
      tx: a single-task transformation.
      tasks: the task names, as in the :class:`TaskGrads` it will receive.
    """
    tasks = task_names(tasks, "per_task")
    inner = optax.with_extra_args_support(tx)

    def init_fn(params):
        return PerTaskState({t: inner.init(params) for t in tasks})

    def update_fn(grads, state, params=None, **extra_args):
        grads = check_task_grads(grads, tasks, "per_task")
        out, states = {}, {}
        for t, g in grads.items():
            out[t], states[t] = inner.update(g, state.tasks[t], params, **extra_args)
        return TaskGrads(**out), PerTaskState(states)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
