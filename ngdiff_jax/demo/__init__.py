"""The study runner behind ``ngdiff demo`` and ``ngdiff study``: data, target and retain models,
then a sweep of unlearning methods with statistics and verdicts.

Phases (each timed, with a progress display):

1. **data** — the synthetic TOFU-style benchmark (:func:`ngdiff_jax.data.synthetic.prepare`)
   and a BPE tokenizer trained on its text, or a subset of the real TOFU files. Two training
   splits: ``demo_target_train`` (``full`` + world facts + real authors) and
   ``demo_retain_train`` (``retainNN`` + world facts + real authors); the general-knowledge
   questions stand in for what a pretrained model brings to TOFU.
2. **target** / **retain** — a model trained on each split (from scratch, or fine-tuned from
   ``model_path``) (:func:`ngdiff_jax.training.run_finetune`).
3. **evaluation** of the retain model, then of the target against it (TOFU metrics with
   open-unlearning's names, :func:`ngdiff_jax.evaluation.evaluate_tofu`). The target must have
   memorized its forget authors (a hard requirement: the run fails otherwise).
4. **sweep** — every method of ``sweep.methods`` over initial learning rates x seeds, each as
   one compiled population (:mod:`ngdiff_jax.sweep`), its members evaluated together; each
   method's setting selected by the stated rule on the selection seeds and run again on fresh
   report seeds.
5. **robustness of forgetting** (with ``sweep.forgetting_checks``) — each listed method run once
   more at its selected setting, then relearned, quantized and asked rephrased questions
   (:mod:`ngdiff_jax.evaluation.robustness`), beside the target and retain models checked the
   same way.
6. **report** — ``report.json`` / ``report.md`` with intervals, paired comparisons and the
   verdicts of the paper's two claims, the robustness table, ``sensitivity.png``,
   ``tradeoff.png`` and ``demo_summary.json`` (settings, checks, verdicts, time per phase).

Settings come from ``configs/demo.yaml``; its ``quick:`` section is merged on top for
``--quick`` (a much smaller run for tests).
"""

from ngdiff_jax.demo.config import (
    DEFAULT_CONFIG,
    TRAIN_SPLITS,
    BenchmarkSpec,
    DemoConfig,
    EvalSpec,
    TrainSpec,
    UnlearnSpec,
    load_demo_config,
)
from ngdiff_jax.demo.runner import StudyCheckFailed, hard_checks, run_demo

__all__ = [
    "BenchmarkSpec",
    "DemoConfig",
    "EvalSpec",
    "TrainSpec",
    "UnlearnSpec",
    "StudyCheckFailed",
    "DEFAULT_CONFIG",
    "TRAIN_SPLITS",
    "hard_checks",
    "load_demo_config",
    "run_demo",
]
