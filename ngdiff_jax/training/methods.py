"""Methods: a :class:`MethodConfig` turned into objectives and an optax chain.

A method names a forget objective, a retain objective, a combiner and a
learning-rate rule; ``configs/methods/<name>.yaml`` holds the named ones
(``ga``, ``gdiff``, ``npo``, ``simnpo``, ``ngdiff``, ``ngdiff_npo``, ``mgda``,
``pcgrad``). A new method is a new YAML file, not new code.

Objectives are functions ``objective(logits, labels, ref) -> (loss, nll)`` of
the model's logits on a batch, where ``ref`` holds what the reference model
contributes (``ref_logp_sum [B]`` for NPO, ``ref_logits`` for KL) and ``nll``
is the plain mean NLL of the batch, logged alongside.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ngdiff_jax.training.config_schema import MethodConfig, OptimConfig, available_methods, load_method

Objective = Callable[[jax.Array, jax.Array, dict[str, Any]], tuple[jax.Array, jax.Array]]

__all__ = [
    "MethodConfig",
    "Objective",
    "available_methods",
    "forget_objective",
    "learning_rate_schedule",
    "load_method",
    "make_finetune_optimizer",
    "make_optimizer",
    "retain_objective",
]


def _nll(logits, labels):
    from ngdiff_jax import losses

    return losses.nll(logits, labels)


def forget_objective(method: MethodConfig) -> Objective | None:
    """The forget-task loss to minimize, or None for ``forget_loss: none``."""
    from ngdiff_jax import losses

    kind = method.forget_loss
    if kind == "none":
        return None
    if kind == "ga":
        def obj(logits, labels, ref):
            nll = _nll(logits, labels)
            return -nll, nll  # == losses.gradient_ascent, with the NLL reused for logging
    elif kind == "nll":
        def obj(logits, labels, ref):
            nll = _nll(logits, labels)
            return nll, nll
    elif kind == "npo":
        def obj(logits, labels, ref):
            return losses.npo(logits, labels, ref["ref_logp_sum"], method.beta), _nll(logits, labels)
    elif kind == "simnpo":
        def obj(logits, labels, ref):
            return losses.simnpo(logits, labels, beta=method.beta, delta=method.simnpo_delta), _nll(
                logits, labels
            )
    else:  # guarded by MethodConfig's Literal type
        raise ValueError(f"unknown forget_loss {kind!r}")
    return obj


def retain_objective(method: MethodConfig) -> Objective | None:
    """The retain-task loss to minimize, or None for ``retain_loss: none``."""
    from ngdiff_jax import losses

    kind = method.retain_loss
    if kind == "none":
        return None
    if kind == "nll":
        def obj(logits, labels, ref):
            nll = _nll(logits, labels)
            return nll, nll
    elif kind == "kl":
        def obj(logits, labels, ref):
            return losses.kl_to_reference(logits, ref["ref_logits"], labels), _nll(logits, labels)
    else:
        raise ValueError(f"unknown retain_loss {kind!r}")
    return obj


def learning_rate_schedule(rule: str, optim: OptimConfig, total_steps: int) -> optax.Schedule | float:
    """The fixed-rate rule: ``constant`` / ``linear`` (decay to 0) / ``cosine``, after linear warm-up."""
    warm = max(0, int(optim.warmup_steps))
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


def make_optimizer(method: MethodConfig, optim: OptimConfig, total_steps: int):
    """The method's optax chain, from :func:`ngdiff_jax.optim.unlearning_optimizer`.

    ``combiner -> (Adam) -> -(GeN | fixed/scheduled rate)``; with ``optim.weight_decay``
    decoupled weight decay (scaled by the fixed rate) is added to the update.
    Call it as ``tx.update(retain_grads, opt_state, params, forget_grads=..., value_fn=..., value=...)``.
    """
    from ngdiff_jax import optim as O

    gen = method.lr_rule == "gen"
    lr = optim.lr if gen else learning_rate_schedule(method.lr_rule, optim, total_steps)
    if method.combiner == "gdiff":
        combiner = O.gdiff(retain_weight=method.retain_weight, forget_weight=method.forget_weight)
    elif method.combiner == "ngdiff":
        combiner = O.ngdiff(eps=optim.eps)
    else:
        combiner = method.combiner
    if optim.weight_decay:
        raise ValueError(
            "optim.weight_decay is not supported for unlearning (the optimizer core's chain has no "
            "weight decay); set optim.weight_decay=0."
        )
    return O.unlearning_optimizer(
        combiner,
        learning_rate=lr,
        adam=method.adam,
        gen=gen,
        gen_every=optim.gen_every,
        gen_smoothing=optim.gen_smoothing,
        gen_clip_factor=optim.gen_clip_factor,
    )


def make_finetune_optimizer(optim: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW with the ``optim.schedule`` rate (after warm-up) and optional gradient clipping."""
    lr = learning_rate_schedule(optim.schedule, optim, total_steps)
    parts = []
    if optim.max_grad_norm:
        parts.append(optax.clip_by_global_norm(optim.max_grad_norm))
    parts.append(optax.adamw(lr, weight_decay=optim.weight_decay))
    return optax.chain(*parts)


def zeros_like_tree(tree):
    return jax.tree_util.tree_map(jnp.zeros_like, tree)
