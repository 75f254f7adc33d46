"""Decoder-block weights stacked on a leading layer axis: the layout of a ``scan_layers=True`` model.

A model's parameters (`ngdiff_jax.models.functional`) hold one subtree per decoder block,
``params["layers"][i]``. XLA then compiles every block's operations, and an optimizer's
element-wise operations, once per block and leaf: a 30-block step is tens of thousands of
kernels, whose compilation (on CPU) took more memory than the step itself in the lean (LoRA,
bfloat16) runs. A ``CausalLM(..., scan_layers=True)`` holds its blocks as one block whose every
weight has a leading ``[num_layers]`` axis (built with ``nnx.vmap``), and runs them as one
``jax.lax.scan`` (MaxText's ``scan_layers``, levanter's ``Stacked``): XLA compiles one block, and
an optimizer sees one leaf per block parameter. ``functional`` of such a model gives its
parameters in this *stacked* layout, ``params["layers"]`` one tree of stacked leaves.

* `scanned` / `unrolled` convert a model between the layouts (the same function: logits,
  log-probs, hidden states and generations are equal);
* `stack` / `unstack` convert a parameter tree (``stack(consume=True)`` frees each block's arrays
  as soon as they are stacked, so converting holds one extra leaf, not a second model).

The blocks must be identical but for their weights (checked: not so for GPT-2's
``scale_attn_by_inverse_layer_idx``).

Example:

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from ngdiff_jax import models
  >>> from ngdiff_jax.models import stacked
  >>> from ngdiff_jax.models.testing import tiny_hf_config
  >>> model = models.from_config(tiny_hf_config("llama"), rngs=nnx.Rngs(0))
  >>> view, params = models.functional(model)
  >>> scan_view, scan_params = models.functional(stacked.scanned(model))
  >>> scan_params["layers"]["attn"]["q_proj"]["kernel"].shape[0] == model.config.num_layers
  True
  >>> bool(jnp.allclose(stacked.unstack(scan_params)["layers"][1]["attn"]["q_proj"]["kernel"],
  ...                   params["layers"][1]["attn"]["q_proj"]["kernel"]))
  True
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ngdiff_jax.models.modeling import (
    CausalLM,
    abstract_like,
    frozen_from_bits,
    is_stacked,
    release_weights,
    shapes_only,
    shared_block_graphdef,
)

__all__ = ["is_stacked", "scanned", "stack", "unrolled", "unstack"]


def stack(params: dict, *, consume: bool = False) -> dict:
    """``params`` with ``params["layers"] = {0: t_0, ..., n-1: t_{n-1}}`` replaced by one tree of
    ``jnp.stack([t_0, ..., t_{n-1}])`` leaves. With ``consume=True`` the blocks are removed from
    ``params`` (mutated) and each block leaf is released once stacked: where nothing else holds the
    blocks' arrays, converting needs one extra leaf of memory instead of a second copy."""
    if is_stacked(params) or "layers" not in params:
        raise ValueError("stack: params has no per-block 'layers' entries (already stacked?)")
    layers = params["layers"]
    n = len(layers)
    if sorted(layers) != list(range(n)):
        raise ValueError(f"stack: params['layers'] keys must be 0..{n - 1}, got {sorted(layers)[:5]}...")
    blocks = [layers.pop(i) for i in range(n)] if consume else [layers[i] for i in range(n)]
    flat = [jax.tree_util.tree_flatten(b) for b in blocks]
    treedef = flat[0][1]
    for i, (_, td) in enumerate(flat):
        if td != treedef:
            raise ValueError(f"stack: block {i} has other parameters than block 0; the blocks cannot be stacked.")
    columns = [list(c) for c in zip(*(leaves for leaves, _ in flat))]
    del blocks, flat
    stacked = []
    for column in columns:
        stacked.append(jnp.stack(column))
        column.clear()  # the last reference to these blocks' leaves (consume=True)
    out = {k: v for k, v in params.items() if k != "layers"}
    out["layers"] = jax.tree_util.tree_unflatten(treedef, stacked)
    return out


def unstack(params: dict, *, host: bool = False) -> dict:
    """The per-block layout of stacked ``params`` (`stack`'s inverse; a frozen tree's bfloat16
    weights, stored as their bits, come back as bfloat16). ``host=True`` gives NumPy arrays that
    are views of the stacked ones where the backend allows (the CPU): no copy, e.g. to export."""
    if not is_stacked(params):
        raise ValueError("unstack: params['layers'] is not stacked")
    layers = params["layers"]
    if host:
        layers = jax.tree.map(np.asarray, layers)
    layers = jax.tree.map(frozen_from_bits, layers)
    n = jax.tree_util.tree_leaves(layers)[0].shape[0]
    out = {k: v for k, v in params.items() if k != "layers"}
    out["layers"] = {i: jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n)}
    return out


def _refill(model: CausalLM, like: CausalLM, params: dict) -> CausalLM:
    graphdef, state = nnx.split(like)
    nnx.replace_by_pure_dict(state, params)
    out = nnx.merge(graphdef, state)
    out.remat = getattr(model, "remat", "none")
    return out


def _no_adapters(model: CausalLM, what: str) -> None:
    if any(getattr(m, "lora", None) is not None for _, m in nnx.iter_modules(model)):
        raise ValueError(f"{what}: the model carries LoRA adapters; convert the base model first and attach "
                         "the adapters to the result (models.lora.attach).")


def _taken(model: CausalLM, release: bool) -> dict:
    """The model's state as a pure dict; with ``release`` the model keeps only the shapes."""
    pure = nnx.to_pure_dict(nnx.state(model))
    if shapes_only(pure):
        raise ValueError("this model holds shapes only, no weights (it gave its arrays away: release=True or "
                         "abstract_model); convert the model that holds them, or build the layout you need with "
                         "models.abstract_like(model, scan_layers=...).")  # fmt: skip
    if release:
        release_weights(model)
    return pure


def scanned(model: CausalLM, *, release: bool = False) -> CausalLM:
    """``model`` with its decoder blocks as one block stacked on a layer axis (``CausalLM(...,
    scan_layers=True)``; the forward pass, KV cache included, is one ``lax.scan`` over the blocks and
    XLA compiles one block). The same function: logits, log-probs, hidden states and generations
    equal the unrolled model's. ``model`` itself when it is scanned already. ``release=True``: the
    model gives its arrays away as they are stacked (it keeps its structure, shapes only), so the
    conversion holds one block's leaf more, not a second model."""
    if model.scan_layers:
        return model
    _no_adapters(model, "scanned")
    shared_block_graphdef(list(model.layers))  # identical blocks, or a clear error
    like = abstract_like(model, scan_layers=True)
    return _refill(model, like, stack(_taken(model, release), consume=True))


def unrolled(model: CausalLM) -> CausalLM:
    """`scanned`'s inverse: one `Block` per layer in ``model.layers``."""
    if not model.scan_layers:
        return model
    _no_adapters(model, "unrolled")
    like = abstract_like(model, scan_layers=False)
    return _refill(model, like, unstack(nnx.to_pure_dict(nnx.state(model))))
