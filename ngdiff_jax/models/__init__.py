"""Flax NNX causal LMs (llama, mistral, qwen2, phi, gpt2) with Hugging Face safetensors I/O,
KV-cache greedy generation, a functional (params-pytree) core, and per-token log-probs."""

from ngdiff_jax.models import stacked  # the stacked-blocks layout of run.scan_layers
from ngdiff_jax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig
from ngdiff_jax.models.generation import generate
from ngdiff_jax.models.hf import from_pretrained, save_pretrained
from ngdiff_jax.models.logprobs import IGNORE_INDEX, TokenLogprobs, sequence_nll, token_logprobs
from ngdiff_jax.models.modeling import (
    REMAT_POLICIES,
    CausalLM,
    abstract_like,
    abstract_model,
    from_config,
    set_remat,
    with_params,
)
from ngdiff_jax.models.pure import functional
from ngdiff_jax.models.sharding import (
    DATA_PARALLEL,
    FSDP,
    FSDP_TENSOR,
    PARAM_LOGICAL_AXES,
    logical_axes,
    param_shardings,
)
from ngdiff_jax.models.view import ModelView

__all__ = [
    "SUPPORTED_MODEL_TYPES", "ModelConfig", "CausalLM", "from_config", "from_pretrained", "save_pretrained",
    "functional", "with_params", "abstract_like", "abstract_model", "set_remat", "REMAT_POLICIES",
    "generate", "logical_axes", "param_shardings", "PARAM_LOGICAL_AXES",
    "DATA_PARALLEL", "FSDP", "FSDP_TENSOR", "token_logprobs", "TokenLogprobs", "sequence_nll",
    "IGNORE_INDEX", "stacked", "ModelView",
]
