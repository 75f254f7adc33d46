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

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ngdiff_jax.processes import pid_alive

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
    return str(_field(_reader(_check_path(path)), "general.architecture"))


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
    if p.stat().st_size < 24:  # magic, version, tensor count, metadata count
        raise ValueError(f"{p}: only {p.stat().st_size} bytes, less than a GGUF header; the file is truncated: "
                         "download or export it again.")  # fmt: skip
    return p


def convert_gguf(path: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Convert a GGUF file into a Hugging Face model directory (float32 safetensors); returns it.

    The directory is written aside (``.<name>.tmp-<pid>``) and renamed into place once complete, so a
    killed conversion leaves no half-written model and the same command runs again from scratch.
    ``overwrite`` replaces an existing model directory as a whole (no stale shard or index of an
    older conversion survives); a non-empty directory that holds no model is never replaced.
    """
    src = _check_path(path)
    out = Path(out_dir).expanduser()
    _check_out(out, overwrite)
    reader = _reader(src)
    arch = str(_field(reader, "general.architecture"))
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(
            f"{src.name}: GGUF architecture {arch!r} is not supported by ngdiff convert; supported: "
            f"{', '.join(sorted(SUPPORTED_GGUF_ARCHITECTURES))} (convert the original Hugging Face "
            "checkpoint instead)."
        )
    if _field(reader, "tokenizer.ggml.model") is None:
        raise ValueError(f"{src}: the GGUF metadata has no tokenizer (no tokenizer.ggml.model key); convert a GGUF "
                         "exported with its tokenizer, or the original Hugging Face checkpoint.")  # fmt: skip
    config, tokenizer = _config_and_tokenizer(src, arch)
    tensors = _tensors(reader, src, arch, config)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    _remove_stale(out)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        _write(tmp, config, tokenizer, tensors)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.rename(out, old)  # an empty directory, or a model that --overwrite replaces
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {out} is a file; pass a directory for the converted model.")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        raise FileExistsError(f"output directory {out} is not empty; pass a new directory (or --overwrite).")
    if held and not (out / "config.json").is_file():
        raise FileExistsError(f"output directory {out} holds {', '.join(held[:5])} but no model (config.json); "
                              "--overwrite only replaces a model directory: pass a new directory.")  # fmt: skip


def _remove_stale(out: Path) -> None:
    """Temporary directories of conversions into ``out`` that were killed (their process is gone)."""
    for p in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = p.name.rpartition("-")
        if kind in (f".{out.name}.tmp", f".{out.name}.old") and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _reader(src: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(str(src))
    except Exception as e:  # gguf raises IndexError/ValueError/numpy errors on a cut or damaged file
        raise ValueError(f"{src}: not a complete GGUF file ({type(e).__name__}: {' '.join(str(e).split())[:160]}); "
                         "it is truncated or damaged: download or export it again.") from None  # fmt: skip


def _config_and_tokenizer(src: Path, arch: str):
    from transformers import AutoConfig, AutoTokenizer

    try:
        # config and tokenizer (incl. chat template) from the GGUF metadata, by transformers
        config = AutoConfig.from_pretrained(str(src.parent), gguf_file=src.name)
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{src}: transformers cannot read its config or tokenizer from the GGUF metadata "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:200]}).") from None  # fmt: skip
    if config.model_type != SUPPORTED_GGUF_ARCHITECTURES[arch]:
        raise ValueError(
            f"{src.name}: transformers reads model_type {config.model_type!r} from GGUF architecture {arch!r}; "
            f"ngdiff convert handles {arch!r} as {SUPPORTED_GGUF_ARCHITECTURES[arch]!r} only."
        )
    return config, tokenizer


def _tensors(reader, src: Path, arch: str, config) -> dict[str, np.ndarray]:
    from gguf.quants import dequantize

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
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        except Exception as e:  # a tensor whose data the file does not hold in full
            why = " ".join(str(e).split())[:120]
            raise ValueError(f"{src}: tensor {t.name} cannot be read ({type(e).__name__}: {why}); the file is "
                             "truncated or damaged.") from None  # fmt: skip
        if arch == "llama" and (".attn_q." in t.name or ".attn_k." in t.name):
            w = _reverse_permute(w, n_heads if ".attn_q." in t.name else n_kv)
        tensors[name] = np.ascontiguousarray(w)
    if unknown:
        raise ValueError(
            f"{src.name}: tensors {unknown[:5]}{' ...' if len(unknown) > 5 else ''} have no Hugging Face "
            f"counterpart in ngdiff's {arch} converter; this GGUF is not a plain {arch} causal LM."
        )
    config.tie_word_embeddings = "lm_head.weight" not in tensors
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{p}.weight" for i in range(config.num_hidden_layers) for p in _LAYER_NAMES.values()
    }
    missing = sorted(expected - set(tensors))
    if missing:
        raise ValueError(f"{src.name}: missing tensors for {missing[:5]} (is the file truncated?).")
    return tensors


def _write(out: Path, config, tokenizer, tensors) -> None:
    from safetensors.numpy import save_file
    from transformers import GenerationConfig

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


def from_gguf(path: str | Path, **kwargs):
    """A ``CausalLM`` from a GGUF file (converted in a temporary directory; kwargs go to ``from_pretrained``)."""
    from ngdiff_jax.models import from_pretrained

    tmp = Path(tempfile.mkdtemp(prefix="ngdiff-gguf-"))
    try:
        convert_gguf(path, tmp / "model")
        return from_pretrained(str(tmp / "model"), **kwargs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
