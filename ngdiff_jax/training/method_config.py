"""An unlearning method as four typed choices: forget objective, retain objective, combiner, rate rule.

Each choice is a registered frozen dataclass with its own fields, their checks next to them and
``build()``: a ``draccus.ChoiceRegistry`` (levanter's registries), so a YAML method names each
by ``type`` and sets only that type's fields::

    name: npo
    forget: {type: npo, beta: 0.1}        # ForgetObjective: ga, npo, simnpo, wga, satimp, ...
    retain: {type: nll}                   # RetainObjective: nll, kl, embed_diff, none
    combiner: {type: gdiff, retain_weight: 1.0, forget_weight: 1.0}   # ngdiff, gdiff, mgda, pcgrad
    rate: {type: linear, warmup_epochs: 1.0}                          # gen, constant, linear, cosine
    max_grad_norm: 1.0

A choice without settings may be written as its name (``retain: nll``). Overrides reach the
fields (``method.forget.beta=0.2``); switching a choice to a type with other fields replaces the
mapping (``method.forget={type: ga}``). A field another type lacks is an error that lists the
type's fields. ``ngdiff_jax.config_loader.build`` reads these (the CLI, with its one-line errors),
and ``draccus.decode(MethodConfig, mapping)`` gives the same object.

Adding a method is one dataclass registered here (when it needs a new objective, combiner or
rule) and one YAML file in ``configs/methods``.

Example:

  >>> from ngdiff_jax.training.method_config import MethodConfig, NPO, GDiff, LinearRate
  >>> m = MethodConfig(name="npo", forget=NPO(beta=0.1), combiner=GDiff(), rate=LinearRate(warmup_epochs=1.0))
  >>> m.forget.kind, m.retain.kind, m.combiner.kind, m.rate.kind, m.needs_reference
  ('npo', 'nll', 'gdiff', 'linear', True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import draccus
import jax
import optax

from ngdiff_jax import losses
from ngdiff_jax.training import objectives as obj
from ngdiff_jax.training.objectives import ALT_KEYS, BATCH_KEYS, Objective

__all__ = [
    "CEU", "DPO", "GA", "GDiff", "MGDA", "NGDiff", "NPO", "PCGrad", "RMU", "UNDIAL", "WGA",
    "Combiner", "ConstantRate", "CosineRate", "EmbedDiff", "ForgetNLL", "ForgetObjective", "GeN",
    "IdkNLL", "LinearRate", "MethodConfig", "NoForget", "NoRetain", "RateRule", "RetainKL", "RetainNLL",
    "RetainObjective", "SatImp", "SimNPO", "choice_names",
]


def _need(where: str, value, ok: bool, must: str, example) -> None:
    """A field's check: one line naming the key, the value and a fix."""
    if not ok:
        raise ValueError(f"{where}={value!r}: must be {must}; set e.g. {where}={example}.")


def _number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _positive(where: str, v, example) -> None:
    _need(where, v, _number(v) and v > 0, "> 0", example)


def _nonnegative(where: str, v, example) -> None:
    _need(where, v, _number(v) and v >= 0, ">= 0", example)


class _Choice:
    """What every registered choice has: ``kind``, its registered name (the YAML ``type``)."""

    SECTION: ClassVar[str] = ""

    @property
    def kind(self) -> str:
        return type(self).get_choice_name(type(self))  # type: ignore[attr-defined]

    def key(self, name: str) -> str:
        return f"method.{self.SECTION}.{name}"


def choice_names(registry) -> list[str]:
    """The registered names of ``registry`` (e.g. ``ForgetObjective``), in registration order."""
    return list(registry.get_known_choices())


# -- forget objectives --------------------------------------------------------------------------


class ForgetObjective(_Choice, draccus.ChoiceRegistry):
    """The forget task's loss (to minimize). ``build()`` gives its `Objective` (None: no forget task)."""

    SECTION: ClassVar[str] = "forget"
    needs_reference: ClassVar[bool] = False  # compares against the frozen reference model
    needs_alternate: ClassVar[bool] = False  # forget batches carry the refusal answers (alt_* arrays)
    hidden_layer: ClassVar[int | None] = None  # reads the hidden state after this block

    def build(self) -> Objective | None:
        raise NotImplementedError


@ForgetObjective.register_subclass("ga")
@dataclass(frozen=True)
class GA(ForgetObjective):
    """Gradient ascent: minus the NLL of the forget answers."""

    def build(self):
        def ga(model, params, batch, ref):
            nll = obj.nll(obj.logprobs(model, params, batch), batch["labels"])
            return -nll, nll  # == losses.gradient_ascent, with the NLL reused for logging

        return Objective(ga)


@ForgetObjective.register_subclass("nll")
@dataclass(frozen=True)
class ForgetNLL(ForgetObjective):
    """Plain NLL of the forget answers (descent: a sanity baseline, not unlearning)."""

    def build(self):
        def nll_loss(model, params, batch, ref):
            nll = obj.nll(obj.logprobs(model, params, batch), batch["labels"])
            return nll, nll

        return Objective(nll_loss)


@ForgetObjective.register_subclass("npo")
@dataclass(frozen=True)
class NPO(ForgetObjective):
    """Negative preference optimization against the reference model (open-unlearning's NPO)."""

    needs_reference: ClassVar[bool] = True
    beta: float = 0.1

    def __post_init__(self):
        _positive(self.key("beta"), self.beta, 0.1)

    def build(self):
        return obj.logprob_objective(lambda lg, b, ref: losses.npo(lg, b["labels"], ref["ref_logp_sum"], self.beta),
                                     reference=obj.ref_logp_sum(), precomputed=("ref_logp_sum",))  # fmt: skip


@ForgetObjective.register_subclass("simnpo")
@dataclass(frozen=True)
class SimNPO(ForgetObjective):
    """Reference-free, length-normalized NPO with margin ``delta``."""

    beta: float = 4.5
    delta: float = 0.0

    def __post_init__(self):
        _positive(self.key("beta"), self.beta, 4.5)
        _nonnegative(self.key("delta"), self.delta, 0.0)

    def build(self):
        return obj.logprob_objective(lambda lg, b, ref: losses.simnpo(lg, b["labels"], beta=self.beta,
                                                                      delta=self.delta))  # fmt: skip


@ForgetObjective.register_subclass("wga")
@dataclass(frozen=True)
class WGA(ForgetObjective):
    """Weighted gradient ascent: each token's ascent weighted by ``p ** beta``."""

    beta: float = 1.0

    def __post_init__(self):
        _positive(self.key("beta"), self.beta, 1.0)

    def build(self):
        return obj.logprob_objective(lambda lg, b, ref: losses.wga(lg, b["labels"], self.beta))


@ForgetObjective.register_subclass("satimp")
@dataclass(frozen=True)
class SatImp(ForgetObjective):
    """Ascent weighted by ``p ** beta1 * (1 - p) ** beta2`` (open-unlearning's SatImp)."""

    beta1: float = 5.0
    beta2: float = 1.0

    def __post_init__(self):
        _nonnegative(self.key("beta1"), self.beta1, 5.0)
        _nonnegative(self.key("beta2"), self.beta2, 1.0)

    def build(self):
        return obj.logprob_objective(lambda lg, b, ref: losses.satimp(lg, b["labels"], self.beta1, self.beta2))


@ForgetObjective.register_subclass("ceu")
@dataclass(frozen=True)
class CEU(ForgetObjective):
    """CE-U: cross-entropy against the distribution with the answer token's logit removed."""

    ignore_first_n: int = 1

    def __post_init__(self):
        _need(self.key("ignore_first_n"), self.ignore_first_n,
              isinstance(self.ignore_first_n, int) and not isinstance(self.ignore_first_n, bool)
              and self.ignore_first_n >= 0, "an integer >= 0", 1)  # fmt: skip

    def build(self):
        return obj.logit_objective(lambda lg, b, ref: losses.ce_u(lg, b["labels"], self.ignore_first_n))


@ForgetObjective.register_subclass("undial")
@dataclass(frozen=True)
class UNDIAL(ForgetObjective):
    """Self-distillation from the reference logits with the answer token's logit lowered by ``beta``."""

    needs_reference: ClassVar[bool] = True
    beta: float = 10.0

    def __post_init__(self):
        _positive(self.key("beta"), self.beta, 10.0)

    def build(self):
        return obj.logit_objective(
            lambda lg, b, ref: losses.undial(lg, ref["ref_logits"], b["labels"], self.beta, b["attention_mask"]),
            reference=obj.ref_logits,
        )  # fmt: skip


def _idk_path(where: str, path) -> None:
    _need(where, path, path is None or (isinstance(path, str) and bool(path)),
          "a JSON-lines file of refusal strings, or null for configs/data/idk.jsonl", "configs/data/idk.jsonl")


@ForgetObjective.register_subclass("idk_nll")
@dataclass(frozen=True)
class IdkNLL(ForgetObjective):
    """NLL of refusal answers (``idk_path``: a JSON-lines file of strings; null: configs/data/idk.jsonl).

    TOFU's original "idk" loss (locuslab/tofu dataloader.py, CustomTrainerForgetting.compute_loss;
    open-unlearning has no IdkNLL) is ONE token-mean NLL over cat(idk batch, retain batch):
    (S_f + S_r) / (N_f + N_r). Here, on purpose, the forget task is the refusal answers' token
    mean NLL and the retain objective the retain batch's, combined as GradDiff does
    (gamma * S_f/N_f + alpha * S_r/N_r): with gamma = alpha = 1 that is twice TOFU's loss when
    N_f == N_r, and otherwise weights the two batches equally instead of by token count."""

    needs_alternate: ClassVar[bool] = True
    idk_path: str | None = None

    def __post_init__(self):
        _idk_path(self.key("idk_path"), self.idk_path)

    def build(self):
        def idk_nll(model, params, batch, ref):
            alt = obj.nll(obj.logprobs(model, params, batch, "alt_"), batch["alt_labels"])
            nll = jax.lax.stop_gradient(obj.nll(obj.logprobs(model, params, batch), batch["labels"]))
            return alt, nll

        return Objective(idk_nll, batch_keys=BATCH_KEYS + ALT_KEYS)


@ForgetObjective.register_subclass("dpo")
@dataclass(frozen=True)
class DPO(ForgetObjective):
    """DPO preferring the refusal answers (``idk_path``) over the forget answers, against the reference."""

    needs_reference: ClassVar[bool] = True
    needs_alternate: ClassVar[bool] = True
    beta: float = 0.1
    idk_path: str | None = None

    def __post_init__(self):
        _positive(self.key("beta"), self.beta, 0.1)
        _idk_path(self.key("idk_path"), self.idk_path)

    def build(self):
        def ref_both(model, ref_params, batch):
            answers, refusals = obj.ref_logp_sum(), obj.ref_logp_sum("alt_")
            return {**answers(model, ref_params, batch), **refusals(model, ref_params, batch)}

        def dpo(model, params, batch, ref):
            lp = obj.logprobs(model, params, batch)
            alt = obj.logprobs(model, params, batch, "alt_")
            loss = losses.dpo(lp, batch["labels"], ref["ref_logp_sum"], alt, batch["alt_labels"],
                              ref["alt_ref_logp_sum"], self.beta)  # fmt: skip
            return loss, obj.nll(lp, batch["labels"])

        return Objective(dpo, reference=ref_both, precomputed=("ref_logp_sum", "alt_ref_logp_sum"),
                         batch_keys=BATCH_KEYS + ALT_KEYS)  # fmt: skip


@ForgetObjective.register_subclass("rmu")
@dataclass(frozen=True)
class RMU(ForgetObjective):
    """Steer the hidden state after block ``layer`` (negative: from the end) toward a fixed random
    direction of norm ``steering_coeff`` (seeded by ``seed``) on forget data."""

    layer: int = 7
    steering_coeff: float = 2.0
    seed: int = 0

    def __post_init__(self):
        _need(self.key("layer"), self.layer, isinstance(self.layer, int) and not isinstance(self.layer, bool),
              "an integer block index (negative: from the end)", 7)
        _positive(self.key("steering_coeff"), self.steering_coeff, 2.0)

    @property
    def hidden_layer(self) -> int:  # type: ignore[override]
        return self.layer

    def build(self):
        def rmu(model, params, batch, ref):
            h = obj.hidden(model, params, batch, self.layer)
            u = losses.rmu_control_vector(jax.random.PRNGKey(self.seed), h.shape[-1], self.steering_coeff)
            nll = jax.lax.stop_gradient(obj.nll(obj.logprobs(model, params, batch), batch["labels"]))
            return losses.rmu_forget(h, u, batch["labels"]), nll

        return Objective(rmu)


@ForgetObjective.register_subclass("none")
@dataclass(frozen=True)
class NoForget(ForgetObjective):
    """No forget task: its gradient is zero and no backward pass is done."""

    def build(self):
        return None


# -- retain objectives --------------------------------------------------------------------------


class RetainObjective(_Choice, draccus.ChoiceRegistry):
    """The retain task's loss (to minimize). ``build()`` gives its `Objective` (None: no retain task)."""

    SECTION: ClassVar[str] = "retain"
    needs_reference: ClassVar[bool] = False
    hidden_layer: ClassVar[int | None] = None

    def build(self) -> Objective | None:
        raise NotImplementedError


@RetainObjective.register_subclass("nll")
@dataclass(frozen=True)
class RetainNLL(RetainObjective):
    """Keep the model's retain answers: their token-mean NLL."""

    def build(self):
        return ForgetNLL().build()


@RetainObjective.register_subclass("kl")
@dataclass(frozen=True)
class RetainKL(RetainObjective):
    """Keep the distribution close to the reference model's: open-unlearning's compute_kl_divergence
    on the batch's real rows and its own length (``kl_positions``: the whole batch's columns, set
    by the step when it runs micro-batches)."""

    needs_reference: ClassVar[bool] = True

    def build(self):
        return obj.logit_objective(
            lambda lg, b, ref: losses.kl_to_reference(
                lg, ref["ref_logits"], b["labels"], scope="batch", attention_mask=b["attention_mask"],
                positions=ref.get("kl_positions"),
            ),
            reference=obj.ref_logits,
        )  # fmt: skip


@RetainObjective.register_subclass("embed_diff")
@dataclass(frozen=True)
class EmbedDiff(RetainObjective):
    """Keep the hidden state after block ``layer`` at the reference model's (RMU's retain loss)."""

    needs_reference: ClassVar[bool] = True
    layer: int = 7

    def __post_init__(self):
        _need(self.key("layer"), self.layer, isinstance(self.layer, int) and not isinstance(self.layer, bool),
              "an integer block index (negative: from the end)", 7)

    @property
    def hidden_layer(self) -> int:  # type: ignore[override]
        return self.layer

    def build(self):
        def ref_hidden(model, ref_params, batch):
            return {"ref_hidden": obj.hidden(model, ref_params, batch, self.layer)}

        def embed_diff(model, params, batch, ref):
            h = obj.hidden(model, params, batch, self.layer)
            nll = jax.lax.stop_gradient(obj.nll(obj.logprobs(model, params, batch), batch["labels"]))
            return losses.activation_mse(h, ref["ref_hidden"], batch["labels"]), nll

        return Objective(embed_diff, reference=ref_hidden)


@RetainObjective.register_subclass("none")
@dataclass(frozen=True)
class NoRetain(RetainObjective):
    """No retain task: its gradient is zero and no backward pass is done."""

    def build(self):
        return None


# -- combiners ----------------------------------------------------------------------------------


class Combiner(_Choice, draccus.ChoiceRegistry):
    """How the task gradients become one direction: ``build(optim)`` gives the optax aggregator
    (`ngdiff_jax.optim`); ``optim.clip_norm`` clips each task's gradient first."""

    SECTION: ClassVar[str] = "combiner"

    def build(self, optim) -> optax.GradientTransformation:
        from ngdiff_jax import optim as O

        return O.COMBINERS[self.kind](clip_norm=optim.clip_norm)


@Combiner.register_subclass("ngdiff")
@dataclass(frozen=True)
class NGDiff(Combiner):
    """``g_r / |g_r| + g_f / |g_f|`` (the paper's; ``optim.eps`` guards the norms)."""

    def build(self, optim):
        from ngdiff_jax import optim as O

        return O.ngdiff(eps=optim.eps, clip_norm=optim.clip_norm)


@Combiner.register_subclass("gdiff")
@dataclass(frozen=True)
class GDiff(Combiner):
    """``retain_weight * g_r + forget_weight * g_f`` (open-unlearning's GradDiff: alpha, gamma)."""

    retain_weight: float = 1.0
    forget_weight: float = 1.0

    def __post_init__(self):
        _nonnegative(self.key("retain_weight"), self.retain_weight, 1.0)
        _nonnegative(self.key("forget_weight"), self.forget_weight, 1.0)
        if self.retain_weight == 0 == self.forget_weight:
            raise ValueError("method.combiner.retain_weight=0 and method.combiner.forget_weight=0: the update is "
                             "always zero; set one > 0.")  # fmt: skip

    def build(self, optim):
        from ngdiff_jax import optim as O

        return O.gdiff(retain_weight=self.retain_weight, forget_weight=self.forget_weight, clip_norm=optim.clip_norm)


@Combiner.register_subclass("mgda")
@dataclass(frozen=True)
class MGDA(Combiner):
    """The min-norm point of the task gradients' convex hull."""


@Combiner.register_subclass("pcgrad")
@dataclass(frozen=True)
class PCGrad(Combiner):
    """Each task gradient projected off the others where they conflict, then summed."""


# -- learning-rate rules ------------------------------------------------------------------------


class RateRule(_Choice, draccus.ChoiceRegistry):
    """How the learning rate is set: GeN's adaptive rule, or a fixed schedule (``optim.lr`` the peak)."""

    SECTION: ClassVar[str] = "rate"
    adaptive: ClassVar[bool] = False  # GeN: the rate comes from probing the loss


@RateRule.register_subclass("gen")
@dataclass(frozen=True)
class GeN(RateRule):
    """GeN (generalized Newton): every ``optim.gen_every`` steps, fit a parabola to the ``probe``d
    loss (``retain``, ``forget`` or their ``sum``) at three points along the update and move the
    rate toward its minimizer; ``optim.lr`` is the initial rate."""

    adaptive: ClassVar[bool] = True
    probe: Literal["retain", "forget", "sum"] = "retain"

    def __post_init__(self):
        _need(self.key("probe"), self.probe, self.probe in ("retain", "forget", "sum"), "retain, forget or sum",
              "retain")


@dataclass(frozen=True)
class _Fixed(RateRule):
    """A fixed-rate schedule after a linear warm-up over ``warmup_epochs`` epochs of the forget set
    (open-unlearning's ``warmup_epochs``: steps = int(epochs * forget rows // batch size); 0: none,
    or ``optim.warmup_steps``)."""

    warmup_epochs: float = 0.0

    def __post_init__(self):
        _need(self.key("warmup_epochs"), self.warmup_epochs, _number(self.warmup_epochs) and self.warmup_epochs >= 0,
              ">= 0 (0: no warm-up)", 1.0)


@RateRule.register_subclass("constant")
@dataclass(frozen=True)
class ConstantRate(_Fixed):
    """``optim.lr`` throughout (after the warm-up)."""


@RateRule.register_subclass("linear")
@dataclass(frozen=True)
class LinearRate(_Fixed):
    """Linear decay from ``optim.lr`` to 0 (Hugging Face's ``get_linear_schedule_with_warmup``)."""


@RateRule.register_subclass("cosine")
@dataclass(frozen=True)
class CosineRate(_Fixed):
    """Cosine decay from ``optim.lr`` to 0."""


# -- the method ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodConfig:
    """An unlearning method: forget objective, retain objective, combiner, learning-rate rule.

    Objectives are losses to *minimize* (``ga`` is minus the NLL of the forget answers); a
    ``none`` objective drops that task. ``adam``: Adam preconditioning of the combined
    direction; ``max_grad_norm``: the combined direction clipped to this global norm before Adam
    (Hugging Face Trainer's ``max_grad_norm``, open-unlearning's trainer). Definitions and sources:
    docs/METRICS.md.
    """

    #: the flat keys of earlier versions -> the typed keys that replaced them (a one-line error)
    RENAMED: ClassVar[dict[str, tuple[str, ...]]] = {
        "forget_loss": ("forget.type",), "retain_loss": ("retain.type",), "lr_rule": ("rate.type",),
        "probe": ("rate.probe",), "beta": ("forget.beta",), "simnpo_delta": ("forget.delta",),
        "satimp_beta1": ("forget.beta1",), "satimp_beta2": ("forget.beta2",),
        "ceu_ignore_first_n": ("forget.ignore_first_n",), "rmu_layer": ("forget.layer", "retain.layer"),
        "rmu_steering_coeff": ("forget.steering_coeff",), "rmu_seed": ("forget.seed",),
        "retain_weight": ("combiner.retain_weight",), "forget_weight": ("combiner.forget_weight",),
        "warmup_epochs": ("rate.warmup_epochs",), "idk_path": ("forget.idk_path",),
    }
    RENAMED_NOTE: ClassVar[str] = (" (a method's settings sit under forget, retain, combiner and rate: "
                                   "configs/methods/*.yaml)")
    #: what switching a section's type by its new key does not carry over (a new type starts from its defaults)
    RENAMED_HINTS: ClassVar[dict[str, str]] = {
        "lr_rule": ", with method.rate.warmup_epochs=<epochs> to keep a warm-up (another rule starts from its "
                   "own defaults)",
        "forget_loss": ", with the objective's settings (another objective starts from its own defaults)",
    }

    name: str = "custom"
    forget: ForgetObjective = field(default_factory=GA)
    retain: RetainObjective = field(default_factory=RetainNLL)
    combiner: Combiner = field(default_factory=NGDiff)
    rate: RateRule = field(default_factory=GeN)
    adam: bool = True
    max_grad_norm: float | None = None

    def __post_init__(self):
        for f, registry in (("forget", ForgetObjective), ("retain", RetainObjective), ("combiner", Combiner),
                            ("rate", RateRule)):  # fmt: skip
            v = getattr(self, f)
            if not isinstance(v, registry):
                raise ValueError(f"method.{f}={v!r}: must be one of {', '.join(choice_names(registry))} "
                                 f"(e.g. method.{f}={{type: {choice_names(registry)[0]}}}).")  # fmt: skip
        if self.max_grad_norm is not None:
            _positive("method.max_grad_norm", self.max_grad_norm, 1.0)
        f, r = self.forget.kind, self.retain.kind
        if f == "none" and r == "none":
            raise ValueError(f"method {self.name!r} has method.forget.type=none and method.retain.type=none: "
                             "nothing to train.")  # fmt: skip
        if isinstance(self.rate, GeN):
            probe = self.rate.probe
            if probe in ("retain", "sum") and r == "none":
                raise ValueError(f"method {self.name!r} uses GeN probing the retain loss (method.rate.probe={probe}) "
                                 "but method.retain.type=none; set method.rate.probe=forget or a retain loss.")
            if probe in ("forget", "sum") and f == "none":
                raise ValueError(f"method {self.name!r} uses GeN probing the forget loss (method.rate.probe={probe}) "
                                 "but method.forget.type=none; set method.rate.probe=retain or a forget loss.")
        fl, rl = self.forget.hidden_layer, self.retain.hidden_layer
        if fl is not None and rl is not None and fl != rl:
            raise ValueError(f"method {self.name!r}: method.forget.layer={fl} and method.retain.layer={rl}: RMU "
                             f"steers and keeps the same block's output; set both to one block (e.g. {fl}).")

    @property
    def needs_reference(self) -> bool:
        """NPO, DPO, UNDIAL, KL and RMU's embed_diff compare against a frozen reference model
        (the model before unlearning)."""
        return self.forget.needs_reference or self.retain.needs_reference

    @property
    def needs_alternate(self) -> bool:
        """``idk_nll`` / ``dpo``: forget batches carry the refusal answers as ``alt_*`` arrays."""
        return self.forget.needs_alternate

    @property
    def needs_hidden(self) -> bool:
        """``rmu`` / ``embed_diff`` read the hidden state after a block."""
        return self.forget.hidden_layer is not None or self.retain.hidden_layer is not None

    @property
    def probe(self) -> str:
        """The loss GeN probes (``retain`` for a fixed-rate rule, which probes nothing)."""
        return self.rate.probe if isinstance(self.rate, GeN) else "retain"

    @property
    def idk_path(self) -> str | None:
        """The refusal answers of ``idk_nll`` / ``dpo`` (None: configs/data/idk.jsonl)."""
        return getattr(self.forget, "idk_path", None)
