"""Shardings for everything the unlearning step touches, derived from the models' rules.

- parameters: ``ngdiff_jax.models.sharding.param_shardings`` (logical axes -> mesh axes);
- optimizer state: every subtree that mirrors the params (Adam's ``mu``/``nu``, ...)
  gets the parameters' shardings, every other leaf (counts, norms, rates) is replicated;
- batches: the leading (batch) dimension split over the mesh axes of the ``batch`` rule.

:func:`sharding_report` lists each parameter whose rule asked for a mesh axis that
could not be used (size not divisible): such parameters are replicated on that
dimension, and the step reports them instead of replicating silently.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ngdiff_jax.models import sharding as shd
from ngdiff_jax.parallel.mesh import resolve_rules

__all__ = [
    "batch_axes",
    "batch_sharding",
    "opt_state_shardings",
    "param_shardings",
    "place",
    "replicated",
    "shard_batch",
    "sharding_report",
]


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def param_shardings(params, mesh: Mesh, rules) -> Any:
    """Pytree of ``NamedSharding`` like ``params`` (arrays or ``ShapeDtypeStruct``s)."""
    return shd.param_shardings(params, mesh, resolve_rules(rules))


def _leaf_shapes(tree):
    return [tuple(np.shape(x)) for x in jax.tree_util.tree_leaves(tree)]


def opt_state_shardings(opt_state, params, p_shardings, mesh: Mesh) -> Any:
    """Shardings for an optax state: subtrees with the params' structure (and shapes)
    take ``p_shardings``; all other leaves are replicated."""
    p_def = jax.tree_util.tree_structure(params)
    p_shapes = _leaf_shapes(params)
    rep = replicated(mesh)

    def mirrors_params(node) -> bool:
        if jax.tree_util.tree_structure(node) != p_def:
            return False
        return _leaf_shapes(node) == p_shapes

    def assign(node):
        if mirrors_params(node):
            return p_shardings
        return jax.tree_util.tree_map(lambda _: rep, node)

    # Treat every params-like subtree as one leaf, then expand it.
    return jax.tree_util.tree_map(assign, opt_state, is_leaf=mirrors_params)


def batch_axes(mesh: Mesh, rules) -> tuple[str, ...]:
    """Mesh axes that split the batch dimension (the ``batch`` rule, axes of this mesh)."""
    table = dict(resolve_rules(rules))
    axes = table.get("batch")
    if axes is None:
        return ()
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return tuple(a for a in axes if a in mesh.shape)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    """``NamedSharding`` splitting dimension 0 over :func:`batch_axes` (other dims replicated);
    valid for ``[B, T]`` token arrays and ``[B]`` per-sample arrays alike."""
    axes = batch_axes(mesh, rules)
    if not axes:
        return replicated(mesh)
    return NamedSharding(mesh, PartitionSpec(axes[0] if len(axes) == 1 else axes))


def _is_global(x) -> bool:
    return isinstance(x, jax.Array) and not x.is_fully_addressable


def _put(x, s: NamedSharding):
    """One leaf onto sharding ``s``: a global array is resharded; host or local data
    (identical on every process) is cut into this process's shards. A leaf already on
    ``s`` is returned as is."""
    if isinstance(x, jax.Array) and x.sharding == s:
        return x
    if _is_global(x) or jax.process_count() == 1:
        return jax.device_put(x, s)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])


def _copy_leaf(a):
    return a & True if a.dtype == np.bool_ else a * np.ones((), a.dtype)


def _fresh_copies(arrays: list, shardings: list) -> list:
    """Copies in new device buffers (a jitted program's outputs never alias its
    non-donated inputs; ``device_put`` may alias the source buffer on a device)."""
    return jax.jit(lambda xs: [_copy_leaf(a) for a in xs], out_shardings=shardings)(arrays)


def place(tree, shardings) -> Any:
    """Put a pytree (params, optimizer state, ...) onto ``shardings`` (same structure).

    Leaves already on their sharding are kept. Moved leaves, and leaves that are one and
    the same array (optax initializes several counters from one ``zeros``), get their own
    buffers, so the result can be donated to a step without deleting the caller's arrays."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    s_leaves = treedef.flatten_up_to(shardings)
    out, seen, redo = [], set(), []
    for i, (x, s) in enumerate(zip(leaves, s_leaves)):
        y = _put(x, s)
        if y is not x or id(y) in seen:
            redo.append(i)
        seen.add(id(y))
        out.append(y)
    if redo:
        copies = _fresh_copies([out[i] for i in redo], [s_leaves[i] for i in redo])
        for i, c in zip(redo, copies):
            out[i] = c
    return jax.tree_util.tree_unflatten(treedef, out)


def shard_batch(batch: dict[str, Any], sharding: NamedSharding) -> dict[str, jax.Array]:
    """A global batch (the same ``[B, ...]`` arrays on every process) as arrays split by
    ``sharding``; each process materializes only its own rows."""
    n = math.prod(
        sharding.mesh.shape[a] for a in _spec_axes(sharding.spec[0] if sharding.spec else None)
    )
    out = {}
    for k, v in batch.items():
        shape = np.shape(v)
        if not shape:
            raise ValueError(
                f"batch entry {k!r} is a scalar; batch entries are [batch, ...] arrays."
            )
        if shape[0] % n:
            raise ValueError(
                f"batch entry {k!r} has batch size {shape[0]}, not divisible by the {n} devices that split "
                f"the batch ({sharding.spec}); use a batch size that is a multiple of {n}."
            )
        out[k] = _put(v, sharding)
    return out


def _spec_axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def sharding_report(params, mesh: Mesh, rules) -> dict[str, list[str]]:
    """What the rules do to each parameter on ``mesh``.

    Returns ``{"sharded": [...], "replicated": [...], "fallback": [...]}`` with dotted
    parameter paths: ``replicated`` ones have no dimension mapped to a mesh axis of size
    > 1 by the rules (e.g. norm scales), ``fallback`` ones (``"path: dim i wants (axes)"``)
    had a dimension whose size did not divide its mesh axes and which is replicated instead.
    """
    table = dict(resolve_rules(rules))
    shardings = param_shardings(params, mesh, rules)
    out: dict[str, list[str]] = {"sharded": [], "replicated": [], "fallback": []}
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_s = jax.tree_util.tree_leaves(shardings)
    for (path, x), s in zip(flat, flat_s):
        name = shd.path_str(path)
        axes = shd.axes_for_path(name, len(np.shape(x)))
        spec = tuple(s.spec) + (None,) * (len(axes) - len(s.spec))
        for i, (logical, got) in enumerate(zip(axes, spec)):
            want = tuple(
                a
                for a in _spec_axes(table.get(logical) if logical else None)
                if a in mesh.shape and mesh.shape[a] > 1
            )
            have = tuple(a for a in _spec_axes(got) if mesh.shape[a] > 1)
            if want and not set(want) <= set(have):
                out["fallback"].append(
                    f"{name}: dim {i} ({logical}, size {np.shape(x)[i]}) wants {want}, got {have or 'replicated'}"
                )
        if any(mesh.shape[a] > 1 for e in spec for a in _spec_axes(e)):
            out["sharded"].append(name)
        else:
            out["replicated"].append(name)
    return out
