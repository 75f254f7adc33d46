"""The ``sweep:`` section: methods x initial learning rates x seeds, a selection rule, the claims.

```yaml
sweep:
  methods:                       # name -> {method: <configs/methods name>, overrides, settings, lr}
    ngdiff: {}
    ngdiff_fixed: {method: ngdiff, overrides: {rate: constant}}
    gdiff: {}
  lr: [3.0e-5, 1.0e-4, 3.0e-4, 1.0e-3]   # every method's initial rates (a method's own `lr` replaces them)
  selection_seeds: [0, 1, 2, 3, 4]       # the runs the rule selects on
  report_seeds: [5, 6, 7, 8, 9]          # fresh runs at each method's selected setting, reported
  rule: {maximize: model_utility, constraints: ["forget_quality>=0.05"]}
  compare: {method: ngdiff, against: [gdiff], metric: model_utility}
  robustness: {methods: [ngdiff, ngdiff_fixed, gdiff], metrics: [model_utility, forget_quality]}
  forgetting_checks: {methods: [ngdiff, gdiff], checks: all, relearn_steps: 10, relearn_lr: 1.0e-3}
```

Every method runs as one population (:mod:`ngdiff_jax.population`) over its rates x settings x
selection seeds; the rule (a :class:`ngdiff_jax.training.selection.Criterion`, on the mean
over the selection seeds) picks each method's setting; with ``report_seeds`` each method
runs again at that setting on seeds the selection never saw, and those runs are reported
(without them the selection seeds are reported, and the report says the estimate is
optimistic). ``forgetting_checks`` runs each listed method once more at its selected setting
(seed ``seed``, default the first selection seed) and measures whether its forgetting survives
relearning, quantization and rephrasing (:mod:`ngdiff_jax.evaluation.robustness`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CompareSpec", "ForgettingChecksSpec", "RobustnessSpec", "SweepMethod", "SweepSection"]


@dataclass(frozen=True)
class SweepMethod:
    """One method of a sweep: a config in ``configs/methods`` (default: the entry's name) with
    ``overrides`` merged into its sections (``{rate: constant}``, ``{forget: {beta: 0.2}}``), population
    ``settings`` (``{method.forget.beta: [...]}``), and its own ``lr``
    list (default: the sweep's)."""

    method: str | None = None
    overrides: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    lr: tuple[float, ...] | None = None


@dataclass(frozen=True)
class CompareSpec:
    """Claim (i): ``method`` against each of ``against`` at their selected settings, on
    ``metric`` (paired by seed); ``forget_metric`` must also meet the rule's constraint."""

    method: str | None = None
    against: tuple[str, ...] = ()
    metric: str = "model_utility"


@dataclass(frozen=True)
class RobustnessSpec:
    """Claim (ii): the spread over the initial rates of each metric, ``methods[0]`` (the adaptive
    rate) against each of the others."""

    methods: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ("model_utility", "forget_quality")


@dataclass(frozen=True)
class ForgettingChecksSpec:
    """Robustness of forgetting (:func:`ngdiff_jax.evaluation.robustness.robustness_checks`) for
    ``methods`` at their selected settings, one run each with ``seed`` (null: the first selection
    seed); ``checks``: ``all`` or a comma-separated subset of ``relearn,bf16,int8,int4,paraphrase,
    formats``; ``relearn_steps`` Adam steps at ``relearn_lr`` on half the forget rows. The target
    and retain models are checked the same way, as references. Off with no methods."""

    methods: tuple[str, ...] = ()
    seed: int | None = None
    checks: str = "all"
    relearn_steps: int = 10
    relearn_lr: float = 1e-5

    def __post_init__(self):
        from ngdiff_jax.evaluation.robustness import parse_checks

        try:
            parse_checks(self.checks)
        except ValueError as e:
            raise ValueError(f"sweep.forgetting_checks.checks: {e}".replace("--robustness ", "")) from None
        if isinstance(self.relearn_steps, bool) or not isinstance(self.relearn_steps, int) or self.relearn_steps < 1:
            raise ValueError(f"sweep.forgetting_checks.relearn_steps={self.relearn_steps!r}: a whole number >= 1, "
                             "e.g. 10.")  # fmt: skip
        if isinstance(self.relearn_lr, bool) or not isinstance(self.relearn_lr, (int, float)) or not (
                self.relearn_lr > 0 and math.isfinite(self.relearn_lr)):  # fmt: skip
            raise ValueError(f"sweep.forgetting_checks.relearn_lr={self.relearn_lr!r}: a positive rate, e.g. 1e-5.")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"sweep.forgetting_checks.seed={self.seed!r}: an integer seed, or null for the first "
                             "selection seed.")  # fmt: skip


@dataclass(frozen=True)
class SweepSection:
    """``sweep:`` see the module doc."""

    methods: dict = field(default_factory=dict)
    lr: tuple[float, ...] = ()
    selection_seeds: tuple[int, ...] = (0,)
    report_seeds: tuple[int, ...] = ()
    rule: dict = field(default_factory=lambda: {"maximize": "model_utility"})
    compare: CompareSpec = field(default_factory=CompareSpec)
    robustness: RobustnessSpec = field(default_factory=RobustnessSpec)
    forgetting_checks: ForgettingChecksSpec = field(default_factory=ForgettingChecksSpec)
    chunk_size: int | None = None  # members per compiled program (null: a method's whole population)
    level: float = 0.95  # intervals' confidence level

    def __post_init__(self):
        from ngdiff_jax.config_loader import build

        if not isinstance(self.methods, dict) or not self.methods:
            raise ValueError("sweep.methods: name at least one method, e.g. {ngdiff: {}, gdiff: {}}.")
        methods = {}
        for name, spec in self.methods.items():
            methods[name] = spec if isinstance(spec, SweepMethod) else build(
                SweepMethod, spec or {}, where=f"sweep.methods.{name}")  # fmt: skip
        object.__setattr__(self, "methods", methods)
        for key, cls in (("compare", CompareSpec), ("robustness", RobustnessSpec),
                         ("forgetting_checks", ForgettingChecksSpec)):
            if isinstance(getattr(self, key), dict):
                object.__setattr__(self, key, build(cls, getattr(self, key), where=f"sweep.{key}"))
        for name, m in methods.items():
            rates = m.lr if m.lr is not None else self.lr
            if not rates:
                raise ValueError(f"sweep.lr is empty and sweep.methods.{name}.lr is not set; list initial rates.")
            if any(isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 0 or not math.isfinite(r)
                   for r in rates):  # fmt: skip
                raise ValueError(f"sweep: learning rates of {name} must be positive numbers, got {list(rates)}.")
        seeds = list(self.selection_seeds) + list(self.report_seeds)
        if not self.selection_seeds:
            raise ValueError("sweep.selection_seeds is empty; list the seeds the rule selects on.")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"sweep: a seed appears twice in selection_seeds + report_seeds ({seeds}); the report "
                             "seeds must be runs the selection never saw.")  # fmt: skip
        self.criterion()  # the rule parses
        for name in ((self.compare.method,) if self.compare.method else ()) + tuple(self.compare.against) + tuple(
                self.robustness.methods) + tuple(self.forgetting_checks.methods):  # fmt: skip
            if name not in methods:
                raise ValueError(f"sweep: {name!r} (in compare/robustness/forgetting_checks) is not one of "
                                 f"sweep.methods ({', '.join(methods)}).")  # fmt: skip
        if self.robustness.methods and len(self.robustness.methods) < 2:
            raise ValueError("sweep.robustness.methods: name the adaptive-rate method and at least one other.")
        if not 0 < self.level < 1:
            raise ValueError(f"sweep.level={self.level}: a confidence level in (0, 1), e.g. 0.95.")

    def criterion(self):
        from ngdiff_jax.training.selection import Criterion

        rule = dict(self.rule)
        try:
            return Criterion(maximize=rule.get("maximize"), minimize=rule.get("minimize"),
                             weights=rule.get("weights"), constraints=tuple(rule.get("constraints", ())))  # fmt: skip
        except ValueError as e:
            raise ValueError(f"sweep.rule: {e}") from None

    def rates(self, name: str) -> tuple[float, ...]:
        m = self.methods[name]
        return tuple(float(r) for r in (m.lr if m.lr is not None else self.lr))

    def describe_rule(self) -> str:
        return self.criterion().describe().replace("; ties keep the earlier step", "; ties keep the lower rate")


def method_config(name: str, spec: SweepMethod) -> Any:
    """The :class:`MethodConfig` of a sweep entry (its config with ``overrides``, named ``name``)."""
    from ngdiff_jax.config_loader import ConfigError
    from ngdiff_jax.training.config_schema import load_method

    try:
        return load_method(spec.method or name, **{"name": name, **spec.overrides})
    except (ConfigError, ValueError, TypeError) as e:
        error = e
    try:  # whose fault: the method's own file, or the entry's overrides
        load_method(spec.method or name)
    except (ConfigError, ValueError, TypeError) as e:
        raise ConfigError(f"sweep.methods.{name}: {e}") from None
    raise ConfigError(f"sweep.methods.{name}.overrides (merged into the method's sections, e.g. "
                      f"{{rate: constant}} or {{forget: {{beta: 0.2}}}}): {error}") from None
