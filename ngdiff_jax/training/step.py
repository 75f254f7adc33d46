"""Jitted training steps: pure functions of (params, opt_state, batches, rng).

``make_unlearn_step(apply_fn, method, tx)`` gives
``step(params, opt_state, forget_batch, retain_batch, rng, ref_params=None)
-> (params, opt_state, metrics)``: two ``jax.value_and_grad`` passes (forget
and retain task), then the method's optax chain combines the two gradients and
sets the learning rate (GeN probes ``value_fn`` along the update direction).
At most two gradient trees are alive at once.

Batches are dicts with ``input_ids``, ``attention_mask``, ``labels`` (see
docs/ARCHITECTURE.md). A forget batch may carry ``ref_logp_sum`` ``[B]``
(precomputed reference log-probs of the answers) instead of passing
``ref_params``; KL on the retain side needs ``ref_params``. The forget batch of
``idk_nll``/``dpo`` also carries ``alt_input_ids``/``alt_attention_mask``/``alt_labels``
(the refusal answer of each row's question).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ngdiff_jax.models.logprobs import token_logprobs
from ngdiff_jax.training.config_schema import MethodConfig
from ngdiff_jax.training.methods import ModelFns, forget_objective, retain_objective

ApplyFn = Callable[[Any, jax.Array, jax.Array], jax.Array]

__all__ = ["make_finetune_step", "make_unlearn_step", "reference_logp_sum"]


def reference_logp_sum(apply_fn: ApplyFn, ref_params, batch) -> jax.Array:
    """Summed log-prob of each sample's scored tokens under the reference model, ``[B]``."""
    logits = apply_fn(ref_params, batch["input_ids"], batch["attention_mask"])
    logp, _ = token_logprobs(logits, batch["labels"])
    return jax.lax.stop_gradient(logp.sum(-1))


def _stats(opt_state) -> dict[str, jax.Array]:
    from ngdiff_jax.optim import inject_stats

    return inject_stats(opt_state)


def make_unlearn_step(
    apply_fn: ApplyFn, method: MethodConfig, tx: optax.GradientTransformationExtraArgs, *, hidden_fn=None
):
    """The two-task unlearning step for ``method`` with the optax chain ``tx`` (see module doc).

    ``hidden_fn(params, ids, mask, *, layer)`` (default ``apply_fn.hidden_state``) serves
    the methods that read a hidden state (RMU). Metrics: ``forget_loss``, ``retain_loss``
    (the objectives), ``forget_nll``, ``retain_nll``, ``forget_grad_norm``, ``retain_grad_norm``,
    ``learning_rate``, ``skipped`` (cumulative count of skipped non-finite steps).
    ``tx`` must start with a two-task combiner (checked: `ngdiff_jax.optim.two_task`).
    """
    from ngdiff_jax.optim import two_task

    tx = two_task(tx, "make_unlearn_step")
    f_obj = forget_objective(method)
    r_obj = retain_objective(method)
    probe = method.probe
    hidden_fn = hidden_fn if hidden_fn is not None else getattr(apply_fn, "hidden_state", None)
    if method.needs_hidden and hidden_fn is None:
        raise ValueError(
            f"method {method.name!r} reads a hidden state (forget_loss={method.forget_loss}, "
            f"retain_loss={method.retain_loss}) but apply_fn has no `hidden_state`; build it with "
            "ngdiff_jax.models.functional or pass hidden_fn=."
        )
    model_fns = ModelFns(apply_fn, hidden_fn)

    def task_loss(obj, batch, ref):
        def loss_fn(params):
            return obj.loss(model_fns, params, batch, ref)

        return loss_fn

    def reference(obj, task, batch, ref_params):
        if obj is None or obj.reference is None:
            return {}
        if obj.precomputed and all(k in batch for k in obj.precomputed):
            return {k: batch[k] for k in obj.precomputed}
        if ref_params is None:
            loss = method.forget_loss if task == "forget" else method.retain_loss
            extra = f" or put precomputed {list(obj.precomputed)} in the {task} batch" if obj.precomputed else ""
            raise ValueError(
                f"method {method.name!r} uses {task}_loss={loss}, which needs the reference model: pass "
                f"ref_params to the step{extra}."
            )
        return jax.tree_util.tree_map(jax.lax.stop_gradient, obj.reference(model_fns, ref_params, batch))

    def view(obj, batch):
        keys = obj.batch_keys if obj is not None else ("input_ids", "attention_mask", "labels")
        missing = [k for k in keys if k not in batch]
        if missing:
            raise ValueError(
                f"method {method.name!r} needs batch entries {missing} (the alternate answers of "
                "idk_nll/dpo come from the forget stream built by the unlearn pipeline)."
            )
        return {k: batch[k] for k in keys}

    def step(params, opt_state, forget_batch, retain_batch, rng, ref_params=None):
        del rng  # the methods here are deterministic; the key is threaded for stochastic ones
        f_ref = reference(f_obj, "forget", forget_batch, ref_params)
        r_ref = reference(r_obj, "retain", retain_batch, ref_params)
        fb = view(f_obj, forget_batch)
        rb = view(r_obj, retain_batch)

        zero = jnp.zeros((), jnp.float32)
        if f_obj is not None:
            f_fn = task_loss(f_obj, fb, f_ref)
            (f_loss, f_nll), f_grads = jax.value_and_grad(f_fn, has_aux=True)(params)
        else:
            f_fn = None
            f_loss = zero
            f_nll = _plain_nll(apply_fn, params, fb)
            f_grads = jax.tree_util.tree_map(jnp.zeros_like, params)
        if r_obj is not None:
            r_fn = task_loss(r_obj, rb, r_ref)
            (r_loss, r_nll), r_grads = jax.value_and_grad(r_fn, has_aux=True)(params)
        else:
            r_fn = None
            r_loss = zero
            r_nll = _plain_nll(apply_fn, params, rb)
            r_grads = jax.tree_util.tree_map(jnp.zeros_like, params)

        if probe == "retain" and r_fn is not None:
            value_fn, value = (lambda p: r_fn(p)[0]), r_loss
        elif probe == "forget" and f_fn is not None:
            value_fn, value = (lambda p: f_fn(p)[0]), f_loss
        else:  # "sum", or the probed task is absent (only for fixed-rate methods, see MethodConfig)
            fns = [fn for fn in (f_fn, r_fn) if fn is not None]
            value_fn = lambda p: sum(fn(p)[0] for fn in fns)
            value = f_loss + r_loss

        metrics = {
            "forget_loss": f_loss,
            "retain_loss": r_loss,
            "forget_nll": f_nll,
            "retain_nll": r_nll,
            "forget_grad_norm": optax.tree.norm(f_grads),
            "retain_grad_norm": optax.tree.norm(r_grads),
        }
        updates, opt_state = tx.update(
            r_grads, opt_state, params, forget_grads=f_grads, value_fn=value_fn, value=value
        )
        del f_grads, r_grads
        params = optax.apply_updates(params, updates)
        stats = _stats(opt_state)
        metrics["learning_rate"] = jnp.asarray(stats.get("learning_rate", jnp.nan), jnp.float32)
        metrics["skipped"] = jnp.asarray(stats.get("skipped", 0), jnp.int32)
        return params, opt_state, metrics

    return step


def _plain_nll(apply_fn, params, batch):
    from ngdiff_jax import losses

    logits = apply_fn(params, batch["input_ids"], batch["attention_mask"])
    return jax.lax.stop_gradient(losses.nll(logits, batch["labels"]))


def make_finetune_step(apply_fn: ApplyFn, tx: optax.GradientTransformation):
    """Plain NLL training: ``step(params, opt_state, batch, rng) -> (params, opt_state, metrics)``."""
    from ngdiff_jax import losses

    def step(params, opt_state, batch, rng):
        del rng

        def loss_fn(p):
            logits = apply_fn(p, batch["input_ids"], batch["attention_mask"])
            return losses.nll(logits, batch["labels"])

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return step
