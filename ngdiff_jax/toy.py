"""A toy two-task unlearning problem that shows why NGDiff + GeN exists.

Softmax regression on Gaussian clusters. The "original model" is trained on
retain + forget data; the forget set is drawn from the *same* distribution as
retain class 0 (memorized samples of a class that must stay usable), so the
tasks conflict: raising the forget loss necessarily pulls against the retain
loss. Unlearning then minimizes

* the retain loss :math:`L_r` = mean NLL on the retain set, and
* the forget objective :math:`L_f = -\\mathrm{NLL}_{forget}` (gradient ascent),

full batch, from the same start, with each combiner chained into
:func:`~ngdiff_jax.optim.unlearning_optimizer` (Adam preconditioning, same
learning rate). GDiff (plain sum) shows its known failure: the unbounded
ascent term dominates, the forget loss explodes and the retain loss is
destroyed with it. NGDiff gives both tasks the same weight whatever their
gradient sizes; with GeN (its quadratic fit on the retain loss, which is bounded
below, unlike the ascent objective) it raises the forget loss while the retain
loss stays near its start.

Example:

  >>> from ngdiff_jax.toy import make_problem, run_method
  >>> problem = make_problem(seed=0)
  >>> res = run_method(problem, "gdiff", steps=20)
  >>> res.forget_end > res.forget_start
  True
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ngdiff_jax.optim import TaskGrads, inject_stats, unlearning_optimizer

__all__ = [
    "METHODS",
    "ToyProblem",
    "ToyResult",
    "format_table",
    "make_problem",
    "run_method",
    "run_toy",
]

#: Method name -> keyword arguments of :func:`unlearning_optimizer`.
METHODS: dict[str, dict[str, Any]] = {
    "gdiff": {"combiner": "gdiff", "gen": False},
    "ngdiff": {"combiner": "ngdiff", "gen": False},
    "ngdiff+gen": {"combiner": "ngdiff", "gen": True},
    "mgda": {"combiner": "mgda", "gen": False},
    "pcgrad": {"combiner": "pcgrad", "gen": False},
}


@dataclasses.dataclass(frozen=True)
class ToyProblem:
    """Data and the trained "original" parameters ``{"w": [d, K], "b": [K]}``."""

    x_retain: np.ndarray
    y_retain: np.ndarray
    x_forget: np.ndarray
    y_forget: np.ndarray
    params: dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class ToyResult:
    """Outcome of one method (losses are mean NLLs; accuracies in [0, 1])."""

    method: str
    retain_start: float
    retain_end: float
    retain_max: float
    forget_start: float
    forget_end: float
    retain_acc_end: float
    forget_acc_end: float
    learning_rate_end: float


def _nll(params, x, y):
    logits = x @ params["w"] + params["b"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def _acc(params, x, y):
    return jnp.mean(jnp.argmax(x @ params["w"] + params["b"], axis=1) == y)


@functools.lru_cache(maxsize=4)
def make_problem(
    seed: int = 0,
    *,
    dim: int = 10,
    classes: int = 3,
    retain_per_class: int = 100,
    n_forget: int = 30,
    pretrain_steps: int = 300,
) -> ToyProblem:
    """Draws the data and trains the original model (Adam, full batch); cached per arguments."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, dim))
    y_retain = np.repeat(np.arange(classes), retain_per_class).astype(np.int32)
    x_retain = (means[y_retain] + rng.normal(size=(len(y_retain), dim))).astype(np.float32)
    y_forget = np.zeros(n_forget, np.int32)
    x_forget = (means[y_forget] + rng.normal(size=(n_forget, dim))).astype(np.float32)

    x_all = jnp.asarray(np.concatenate([x_retain, x_forget]))
    y_all = jnp.asarray(np.concatenate([y_retain, y_forget]))
    tx = optax.adam(0.05)

    @jax.jit
    def pretrain(params):
        def step(carry, _):
            p, s = carry
            u, s = tx.update(jax.grad(_nll)(p, x_all, y_all), s, p)
            return (optax.apply_updates(p, u), s), None

        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=pretrain_steps)
        return params

    params = pretrain(
        {"w": jnp.zeros((dim, classes), jnp.float32), "b": jnp.zeros(classes, jnp.float32)}
    )
    return ToyProblem(x_retain, y_retain, x_forget, y_forget, params)


def run_method(
    problem: ToyProblem,
    method: str,
    *,
    steps: int = 100,
    learning_rate: float = 0.05,
    adam: bool = True,
) -> ToyResult:
    """Unlearns with one method of :data:`METHODS` for ``steps`` full-batch steps."""
    if method not in METHODS:
        raise ValueError(f"unknown toy method {method!r}; use one of {sorted(METHODS)}.")
    kwargs = METHODS[method]
    tx = unlearning_optimizer(kwargs["combiner"], learning_rate, adam=adam, gen=kwargs["gen"])
    xr, yr = jnp.asarray(problem.x_retain), jnp.asarray(problem.y_retain)
    xf, yf = jnp.asarray(problem.x_forget), jnp.asarray(problem.y_forget)

    def retain_loss(p):
        return _nll(p, xr, yr)

    def forget_objective(p):  # gradient ascent: minimize -NLL on the forget set
        return -_nll(p, xf, yf)

    @jax.jit
    def unlearn(params):
        def step(carry, _):
            p, s = carry
            value, g_r = jax.value_and_grad(retain_loss)(p)
            g_f = jax.grad(forget_objective)(p)
            extra = {"value_fn": retain_loss, "value": value} if kwargs["gen"] else {}
            u, s = tx.update(TaskGrads(retain=g_r, forget=g_f), s, p, **extra)
            p = optax.apply_updates(p, u)
            return (p, s), retain_loss(p)

        (params, state), retain_trace = jax.lax.scan(
            step, (params, tx.init(params)), None, length=steps
        )
        return params, state, retain_trace

    p0 = problem.params
    p1, state, trace = unlearn(p0)
    return ToyResult(
        method=method,
        retain_start=float(retain_loss(p0)),
        retain_end=float(retain_loss(p1)),
        retain_max=float(jnp.max(trace)),
        forget_start=float(-forget_objective(p0)),
        forget_end=float(-forget_objective(p1)),
        retain_acc_end=float(_acc(p1, xr, yr)),
        forget_acc_end=float(_acc(p1, xf, yf)),
        learning_rate_end=float(inject_stats(state)["learning_rate"]),
    )


def run_toy(
    methods: tuple[str, ...] = ("gdiff", "ngdiff+gen", "mgda", "pcgrad"),
    *,
    seed: int = 0,
    steps: int = 100,
    learning_rate: float = 0.05,
    adam: bool = True,
) -> list[ToyResult]:
    """Runs several methods on one problem from the same start."""
    problem = make_problem(seed)
    return [
        run_method(problem, m, steps=steps, learning_rate=learning_rate, adam=adam) for m in methods
    ]


def format_table(results: list[ToyResult]) -> str:
    """A plain-text table: retain/forget NLL before and after, accuracies, final rate."""
    head = (
        f"{'method':<11} {'retain NLL':>18} {'forget NLL':>19} "
        f"{'retain acc':>10} {'forget acc':>10} {'final lr':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r.method:<11} {r.retain_start:>7.3f} -> {r.retain_end:<7.3f} "
            f"{r.forget_start:>7.3f} -> {r.forget_end:<8.3f} "
            f"{r.retain_acc_end:>10.3f} {r.forget_acc_end:>10.3f} {r.learning_rate_end:>9.4f}"
        )
    return "\n".join(lines)
