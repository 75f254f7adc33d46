"""`ModelConfig`: a frozen, hashable description of a causal LM, built from a Hugging Face config.

Every family (llama, mistral, qwen2, phi, gpt2) is expressed with the same set of
switches (norm type, gated MLP, parallel block, biases, rotary or learned
positions, ...), so one NNX module implements them all. The original HF config is
kept as JSON so that `to_hf()` and `save_pretrained` give back exactly what was read.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "phi", "gpt2")
SUPPORTED_ACTIVATIONS = ("silu", "swish", "gelu_new", "gelu", "gelu_pytorch_tanh", "gelu_fast", "relu")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def unsupported_type_error(model_type: Any) -> ValueError:
    return ValueError(
        f"unsupported model_type {model_type!r}: ngdiff_jax.models supports "
        f"{', '.join(SUPPORTED_MODEL_TYPES)} (set `model_type` in config.json to one of these, "
        "or add the family to ngdiff_jax/models/hf.py)"
    )


def _as_hf_config(hf_config: Any):
    """A `transformers.PretrainedConfig` from a config object, a dict, or a path to config.json."""
    import transformers

    if isinstance(hf_config, transformers.PretrainedConfig):
        return hf_config
    if isinstance(hf_config, dict):
        d = dict(hf_config)
        model_type = d.pop("model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise unsupported_type_error(model_type)
        return transformers.AutoConfig.for_model(model_type, **d)
    raise TypeError(
        f"expected a transformers.PretrainedConfig, a dict or a ModelConfig, got {type(hf_config).__name__}"
    )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_type: str = "rms"  # "rms" | "layer"
    norm_eps: float = 1e-6
    activation: str = "silu"
    gated_mlp: bool = True  # llama-style gate/up/down, else fc1/fc2
    parallel_block: bool = False  # phi: attention and MLP read the same normed input
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    lm_head_bias: bool = False
    tie_embeddings: bool = False
    position_embedding: str = "rope"  # "rope" | "learned"
    rope_theta: float = 10000.0
    rotary_dim: int = 0  # number of rotated dims per head (== head_dim unless partial rotary)
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # sorted items of HF rope_parameters
    sliding_window: int | None = None
    attn_scale: float = 1.0
    scale_attn_by_inverse_layer_idx: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    hf_json: str = "{}"  # the HF config (to_dict) this was built from
    generation_json: str = "{}"  # the checkpoint's generation_config.json ("{}": none)

    # ------------------------------------------------------------------ HF
    @classmethod
    def from_hf(cls, hf_config: Any) -> ModelConfig:
        """Build from a `transformers.PretrainedConfig` (or its dict)."""
        if isinstance(hf_config, ModelConfig):
            return hf_config
        c = _as_hf_config(hf_config)
        mt = c.model_type
        if mt not in SUPPORTED_MODEL_TYPES:
            raise unsupported_type_error(mt)
        hf_dict = c.to_dict()
        eos = c.eos_token_id
        if isinstance(eos, list):
            eos = tuple(eos)
        common = dict(
            model_type=mt,
            vocab_size=int(c.vocab_size),
            initializer_range=float(getattr(c, "initializer_range", 0.02)),
            bos_token_id=getattr(c, "bos_token_id", None),
            eos_token_id=eos,
            pad_token_id=getattr(c, "pad_token_id", None),
            tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            hf_json=json.dumps(hf_dict, sort_keys=True, default=str),
        )
        if mt == "gpt2":
            h = int(c.n_embd)
            nh = int(c.n_head)
            act = c.activation_function
            _check_act(act)
            return cls(
                **common,
                hidden_size=h,
                intermediate_size=int(c.n_inner) if c.n_inner is not None else 4 * h,
                num_layers=int(c.n_layer),
                num_heads=nh,
                num_kv_heads=nh,
                head_dim=h // nh,
                max_position_embeddings=int(c.n_positions),
                norm_type="layer",
                norm_eps=float(c.layer_norm_epsilon),
                activation=act,
                gated_mlp=False,
                qkv_bias=True,
                o_bias=True,
                mlp_bias=True,
                position_embedding="learned",
                attn_scale=(h // nh) ** -0.5 if c.scale_attn_weights else 1.0,
                scale_attn_by_inverse_layer_idx=bool(c.scale_attn_by_inverse_layer_idx),
            )

        h = int(c.hidden_size)
        nh = int(c.num_attention_heads)
        nkv = int(getattr(c, "num_key_value_heads", None) or nh)
        hd = int(getattr(c, "head_dim", None) or h // nh)
        rope = dict(getattr(c, "rope_parameters", None) or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope type {rope_type!r} in the config's rope_parameters is not supported; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        theta = float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)))
        partial = float(rope.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", None) or 1.0))
        scaling = None
        if rope_type != "default":
            scaling = tuple(sorted((k, v) for k, v in rope.items() if k in (
                "rope_type", "factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings")))
        act = c.hidden_act
        _check_act(act)
        rope_kw = dict(
            hidden_size=h,
            intermediate_size=int(c.intermediate_size),
            num_layers=int(c.num_hidden_layers),
            num_heads=nh,
            num_kv_heads=nkv,
            head_dim=hd,
            max_position_embeddings=int(c.max_position_embeddings),
            activation=act,
            rope_theta=theta,
            rotary_dim=int(hd * partial),
            rope_scaling=scaling,
            attn_scale=hd**-0.5,
        )
        if mt == "phi":
            if getattr(c, "qk_layernorm", False):
                raise ValueError("phi with qk_layernorm=True is not supported (Phi-1.5/Phi-2 have it off)")
            return cls(
                **common, **rope_kw,
                norm_type="layer",
                norm_eps=float(c.layer_norm_eps),
                gated_mlp=False,
                parallel_block=True,
                qkv_bias=True,
                o_bias=True,
                mlp_bias=True,
                lm_head_bias=True,
            )
        if mt == "qwen2":
            if getattr(c, "use_sliding_window", False):
                raise ValueError("qwen2 with use_sliding_window=True is not supported; set it to false")
            return cls(**common, **rope_kw, norm_eps=float(c.rms_norm_eps), qkv_bias=True)
        if mt == "mistral":
            sw = getattr(c, "sliding_window", None)
            return cls(**common, **rope_kw, norm_eps=float(c.rms_norm_eps),
                       sliding_window=int(sw) if sw else None)
        # llama
        return cls(
            **common, **rope_kw,
            norm_eps=float(c.rms_norm_eps),
            qkv_bias=bool(getattr(c, "attention_bias", False)),
            o_bias=bool(getattr(c, "attention_bias", False)),
            mlp_bias=bool(getattr(c, "mlp_bias", False)),
        )

    def to_hf(self):
        """The `transformers.PretrainedConfig` this config was built from (or an equivalent one)."""
        import transformers

        d = json.loads(self.hf_json)
        if not d:
            raise ValueError("this ModelConfig was not built from a Hugging Face config; use ModelConfig.from_hf")
        d.pop("model_type", None)
        for k in ("transformers_version", "architectures"):
            d.pop(k, None)
        cfg = transformers.AutoConfig.for_model(self.model_type, **d)
        return cfg

    @property
    def generation_config(self) -> dict[str, Any]:
        """The checkpoint's ``generation_config.json`` as a dict (empty when it had none)."""
        return json.loads(self.generation_json)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Stop tokens: ``generation_config.json``'s ``eos_token_id`` (int or list) when set, as
        transformers' ``generate`` takes them, else the model config's."""
        eos = self.generation_config.get("eos_token_id", self.eos_token_id)
        if eos is None:
            return ()
        if isinstance(eos, int):
            return (eos,)
        return tuple(int(e) for e in eos)

    @property
    def pad_id(self) -> int | None:
        """``generation_config.json``'s ``pad_token_id`` when set, else the model config's."""
        pad = self.generation_config.get("pad_token_id", self.pad_token_id)
        return None if pad is None else int(pad)

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None


def _check_act(act: str) -> None:
    if act not in SUPPORTED_ACTIVATIONS:
        raise ValueError(f"activation {act!r} is not supported; supported: {', '.join(SUPPORTED_ACTIVATIONS)}")
