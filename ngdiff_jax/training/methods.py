"""Methods: a :class:`MethodConfig` turned into objectives and an optax chain.

A method names a forget objective, a retain objective, a combiner and a learning-rate rule,
each a registered dataclass of `ngdiff_jax.training.method_config` with its own settings and
``build()``; ``configs/methods/<name>.yaml`` holds the named methods (``ngdiff``, ``gdiff``,
``npo``, ``simnpo``, ``rmu``, ...). The objectives (`ngdiff_jax.training.objectives.Objective`)
run the model themselves; definitions and sources are listed in docs/METRICS.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ngdiff_jax.training.config_schema import MethodConfig, OptimConfig, available_methods, load_method
from ngdiff_jax.training.objectives import Objective

__all__ = [
    "MethodConfig",
    "Objective",
    "available_methods",
    "forget_objective",
    "learning_rate_schedule",
    "load_method",
    "load_idk_responses",
    "make_finetune_optimizer",
    "make_optimizer",
    "retain_objective",
    "warmup_steps",
]


def forget_objective(method: MethodConfig) -> Objective | None:
    """The forget-task :class:`Objective` (a loss to minimize), or None for ``forget: none``."""
    return method.forget.build()


def retain_objective(method: MethodConfig) -> Objective | None:
    """The retain-task :class:`Objective` (a loss to minimize), or None for ``retain: none``."""
    return method.retain.build()


def load_idk_responses(path=None) -> list[str]:
    """The refusal answers for ``idk_nll`` / ``dpo``: a JSON-lines file of strings, one per line
    (default ``configs/data/idk.jsonl``, our own list in the style of open-unlearning's ``idk.jsonl``)."""
    import json
    from pathlib import Path

    from ngdiff_jax.paths import CONFIG_DIR

    p = Path(path).expanduser() if path else CONFIG_DIR / "data" / "idk.jsonl"
    if not p.is_file():
        raise FileNotFoundError(f"method.forget.idk_path: {p} not found; give a JSON-lines file of refusal strings.")
    out = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            v = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{p}:{n}: not JSON ({e.msg}); each line must be a JSON string such as \"I don't know.\""
            ) from None
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"{p}:{n}: expected a non-empty JSON string, got {v!r}.")
        out.append(v)
    if not out:
        raise ValueError(f"{p} holds no refusal answers; add one JSON string per line.")
    return out


def warmup_steps(method: MethodConfig, optim: OptimConfig, steps_per_epoch: float | None) -> int:
    """Warm-up steps of a fixed-rate unlearning rule: ``optim.warmup_steps``, or
    ``method.rate.warmup_epochs`` epochs of the forget set as open-unlearning counts them
    (``int(warmup_epochs * forget rows) // batch size``, ``src/trainer/__init__.py``), with
    ``steps_per_epoch = forget rows / batch size``."""
    epochs = getattr(method.rate, "warmup_epochs", 0.0)
    if not epochs:
        return max(0, int(optim.warmup_steps))
    if optim.warmup_steps:
        raise ValueError(
            f"optim.warmup_steps={optim.warmup_steps} and method.rate.warmup_epochs={epochs} both set a "
            "warm-up; set one of them to 0."
        )
    if steps_per_epoch is None:
        raise ValueError(
            f"method {method.name!r} warms up over method.rate.warmup_epochs={epochs} epochs: pass "
            "steps_per_epoch= (forget rows / batch size) to make_optimizer, or set method.rate.warmup_epochs=0."
        )
    return int(epochs * steps_per_epoch + 1e-9)


def learning_rate_schedule(
    rule: str, optim: OptimConfig, total_steps: int, warmup: int | None = None
) -> optax.Schedule | float:
    """The fixed-rate rule: ``constant`` / ``linear`` (decay to 0) / ``cosine``, after ``warmup``
    (default ``optim.warmup_steps``) steps of linear warm-up from 0. ``linear`` with warm-up is
    Hugging Face's ``get_linear_schedule_with_warmup`` (the Trainer's default scheduler, so
    open-unlearning's): the first step's rate is 0 and the last one's ``lr / (total - warmup)``."""
    warm = max(0, int(optim.warmup_steps if warmup is None else warmup))
    rest = max(1, int(total_steps) - warm)
    if rule == "constant":
        main = optax.constant_schedule(optim.lr)
    elif rule == "linear":
        main = optax.linear_schedule(optim.lr, 0.0, rest)
    elif rule == "cosine":
        main = optax.cosine_decay_schedule(optim.lr, rest)
    else:
        raise ValueError(f"learning-rate rule {rule!r} is not a schedule; use constant, linear or cosine.")
    if warm == 0:
        return main if rule != "constant" else optim.lr
    return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warm), main], [warm])


def make_optimizer(
    method: MethodConfig, optim: OptimConfig, total_steps: int, *, steps_per_epoch: float | None = None,
    member_axis=None, backend=None,
):
    """The method's optax chain, from :func:`ngdiff_jax.optim.unlearning_optimizer`.

    ``combiner -> (clip) -> (Adam) -> weight decay -> -(GeN | fixed/scheduled rate)``: the
    combiner clips each task's gradient to ``optim.clip_norm`` when set, the combined direction
    is clipped to ``method.max_grad_norm`` (open-unlearning's total-gradient clipping); a
    fixed-rate rule warms up over ``method.rate.warmup_epochs`` epochs of the forget set
    (``steps_per_epoch`` = forget rows / batch size, see :func:`warmup_steps`) or
    ``optim.warmup_steps`` steps; Adam takes ``optim.b1, b2,
    adam_eps, eps_root, mu_dtype``; ``optim.weight_decay`` adds decoupled weight decay
    (``optax.add_decayed_weights``) scaled by the rate, GeN's or the fixed/scheduled one, as in
    AdamW. Call it as ``tx.update(TaskGrads(retain=..., forget=...), opt_state, params,
    value_fn=..., value=...)``. ``member_axis``: the ``vmap`` axis of a population of runs (GeN's shared probing
    steps, see `ngdiff_jax.optim.scale_by_gen`). ``backend``: GeN's `ngdiff_jax.backends.Backend`
    (the model's; ``None``: the default platform's).
    """
    from ngdiff_jax import optim as O

    gen = method.rate.adaptive
    warm = 0 if gen else warmup_steps(method, optim, steps_per_epoch)
    if warm and int(total_steps) <= 1:
        raise ValueError(
            f"method {method.name!r} warms up over {warm} step(s) of a {total_steps}-step run: its only step has "
            "rate 0 (warm-up starts at 0, as Hugging Face's); run more steps or set method.rate.warmup_epochs=0."
        )
    lr = optim.lr if gen else learning_rate_schedule(method.rate.kind, optim, total_steps, warm)
    combiner = method.combiner.build(optim)
    return O.unlearning_optimizer(
        combiner,
        learning_rate=lr,
        adam=method.adam,
        gen=gen,
        gen_every=optim.gen_every,
        gen_smoothing=optim.gen_smoothing,
        gen_clip_factor=optim.gen_clip_factor,
        b1=optim.b1,
        b2=optim.b2,
        adam_eps=optim.adam_eps,
        eps_root=optim.eps_root,
        mu_dtype=None if optim.mu_dtype is None else jnp.dtype(optim.mu_dtype),
        weight_decay=optim.weight_decay,
        max_grad_norm=method.max_grad_norm,
        member_axis=member_axis,
        backend=backend,
    )


def make_finetune_optimizer(optim: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW with the ``optim.schedule`` rate (after warm-up) and optional gradient clipping."""
    if optim.warmup_steps and int(total_steps) <= 1:
        raise ValueError(
            f"optim.warmup_steps={optim.warmup_steps} in a {total_steps}-step run: its only step has rate 0 (warm-up "
            "starts at 0); run more steps or set optim.warmup_steps=0."
        )
    lr = learning_rate_schedule(optim.schedule, optim, total_steps)
    parts = []
    if optim.max_grad_norm:
        parts.append(optax.clip_by_global_norm(optim.max_grad_norm))
    parts.append(optax.adamw(lr, weight_decay=optim.weight_decay))
    return optax.chain(*parts)


def zeros_like_tree(tree):
    return jax.tree_util.tree_map(jnp.zeros_like, tree)
