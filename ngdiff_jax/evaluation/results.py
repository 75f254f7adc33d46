"""The result of one evaluation: aggregates, every per-sample value, generations, timings.

Saved as one JSON file::

    {"name": ..., "benchmark": "tofu" | "muse", "meta": {...},
     "aggregates": {"forget_Q_A_Prob": 0.71, ..., "forget_quality": 0.02},
     "per_sample": {"forget_truth_ratio": [...], "forget_Q_A_Prob": [...], ...},
     "generations": {"forget_Q_A_ROUGE": [...], ...},
     "timings": {...}}

``per_sample`` lists are in the dataset's row order, so forget quality and privleak
can be computed later against any saved retain-model result (:func:`reference_stats`
also reads open-unlearning's ``TOFU_EVAL.json`` / ``MUSE_EVAL.json``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ngdiff_jax.data.jsonio import read_json


def json_safe(x):
    """JSON-safe copy: numpy -> python, NaN/inf -> None."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return json_safe(x.tolist())
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


@dataclass
class EvalResult:
    """Aggregates (open-unlearning metric names) plus per-sample values of one model."""

    name: str
    benchmark: str
    aggregates: dict = field(default_factory=dict)
    per_sample: dict = field(default_factory=dict)
    generations: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    path: str | None = None  # where it was saved / loaded from

    def to_dict(self) -> dict:
        return json_safe(
            {
                "name": self.name,
                "benchmark": self.benchmark,
                "meta": self.meta,
                "aggregates": self.aggregates,
                "per_sample": self.per_sample,
                "generations": self.generations,
                "timings": self.timings,
            }
        )

    def save(self, path: str | Path) -> Path:
        """Write the JSON file (parents created) and remember its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)
        self.path = str(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> EvalResult:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No evaluation result at {path}; run `ngdiff eval` to write one.")
        d = read_json(path)
        if not isinstance(d, dict) or "aggregates" not in d or "benchmark" not in d:
            raise ValueError(
                f"{path} is not an ngdiff evaluation result (no 'aggregates'/'benchmark'); "
                "for open-unlearning logs use reference_stats()."
            )
        return cls(
            name=d.get("name", path.stem),
            benchmark=d["benchmark"],
            aggregates=d.get("aggregates", {}),
            per_sample=d.get("per_sample", {}),
            generations=d.get("generations", {}),
            timings=d.get("timings", {}),
            meta=d.get("meta", {}),
            path=str(path),
        )


def reference_stats(ref) -> dict:
    """The retain model's statistics needed by forget_quality and privleak.

    ``ref`` is an :class:`EvalResult`, the path of a saved one, or the path of an
    open-unlearning ``*_EVAL.json`` (``{"forget_truth_ratio": {"value_by_index":
    {i: {"score": tr}}}, "mia_min_k": {"agg_value": auc}}``). Returns
    ``{"forget_truth_ratio": np.ndarray | None, "mia_min_k": float | None, "mia": {name: auc},
    "source": str}`` (``mia``: every ``mia_<attack>`` AUC, for ``privleak_<attack>``).
    """
    if isinstance(ref, EvalResult):
        tr = ref.per_sample.get("forget_truth_ratio")
        return {
            "forget_truth_ratio": None if tr is None else np.asarray(tr, dtype=np.float64),
            "mia_min_k": ref.aggregates.get("mia_min_k"),
            "mia": {k: v for k, v in ref.aggregates.items() if k.startswith("mia_") and v is not None},
            "source": ref.path or ref.name,
        }
    path = Path(ref)
    if not path.is_file():
        raise FileNotFoundError(
            f"Retain-model evaluation {path} does not exist; evaluate the retain model first "
            "(`ngdiff eval --model <retain> --out <file>`) and pass that file."
        )
    d = read_json(path)
    if not isinstance(d, dict):
        raise ValueError(f"{path} holds a {type(d).__name__}, not an evaluation result; pass the JSON that "
                         "ngdiff eval wrote for the retain model (or an open-unlearning *_EVAL.json).")  # fmt: skip
    if "aggregates" in d and "benchmark" in d:
        return reference_stats(EvalResult.load(path))
    out = {"forget_truth_ratio": None, "mia_min_k": None, "source": str(path)}
    ftr = d.get("forget_truth_ratio") or d.get("forget_Truth_Ratio")
    if isinstance(ftr, dict) and "value_by_index" in ftr:
        vals = [v.get("score") for v in ftr["value_by_index"].values() if isinstance(v, dict)]
        out["forget_truth_ratio"] = np.asarray([v for v in vals if v is not None], dtype=np.float64)
    mia = d.get("mia_min_k")
    if isinstance(mia, dict) and mia.get("agg_value") is not None:
        out["mia_min_k"] = float(mia["agg_value"])
    out["mia"] = {k: float(v["agg_value"]) for k, v in d.items()
                  if k.startswith("mia_") and isinstance(v, dict) and v.get("agg_value") is not None}  # fmt: skip
    if out["forget_truth_ratio"] is None and out["mia_min_k"] is None:
        raise ValueError(
            f"{path} has neither forget_truth_ratio per-sample scores nor a mia_min_k AUC; "
            "it is not a usable retain-model evaluation."
        )
    return out
