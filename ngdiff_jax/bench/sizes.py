"""Model and batch presets of the benchmark (all Llama architecture)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class BenchSize:
    """A Llama config (HF ``LlamaConfig`` keyword arguments) with the step's batch and length."""

    name: str
    hf: dict[str, Any] = field(hash=False)
    batch: int
    seq_len: int
    description: str = ""

    def hf_config(self):
        """The ``transformers.LlamaConfig`` (no EOS, so generation always runs its full length)."""
        import transformers

        return transformers.LlamaConfig(
            **self.hf, bos_token_id=None, eos_token_id=None, pad_token_id=0
        )

    def param_count(self) -> int:
        """Number of parameters (embeddings and untied head included)."""
        h = self.hf
        E, V, M, L = h["hidden_size"], h["vocab_size"], h["intermediate_size"], h["num_hidden_layers"]
        H, K = h["num_attention_heads"], h.get("num_key_value_heads", h["num_attention_heads"])
        D = E // H
        per_layer = E * H * D + 2 * E * K * D + H * D * E + 3 * E * M + 2 * E
        head = 0 if h.get("tie_word_embeddings", False) else E * V
        return V * E + L * per_layer + E + head

    def step_flops(self) -> float:
        """Matrix-multiply FLOPs of one two-task step: 2 tasks x (forward + backward = 3 forwards).

        Counts every projection, the LM head and the attention products (QK^T and PV over the
        full, unmasked T x T square, as both frameworks compute them); elementwise work is
        not counted.
        """
        h = self.hf
        E, V, M, L = h["hidden_size"], h["vocab_size"], h["intermediate_size"], h["num_hidden_layers"]
        H, K = h["num_attention_heads"], h.get("num_key_value_heads", h["num_attention_heads"])
        D = E // H
        per_token = 2 * L * (E * H * D + 2 * E * K * D + H * D * E + 3 * E * M) + 2 * E * V
        attention = L * 2 * 2 * self.seq_len * H * D
        forward = self.batch * self.seq_len * (per_token + attention)
        return float(2 * 3 * forward)


def _llama(vocab, hidden, inter, layers, heads, kv_heads, *, tie=False, theta=10000.0, max_pos=2048):
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_pos,
        rms_norm_eps=1e-6,
        rope_theta=theta,
        tie_word_embeddings=tie,
    )


SIZES: dict[str, BenchSize] = {
    s.name: s
    for s in (
        BenchSize("micro", _llama(128, 32, 64, 1, 4, 2), batch=2, seq_len=16,
                  description="smoke-test size"),
        BenchSize("6m", _llama(4096, 256, 1024, 4, 4, 4), batch=8, seq_len=128,
                  description="~6M params"),
        BenchSize("30m", _llama(8192, 512, 1536, 6, 8, 8), batch=8, seq_len=128,
                  description="~30M params"),
        # Llama-3.2-1B's shape (GQA 32/8, tied embeddings), for a GPU in bf16.
        BenchSize("1b", _llama(128256, 2048, 8192, 16, 32, 8, tie=True, theta=500000.0),
                  batch=8, seq_len=512, description="Llama-3.2-1B shape (GPU)"),
    )
}
