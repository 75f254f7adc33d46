"""Tiny random Hugging Face models for tests (needs torch): one per supported family.

``tiny_hf_model(family, path)`` builds a transformers model with every parameter redrawn
from N(0, std) (visible scale, not the near-zero init), saves it with ``save_pretrained``
to ``path`` and returns the torch model in eval mode.
"""

from __future__ import annotations

from typing import Any

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 500000.0}

TINY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    # GQA, llama3 rope scaling, untied embeddings
    "llama": ("llama", dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                            rope_parameters=LLAMA3_ROPE)),
    # tied embeddings, attention and MLP biases, default rope
    "llama_tied": ("llama", dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                 tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
    # sliding window smaller than the test sequences
    "mistral": ("mistral", dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                sliding_window=6)),
    "qwen2": ("qwen2", dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                            tie_word_embeddings=False)),
    # partial rotary, parallel block, LayerNorm, gelu_new, lm_head bias
    "phi": ("phi", dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, partial_rotary_factor=0.5)),
    # learned positions, Conv1D, tied
    "gpt2": ("gpt2", dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
}


def tiny_hf_config(family: str, **overrides):
    import transformers

    model_type, kw = TINY_CONFIGS[family]
    kw = {**kw, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **overrides}
    return transformers.AutoConfig.for_model(model_type, **kw)


def tiny_hf_model(family: str, path=None, *, seed: int = 0, std: float = 0.2, **overrides):
    import torch
    import transformers

    cfg = tiny_hf_config(family, **overrides)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    if path is not None:
        model.save_pretrained(str(path))
    return model
