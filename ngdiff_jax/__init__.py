"""ngdiff-jax: machine unlearning for causal language models in JAX / Flax NNX.

The core is the NGDiff update rule (normalized gradient difference) with the GeN
adaptive learning rate, written as optax transformations; around it live Flax
NNX causal LMs that load Hugging Face checkpoints, TOFU and MUSE data and
metrics, and a jitted two-task unlearning step.
"""

from ngdiff_jax.optim import *  # noqa: F401,F403
from ngdiff_jax.optim import __all__ as _optim_all

__version__ = "0.1.0"
__all__ = list(_optim_all)
