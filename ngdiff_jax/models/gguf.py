"""GGUF import: a llama.cpp ``.gguf`` file -> a normal Hugging Face model directory -> ``CausalLM``.

``convert_gguf(path, out_dir)`` writes ``config.json``, ``model.safetensors`` (float32,
dequantized with ``gguf.quants.dequantize``), the tokenizer and its chat template (read from
the GGUF metadata by transformers' GGUF support) and ``generation_config.json``.
``from_gguf(path)`` converts into a temporary directory and loads it with
:func:`ngdiff_jax.models.from_pretrained`.

Supported GGUF architectures: ``llama`` (Llama, SmolLM, Mistral: llama.cpp stores them all
as ``llama``) and ``qwen2``. For ``llama`` llama.cpp permutes the rows of the q and k
projections (``convert_hf_to_gguf.py`` ``LlamaModel.permute``, for its rotary layout); they
are permuted back exactly as transformers' ``LlamaTensorProcessor._reverse_permute_weights``
does. Other architectures are refused with a message naming them.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["SUPPORTED_GGUF_ARCHITECTURES", "convert_gguf", "from_gguf", "gguf_architecture"]

#: GGUF ``general.architecture`` values we convert, and the HF ``model_type`` they become.
SUPPORTED_GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}

# GGUF tensor name (after ``blk.N.``) -> HF parameter name (after ``model.layers.N.``)
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# rotary-embedding caches some converters store; they carry no parameters
_SKIP = ("rope_freqs", "rope_factors_long", "rope_factors_short")


def _field(reader, key: str):
    f = reader.fields.get(key)
    if f is None:
        return None
    v = f.contents() if hasattr(f, "contents") else f.parts[f.data[0]]
    if isinstance(v, (bytes, bytearray)):
        v = bytes(v).decode("utf-8")
    return v


def gguf_architecture(path: str | Path) -> str:
    """The ``general.architecture`` of a GGUF file."""
    from gguf import GGUFReader

    return str(_field(GGUFReader(str(path)), "general.architecture"))


def _reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (transformers ``_reverse_permute_weights``)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _hf_name(gguf_name: str) -> str | None:
    base, _, suffix = gguf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        return None
    if base.startswith("blk."):
        _, layer, part = base.split(".", 2)
        if part not in _LAYER_NAMES:
            return None
        return f"model.layers.{int(layer)}.{_LAYER_NAMES[part]}.{suffix}"
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{suffix}"
    return None


def _check_path(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"GGUF file {p} does not exist; pass the path of a .gguf file.")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{p} is not a GGUF file (it starts with {magic!r}, not b'GGUF').")
    return p


def convert_gguf(path: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Convert a GGUF file into a Hugging Face model directory (float32 safetensors); returns it."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.numpy import save_file
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    src = _check_path(path)
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory {out} is not empty; pass a new directory (or --overwrite).")
    reader = GGUFReader(str(src))
    arch = str(_field(reader, "general.architecture"))
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(
            f"{src.name}: GGUF architecture {arch!r} is not supported by ngdiff convert; supported: "
            f"{', '.join(sorted(SUPPORTED_GGUF_ARCHITECTURES))} (convert the original Hugging Face "
            "checkpoint instead)."
        )
    # config and tokenizer (incl. chat template) from the GGUF metadata, by transformers
    config = AutoConfig.from_pretrained(str(src.parent), gguf_file=src.name)
    if config.model_type != SUPPORTED_GGUF_ARCHITECTURES[arch]:
        raise ValueError(
            f"{src.name}: transformers reads model_type {config.model_type!r} from GGUF architecture {arch!r}; "
            f"ngdiff convert handles {arch!r} as {SUPPORTED_GGUF_ARCHITECTURES[arch]!r} only."
        )
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads

    tensors: dict[str, np.ndarray] = {}
    unknown = []
    for t in reader.tensors:
        if t.name.split(".")[0] in _SKIP:
            continue
        name = _hf_name(t.name)
        if name is None:
            unknown.append(t.name)
            continue
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if arch == "llama" and (".attn_q." in t.name or ".attn_k." in t.name):
            w = _reverse_permute(w, n_heads if ".attn_q." in t.name else n_kv)
        tensors[name] = np.ascontiguousarray(w)
    if unknown:
        raise ValueError(
            f"{src.name}: tensors {unknown[:5]}{' ...' if len(unknown) > 5 else ''} have no Hugging Face "
            f"counterpart in ngdiff's {arch} converter; this GGUF is not a plain {arch} causal LM."
        )
    tied = "lm_head.weight" not in tensors
    config.tie_word_embeddings = tied
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{p}.weight" for i in range(config.num_hidden_layers) for p in _LAYER_NAMES.values()
    }
    missing = sorted(expected - set(tensors))
    if missing:
        raise ValueError(f"{src.name}: missing tensors for {missing[:5]} (is the file truncated?).")

    out.mkdir(parents=True, exist_ok=True)
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    config.dtype = "float32"
    if tokenizer.bos_token_id is not None:
        config.bos_token_id = tokenizer.bos_token_id
    if tokenizer.eos_token_id is not None:
        config.eos_token_id = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id
    config.save_pretrained(out)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    ).save_pretrained(out)
    return out


def from_gguf(path: str | Path, **kwargs):
    """A ``CausalLM`` from a GGUF file (converted in a temporary directory; kwargs go to ``from_pretrained``)."""
    from ngdiff_jax.models import from_pretrained

    tmp = Path(tempfile.mkdtemp(prefix="ngdiff-gguf-"))
    try:
        convert_gguf(path, tmp / "model")
        return from_pretrained(str(tmp / "model"), **kwargs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
