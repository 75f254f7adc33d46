"""LoRA adapters for every model family (llama, mistral, qwen2, phi, gpt2): attach, apply, merge, export.

A targeted projection ``y = x @ W (+ b)`` becomes ``y = x @ W (+ b) + scale * (x @ A) @ B`` with
``A [in, r]``, ``B [r, out]`` and ``scale = alpha / r`` (PEFT's definition). ``in``/``out`` are the
projection's flattened HF sizes (q: ``[E] -> [H*D]``, o: ``[H*D] -> [E]``), so ``A``/``B`` are
PEFT's ``lora_A.weight.T`` / ``lora_B.weight.T``. ``W + scale * A @ B`` is never formed in training.

* :func:`attach` gives each targeted `Dense` layer an adapter submodule, ``dense.lora`` (a
  :class:`LoRA`: flax's ``nnx.LoRA`` with PEFT's ``scale``), whose matrices are :class:`LoraParam`
  variables (not ``nnx.Param``): ``nnx.state(model, nnx.Param)`` stays the frozen base. The model
  never imports this module: `ngdiff_jax.models.modeling.add_adapters` adds any ``dense.lora``'s
  low-rank term in every path that uses the projection (including the fused SwiGLU
  down-projection).
* :func:`split` gives ``(view, base, adapters)``: ``view({"base": base, "lora": adapters},
  input_ids, attention_mask)`` is pure; differentiate in ``adapters`` only and the gradients,
  optimizer state and combiner norms cover just the adapters. A scanned model
  (``scan_layers=True``) carries one adapter per target stacked on the layer axis.
* :func:`merge_params` / :func:`merged_model` fold the adapters into the kernels (for
  ``save_pretrained``); :func:`save_peft_adapter` writes ``adapter_config.json`` +
  ``adapter_model.safetensors`` that ``peft.PeftModel.from_pretrained`` loads onto the HF base.

Targets are named per family (:data:`TARGETS`), with the HF module names accepted as aliases
(``q_proj``, ``dense``, ``c_attn`` ...) and ``all`` for every projection. An unknown name is an error.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from ngdiff_jax.models.modeling import CausalLM, is_stacked
from ngdiff_jax.models.pure import functional

Array = jax.Array

# family -> target -> module path inside ``layers.{i}`` (our names)
_LLAMA = {"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.o_proj",
          "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_PHI_GPT2 = {"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.o_proj",
             "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
TARGETS: dict[str, dict[str, str]] = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA,
                                      "phi": _PHI_GPT2, "gpt2": _PHI_GPT2}
_LLAMA_ALIASES = {"q_proj": ("q",), "k_proj": ("k",), "v_proj": ("v",), "o_proj": ("o",),
                  "gate_proj": ("gate",), "up_proj": ("up",), "down_proj": ("down",)}
# HF module names (PEFT's ``target_modules``) accepted as aliases.
ALIASES: dict[str, dict[str, tuple[str, ...]]] = {
    "llama": _LLAMA_ALIASES, "mistral": _LLAMA_ALIASES, "qwen2": _LLAMA_ALIASES,
    "phi": {"q_proj": ("q",), "k_proj": ("k",), "v_proj": ("v",), "dense": ("o",)},
    "gpt2": {"c_attn": ("q", "k", "v"), "c_proj": ("o", "fc2"), "attn.c_proj": ("o",),
             "mlp.c_proj": ("fc2",), "c_fc": ("fc1",)},
}
# target -> the HF module (relative to the layer) PEFT puts the adapter on; gpt2's q/k/v share c_attn.
_HF_MODULE = {
    "llama": {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
              "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"},
    "phi": {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
            "o": "self_attn.dense", "fc1": "mlp.fc1", "fc2": "mlp.fc2"},
    "gpt2": {"q": "attn.c_attn", "k": "attn.c_attn", "v": "attn.c_attn", "o": "attn.c_proj",
             "fc1": "mlp.c_fc", "fc2": "mlp.c_proj"},
}
_HF_MODULE["mistral"] = _HF_MODULE["qwen2"] = _HF_MODULE["llama"]
_LAYER_PREFIX = {"llama": "model.layers.{i}.", "mistral": "model.layers.{i}.", "qwen2": "model.layers.{i}.",
                 "phi": "model.layers.{i}.", "gpt2": "transformer.h.{i}."}


def valid_target_names(model_type: str) -> list[str]:
    """Every name ``lora.targets`` accepts for ``model_type``."""
    return ["all", *TARGETS[model_type], *ALIASES[model_type]]


def all_target_names() -> set[str]:
    """Names valid for at least one family (for checks before the model is known)."""
    return {n for mt in TARGETS for n in valid_target_names(mt)}


def resolve_targets(model_type: str, names) -> tuple[str, ...]:
    """Canonical targets (in the family's order) for ``names``; unknown names raise a ``ValueError``
    that names them and lists the valid ones."""
    if model_type not in TARGETS:
        raise ValueError(f"LoRA does not know model type {model_type!r}; supported: {', '.join(TARGETS)}.")
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError("lora.targets is empty; name the projections to adapt (e.g. [q, v]) or use [all].")
    table, aliases = TARGETS[model_type], ALIASES[model_type]
    chosen: set[str] = set()
    bad = []
    for n in names:
        if n == "all":
            chosen.update(table)
        elif n in table:
            chosen.add(n)
        elif n in aliases:
            chosen.update(aliases[n])
        else:
            bad.append(n)
    if bad:
        raise ValueError(
            f"lora.targets: {', '.join(map(repr, bad))} {'is' if len(bad) == 1 else 'are'} not a projection of "
            f"the {model_type} model; valid targets: {', '.join(valid_target_names(model_type))}."
        )
    return tuple(t for t in table if t in chosen)


@dataclass(frozen=True)
class LoraSpec:
    """Rank, alpha and the canonical targets (see :func:`resolve_targets`)."""

    rank: int
    alpha: float
    targets: tuple[str, ...]

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"lora.rank={self.rank!r}: the rank must be a positive integer (e.g. 8).")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"lora.alpha={self.alpha!r}: alpha must be a positive number (e.g. 16).")
        if not self.targets:
            raise ValueError("lora.targets is empty; name the projections to adapt (e.g. [q, v]) or use [all].")

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank


class LoraParam(nnx.Variable):
    """A LoRA adapter matrix. Not an ``nnx.Param``: filters keep it apart from the frozen base."""


class LoRA(nnx.LoRA):
    """One projection's adapter: flax's ``nnx.LoRA`` (``lora_a [in, r]``, ``lora_b [r, out]``, no
    base module) whose matrices are :class:`LoraParam`, plus PEFT's ``scale = alpha / r``.
    ``lora(x) = scale * x @ lora_a @ lora_b`` on ``x [..., in]``; inside the model,
    `ngdiff_jax.models.modeling.add_adapters` computes the same term on the projection's input."""

    def __init__(self, in_features: int, rank: int, out_features: int, *, scale: float, a, dtype=np.float32):
        super().__init__(in_features, rank, out_features, param_dtype=dtype, lora_param_type=LoraParam,
                         rngs=nnx.Rngs(0))  # fmt: skip
        a = jax.numpy.asarray(a, dtype)  # drawn by `attach` (PEFT's initialization); [layers, in, r] when stacked
        self.lora_a.set_value(a)
        self.lora_b.set_value(jax.numpy.zeros((*a.shape[:-2], rank, out_features), dtype))
        self.scale = float(scale)

    def __call__(self, x: Array) -> Array:
        return super().__call__(x) * self.scale


def _module(model, path: str):
    obj = model
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def _io_sizes(dense, *, stacked: bool = False) -> tuple[int, int]:
    """``(in, out)`` of a `Dense` flattened to 2-D (contracted axes lead the kernel for every target;
    ``stacked``: the kernel has a leading layer axis first, a scanned model's)."""
    xs = dense.eq.split("->")[0].split(",")[0]
    nc = len(xs) - 2
    shape = dense.kernel.shape[1:] if stacked else dense.kernel.shape
    return math.prod(shape[:nc]), math.prod(shape[nc:])


def target_paths(model, targets) -> list[tuple[int, str, str]]:
    """``(layer, target, module path)`` for every adapted projection, per block (as an unrolled
    model holds them, and as the merge and PEFT export read the adapters)."""
    table = TARGETS[model.config.model_type]
    return [(i, t, f"layers.{i}.{table[t]}") for i in range(model.config.num_layers) for t in targets]


def _sites(model, targets) -> list[tuple[str, object]]:
    """``(module path, Dense)`` of every adapted projection in ``model``'s own layout: one per block
    and target, or one per target for a scanned model (its kernel stacked on the layer axis)."""
    if not model.scan_layers:
        return [(path, _module(model, path)) for _, _, path in target_paths(model, targets)]
    table = TARGETS[model.config.model_type]
    return [(f"layers.{table[t]}", _module(model, f"layers.{table[t]}")) for t in targets]


def _initial_a(model, spec: LoraSpec, seed: int, dtype) -> list[np.ndarray]:
    """Every adapter's ``A``, in `_sites` order: PEFT's default (kaiming-uniform, ``U(-1/sqrt(in),
    1/sqrt(in))``), drawn block by block and target by target whatever the layout, so one seed
    gives the same adapters to an unrolled and a scanned model."""
    rng = np.random.default_rng(seed)
    sites = _sites(model, spec.targets)
    n = len(spec.targets)
    per_block = []
    for j in range(model.config.num_layers * n):  # block by block, target by target
        _, dense = sites[j % n] if model.scan_layers else sites[j]
        k = _io_sizes(dense, stacked=model.scan_layers)[0]
        per_block.append(rng.uniform(-1.0 / math.sqrt(k), 1.0 / math.sqrt(k), (k, spec.rank)).astype(dtype))
    return [np.stack(per_block[j::n]) for j in range(n)] if model.scan_layers else per_block


def attach(model, spec: LoraSpec, *, seed: int = 0, dtype=np.float32) -> None:
    """Add adapters to ``model`` in place: ``A`` drawn as PEFT's default (kaiming-uniform,
    ``U(-1/sqrt(in), 1/sqrt(in))``), ``B`` zeros, so the adapted model starts equal to the base.
    On a scanned model (``scan_layers=True``) each target gets one adapter stacked on the layer
    axis, equal block by block to the unrolled model's for the same seed."""
    for (path, dense), a in zip(_sites(model, spec.targets), _initial_a(model, spec, seed, dtype)):
        if dense.lora is not None:
            raise ValueError(f"{path} already has a LoRA adapter; attach once per model.")
        k, o = _io_sizes(dense, stacked=model.scan_layers)
        dense.lora = LoRA(k, spec.rank, o, scale=spec.scale, dtype=dtype, a=a)


def initial_adapters(model, spec: LoraSpec, *, seed: int, dtype=np.float32) -> dict:
    """The adapters :func:`attach` draws with ``seed``, as the pure dict :func:`split` returns for
    them (in ``model``'s layout), without touching ``model`` (which must have adapters attached): a
    population of runs starts each member from its own seed's adapters."""
    out = jax.tree.map(lambda x: x, nnx.to_pure_dict(nnx.state(model, LoraParam)))
    for (path, _), a in zip(_sites(model, spec.targets), _initial_a(model, spec, seed, dtype)):
        node = out
        for part in [*path.split("."), "lora"]:
            node = node[int(part) if part.isdigit() else part]
        node["lora_a"] = jax.numpy.asarray(a)
        node["lora_b"] = jax.numpy.zeros(node["lora_b"].shape, dtype)
    return out


# ---------------------------------------------------------------------- functional core
def split(model, *, release: bool = False):
    """``(view, base, adapters)`` for a model with adapters attached: a `ModelView` on
    ``{"base": base, "lora": adapters}``.

    ``view(params, input_ids, attention_mask=None, positions=None) -> logits`` with
    ``params = {"base": base, "lora": adapters}`` (pure dicts of arrays) is pure and jittable;
    differentiate it in ``params["lora"]`` only. Both trees are in the model's layout: stacked on
    the layer axis for a scanned model, whose base is then frozen (`ngdiff_jax.models.functional`:
    carried into the layer scan as the backend stores it; differentiating it raises).
    ``release``: the model gives its arrays to the trees (it keeps its structure; see there)."""
    if not jax.tree_util.tree_leaves(nnx.state(model, LoraParam)):
        raise ValueError("the model has no LoRA adapters; call models.lora.attach first.")
    frozen = (0,) if model.scan_layers else ()
    view, (base, adapters) = functional(model, nnx.Param, LoraParam, frozen=frozen, release=release)

    def on_pair(fn):
        return lambda params, *args, **kwargs: fn((params["base"], params["lora"]), *args, **kwargs)

    return view.map(on_pair), base, adapters


def _get(tree, path: str):
    for part in path.split("."):
        tree = tree[int(part)] if part.isdigit() and int(part) in tree else tree[part]
    return tree


def _per_block(**trees) -> None:
    """Refuse trees in the stacked layout (a scanned model's ``split``): these functions index blocks."""
    for name, tree in trees.items():
        if isinstance(tree, dict) and is_stacked(tree):
            raise ValueError(f"{name} are in the stacked layout (from lora.split of a scan_layers=True model); "
                             f"pass models.stacked.unstack({name}) (one tree per block).")  # fmt: skip


def _adapter_pairs(model, adapters, targets) -> list[tuple[int, str, str, np.ndarray, np.ndarray]]:
    _per_block(adapters=adapters)
    out = []
    for i, t, path in target_paths(model, targets):
        node = _get(adapters, path)["lora"]
        out.append((i, t, path, np.asarray(jax.device_get(node["lora_a"]), np.float32),
                    np.asarray(jax.device_get(node["lora_b"]), np.float32)))
    return out


class _Lazy:
    """A host tensor made when it is read (``np.asarray`` / ``jax.device_get``): ``fn()`` gives it."""

    def __init__(self, fn, shape, dtype):
        self._fn, self.shape, self.dtype = fn, tuple(shape), np.dtype(dtype)

    def __array__(self, dtype=None, copy=None):
        out = self._fn()
        return out if dtype is None else out.astype(dtype)


def merge_params(model, base, adapters, spec: LoraSpec, *, dtype=None, stats: dict | None = None,
                 lazy: bool = False):
    """``base`` with every targeted kernel replaced by ``W + scale * A @ B`` (computed in float32,
    stored in ``dtype`` -- default the kernel's own -- as a host numpy array, so exporting needs no
    second copy of the model on the device). Other leaves are shared, or cast on the host when
    ``dtype`` differs from theirs.

    ``stats`` (a dict, filled in) gets ``update_lost``: the part of the adapters' update that
    rounding the merged kernels to ``dtype`` loses, ``||round(W + d) - round(W) - d|| / ||d||``
    over all targets (0 in float32; large when a bfloat16 export swallows a small update).

    ``lazy=True`` (the export): every cast or merged leaf is a placeholder made when it is read
    (`save_pretrained` reads one tensor at a time), so merging holds no second model."""
    _per_block(base=base, adapters=adapters)
    dt = None if dtype is None else np.dtype(dtype)

    def cast(x):
        if dt is None or x.dtype == dt or not jax.numpy.issubdtype(x.dtype, jax.numpy.floating):
            return x
        if lazy:
            return _Lazy(lambda: np.asarray(jax.device_get(x)).astype(dt), x.shape, dt)
        return np.asarray(jax.device_get(x)).astype(dt)

    merged = jax.tree.map(cast, base)  # new containers; leaves shared unless cast
    lost2 = upd2 = 0.0
    for _, _, path, a, b in _adapter_pairs(model, adapters, spec.targets):
        parent = _get(merged, path)
        w = np.asarray(jax.device_get(_get(base, path)["kernel"]), np.float32)
        out_dt = dt if dt is not None else np.dtype(_get(base, path)["kernel"].dtype)
        delta = (a @ b).reshape(w.shape) * np.float32(spec.scale)
        new = (w + delta).astype(out_dt)
        if out_dt.itemsize < 4 and stats is not None:
            got = new.astype(np.float32) - w.astype(out_dt).astype(np.float32)
            lost2 += float(np.sum((got - delta) ** 2))
        upd2 += float(np.sum(delta.astype(np.float64) ** 2))
        if lazy:  # made again when written (the kernel and a rank-r product: cheap)
            del new, w, delta
            parent["kernel"] = _Lazy(
                lambda path=path, a=a, b=b, out_dt=out_dt: (
                    np.asarray(jax.device_get(_get(base, path)["kernel"]), np.float32)
                    + (a @ b).reshape(_get(base, path)["kernel"].shape) * np.float32(spec.scale)
                ).astype(out_dt),
                _get(base, path)["kernel"].shape, out_dt)  # fmt: skip
        else:
            parent["kernel"] = new
    if stats is not None:
        stats["update_lost"] = (lost2 / upd2) ** 0.5 if upd2 > 0 else 0.0
    return merged


def merged_model(model, base, adapters, spec: LoraSpec, *, dtype=None, stats: dict | None = None,
                 lazy: bool = False):
    """A plain `CausalLM` (no adapters) holding the merged weights (in ``dtype``, default the
    base's), for ``save_pretrained``; ``stats`` as in `merge_params`."""
    cfg = model.config
    abstract = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0), dtype=model.dtype,
                                               param_dtype=dtype if dtype is not None else model.param_dtype))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, merge_params(model, base, adapters, spec, dtype=dtype, stats=stats, lazy=lazy))
    return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------- PEFT export
def peft_tensors(model, adapters, spec: LoraSpec) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(tensors, adapter_config)`` in PEFT's format (keys like
    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` ``[r, in]``).

    gpt2's q/k/v live in one fused ``c_attn``: their adapters become one adapter of rank
    ``n*r`` on it (``A`` side by side, ``B`` block-diagonal over the q/k/v output columns, alpha
    ``n*alpha`` so the scale stays ``alpha/r``), exact for any subset of q, k, v."""
    mt = model.config.model_type
    hf_mod, prefix = _HF_MODULE[mt], _LAYER_PREFIX[mt]
    tensors: dict[str, np.ndarray] = {}
    fused: dict[int, list[tuple[str, np.ndarray, np.ndarray]]] = {}
    for i, t, _, a, b in _adapter_pairs(model, adapters, spec.targets):
        if mt == "gpt2" and t in ("q", "k", "v"):
            fused.setdefault(i, []).append((t, a, b))
            continue
        key = "base_model.model." + prefix.format(i=i) + hf_mod[t]
        tensors[key + ".lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[key + ".lora_B.weight"] = np.ascontiguousarray(b.T)
    rank_pattern, alpha_pattern = {}, {}
    for i, parts in fused.items():
        r, o = spec.rank, parts[0][2].shape[1]
        a = np.concatenate([p[1] for p in parts], axis=1)
        b = np.zeros((r * len(parts), 3 * o), np.float32)
        for s, (t, _, bt) in enumerate(parts):
            j = "qkv".index(t)
            b[s * r:(s + 1) * r, j * o:(j + 1) * o] = bt
        key = "base_model.model." + prefix.format(i=i) + hf_mod["q"]
        tensors[key + ".lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[key + ".lora_B.weight"] = np.ascontiguousarray(b.T)
        if len(parts) > 1:
            rank_pattern["c_attn"] = r * len(parts)
            alpha_pattern["c_attn"] = _num(spec.alpha * len(parts))
    modules = sorted({hf_mod[t] for t in spec.targets})
    if mt != "gpt2":  # leaf names are unique within a llama/phi layer (PEFT matches by suffix)
        modules = sorted({m.split(".")[-1] for m in modules})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": spec.rank,
        "lora_alpha": _num(spec.alpha),
        "lora_dropout": 0.0,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": mt == "gpt2",  # gpt2's Conv1D stores weights [in, out]
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }
    return tensors, config


def _num(x: float):
    return int(x) if float(x).is_integer() else float(x)


def save_peft_adapter(model, adapters, spec: LoraSpec, path, *, base_model_name_or_path: str | None = None) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (float32) to ``path``;
    ``peft.PeftModel.from_pretrained(hf_base, path)`` reproduces our adapted logits."""
    from safetensors.numpy import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors, config = peft_tensors(model, adapters, spec)
    config["base_model_name_or_path"] = base_model_name_or_path
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
