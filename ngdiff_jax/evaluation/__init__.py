"""TOFU and MUSE evaluation with open-unlearning's metric names and definitions.

* :mod:`~ngdiff_jax.evaluation.metrics`: pure numpy/scipy metric functions;
* :class:`Scorer` (batched teacher-forced NLL / token log-probs) and
  :func:`generate_texts` (batched greedy generation) run models;
* :func:`evaluate_tofu` / :func:`evaluate_muse` return an :class:`EvalResult`
  (aggregates + every per-sample value, saved as JSON); :func:`evaluate_tofu_members`
  evaluates a population's members (:class:`Members`) as one batched evaluation;
* :func:`write_report` writes ``report.json``, ``report.md`` and ``tradeoff.png``.
"""

from ngdiff_jax.evaluation import metrics
from ngdiff_jax.evaluation.metrics import MODEL_UTILITY_KEYS
from ngdiff_jax.evaluation.report import write_report
from ngdiff_jax.evaluation.results import EvalResult, reference_stats


def __getattr__(name):  # model-running parts import jax/flax lazily
    if name == "evaluate_tofu":
        from ngdiff_jax.evaluation.tofu import evaluate_tofu

        return evaluate_tofu
    if name == "evaluate_tofu_members":
        from ngdiff_jax.evaluation.tofu import evaluate_tofu_members

        return evaluate_tofu_members
    if name == "Members":
        from ngdiff_jax.evaluation.members import Members

        return Members
    if name == "evaluate_muse":
        from ngdiff_jax.evaluation.muse import evaluate_muse

        return evaluate_muse
    if name == "Scorer":
        from ngdiff_jax.evaluation.scoring import Scorer

        return Scorer
    if name == "generate_texts":
        from ngdiff_jax.evaluation.generation import generate_texts

        return generate_texts
    raise AttributeError(f"module 'ngdiff_jax.evaluation' has no attribute {name!r}")


__all__ = [
    "EvalResult",
    "MODEL_UTILITY_KEYS",
    "Members",
    "Scorer",
    "evaluate_muse",
    "evaluate_tofu",
    "evaluate_tofu_members",
    "generate_texts",
    "metrics",
    "reference_stats",
    "write_report",
]
