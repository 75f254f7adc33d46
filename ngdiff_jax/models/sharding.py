"""Logical axis names of every parameter and the logical -> mesh axis rules.

Both are data: ``PARAM_LOGICAL_AXES`` maps parameter paths (regex on the dotted path of
the pure params dict) to logical axes; a *rules* tuple maps each logical name to a mesh
axis (or a tuple of mesh axes, or None). Mesh axes are ``data``, ``fsdp``, ``tensor``.
A dimension whose size is not divisible by its mesh axes' size is replicated instead.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = tuple[tuple[str, Any], ...]

# (regex on the dotted param path, logical axes). First match wins.
PARAM_LOGICAL_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"^embed$", ("vocab", "embed")),
    (r"^pos_embed$", (None, "embed")),
    (r"\.attn\.q_proj\.kernel$", ("embed", "heads", "head_dim")),
    (r"\.attn\.[kv]_proj\.kernel$", ("embed", "kv", "head_dim")),
    (r"\.attn\.q_proj\.bias$", ("heads", "head_dim")),
    (r"\.attn\.[kv]_proj\.bias$", ("kv", "head_dim")),
    (r"\.attn\.o_proj\.kernel$", ("heads", "head_dim", "embed")),
    (r"\.attn\.o_proj\.bias$", (None,)),
    (r"\.mlp\.(gate_proj|up_proj|fc1)\.kernel$", ("embed", "mlp")),
    (r"\.mlp\.(gate_proj|up_proj|fc1)\.bias$", ("mlp",)),
    (r"\.mlp\.(down_proj|fc2)\.kernel$", ("mlp", "embed")),
    (r"\.mlp\.(down_proj|fc2)\.bias$", (None,)),
    (r"norm\.(scale|bias)$", (None,)),
    (r"^lm_head\.kernel$", ("embed", "vocab")),
    (r"^lm_head\.bias$", ("vocab",)),
)

# Presets: logical name -> mesh axes.
DATA_PARALLEL: Rules = (
    ("batch", "data"),
    ("vocab", None), ("embed", None), ("heads", None), ("kv", None), ("head_dim", None), ("mlp", None),
)
FSDP: Rules = (
    ("batch", ("data", "fsdp")),
    ("vocab", None), ("embed", "fsdp"), ("heads", None), ("kv", None), ("head_dim", None), ("mlp", None),
)
FSDP_TENSOR: Rules = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"), ("embed", "fsdp"), ("heads", "tensor"), ("kv", "tensor"), ("head_dim", None),
    ("mlp", "tensor"),
)
PRESETS: dict[str, Rules] = {"dp": DATA_PARALLEL, "fsdp": FSDP, "fsdp_tensor": FSDP_TENSOR}


def path_str(path) -> str:
    return ".".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


def axes_for_path(path: str, ndim: int) -> tuple[str | None, ...]:
    for pat, axes in PARAM_LOGICAL_AXES:
        if re.search(pat, path):
            if re.match(r"layers\.[^0-9]", path) and len(axes) + 1 == ndim:
                # the stacked layout (models.stacked): a leading layer axis, not sharded
                return ("layers", *axes)
            if len(axes) != ndim:
                raise ValueError(f"logical axes {axes} for parameter {path} do not match its rank {ndim}")
            return axes
    raise KeyError(f"no logical axes rule for parameter {path}; add one to PARAM_LOGICAL_AXES")


def _params_tree(model_or_params):
    if isinstance(model_or_params, nnx.Module):
        return nnx.to_pure_dict(nnx.state(model_or_params, nnx.Param))
    if isinstance(model_or_params, nnx.State):
        return nnx.to_pure_dict(model_or_params)
    return model_or_params


def logical_axes(model_or_params) -> Any:
    """Pytree like the params (pure dict) with a tuple of logical axis names per parameter."""
    tree = _params_tree(model_or_params)
    return jax.tree_util.tree_map_with_path(lambda p, x: axes_for_path(path_str(p), np.ndim(x)), tree)


def _resolve(rules: Rules | str | None) -> dict[str, Any]:
    if rules is None:
        rules = FSDP
    if isinstance(rules, str):
        if rules not in PRESETS:
            raise ValueError(f"unknown sharding preset {rules!r}; choose from {', '.join(PRESETS)}")
        rules = PRESETS[rules]
    return dict(rules)


def spec_for(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh, rules) -> PartitionSpec:
    table = _resolve(rules)
    used: set[str] = set()
    out = []
    for name, size in zip(axes, shape):
        mesh_axes = table.get(name) if name is not None else None
        if mesh_axes is None:
            out.append(None)
            continue
        tup = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        tup = tuple(a for a in tup if a in mesh.shape and a not in used)
        n = int(np.prod([mesh.shape[a] for a in tup])) if tup else 1
        if not tup or n == 1 or size % n != 0:
            out.append(None)
            continue
        used.update(tup)
        out.append(tup[0] if len(tup) == 1 else tup)
    return PartitionSpec(*out)


def param_shardings(model_or_abstract, mesh: Mesh, rules: Rules | str | None = None):
    """Pytree (pure dict like the params) of `NamedSharding` for each parameter."""
    tree = _params_tree(model_or_abstract)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(mesh, spec_for(axes_for_path(path_str(p), len(x.shape)),
                                                  tuple(x.shape), mesh, rules)),
        tree,
    )
