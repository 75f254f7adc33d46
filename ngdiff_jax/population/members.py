"""A population of runs: seeds x initial learning rates x scalar method settings.

A ``population:`` section turns one unlearning config into a grid of *members*, every
combination of the listed values. Members differ only in numbers the step computes with
(the rate, a loss's ``beta``, GeN's ``smoothing``, ...) and in their seed (data order, RNG,
LoRA initialization), so they share one compiled program: the step is ``vmap``-ed over a
leading member axis of the parameters, optimizer state, RNG keys, batches and settings
(:mod:`ngdiff_jax.population.step`). A setting that changes the program's structure (the
forget objective, the combiner, RMU's ``layer``) needs separate runs.

Example:

  >>> from ngdiff_jax.population import PopulationSection
  >>> pop = PopulationSection(seeds=(0, 1), lr=(1e-4, 1e-3), settings={"method.forget.beta": [0.1]})
  >>> [m.name for m in pop.members(seed=0, lr=2e-4)]  # doctest: +NORMALIZE_WHITESPACE
  ['lr=0.0001 method.forget.beta=0.1 seed=0', 'lr=0.0001 method.forget.beta=0.1 seed=1',
   'lr=0.001 method.forget.beta=0.1 seed=0', 'lr=0.001 method.forget.beta=0.1 seed=1']
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SETTINGS", "Member", "PopulationSection", "concrete_configs", "member_values", "traced_configs"]

#: The settings a population may vary, with what each is. Each is a number the step only computes
#: with (checked when concrete, traced under ``vmap``); the rate key is ``lr`` (``optim.lr``).
SETTINGS: dict[str, str] = {
    "optim.lr": "the initial (GeN) or fixed/peak learning rate",
    "optim.weight_decay": "decoupled weight decay",
    "optim.gen_every": "GeN probes every this many steps",
    "optim.gen_smoothing": "GeN's moving-average weight of the old rate",
    "optim.gen_clip_factor": "GeN's bound on one rate change",
    "optim.b1": "Adam's first-moment decay",
    "optim.b2": "Adam's second-moment decay",
    "optim.adam_eps": "Adam's epsilon",
    "optim.eps": "NGDiff's normalization epsilon",
    "optim.clip_norm": "per-task gradient clipping norm",
    "method.max_grad_norm": "total-norm clipping of the combined direction",
    "method.forget.beta": "NPO / SimNPO / DPO / WGA / UNDIAL beta",
    "method.forget.delta": "SimNPO's delta",
    "method.forget.beta1": "SatImp's beta1",
    "method.forget.beta2": "SatImp's beta2",
    "method.forget.steering_coeff": "RMU's steering coefficient",
    "method.combiner.retain_weight": "GDiff's retain weight",
    "method.combiner.forget_weight": "GDiff's forget weight",
}
_INTEGER = ("optim.gen_every",)


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


@dataclass(frozen=True)
class Member:
    """One run of a population: its position, its seed and its value of every swept setting."""

    index: int
    seed: int
    values: dict[str, Any]  # dotted setting -> value; always holds "optim.lr"

    @property
    def key(self) -> str:
        """A short, stable id (``m007``) for files and folders."""
        return f"m{self.index:03d}"

    @property
    def lr(self) -> float:
        return float(self.values["optim.lr"])

    @property
    def name(self) -> str:
        parts = [f"lr={_fmt(self.lr)}"]
        parts += [f"{k}={_fmt(v)}" for k, v in sorted(self.values.items()) if k != "optim.lr"]
        return " ".join(parts + [f"seed={self.seed}"])

    @property
    def setting(self) -> tuple:
        """The member's values without its seed: members that differ only by seed share it."""
        return tuple(sorted(self.values.items()))

    def to_dict(self) -> dict:
        return {"index": self.index, "key": self.key, "seed": self.seed, "values": dict(self.values), "name": self.name}


@dataclass(frozen=True)
class PopulationSection:
    """``population:`` seeds x initial learning rates x settings, every combination one member.

    ``seeds``: run seeds (data order, RNG, LoRA initialization; default ``run.seed`` alone);
    ``lr``: learning rates (GeN's initial rate, or the fixed/peak rate; default ``optim.lr``
    alone); ``settings``: ``{dotted key: [values]}`` for the keys of :data:`SETTINGS`;
    ``chunk_size``: members per compiled program (null: all of them; lower it when their state
    does not fit in memory together); ``at_once``: members computed together inside the program,
    the groups one after the other (null: the whole chunk; lower it when activations dominate,
    e.g. LoRA on a large model); ``spread``: members spread over every local device (a
    ``member`` mesh axis), else one device; ``export``: write each member's model. Off when none
    of seeds/lr/settings is given.
    """

    seeds: tuple[int, ...] | None = None
    lr: tuple[float, ...] | None = None
    settings: dict = field(default_factory=dict)
    chunk_size: int | None = None
    at_once: int | None = None
    spread: bool = True
    export: bool = True

    def __post_init__(self):
        if self.seeds is not None:
            if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in self.seeds):
                raise ValueError(f"population.seeds={list(self.seeds)!r}: give a list of integers, e.g. [0, 1, 2].")
            _unique("population.seeds", self.seeds)
        if self.lr is not None:
            if not self.lr or any(not _positive(v) for v in self.lr):
                raise ValueError(f"population.lr={list(self.lr)!r}: give a list of positive learning rates.")
            _unique("population.lr", self.lr)
        if not isinstance(self.settings, dict):
            raise ValueError("population.settings must map setting keys to lists of values, "
                             "e.g. {method.forget.beta: [0.05, 0.1]}.")  # fmt: skip
        for key, values in self.settings.items():
            if key == "optim.lr":
                raise ValueError("population.settings.optim.lr: list learning rates in population.lr instead.")
            if key not in SETTINGS:
                raise ValueError(
                    f"population.settings.{key}: not a setting a population can vary (one compiled program "
                    f"for every member); use one of {', '.join(k for k in SETTINGS if k != 'optim.lr')}, or "
                    "separate runs for settings that change the program (objectives, combiner, layers)."
                )
            if not isinstance(values, (list, tuple)) or not values:
                raise ValueError(f"population.settings.{key}={values!r}: give a non-empty list of values.")
            for v in values:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ValueError(f"population.settings.{key}: {v!r} is not a finite number.")
                if key in _INTEGER and int(v) != v:
                    raise ValueError(f"population.settings.{key}: {v!r} must be an integer.")
            _unique(f"population.settings.{key}", values)
        for key in ("chunk_size", "at_once"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"population.{key}={v!r}: use a positive number of members, or null for all of "
                                 "them at once.")  # fmt: skip
        if self.at_once is not None and self.chunk_size is not None and self.chunk_size % self.at_once:
            raise ValueError(f"population.at_once={self.at_once} must divide population.chunk_size="
                             f"{self.chunk_size}.")  # fmt: skip

    @property
    def enabled(self) -> bool:
        return self.seeds is not None or self.lr is not None or bool(self.settings)

    def members(self, *, seed: int, lr: float) -> list[Member]:
        """Every combination, settings outermost and seeds innermost (``seed``/``lr``: the
        config's own, used when the section lists none)."""
        seeds = list(self.seeds) if self.seeds is not None else [int(seed)]
        rates = [float(v) for v in self.lr] if self.lr is not None else [float(lr)]
        keys = sorted(self.settings)
        grids = [[_cast(k, v) for v in self.settings[k]] for k in keys]
        out = []
        for rate in rates:
            for combo in itertools.product(*grids):
                for s in seeds:
                    values = {"optim.lr": rate, **dict(zip(keys, combo))}
                    out.append(Member(len(out), s, values))
        return out

    def chunks(self, members: list[Member]) -> list[list[Member]]:
        """``members`` in runs of ``chunk_size`` (all at once when unset)."""
        size = self.chunk_size or len(members)
        return [members[i : i + size] for i in range(0, len(members), size)]


def _positive(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def _unique(where: str, values) -> None:
    if len(set(values)) != len(values):
        raise ValueError(f"{where} lists a value twice: {list(values)!r}.")


def _cast(key: str, v):
    return int(v) if key in _INTEGER else float(v)


def member_values(members: list[Member]) -> dict[str, list]:
    """The swept settings as ``{key: [value per member]}`` (the step's per-member numbers)."""
    keys = sorted({k for m in members for k in m.values})
    return {k: [m.values[k] for m in members] for k in keys}


def concrete_configs(method, optim, member: Member):
    """``(method, optim)`` with ``member``'s values, built (and range-checked) as a single run's."""
    return _set(method, optim, member.values, validate=True)


def traced_configs(method, optim, values: dict[str, Any]):
    """``(method, optim)`` holding ``values`` (traced scalars inside ``vmap``) without re-running
    the configs' checks (they compare numbers; every member's values were checked concretely by
    `concrete_configs` first)."""
    return _set(method, optim, values, validate=False)


def _set(method, optim, values: dict[str, Any], *, validate: bool):
    changes: dict[str, dict] = {"method": {}, "optim": {}}
    for key, v in values.items():
        root, *path = key.split(".")
        node = changes[root]
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = v
    return (_set_fields(method, changes["method"], validate=validate, where="method"),
            _set_fields(optim, changes["optim"], validate=validate, where="optim"))  # fmt: skip


def _set_fields(cfg, changes: dict, *, validate: bool, where: str):
    """``cfg`` (a frozen dataclass) with ``changes`` (``{field: value or nested changes}``) set, one
    ``dataclasses.replace`` per dataclass (its checks run on the member's whole setting) when
    ``validate``, else copies with the fields set unchecked (``cfg`` itself is never changed)."""
    if not changes:
        return cfg
    have = [f.name for f in dataclasses.fields(cfg)]
    for name in changes:
        if name not in have:
            what = f"{where}.type={cfg.kind}" if hasattr(cfg, "kind") else where
            raise ValueError(f"population.settings.{where}.{name}: {what} has no setting {name!r} (its settings: "
                             f"{', '.join(have) or 'none'}); vary a setting the method's {where.split('.')[-1]} "
                             "has, or drop this key.")  # fmt: skip
    new = {name: _set_fields(getattr(cfg, name), v, validate=validate, where=f"{where}.{name}")
           if isinstance(v, dict) else v for name, v in changes.items()}  # fmt: skip
    if validate:
        return dataclasses.replace(cfg, **new)
    out = copy.copy(cfg)
    for name, v in new.items():
        object.__setattr__(out, name, v)
    return out
