"""Model selection during training: evaluate every N steps, keep the best checkpoint by a declared
criterion, optionally stop early, export the best model beside the last one.

The ``selection:`` section of ``ngdiff unlearn`` (:class:`SelectionSection`):

```yaml
selection:
  every: 5                       # evaluate at step 0, every 5 steps and at the end
  tofu: true                     # full TOFU metrics (forget_quality, model_utility, ...) at each point
  retain_eval: eval/retain.json  # the retain model's result, for forget_quality / privleak
  maximize: model_utility        # or minimize: <metric>, or weights: {model_utility: 1, forget_quality: 2}
  constraints: ["forget_quality>=0.05"]
  patience: 3                    # stop after 3 evaluations without a better model (0: never)
```

Without ``tofu`` the metrics are the in-loop hook's (``forget_prob``, ``retain_prob``,
``forget_nll``, ``retain_nll``). A point is *feasible* when every constraint holds; its score
is the objective (negated for ``minimize``) or the weighted sum. The best point is the feasible
one with the highest score; ties keep the earlier step (a later point must be strictly better).
``<output_dir>/best_model`` holds the best model (rewritten atomically when it changes),
``<output_dir>/model`` the last one, and ``<output_dir>/selection.json`` the state: every
evaluated point, the best step, score and metrics, and the early-stopping count. A resumed run
reads that state back, so the best model so far is kept (the steps after the resumed
checkpoint are evaluated again and, being deterministic, give the same scores, which do not
replace an equal best).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_CONSTRAINT = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(>=|<=|>|<)\s*([-+0-9.eE]+|inf|-inf)\s*$")
_OPS = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, "<": lambda a, b: a < b}


@dataclass(frozen=True)
class SelectionSection:
    """``selection:`` model selection during training (see the module doc)."""

    every: int = 0  # evaluate every N steps (0: selection off)
    tofu: bool = False  # evaluate the full TOFU metrics at each point (else the hook's probabilities)
    tofu_limit: int | None = None  # rows per TOFU split at each point (null: all)
    tofu_max_new_tokens: int = 200  # greedy answer length for the ROUGE metrics (TOFU: 200)
    retain_eval: str | None = None  # retain model's saved evaluation (forget_quality, privleak)
    maximize: str | None = None
    minimize: str | None = None
    weights: dict = field(default_factory=dict)  # metric -> weight: maximize sum(weight * metric)
    constraints: tuple[str, ...] = ()  # "metric>=value" (>=, <=, >, <)
    patience: int = 0  # early stopping: evaluations without a better point (0: off)
    export_best: bool = True

    def __post_init__(self):
        if self.every < 0:
            raise ValueError(f"selection.every={self.every} must be >= 0 (0 turns selection off).")
        if self.patience < 0:
            raise ValueError(f"selection.patience={self.patience} must be >= 0 (0: no early stopping).")
        if not self.enabled:
            given = [k for k in ("maximize", "minimize", "retain_eval") if getattr(self, k)]
            given += [k for k in ("weights", "constraints") if getattr(self, k)] + (["tofu"] if self.tofu else [])
            if given or self.patience:
                raise ValueError(
                    f"selection.{(given or ['patience'])[0]} is set but selection.every=0 (selection off); "
                    "set selection.every=<steps between evaluations>."
                )
            return
        crit = self.criterion()  # parses and checks the criterion
        if "forget_quality" in crit.metrics and not (self.tofu and self.retain_eval):
            raise ValueError(
                "the selection criterion uses forget_quality, which needs selection.tofu=true and "
                "selection.retain_eval=<the retain model's evaluation JSON (ngdiff eval --role retain)>."
            )

    @property
    def enabled(self) -> bool:
        return self.every > 0

    def criterion(self) -> Criterion:
        return Criterion(maximize=self.maximize, minimize=self.minimize, weights=dict(self.weights),
                         constraints=tuple(self.constraints))  # fmt: skip


class Criterion:
    """Feasibility (constraints) and score (objective or weighted sum) of a point's metrics."""

    def __init__(self, *, maximize=None, minimize=None, weights=None, constraints=()):
        weights = dict(weights or {})
        chosen = [k for k, v in (("maximize", maximize), ("minimize", minimize), ("weights", weights)) if v]
        if len(chosen) != 1:
            raise ValueError(
                "selection needs exactly one criterion: maximize: <metric>, minimize: <metric> or "
                f"weights: {{metric: weight}}; got {chosen or 'none'}."
            )
        for k, w in weights.items():
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w):
                raise ValueError(f"selection.weights.{k}={w!r} must be a finite number.")
        self.maximize, self.minimize, self.weights = maximize, minimize, weights
        self.constraints = []
        for c in constraints:
            m = _CONSTRAINT.match(str(c))
            if not m:
                raise ValueError(
                    f"selection.constraints: {c!r} is not 'metric>=value' (operators >=, <=, >, <), "
                    "e.g. 'forget_quality>=0.05'."
                )
            self.constraints.append((m.group(1), m.group(2), float(m.group(3))))

    @property
    def metrics(self) -> list[str]:
        names = [self.maximize or self.minimize] if (self.maximize or self.minimize) else list(self.weights)
        return names + [n for n, _, _ in self.constraints if n not in names]

    def describe(self) -> str:
        if self.weights:
            obj = "maximize " + " + ".join(f"{w:g}*{k}" for k, w in self.weights.items())
        else:
            obj = f"maximize {self.maximize}" if self.maximize else f"minimize {self.minimize}"
        cons = " and ".join(f"{n}{op}{v:g}" for n, op, v in self.constraints)
        return obj + (f" subject to {cons}" if cons else "") + "; ties keep the earlier step"

    def check_available(self, metrics: Mapping[str, Any]) -> None:
        missing = [n for n in self.metrics if n not in metrics]
        if missing:
            raise KeyError(
                f"selection criterion uses {missing}, which the evaluation does not give; available: "
                f"{sorted(metrics)} (full TOFU metrics need selection.tofu=true)."
            )

    def score(self, metrics: Mapping[str, Any]) -> float | None:
        """The point's score, or None when a constraint fails or a needed value is None/NaN."""
        self.check_available(metrics)

        def val(n):
            v = metrics[n]
            return None if v is None or not math.isfinite(float(v)) else float(v)

        for n, op, bound in self.constraints:
            v = val(n)
            if v is None or not _OPS[op](v, bound):
                return None
        if self.weights:
            vals = {k: val(k) for k in self.weights}
            if any(v is None for v in vals.values()):
                return None
            return float(sum(w * vals[k] for k, w in self.weights.items()))
        v = val(self.maximize or self.minimize)
        return None if v is None else (v if self.maximize else -v)


class Selector:
    """The loop's ``eval_fn``: evaluates, keeps the best point, asks the loop to stop early.

    Args:
      criterion: a :class:`Criterion`.
      evaluate: ``evaluate(step, params) -> dict`` of metrics.
      out_dir: the run directory (``selection.json``, ``best_model``).
      export: ``export(params, directory)`` writes a model (None: no best-model export).
      patience: evaluations without a better point before ``should_stop`` (0: never).
      main: whether this process writes files.
    """

    def __init__(self, criterion: Criterion, evaluate: Callable[[int, Any], Mapping[str, Any]], out_dir, *,
                 export: Callable[[Any, Path], Any] | None = None, patience: int = 0, main: bool = True):  # fmt: skip
        self.criterion, self.evaluate, self.export = criterion, evaluate, export
        self.out = Path(out_dir)
        self.patience, self.main = int(patience), main
        self.state_path = self.out / "selection.json"
        self.best_dir = self.out / "best_model"
        self.state = {"criterion": criterion.describe(), "history": [], "best": None, "since_best": 0,
                      "stopped_at": None}  # fmt: skip
        if self.state_path.is_file():  # a resumed run: keep the best so far
            saved = json.loads(self.state_path.read_text())
            if saved.get("criterion") != self.state["criterion"]:
                raise ValueError(
                    f"{self.state_path} was written with the criterion {saved.get('criterion')!r}, not "
                    f"{self.state['criterion']!r}; use a new output directory or delete that file."
                )
            self.state = saved

    @property
    def should_stop(self) -> bool:
        return self.state["stopped_at"] is not None

    @property
    def best(self) -> dict | None:
        return self.state["best"]

    def __call__(self, step: int, params) -> dict:
        metrics = dict(self.evaluate(step, params))
        score = self.criterion.score(metrics)
        hist = [h for h in self.state["history"] if h["step"] != step]  # a resumed run re-evaluates
        hist.append({"step": int(step), "score": score, **{k: _num(v) for k, v in metrics.items()}})
        self.state["history"] = sorted(hist, key=lambda h: h["step"])
        best = self.state["best"]
        improved = score is not None and (best is None or score > best["score"] or
                                          (score == best["score"] and step < best["step"]))  # fmt: skip
        if improved:
            if self.export is not None:
                self._export(params)
            kept = {k: _num(v) for k, v in metrics.items()}
            self.state["best"] = {"step": int(step), "score": score, "metrics": kept}
        best = self.state["best"]
        self.state["since_best"] = sum(1 for h in self.state["history"] if best is None or h["step"] > best["step"])
        if self.patience and self.state["since_best"] >= self.patience and self.state["best"] is not None:
            self.state["stopped_at"] = int(step)
        self._save()
        out = dict(metrics)
        out["selection_score"] = score
        out["best_step"] = None if self.state["best"] is None else self.state["best"]["step"]
        return out

    def _export(self, params) -> None:
        tmp = self.out / "best_model.tmp"
        if self.main and tmp.exists():
            shutil.rmtree(tmp)
        self.export(params, tmp)
        if self.main:
            if self.best_dir.exists():
                old = self.out / "best_model.old"
                if old.exists():
                    shutil.rmtree(old)
                os.replace(self.best_dir, old)
                os.replace(tmp, self.best_dir)
                shutil.rmtree(old)
            else:
                os.replace(tmp, self.best_dir)

    def _save(self) -> None:
        if not self.main:
            return
        tmp = self.state_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, self.state_path)

    def summary(self) -> dict:
        best = self.state["best"]
        return {
            "criterion": self.state["criterion"],
            "best_step": None if best is None else best["step"],
            "best_score": None if best is None else best["score"],
            "best_metrics": None if best is None else best["metrics"],
            "best_model": str(self.best_dir) if best is not None and self.export is not None else None,
            "stopped_early_at": self.state["stopped_at"],
            "evaluations": len(self.state["history"]),
        }


def tofu_evaluate(model, tokenizer, *, data_dir, forget_split: str, retain_eval=None, limit=None, batch_size=16,
                  buckets=None, formatter=None, to_full=None, max_new_tokens=200) -> Callable[[int, Any], dict]:
    """``evaluate(step, params)``: the TOFU aggregates (``forget_quality``, ``model_utility``, ...)
    of ``model`` holding ``to_full(params)``; MIA attacks other than Min-K% are left out (cost)."""
    from ngdiff_jax import models
    from ngdiff_jax.evaluation.tofu import evaluate_tofu

    def evaluate(step, params):
        full = to_full(params) if to_full is not None else params
        r = evaluate_tofu(models.with_params(model, full), tokenizer, data_dir, forget_split=forget_split,
                          retain_reference=retain_eval, batch_size=batch_size, buckets=buckets, limit=limit,
                          formatter=formatter, name=f"step{step}", mia_attacks=("min_k",),
                          max_new_tokens=max_new_tokens)  # fmt: skip
        return {k: v for k, v in r.aggregates.items() if v is None or isinstance(v, (int, float))}

    return evaluate


def _num(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    try:
        return float(v)
    except (TypeError, ValueError):
        return None
