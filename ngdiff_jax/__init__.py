"""ngdiff-jax: machine unlearning for causal language models in JAX / Flax NNX.

The core is the NGDiff update rule (normalized gradient difference) with the GeN
adaptive learning rate, written as optax transformations; around it live Flax
NNX causal LMs that load Hugging Face checkpoints, TOFU and MUSE data and
metrics, and a jitted two-task unlearning step.

The optimizer core is imported with the package; the other subpackages are
attributes loaded on first use (``ngdiff_jax.models``, ``ngdiff_jax.training``,
``ngdiff_jax.parallel``, ...), so ``import ngdiff_jax`` stays cheap.

>>> import ngdiff_jax
>>> ngdiff_jax.models.CausalLM.__name__
'CausalLM'
"""

import importlib

from ngdiff_jax.optim import *  # noqa: F401,F403
from ngdiff_jax.optim import __all__ as _optim_all

__version__ = "0.1.0"
__all__ = list(_optim_all)

#: Subpackages and modules reachable as attributes, imported on first access.
_LAZY = ("models", "training", "parallel", "data", "evaluation", "losses", "optim", "paths")


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f"ngdiff_jax.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'ngdiff_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
