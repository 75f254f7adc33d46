"""Benchmarks behind ``ngdiff bench``: the unlearning step against PyTorch, the cost of
NGDiff and GeN, greedy generation against transformers, and memory.

* :mod:`~ngdiff_jax.bench.sizes`: the model/batch presets (``micro``, ``6m``, ``30m``, ``1b``);
* :mod:`~ngdiff_jax.bench.jax_side` / :mod:`~ngdiff_jax.bench.torch_side`: the same step and
  generation in ngdiff-jax and in PyTorch (a transformers ``LlamaForCausalLM``, torch autograd);
* :mod:`~ngdiff_jax.bench.runner`: runs the sections side by side and returns one dict
  (:func:`run_benchmark`), printed by :func:`format_report`;
* :mod:`~ngdiff_jax.bench.memory_child`: one training process per method, for peak host memory.
"""

from ngdiff_jax.bench.runner import BenchOptions, format_report, run_benchmark
from ngdiff_jax.bench.sizes import SIZES, BenchSize

__all__ = ["SIZES", "BenchOptions", "BenchSize", "format_report", "run_benchmark"]
