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

from ngdiff_jax.backends import resolve as resolve_backend
from ngdiff_jax.models.logprobs import IGNORE_INDEX
from ngdiff_jax.models.view import ModelView
from ngdiff_jax.optim._base import shared_reductions, tree_scaled_norm
from ngdiff_jax.optim.tasks import TaskGrads
from ngdiff_jax.shifted import takes_shifted
from ngdiff_jax.training.config_schema import MethodConfig
from ngdiff_jax.training.grad_accum import accumulate_gradients, split_micro_batches
from ngdiff_jax.training.methods import forget_objective, retain_objective

#: a `ModelView`, or a bare logits function ``(params, input_ids, attention_mask) -> logits``
ApplyFn = ModelView | Callable[[Any, jax.Array, jax.Array], jax.Array]

__all__ = ["make_finetune_step", "make_unlearn_step", "reference_logp_sum"]


def reference_logp_sum(apply_fn: ApplyFn, ref_params, batch) -> jax.Array:
    """Summed log-prob of each sample's scored tokens under the reference model, ``[B]``."""
    logp, _ = ModelView.of(apply_fn).logprobs(ref_params, batch["input_ids"], batch["labels"],
                                              batch["attention_mask"])  # fmt: skip
    return jax.lax.stop_gradient(logp.sum(-1))


def _stats(opt_state) -> dict[str, jax.Array]:
    from ngdiff_jax.optim import inject_stats

    return inject_stats(opt_state)


def _objective_weight(kind: str, batch) -> jax.Array:
    """The denominator of objective ``kind`` on ``batch`` (float32): these objectives are
    ``numerator / denominator`` with a denominator that does not depend on the parameters (the
    scored tokens for NLL/GA, the scored rows for NPO/SimNPO, the real rows for KL, whose
    positions per row are the whole batch's: `_whole_batch_ref`), so the
    full-batch loss is the denominator-weighted mean of the micro-batch losses, and so is its
    gradient. That is what keeps accumulation exact. Other objectives are refused."""
    labels = batch["labels"]
    if kind in ("ga", "nll"):
        return (labels[:, 1:] != IGNORE_INDEX).sum().astype(jnp.float32)
    if kind in ("npo", "simnpo"):
        return (labels[:, 1:] != IGNORE_INDEX).any(-1).sum().astype(jnp.float32)
    if kind == "kl":  # rows x the whole batch's columns (`_whole_batch_ref`), a factor common to all
        return batch["attention_mask"].astype(bool).any(-1).sum().astype(jnp.float32)
    raise ValueError(
        f"run.micro_batches > 1 does not know how to weight the {kind!r} objective across micro-batches "
        "(exact accumulation is implemented for ga, nll, npo, simnpo, kl); use run.micro_batches=1 for this method."
    )


def _whole_batch_ref(kind: str, batch) -> dict:
    """What objective ``kind`` reads of the whole batch when it runs on micro-batches, merged into
    each micro-batch's ``ref``: KL counts the whole batch's columns (`ngdiff_jax.losses.batch_positions`)."""
    if kind == "kl":
        from ngdiff_jax.losses import batch_positions

        return {"kl_positions": batch_positions(batch["attention_mask"])}
    return {}


def _weights(kind: str, mbs) -> jax.Array:
    w = jax.vmap(lambda mb: _objective_weight(kind, mb))(mbs)
    return w / jnp.maximum(w.sum(), 1e-30)


def _constrainer(shardings):
    if shardings is None:
        return lambda tree: tree
    return lambda tree: jax.lax.with_sharding_constraint(tree, shardings)


def _norm(tree) -> jax.Array:
    """Global L2 norm accumulated in float32 whatever the leaves' dtype: the combiners' own norm
    (`tree_scaled_norm`), so that XLA computes the two as one reduction per leaf."""
    return tree_scaled_norm(tree)


def _absent_task_grads(params):
    """The zero gradient of a task a method leaves out (``retain: none`` ...), behind an
    optimization barrier: as constants, XLA constant-folds the norms taken of them, one element
    at a time (bfloat16 SmolLM2, GA + GeN: many minutes of compiling)."""
    return jax.lax.optimization_barrier(jax.tree_util.tree_map(jnp.zeros_like, params))


def make_unlearn_step(
    apply_fn: ApplyFn, method: MethodConfig, tx: optax.GradientTransformationExtraArgs, *, hidden_fn=None,
    micro_batches: int = 1, grad_sharding=None, backend=None,
):
    """The two-task unlearning step for ``method`` with the optax chain ``tx`` (see module doc).

    ``apply_fn`` is a `ngdiff_jax.models.ModelView` (what ``models.functional`` returns) or a
    bare logits function. ``hidden_fn(params, ids, mask, *, layer)`` (default the view's
    ``hidden_state``) serves
    the methods that read a hidden state (RMU). Metrics: ``forget_loss``, ``retain_loss``
    (the objectives), ``forget_nll``, ``retain_nll``, ``forget_grad_norm``, ``retain_grad_norm``,
    ``learning_rate``, ``skipped`` (cumulative count of skipped non-finite steps).
    ``tx`` maps the step's ``TaskGrads(retain=..., forget=...)`` to updates shaped like the
    params: a chain that starts with a combiner (checked when the step is traced).

    With ``micro_batches=k > 1`` each batch is cut into ``k`` equal micro-batches; a
    ``lax.scan`` accumulates the forget and the retain gradient **separately** (each weighted by
    its micro-batch's share of the objective's denominator, see `_objective_weight`; the reference
    model's contribution is computed per micro-batch), and the combiner sees the two full-batch
    gradients once: the step equals the full-batch step (up to rounding) for every combiner.
    GeN's probes evaluate the whole batch's loss (also scanning the micro-batches, without
    gradients). Only one micro-batch's activations are alive at a time.

    ``grad_sharding`` (a tree of shardings like the parameters, e.g. a ShardedStep's
    ``param_shardings``) pins both gradient trees to the parameters' sharding: under FSDP the
    gradients are then reduce-scattered as they are made instead of being kept whole.

    ``backend`` (`ngdiff_jax.backends.Backend` or its name; ``None``: the default platform's,
    chosen here) orders the two tasks: the retain pass starts once the forget gradient's norm is
    computed (`Backend.after`), so one task's activations are alive at a time instead of XLA
    interleaving the two forward passes and keeping both until the backward passes.
    """
    backend = resolve_backend(backend)
    constrain = _constrainer(grad_sharding)
    f_obj = forget_objective(method)
    r_obj = retain_objective(method)
    probe = method.probe
    k = int(micro_batches)
    if k < 1:
        raise ValueError(f"run.micro_batches={k}: use 1 (no accumulation) or more.")
    if k > 1:  # fail now, not at the first step, for an objective that cannot be accumulated exactly
        for kind, obj in ((method.forget.kind, f_obj), (method.retain.kind, r_obj)):
            if obj is not None:
                _objective_weight(kind, {"labels": jnp.zeros((1, 2), jnp.int32),
                                         "attention_mask": jnp.zeros((1, 2), jnp.int32)})
    model_fns = ModelView.of(apply_fn)
    if hidden_fn is not None:
        model_fns = model_fns.replace(hidden_state=hidden_fn)
    if method.needs_hidden and model_fns.hidden_state is None:
        raise ValueError(
            f"method {method.name!r} reads a hidden state (method.forget.type={method.forget.kind}, "
            f"method.retain.type={method.retain.kind}) but apply_fn has no `hidden_state`; build it with "
            "ngdiff_jax.models.functional or pass hidden_fn=."
        )
    # GeN's probe point reaches the model unmade when every model function takes one
    # (ngdiff_jax.shifted; the stacked layout shifts one block's weights at a time)
    lazy_probe = model_fns.accepts_shifted

    def probe_fn(fn):
        return takes_shifted(fn) if lazy_probe else fn

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
            loss = getattr(method, task).kind
            extra = f" or put precomputed {list(obj.precomputed)} in the {task} batch" if obj.precomputed else ""
            raise ValueError(
                f"method {method.name!r} uses method.{task}.type={loss}, which needs the reference model: pass "
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

    def one_task(obj, task, batch, ref_params, params):
        """``(loss, nll, grads, value_fn)`` of one task on the whole batch (``k`` micro-batches)."""
        if k == 1:
            fn = task_loss(obj, view(obj, batch), reference(obj, task, batch, ref_params))
            (loss, nll), grads = jax.value_and_grad(fn, has_aux=True)(params)
            return loss, nll, constrain(grads), probe_fn(lambda p: fn(p)[0])
        kind = getattr(method, task).kind
        mbs = split_micro_batches(batch, k)
        w_obj, w_nll = _weights(kind, mbs), _weights("nll", mbs)
        whole = _whole_batch_ref(kind, batch)

        def mb_loss(p, mb):
            return task_loss(obj, view(obj, mb), {**reference(obj, task, mb, ref_params), **whole})(p)

        (loss, nll), grads = accumulate_gradients(mb_loss, params, mbs, w_obj, has_aux=True, aux_weights=w_nll,
                                                  constrain=constrain)  # fmt: skip
        zero = jnp.zeros((), jnp.float32)

        def value_fn(p):
            def vbody(acc, xs):
                return acc + xs[1] * mb_loss(p, xs[0])[0].astype(jnp.float32), None

            return jax.lax.scan(vbody, zero, (mbs, w_obj))[0]

        return loss, nll, grads, probe_fn(value_fn)

    def plain_nll(params, batch):
        b = view(None, batch)
        if k == 1:
            return _plain_nll(apply_fn, params, b)
        mbs = split_micro_batches(b, k)
        return jax.lax.scan(lambda acc, xs: (acc + xs[1] * _plain_nll(apply_fn, params, xs[0]), None),
                            jnp.zeros((), jnp.float32), (mbs, _weights("nll", mbs)))[0]  # fmt: skip

    def step(params, opt_state, forget_batch, retain_batch, rng, ref_params=None):
        with shared_reductions():  # the gradients' norms, logged and combined, read each leaf once
            return body(params, opt_state, forget_batch, retain_batch, rng, ref_params)

    def body(params, opt_state, forget_batch, retain_batch, rng, ref_params=None):
        del rng  # the methods here are deterministic; the key is threaded for stochastic ones
        zero = jnp.zeros((), jnp.float32)
        if f_obj is not None:
            f_loss, f_nll, f_grads, f_fn = one_task(f_obj, "forget", forget_batch, ref_params, params)
        else:
            f_fn = None
            f_loss = zero
            f_nll = plain_nll(params, forget_batch)
            f_grads = _absent_task_grads(params)
        f_norm = _norm(f_grads)
        # the retain pass reads its token ids only once the forget gradient's norm exists
        retain_batch = {**retain_batch, "input_ids": backend.after(retain_batch["input_ids"], f_norm)}
        if r_obj is not None:
            r_loss, r_nll, r_grads, r_fn = one_task(r_obj, "retain", retain_batch, ref_params, params)
        else:
            r_fn = None
            r_loss = zero
            r_nll = plain_nll(params, retain_batch)
            r_grads = _absent_task_grads(params)

        if probe == "retain" and r_fn is not None:
            value_fn, value = r_fn, r_loss
        elif probe == "forget" and f_fn is not None:
            value_fn, value = f_fn, f_loss
        else:  # "sum", or the probed task is absent (only for fixed-rate methods, see MethodConfig)
            fns = [fn for fn in (f_fn, r_fn) if fn is not None]
            value_fn = probe_fn(lambda p: sum(fn(p) for fn in fns))
            value = f_loss + r_loss

        metrics = {
            "forget_loss": f_loss.astype(jnp.float32),
            "retain_loss": r_loss.astype(jnp.float32),
            "forget_nll": f_nll.astype(jnp.float32),
            "retain_nll": r_nll.astype(jnp.float32),
            "forget_grad_norm": f_norm,
            "retain_grad_norm": _norm(r_grads),
        }
        grads = TaskGrads(retain=r_grads, forget=f_grads)
        del f_grads, r_grads
        updates, opt_state = tx.update(grads, opt_state, params, value_fn=value_fn, value=value)
        del grads
        _check_updates(updates, params)
        params = optax.apply_updates(params, updates)
        stats = _stats(opt_state)
        metrics["learning_rate"] = jnp.asarray(stats.get("learning_rate", jnp.nan), jnp.float32)
        metrics["skipped"] = jnp.asarray(stats.get("skipped", 0), jnp.int32)
        return params, opt_state, metrics

    return step


def _check_updates(updates, params) -> None:
    """The optimizer must turn the task gradients into one update shaped like the params."""
    if jax.tree.structure(updates) != jax.tree.structure(params):
        raise ValueError(
            "make_unlearn_step: the optimizer returned updates with the tree structure "
            f"{jax.tree.structure(updates)}, not the params' {jax.tree.structure(params)}: start its chain with a "
            "combiner (ngdiff_jax.optim.ngdiff(), gdiff, mgda, pcgrad), which turns TaskGrads into one direction, "
            "e.g. optax.chain(ngdiff(), optax.adam(1e-5)); a single-task optimizer alone does not combine the tasks."
        )


def _plain_nll(apply_fn, params, batch):
    from ngdiff_jax import losses

    lp = ModelView.of(apply_fn).logprobs(params, batch["input_ids"], batch["labels"], batch["attention_mask"])
    return jax.lax.stop_gradient(losses.nll(lp, batch["labels"]))


def make_finetune_step(
    apply_fn: ApplyFn, tx: optax.GradientTransformation, *, micro_batches: int = 1, grad_sharding=None
):
    """Plain NLL training: ``step(params, opt_state, batch, rng) -> (params, opt_state, metrics)``.
    ``micro_batches=k`` accumulates the gradient over ``k`` equal micro-batches (token-weighted,
    so it equals the full-batch gradient)."""
    from ngdiff_jax import losses

    k = int(micro_batches)
    constrain = _constrainer(grad_sharding)

    view = ModelView.of(apply_fn)

    def loss_fn(p, batch):
        lp = view.logprobs(p, batch["input_ids"], batch["labels"], batch["attention_mask"])
        return losses.nll(lp, batch["labels"])

    def step(params, opt_state, batch, rng):
        del rng
        b = {key: batch[key] for key in ("input_ids", "attention_mask", "labels")}
        if k == 1:
            loss, grads = jax.value_and_grad(loss_fn)(params, b)
            grads = constrain(grads)
        else:
            mbs = split_micro_batches(b, k)
            loss, grads = accumulate_gradients(loss_fn, params, mbs, _weights("nll", mbs), constrain=constrain)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss.astype(jnp.float32), "grad_norm": _norm(grads)}

    return step
