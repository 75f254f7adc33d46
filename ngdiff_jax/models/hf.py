"""Hugging Face checkpoint I/O: key maps as data, streaming (sharded) load, sharded save.

A key map entry says how one of our parameters is stored in the HF checkpoint:
``our_template -> (hf_template, merge, transpose, part)`` where

* ``merge`` groups our axes into the HF axes (our ``q: [E, H, D]`` is HF's ``[E, H*D]``
  before the transpose: ``((0,), (1, 2))``);
* ``transpose``: HF stores the 2-D block transposed (``torch.nn.Linear`` is ``[out, in]``);
* ``part``: ``(axis, index, count)`` when the tensor is one of ``count`` equal pieces of a
  fused HF tensor along ``axis`` (gpt2's ``c_attn`` holds q, k and v).

``{i}`` stands for the layer index. Every converted tensor is shape-checked.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ngdiff_jax.backends import Backend
from ngdiff_jax.backends import resolve as resolve_backend
from ngdiff_jax.models import sharding as shd
from ngdiff_jax.models import stacked
from ngdiff_jax.models.attention import resolve_attention
from ngdiff_jax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig, unsupported_type_error
from ngdiff_jax.models.modeling import CausalLM, abstract_like
from ngdiff_jax.models.safetensors_io import SafetensorsFile, aligned_empty, write_safetensors

A = ((0,),)  # 1-D, unchanged
M2 = ((0,), (1,))  # 2-D matrix
IN_HEADS = ((0,), (1, 2))  # [E, H, D] <-> [E, H*D]
HEADS_OUT = ((0, 1), (2,))  # [H, D, E] <-> [H*D, E]
HEADS = ((0, 1),)  # [H, D] <-> [H*D]


def _llama_like(prefix="model."):
    L = prefix + "layers.{i}."
    return {
        "embed": (prefix + "embed_tokens.weight", M2, False, None),
        "layers.{i}.attn_norm.scale": (L + "input_layernorm.weight", A, False, None),
        "layers.{i}.mlp_norm.scale": (L + "post_attention_layernorm.weight", A, False, None),
        **{f"layers.{{i}}.attn.{p}_proj.kernel": (L + f"self_attn.{p}_proj.weight", IN_HEADS, True, None)
           for p in "qkv"},
        **{f"layers.{{i}}.attn.{p}_proj.bias": (L + f"self_attn.{p}_proj.bias", HEADS, False, None)
           for p in "qkv"},
        "layers.{i}.attn.o_proj.kernel": (L + "self_attn.o_proj.weight", HEADS_OUT, True, None),
        "layers.{i}.attn.o_proj.bias": (L + "self_attn.o_proj.bias", A, False, None),
        **{f"layers.{{i}}.mlp.{p}.kernel": (L + f"mlp.{p}.weight", M2, True, None)
           for p in ("gate_proj", "up_proj", "down_proj")},
        **{f"layers.{{i}}.mlp.{p}.bias": (L + f"mlp.{p}.bias", A, False, None)
           for p in ("gate_proj", "up_proj", "down_proj")},
        "final_norm.scale": (prefix + "norm.weight", A, False, None),
        "lm_head.kernel": ("lm_head.weight", M2, True, None),
        "lm_head.bias": ("lm_head.bias", A, False, None),
    }


def _phi():
    L = "model.layers.{i}."
    return {
        "embed": ("model.embed_tokens.weight", M2, False, None),
        "layers.{i}.attn_norm.scale": (L + "input_layernorm.weight", A, False, None),
        "layers.{i}.attn_norm.bias": (L + "input_layernorm.bias", A, False, None),
        **{f"layers.{{i}}.attn.{p}_proj.kernel": (L + f"self_attn.{p}_proj.weight", IN_HEADS, True, None)
           for p in "qkv"},
        **{f"layers.{{i}}.attn.{p}_proj.bias": (L + f"self_attn.{p}_proj.bias", HEADS, False, None)
           for p in "qkv"},
        "layers.{i}.attn.o_proj.kernel": (L + "self_attn.dense.weight", HEADS_OUT, True, None),
        "layers.{i}.attn.o_proj.bias": (L + "self_attn.dense.bias", A, False, None),
        "layers.{i}.mlp.fc1.kernel": (L + "mlp.fc1.weight", M2, True, None),
        "layers.{i}.mlp.fc1.bias": (L + "mlp.fc1.bias", A, False, None),
        "layers.{i}.mlp.fc2.kernel": (L + "mlp.fc2.weight", M2, True, None),
        "layers.{i}.mlp.fc2.bias": (L + "mlp.fc2.bias", A, False, None),
        "final_norm.scale": ("model.final_layernorm.weight", A, False, None),
        "final_norm.bias": ("model.final_layernorm.bias", A, False, None),
        "lm_head.kernel": ("lm_head.weight", M2, True, None),
        "lm_head.bias": ("lm_head.bias", A, False, None),
    }


def _gpt2():
    L = "transformer.h.{i}."
    m = {
        "embed": ("transformer.wte.weight", M2, False, None),
        "pos_embed": ("transformer.wpe.weight", M2, False, None),
        "layers.{i}.attn_norm.scale": (L + "ln_1.weight", A, False, None),
        "layers.{i}.attn_norm.bias": (L + "ln_1.bias", A, False, None),
        "layers.{i}.mlp_norm.scale": (L + "ln_2.weight", A, False, None),
        "layers.{i}.mlp_norm.bias": (L + "ln_2.bias", A, False, None),
        "layers.{i}.attn.o_proj.kernel": (L + "attn.c_proj.weight", HEADS_OUT, False, None),
        "layers.{i}.attn.o_proj.bias": (L + "attn.c_proj.bias", A, False, None),
        "layers.{i}.mlp.fc1.kernel": (L + "mlp.c_fc.weight", M2, False, None),
        "layers.{i}.mlp.fc1.bias": (L + "mlp.c_fc.bias", A, False, None),
        "layers.{i}.mlp.fc2.kernel": (L + "mlp.c_proj.weight", M2, False, None),
        "layers.{i}.mlp.fc2.bias": (L + "mlp.c_proj.bias", A, False, None),
        "final_norm.scale": ("transformer.ln_f.weight", A, False, None),
        "final_norm.bias": ("transformer.ln_f.bias", A, False, None),
        "lm_head.kernel": ("lm_head.weight", M2, True, None),
    }
    for j, p in enumerate("qkv"):
        m[f"layers.{{i}}.attn.{p}_proj.kernel"] = (L + "attn.c_attn.weight", IN_HEADS, False, (1, j, 3))
        m[f"layers.{{i}}.attn.{p}_proj.bias"] = (L + "attn.c_attn.bias", HEADS, False, (0, j, 3))
    return m


KEY_MAPS: dict[str, dict[str, tuple]] = {
    "llama": _llama_like(),
    "mistral": _llama_like(),
    "qwen2": _llama_like(),
    "phi": _phi(),
    "gpt2": _gpt2(),
}
# Prefix that checkpoints of the bare base model omit (e.g. hub `gpt2` has `h.0...`, not `transformer.h.0...`).
BASE_PREFIX = {"llama": "model.", "mistral": "model.", "qwen2": "model.", "phi": "model.", "gpt2": "transformer."}
# HF tensors that are buffers, not parameters: present in some checkpoints, safe to skip.
IGNORED_HF_KEYS = (r"rotary_emb\.inv_freq$", r"\.attn\.bias$", r"\.attn\.masked_bias$")
ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "phi": "PhiForCausalLM", "gpt2": "GPT2LMHeadModel",
}


# ---------------------------------------------------------------------- per-tensor mapping
class _Spec:
    """How one of our parameters maps onto (a piece of) one HF tensor."""

    def __init__(self, path: str, our_shape, entry):
        hf_t, merge, transpose, part = entry
        m = re.match(r"^layers\.(\d+)\.", path)
        self.path = path
        self.hf_name = hf_t.format(i=m.group(1)) if m else hf_t
        self.merge, self.transpose, self.part = merge, transpose, part
        self.our_shape = tuple(our_shape)
        flat = [a for g in merge for a in g]
        if flat != list(range(len(self.our_shape))):
            raise ValueError(f"key map for {path}: merge {merge} does not cover shape {self.our_shape}")
        self.t_shape = tuple(int(np.prod([self.our_shape[a] for a in g])) for g in merge)
        hf = list(self.t_shape[::-1] if transpose else self.t_shape)
        if part is not None:
            hf[part[0]] *= part[2]
        self.hf_shape = tuple(hf)

    def read(self, f: SafetensorsFile, index: tuple[slice, ...] | None = None, dtype=None) -> np.ndarray:
        """Our tensor (or the block ``index`` of it) read from file ``f``, as ``dtype``, in a
        64-byte-aligned buffer (adopted without a copy by jax on CPU)."""
        if index is None:
            index = tuple(slice(None) for _ in self.our_shape)
        idx = [slice(*s.indices(n)[:2]) for s, n in zip(index, self.our_shape)]
        t_ranges, post_shape, post = [], [], []
        for g in self.merge:
            sizes = [self.our_shape[a] for a in g]
            sl = [idx[a] for a in g]
            rest = int(np.prod(sizes[1:])) if len(g) > 1 else 1
            if all(s.start == 0 and s.stop == n for s, n in zip(sl[1:], sizes[1:])):
                t_ranges.append((sl[0].start * rest, sl[0].stop * rest))
                post_shape += [sl[0].stop - sl[0].start] + sizes[1:]
                post += [slice(None)] * len(g)
            else:
                t_ranges.append((0, int(np.prod(sizes))))
                post_shape += sizes
                post += sl
        hf_ranges = list(t_ranges[::-1] if self.transpose else t_ranges)
        if self.part is not None:
            ax, j, n = self.part
            off = j * (self.hf_shape[ax] // n)
            lo, hi = hf_ranges[ax]
            hf_ranges[ax] = (lo + off, hi + off)
        name = self.hf_name
        dtype = np.dtype(dtype or f.dtype(name))
        hf_ranges = tuple(hf_ranges)
        if not self.transpose and dtype == f.dtype(name):
            block = f.read(name, hf_ranges)
        else:
            # Convert (transpose and/or cast) in row chunks of ~32 MB into the final buffer,
            # so the transient memory is one chunk, not a second copy of the tensor.
            (lo, hi), rest = hf_ranges[0], hf_ranges[1:]
            shape = tuple(b - a for a, b in hf_ranges)
            block = aligned_empty(shape[::-1] if self.transpose else shape, dtype)
            row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * f.dtype(name).itemsize
            step = max(1, (32 << 20) // max(row_bytes, 1))
            for r in range(lo, hi, step):
                chunk = f.read(name, ((r, min(r + step, hi)),) + rest)
                if self.transpose:
                    block[:, r - lo:r - lo + chunk.shape[0]] = chunk.T
                else:
                    block[r - lo:r - lo + chunk.shape[0]] = chunk
                del chunk
        view = block.reshape(post_shape)[tuple(post)]
        if view.flags.c_contiguous and view.ctypes.data % 64 == 0:
            return view
        out = aligned_empty(view.shape, dtype)
        out[...] = view
        return out

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        t = ours.reshape(self.t_shape)
        return t.T if self.transpose else t


def flat_params(state_or_tree) -> dict[str, Any]:
    tree = state_or_tree
    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        flat[shd.path_str(path)] = leaf
    return flat


def specs_for(cfg: ModelConfig, flat_shapes: dict[str, tuple[int, ...]]) -> dict[str, _Spec]:
    table = KEY_MAPS[cfg.model_type]
    out = {}
    for path, shape in flat_shapes.items():
        tmpl = re.sub(r"^layers\.\d+\.", "layers.{i}.", path)
        if tmpl not in table:
            raise KeyError(f"parameter {path} has no entry in the {cfg.model_type} key map (ngdiff_jax/models/hf.py)")
        out[path] = _Spec(path, shape, table[tmpl])
    return out


# ---------------------------------------------------------------------- files
def _resolve_dir(path_or_repo_id: str | os.PathLike) -> Path:
    p = Path(path_or_repo_id).expanduser()
    if p.is_dir():
        return p
    s = str(path_or_repo_id)
    if p.exists():
        raise FileNotFoundError(f"{p} is a file; from_pretrained expects a checkpoint directory or a hub id")
    if s.startswith((".", "/", "~")) or s.count("/") > 1:
        raise FileNotFoundError(f"checkpoint directory {p} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(s, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:  # network, auth, missing repo
        raise FileNotFoundError(
            f"{s!r} is not a local directory and could not be fetched from the Hugging Face hub: {e}"
        ) from e


def _read_config(d: Path) -> ModelConfig:
    f = d / "config.json"
    if not f.exists():
        raise FileNotFoundError(f"no config.json in {d}: a Hugging Face checkpoint directory needs one")
    try:
        raw = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {f}: {e}") from e
    if raw.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise unsupported_type_error(raw.get("model_type"))
    import transformers

    cfg = ModelConfig.from_hf(transformers.AutoConfig.from_pretrained(str(d)))
    g = d / "generation_config.json"
    if g.exists():
        try:
            gen = json.loads(g.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {g}: {e}; fix or delete the file") from e
        if not isinstance(gen, dict):
            raise ValueError(f"{g} must hold a JSON object, got {type(gen).__name__}; fix or delete the file")
        cfg = dataclasses.replace(cfg, generation_json=json.dumps(gen, sort_keys=True))
    return cfg


def generation_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """What `save_pretrained` writes as ``generation_config.json``: the loaded checkpoint's file
    when it had one, else the token ids of the model config (as transformers'
    ``GenerationConfig.from_model_config``); empty when there is nothing to say."""
    gen = cfg.generation_config
    if gen:
        return gen
    ids = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}
    ids = {k: (list(v) if isinstance(v, tuple) else v) for k, v in ids.items() if v is not None}
    return {"_from_model_config": True, **ids} if ids else {}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def model_card(cfg: ModelConfig, card: dict[str, Any] | None = None) -> str:
    """A short model card (``README.md``): YAML front matter for the hub, then base model,
    method, data and metrics where ``card`` gives them (keys ``base_model``, ``method``,
    ``data``, ``metrics``, ``notes``; data and metrics may be dicts).

    >>> from ngdiff_jax.models.config import ModelConfig
    >>> from ngdiff_jax.models.testing import tiny_hf_config
    >>> cfg = ModelConfig.from_hf(tiny_hf_config("llama"))
    >>> text = model_card(cfg, {"method": "ngdiff", "metrics": {"loss": 1.23456}})
    >>> "- **Method:** ngdiff" in text and "| loss | 1.235 |" in text
    True
    """
    card = dict(card or {})
    base = card.get("base_model")
    lines = ["---", "library_name: transformers", "tags:", "- ngdiff-jax", "- machine-unlearning"]
    if base and not str(base).startswith(("/", ".", "~")):
        lines.append(f"base_model: {base}")
    lines += ["---", "", f"# {card.get('title', 'Model exported by ngdiff-jax')}", ""]
    lines.append(f"A `{cfg.model_type}` causal LM ({cfg.num_layers} layers, hidden size {cfg.hidden_size}, "
                 f"vocabulary {cfg.vocab_size}) written by ngdiff-jax's `save_pretrained`; "
                 "`transformers.AutoModelForCausalLM.from_pretrained` loads it.")
    lines.append("")
    if base:
        lines.append(f"- **Base model:** {base}")
    if card.get("method"):
        lines.append(f"- **Method:** {card['method']}")
    data = card.get("data")
    if isinstance(data, dict):
        data = ", ".join(f"{k}={v}" for k, v in data.items() if v is not None)
    if data:
        lines.append(f"- **Data:** {data}")
    if cfg.eos_ids:
        lines.append(f"- **Stop tokens:** {list(cfg.eos_ids)}")
    metrics = card.get("metrics")
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items() if isinstance(v, (int, float, str))]
    if card.get("notes"):
        lines += ["", str(card["notes"])]
    return "\n".join(lines) + "\n"


def _open_files(d: Path) -> dict[str, SafetensorsFile]:
    """Tensor name -> open file holding it."""
    index = d / "model.safetensors.index.json"
    single = d / "model.safetensors"
    if index.exists():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"cannot read the shard index {index}: {e}") from e
        absent = sorted({fn for fn in wm.values() if not (d / fn).is_file()})
        if absent:
            from ngdiff_jax.errors import InputError

            raise InputError(f"{index} names shard(s) {', '.join(absent[:3])} that are not in {d}; copy the "
                             "missing shards or remove the stale index.")  # fmt: skip
        files = {fn: SafetensorsFile(d / fn) for fn in sorted(set(wm.values()))}
        out = {}
        for f in files.values():
            for k in f.keys():
                out[k] = f
        return out
    if single.exists():
        f = SafetensorsFile(single)
        return {k: f for k in f.keys()}
    others = sorted(p.name for p in d.glob("*"))
    raise FileNotFoundError(
        f"no model.safetensors or model.safetensors.index.json in {d} (found: {', '.join(others) or 'nothing'}); "
        "convert .bin checkpoints to safetensors first"
    )


def load_params(model_dir, cfg: ModelConfig, abstract_flat: dict[str, Any], *, mesh=None, rules=None,
                backend: Backend | None = None):
    """Flat dict path -> jax.Array for every parameter, streamed from the checkpoint (each in a
    buffer a training step can donate: ``backend.owned``, default the platform's backend)."""
    owned = resolve_backend(backend).owned
    d = Path(model_dir)
    files = _open_files(d)
    specs = specs_for(cfg, {k: tuple(v.shape) for k, v in abstract_flat.items()})
    prefix = BASE_PREFIX[cfg.model_type]
    # Accept bare base-model checkpoints (keys without the prefix).
    if not any(k.startswith(prefix) for k in files) and any(s.hf_name.startswith(prefix) for s in specs.values()):
        files = {prefix + k if not k.startswith("lm_head.") else k: f for k, f in files.items()}
        for f in set(files.values()):
            f.tensors = {(prefix + k if not k.startswith("lm_head.") else k): v for k, v in f.tensors.items()}
    needed = {s.hf_name for s in specs.values()}
    missing = sorted(needed - set(files))
    if missing:
        raise KeyError(f"checkpoint {d} lacks tensors {missing} needed by the {cfg.model_type} model; "
                       "is config.json from the same model?")
    unexpected = sorted(
        k for k in set(files) - needed
        if not any(re.search(p, k) for p in IGNORED_HF_KEYS) and not (cfg.tie_embeddings and k == "lm_head.weight")
    )
    if unexpected:
        raise KeyError(f"checkpoint {d} has tensors the {cfg.model_type} model does not use: {unexpected}; "
                       "check config.json (e.g. bias or tie_word_embeddings settings)")
    bad = [f"{s.hf_name}: expected {s.hf_shape}, found {files[s.hf_name].shape(s.hf_name)}"
           for s in specs.values() if files[s.hf_name].shape(s.hf_name) != s.hf_shape]
    if bad:
        raise ValueError(
            f"checkpoint {d} has tensors of the wrong shape for config.json: " + "; ".join(sorted(set(bad)))
        )
    not_float = sorted({f"{s.hf_name} ({files[s.hf_name].dtype(s.hf_name)})" for s in specs.values()
                        if not jnp.issubdtype(files[s.hf_name].dtype(s.hf_name), jnp.floating)})  # fmt: skip
    if not_float:
        from ngdiff_jax.errors import InputError

        raise InputError(f"checkpoint {d} stores weights as integers: {', '.join(not_float[:3])}; a float model is "
                         "needed (dequantize or re-export it in float32/bfloat16).")  # fmt: skip
    shardings = None
    if mesh is not None:
        shardings = flat_params(shd.param_shardings(_unflatten_abstract(abstract_flat), mesh, rules))
    out = {}
    for path, spec in specs.items():
        f = files[spec.hf_name]
        dt = np.dtype(abstract_flat[path].dtype)
        if shardings is None:
            a = spec.read(f, dtype=dt)
            if a.shape != spec.our_shape:
                raise ValueError(f"converted {spec.hf_name} to shape {a.shape}, expected {spec.our_shape}")
            out[path] = owned(jax.device_put(a))  # an XLA buffer: a training step can donate it
            del a
        else:
            def cb(index, spec=spec, f=f, dt=dt):
                return spec.read(f, index, dtype=dt)

            out[path] = owned(jax.make_array_from_callback(spec.our_shape, shardings[path], cb))
    return out


def _unflatten_abstract(flat: dict[str, Any]):
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        parts = path.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return tree


def _set_leaves(tree, flat: dict[str, Any]):
    return jax.tree_util.tree_map_with_path(lambda p, _: flat[shd.path_str(p)], tree)


def from_pretrained(path_or_repo_id, *, dtype=jnp.float32, param_dtype=jnp.float32, mesh=None,
                    rules=None, backend: Backend | str | None = None, attention: str | None = None,
                    scan_layers: bool | None = False) -> CausalLM:
    """Load a HF checkpoint directory (or hub id) into a `CausalLM` (``backend``: see
    `ngdiff_jax.backends`, ``attention``: `ngdiff_jax.models.attention`; defaults by platform).
    ``scan_layers``: the blocks stacked on a layer axis and run as one scan (`CausalLM`; each
    block's tensors are released as they are stacked); ``None``: so where the blocks are one block
    repeated (all but GPT-2's ``scale_attn_by_inverse_layer_idx``), else unrolled.

    With ``mesh``, every tensor is streamed into its `NamedSharding` (from ``rules``; default
    the FSDP preset), reading only each device's block.
    """
    d = _resolve_dir(path_or_repo_id)
    cfg = _read_config(d)
    backend = resolve_backend(backend)
    attention = resolve_attention(attention, dtype, backend)
    abstract = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                                               backend=backend, attention=attention))
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    flat_abs = flat_params(pure)
    flat = load_params(d, cfg, flat_abs, mesh=mesh, rules=rules, backend=backend)
    params = _set_leaves(pure, flat)
    del flat
    if scan_layers is None:
        scan_layers = not cfg.scale_attn_by_inverse_layer_idx
    if scan_layers:
        graphdef, state = nnx.split(abstract_like(abstract, scan_layers=True))
        params = stacked.stack(params, consume=True)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------- save
def _parse_size(s: int | str) -> int:
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", s.upper())
    if not m:
        raise ValueError(f"max_shard_size {s!r} is not like '5GB', '500MB' or an int of bytes")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)])


def save_pretrained(model: CausalLM, path, *, tokenizer=None, max_shard_size: int | str = "5GB",
                    card: dict[str, Any] | None = None) -> None:
    """Write ``config.json`` and safetensors (sharded above ``max_shard_size``) that
    ``transformers.AutoModelForCausalLM.from_pretrained(path)`` loads with the same logits,
    ``generation_config.json`` (the loaded one, so multi-EOS models keep their stop tokens, or
    one from the config's token ids) and a short model card ``README.md`` (`model_card`, with
    what ``card`` gives: base model, method, data, metrics)."""
    from ngdiff_jax.models.lora import LoraParam

    if jax.tree_util.tree_leaves(nnx.state(model, LoraParam)):
        raise ValueError("save_pretrained: the model has LoRA adapters attached, which a Hugging Face model "
                         "directory has no place for (only the base weights would be written); save "
                         "lora.merged_model(...) for a full model, or lora.save_peft_adapter(...) for the "
                         "adapter.")  # fmt: skip
    cfg: ModelConfig = model.config
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    hf_cfg = cfg.to_hf()
    hf_cfg.architectures = [ARCHITECTURES[cfg.model_type]]
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat = flat_params(stacked.unstack(params, host=True) if model.scan_layers else params)
    pdt = np.dtype(next(iter(flat.values())).dtype)
    hf_cfg.dtype = {np.dtype(np.float32): "float32", np.dtype(jnp.bfloat16): "bfloat16",
                    np.dtype(np.float16): "float16"}.get(pdt, "float32")
    hf_cfg.save_pretrained(str(out))
    gen = generation_config_dict(cfg)
    if gen:
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
    (out / "README.md").write_text(model_card(cfg, card))
    specs = specs_for(cfg, {k: tuple(v.shape) for k, v in flat.items()})
    # Group pieces of fused tensors (gpt2 c_attn) under their HF name, in file order.
    by_name: dict[str, list[_Spec]] = {}
    for s in specs.values():
        by_name.setdefault(s.hf_name, []).append(s)

    def produce(name):
        pieces = sorted(by_name[name], key=lambda s: s.part[1] if s.part else 0)
        arrs = [pieces_i.to_hf(np.asarray(jax.device_get(flat[pieces_i.path]))) for pieces_i in pieces]
        return arrs[0] if len(arrs) == 1 else np.concatenate(arrs, axis=pieces[0].part[0])

    entries = []
    for name, pieces in by_name.items():
        shape = pieces[0].hf_shape
        dt = np.dtype(flat[pieces[0].path].dtype)
        entries.append((name, shape, dt, lambda name=name: produce(name)))
    limit = _parse_size(max_shard_size)
    shards, cur, cur_size = [], [], 0
    for e in entries:
        n = int(np.prod(e[1])) * e[2].itemsize
        if cur and cur_size + n > limit:
            shards.append(cur)
            cur, cur_size = [], 0
        cur.append(e)
        cur_size += n
    shards.append(cur)
    for old in list(out.glob("model*.safetensors")) + [out / "model.safetensors.index.json"]:
        if old.exists():
            old.unlink()
    if len(shards) == 1:
        write_safetensors(out / "model.safetensors", shards[0], {"format": "pt"})
    else:
        weight_map, total = {}, 0
        for i, sh in enumerate(shards):
            fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(out / fn, sh, {"format": "pt"})
            for name, shape, dt, _ in sh:
                weight_map[name] = fn
                total += int(np.prod(shape)) * dt.itemsize
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
