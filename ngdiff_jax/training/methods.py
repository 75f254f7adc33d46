"""Methods: a :class:`MethodConfig` turned into objectives and an optax chain.

A method names a forget objective, a retain objective, a combiner and a
learning-rate rule; ``configs/methods/<name>.yaml`` holds the named ones
(``ga``, ``gdiff``, ``npo``, ``simnpo``, ``ngdiff``, ``ngdiff_npo``, ``mgda``,
``pcgrad``). A new method is a new YAML file, not new code.

An objective is an :class:`Objective`: ``loss(model, params, batch, ref) -> (loss, nll)``
runs the model itself (``model.logits(params, ids, mask)``, or
``model.hidden(params, ids, mask, layer=...)`` for RMU), so it can read a second
answer of each question (``alt_*`` arrays: DPO/IdkNLL) or a hidden state. ``ref``
holds what the frozen reference model contributes, made by ``reference(model,
ref_params, batch)`` (``ref_logp_sum [B]`` for NPO, ``ref_logits`` for KL and
UNDIAL, ...) or read from precomputed batch entries. ``nll`` is the plain mean NLL
of the batch, logged alongside. Definitions and sources are listed in docs/METRICS.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ngdiff_jax.training.config_schema import MethodConfig, OptimConfig, available_methods, load_method

ApplyFn = Callable[..., jax.Array]

BATCH_KEYS = ("input_ids", "attention_mask", "labels")
ALT_KEYS = ("alt_input_ids", "alt_attention_mask", "alt_labels")


class ModelFns(NamedTuple):
    """What an objective may call: ``logits(params, ids, mask)``; for RMU,
    ``hidden(params, ids, mask, *, layer)`` (``apply_fn.hidden_state`` of ``models.functional``);
    and ``logprobs(params, ids, mask, labels) -> TokenLogprobs`` (``apply_fn.token_logprobs``: the
    chunked head, no ``[B, T, V]`` logits; None: computed from ``logits``)."""

    logits: ApplyFn
    hidden: Callable[..., jax.Array] | None = None
    logprobs: Callable[..., Any] | None = None

    def token_logprobs(self, params, ids, mask, labels):
        """The labels' log-probs as a `TokenLogprobs` (through ``logprobs`` when given)."""
        from ngdiff_jax.models.logprobs import TokenLogprobs, token_logprobs

        if self.logprobs is not None:
            return self.logprobs(params, ids, labels, mask)
        return TokenLogprobs(*token_logprobs(self.logits(params, ids, mask), labels))


@dataclass(frozen=True)
class Objective:
    """A task loss. ``loss(model, params, batch, ref) -> (loss, nll)``; ``reference(model,
    ref_params, batch) -> ref`` (None: needs no reference); ``precomputed``: batch keys that
    may stand in for ``reference`` (e.g. ``ref_logp_sum``); ``batch_keys``: the batch
    entries the loss reads."""

    loss: Callable[[ModelFns, Any, dict, dict], tuple[jax.Array, jax.Array]]
    reference: Callable[[ModelFns, Any, dict], dict] | None = None
    precomputed: tuple[str, ...] = ()
    batch_keys: tuple[str, ...] = BATCH_KEYS


__all__ = [
    "MethodConfig",
    "ModelFns",
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


def _nll(logits, labels):
    from ngdiff_jax import losses

    return losses.nll(logits, labels)


def _logits(model: ModelFns, params, batch, prefix: str = ""):
    return model.logits(params, batch[prefix + "input_ids"], batch[prefix + "attention_mask"])


def _logprobs(model: ModelFns, params, batch, prefix: str = ""):
    """The labels' log-probs (a `TokenLogprobs`, accepted by the log-prob losses in place of logits)."""
    return model.token_logprobs(params, batch[prefix + "input_ids"], batch[prefix + "attention_mask"],
                                batch[prefix + "labels"])


def _hidden(model: ModelFns, params, batch, layer: int):
    return model.hidden(params, batch["input_ids"], batch["attention_mask"], layer=layer)


def _ref_logp_sum(prefix: str = ""):
    def reference(model, ref_params, batch):
        from ngdiff_jax import losses

        lp = _logprobs(model, ref_params, batch, prefix)
        return {f"{prefix}ref_logp_sum": losses.sequence_logprob_sum(lp, batch[prefix + "labels"])}

    return reference


def _ref_logits(model, ref_params, batch):
    return {"ref_logits": _logits(model, ref_params, batch)}


def _logit_objective(fn, **kw) -> Objective:
    """An objective of the batch's logits only: ``fn(logits, labels, ref) -> loss``."""

    def loss(model, params, batch, ref):
        logits = _logits(model, params, batch)
        return fn(logits, batch, ref), _nll(logits, batch["labels"])

    return Objective(loss, **kw)


def _logprob_objective(fn, **kw) -> Objective:
    """An objective of the labels' log-probs only: ``fn(token_logprobs, batch, ref) -> loss``
    (the chunked head: no vocabulary-sized activations)."""

    def loss(model, params, batch, ref):
        lp = _logprobs(model, params, batch)
        return fn(lp, batch, ref), _nll(lp, batch["labels"])

    return Objective(loss, **kw)


def forget_objective(method: MethodConfig) -> Objective | None:
    """The forget-task :class:`Objective` (a loss to minimize), or None for ``forget_loss: none``."""
    from ngdiff_jax import losses

    kind = method.forget_loss
    if kind == "none":
        return None
    if kind == "ga":
        def ga(model, params, batch, ref):
            nll = _nll(_logprobs(model, params, batch), batch["labels"])
            return -nll, nll  # == losses.gradient_ascent, with the NLL reused for logging

        return Objective(ga)
    if kind == "nll":
        def nll_loss(model, params, batch, ref):
            nll = _nll(_logprobs(model, params, batch), batch["labels"])
            return nll, nll

        return Objective(nll_loss)
    if kind == "npo":
        return _logprob_objective(
            lambda lg, b, ref: losses.npo(lg, b["labels"], ref["ref_logp_sum"], method.beta),
            reference=_ref_logp_sum(), precomputed=("ref_logp_sum",),
        )  # fmt: skip
    if kind == "simnpo":
        return _logprob_objective(
            lambda lg, b, ref: losses.simnpo(lg, b["labels"], beta=method.beta, delta=method.simnpo_delta)
        )
    if kind == "wga":
        return _logprob_objective(lambda lg, b, ref: losses.wga(lg, b["labels"], method.beta))
    if kind == "satimp":
        return _logprob_objective(
            lambda lg, b, ref: losses.satimp(lg, b["labels"], method.satimp_beta1, method.satimp_beta2)
        )
    if kind == "ceu":
        return _logit_objective(lambda lg, b, ref: losses.ce_u(lg, b["labels"], method.ceu_ignore_first_n))
    if kind == "undial":
        return _logit_objective(
            lambda lg, b, ref: losses.undial(lg, ref["ref_logits"], b["labels"], method.beta, b["attention_mask"]),
            reference=_ref_logits,
        )  # fmt: skip
    if kind == "idk_nll":
        # TOFU's original "idk" loss (locuslab/tofu dataloader.py, CustomTrainerForgetting.compute_loss;
        # open-unlearning has no IdkNLL) is ONE token-mean NLL over cat(idk batch, retain batch):
        # (S_f + S_r) / (N_f + N_r). Here, on purpose, the forget task is the refusal answers' token mean
        # NLL and the retain objective the retain batch's, combined as GradDiff does
        # (gamma * S_f/N_f + alpha * S_r/N_r): with gamma = alpha = 1 that is twice TOFU's loss when
        # N_f == N_r, and otherwise weights the two batches equally instead of by token count.
        def idk_nll(model, params, batch, ref):
            alt = _nll(_logprobs(model, params, batch, "alt_"), batch["alt_labels"])
            nll = jax.lax.stop_gradient(_nll(_logprobs(model, params, batch), batch["labels"]))
            return alt, nll

        return Objective(idk_nll, batch_keys=BATCH_KEYS + ALT_KEYS)
    if kind == "dpo":
        def ref_both(model, ref_params, batch):
            return {**_ref_logp_sum()(model, ref_params, batch), **_ref_logp_sum("alt_")(model, ref_params, batch)}

        def dpo(model, params, batch, ref):
            logits = _logprobs(model, params, batch)
            alt = _logprobs(model, params, batch, "alt_")
            loss = losses.dpo(logits, batch["labels"], ref["ref_logp_sum"], alt, batch["alt_labels"],
                              ref["alt_ref_logp_sum"], method.beta)  # fmt: skip
            return loss, _nll(logits, batch["labels"])

        return Objective(dpo, reference=ref_both, precomputed=("ref_logp_sum", "alt_ref_logp_sum"),
                         batch_keys=BATCH_KEYS + ALT_KEYS)  # fmt: skip
    if kind == "rmu":
        def rmu(model, params, batch, ref):
            h = _hidden(model, params, batch, method.rmu_layer)
            u = losses.rmu_control_vector(jax.random.PRNGKey(method.rmu_seed), h.shape[-1], method.rmu_steering_coeff)
            nll = jax.lax.stop_gradient(_nll(_logprobs(model, params, batch), batch["labels"]))
            return losses.rmu_forget(h, u, batch["labels"]), nll

        return Objective(rmu)
    raise ValueError(f"unknown forget_loss {kind!r}")  # guarded by MethodConfig's Literal type


def retain_objective(method: MethodConfig) -> Objective | None:
    """The retain-task :class:`Objective` (a loss to minimize), or None for ``retain_loss: none``."""
    from ngdiff_jax import losses

    kind = method.retain_loss
    if kind == "none":
        return None
    if kind == "nll":
        def nll_loss(model, params, batch, ref):
            nll = _nll(_logprobs(model, params, batch), batch["labels"])
            return nll, nll

        return Objective(nll_loss)
    if kind == "kl":
        # open-unlearning's compute_kl_divergence on the batch's real rows and its own length
        # (``kl_positions``: the whole batch's columns, set by the step when it runs micro-batches)
        return _logit_objective(
            lambda lg, b, ref: losses.kl_to_reference(
                lg, ref["ref_logits"], b["labels"], scope="batch", attention_mask=b["attention_mask"],
                positions=ref.get("kl_positions"),
            ),
            reference=_ref_logits,
        )  # fmt: skip
    if kind == "embed_diff":
        def ref_hidden(model, ref_params, batch):
            return {"ref_hidden": _hidden(model, ref_params, batch, method.rmu_layer)}

        def embed_diff(model, params, batch, ref):
            h = _hidden(model, params, batch, method.rmu_layer)
            nll = jax.lax.stop_gradient(_nll(_logprobs(model, params, batch), batch["labels"]))
            return losses.activation_mse(h, ref["ref_hidden"], batch["labels"]), nll

        return Objective(embed_diff, reference=ref_hidden)
    raise ValueError(f"unknown retain_loss {kind!r}")


def load_idk_responses(path=None) -> list[str]:
    """The refusal answers for ``idk_nll`` / ``dpo``: a JSON-lines file of strings, one per line
    (default ``configs/data/idk.jsonl``, our own list in the style of open-unlearning's ``idk.jsonl``)."""
    import json
    from pathlib import Path

    from ngdiff_jax.paths import CONFIG_DIR

    p = Path(path).expanduser() if path else CONFIG_DIR / "data" / "idk.jsonl"
    if not p.is_file():
        raise FileNotFoundError(f"method.idk_path: {p} not found; give a JSON-lines file of refusal strings.")
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
    ``method.warmup_epochs`` epochs of the forget set as open-unlearning counts them
    (``int(warmup_epochs * forget rows) // batch size``, ``src/trainer/__init__.py``), with
    ``steps_per_epoch = forget rows / batch size``."""
    if not method.warmup_epochs:
        return max(0, int(optim.warmup_steps))
    if optim.warmup_steps:
        raise ValueError(
            f"optim.warmup_steps={optim.warmup_steps} and method.warmup_epochs={method.warmup_epochs} both set a "
            "warm-up; set one of them to 0."
        )
    if steps_per_epoch is None:
        raise ValueError(
            f"method {method.name!r} warms up over method.warmup_epochs={method.warmup_epochs} epochs: pass "
            "steps_per_epoch= (forget rows / batch size) to make_optimizer, or set method.warmup_epochs=0."
        )
    return int(method.warmup_epochs * steps_per_epoch + 1e-9)


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
    fixed-rate rule warms up over ``method.warmup_epochs`` epochs of the forget set
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

    gen = method.lr_rule == "gen"
    warm = 0 if gen else warmup_steps(method, optim, steps_per_epoch)
    if warm and int(total_steps) <= 1:
        raise ValueError(
            f"method {method.name!r} warms up over {warm} step(s) of a {total_steps}-step run: its only step has "
            "rate 0 (warm-up starts at 0, as Hugging Face's); run more steps or set method.warmup_epochs=0."
        )
    lr = optim.lr if gen else learning_rate_schedule(method.lr_rule, optim, total_steps, warm)
    clip = optim.clip_norm
    if method.combiner == "gdiff":
        combiner = O.gdiff(retain_weight=method.retain_weight, forget_weight=method.forget_weight, clip_norm=clip)
    elif method.combiner == "ngdiff":
        combiner = O.ngdiff(eps=optim.eps, clip_norm=clip)
    elif method.combiner == "none":
        combiner = O.gdiff(1.0, 1.0, clip_norm=clip)
    else:
        combiner = O.COMBINERS[method.combiner](clip_norm=clip)
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
