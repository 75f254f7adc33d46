"""Decoder-block weights stacked on a leading layer axis: the parameter layout of ``run.scan_layers``.

A model's parameters (`ngdiff_jax.models.functional`) hold one subtree per decoder block,
``params["layers"][i]``. XLA then compiles every block's operations, and an optimizer's
element-wise operations, once per block and leaf: a 30-block step is tens of thousands of
kernels, whose compilation (on CPU) took more memory than the step itself in the lean (LoRA,
bfloat16) runs. In the *stacked* layout ``params["layers"]`` is one block's subtree whose
every leaf has a leading ``[num_layers]`` axis, and the forward pass runs the blocks as one
``jax.lax.scan`` over it (MaxText's ``scan_layers``, levanter's ``Stacked``): XLA compiles one
block, and an optimizer sees one leaf per block parameter.

* `stack` / `unstack` convert between the layouts (``stack(consume=True)`` frees each block's
  arrays as soon as they are stacked, so converting holds one extra leaf, not a second model);
* `functional` is `ngdiff_jax.models.functional` on the stacked layout (the same `ModelView`:
  logits, ``.hidden_state``, ``.token_logprobs``; no KV cache, so no generation);
* `runner` is the building block for parameter trees split by variable type (LoRA's frozen base
  and adapters, `ngdiff_jax.models.lora.split`).

The stacked forward equals the unrolled one (the same block, the same order; tests compare
logits, log-probs, hidden states and gradients). The blocks must be identical but for their
weights (checked: not so for GPT-2's ``scale_attn_by_inverse_layer_idx``).

Example:

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from ngdiff_jax import models
  >>> from ngdiff_jax.models import stacked
  >>> from ngdiff_jax.models.testing import tiny_hf_config
  >>> model = models.from_config(tiny_hf_config("llama"), rngs=nnx.Rngs(0))
  >>> apply_fn, params = stacked.functional(model)
  >>> params["layers"]["attn"]["q_proj"]["kernel"].shape[0] == model.config.num_layers
  True
  >>> ids = jnp.ones((1, 4), jnp.int32)
  >>> plain_fn, plain = models.functional(model)
  >>> bool(jnp.allclose(apply_fn(params, ids), plain_fn(plain, ids), atol=1e-5))
  True
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ngdiff_jax.models.modeling import (
    CausalLM,
    abstract_like,
    frozen_from_bits,
    frozen_weight,
    is_stacked,
    model_inputs,
    shared_block_graphdef,
)
from ngdiff_jax.models.view import ModelView
from ngdiff_jax.shifted import Shifted, takes_shifted

__all__ = ["functional", "is_stacked", "runner", "scanned", "stack", "unrolled", "unstack"]


def stack(params: dict, *, consume: bool = False, convert=None) -> dict:
    """``params`` with ``params["layers"] = {0: t_0, ..., n-1: t_{n-1}}`` replaced by one tree of
    ``jnp.stack([t_0, ..., t_{n-1}])`` leaves. With ``consume=True`` the blocks are removed from
    ``params`` (mutated) and each block leaf is released once stacked: where nothing else holds the
    blocks' arrays, converting needs one extra leaf of memory instead of a second copy.
    ``convert`` (a function of one leaf) is applied to each block's leaf before stacking."""
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
        stacked.append(jnp.stack([x if convert is None else convert(x) for x in column]))
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


def scanned(model: CausalLM) -> CausalLM:
    """``model`` with its decoder blocks as one block stacked on a layer axis (``CausalLM(...,
    scan_layers=True)``; the forward pass, KV cache included, is one ``lax.scan`` over the blocks and
    XLA compiles one block). The same function: logits, log-probs, hidden states and generations
    equal the unrolled model's. ``model`` itself when it is scanned already."""
    if model.scan_layers:
        return model
    _no_adapters(model, "scanned")
    like = abstract_like(model, scan_layers=True)  # a clear error where the blocks differ by construction
    shared_block_graphdef(list(model.layers))
    return _refill(model, like, stack(nnx.to_pure_dict(nnx.state(model))))


def unrolled(model: CausalLM) -> CausalLM:
    """`scanned`'s inverse: one `Block` per layer in ``model.layers``."""
    if not model.scan_layers:
        return model
    _no_adapters(model, "unrolled")
    like = abstract_like(model, scan_layers=False)
    return _refill(model, like, unstack(nnx.to_pure_dict(nnx.state(model))))


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def runner(model, *filters, release: bool = False, frozen: tuple[int, ...] = ()):
    """``(call, params)`` for ``model`` split by ``filters`` (all of its state when none), stacked.

    ``params`` is a list of stacked pure dicts, one per filter; ``call(method, params, *args,
    **kwargs)`` runs ``model.<method>(*args, **kwargs)`` (``"__call__"``, ``"hidden_state"``,
    ``"token_logprobs"``) on them, pure and jittable. With ``release=True`` the model's own arrays
    are replaced by their shapes as the blocks are stacked (the model keeps its structure, e.g. for
    an export, but no weights), so the conversion does not hold two copies. ``frozen``: indices
    of ``filters`` whose trees are never differentiated (LoRA's base: a gradient with respect to
    them raises), which lets the backend carry their weights into the layer scan in its own form
    (``modeling._scan_stacked``, `ngdiff_jax.backends.Backend.carry`)."""
    if model.scan_layers:
        raise ValueError("this model's blocks are stacked already (scan_layers=True): models.functional(model) gives "
                         "its stacked parameters; for trees split by variable type (LoRA), pass "
                         "models.stacked.unrolled(model).")  # fmt: skip
    layers = list(model.layers)
    shared_block_graphdef(layers)  # identical blocks, or a clear error
    graphdef, *states = nnx.split(model, *filters) if filters else nnx.split(model)
    block_def, *block_states = nnx.split(layers[0], *filters) if filters else nnx.split(layers[0])
    pures = [nnx.to_pure_dict(st) for st in states]
    templates = [_abstract(st) for st in states]
    block_templates = [_abstract(st) for st in block_states]
    del states, block_states, layers
    if release:
        nnx.update(model, _abstract(nnx.state(model)))
    # a frozen tree is stored as the backend carries it into the scan (modeling._scan_stacked)
    carry = partial(frozen_weight, model.backend)
    params = [stack(p, consume=release, convert=carry if i in frozen else None) for i, p in enumerate(pures)]
    del pures

    def call(method: str, params_list, *args, **kwargs):
        if len(params_list) != len(templates):
            raise ValueError(f"expected {len(templates)} parameter trees, got {len(params_list)}")
        sts, blocks, shifts = [], [], []
        for tmpl, btmpl, p in zip(templates, block_templates, params_list):
            shift = None
            if isinstance(p, Shifted):  # GeN's probe point: the blocks' weights are shifted in the scan
                top = Shifted(*({k: v for k, v in t.items() if k != "layers"} for t in (p.params, p.direction)),
                              p.step).materialize()
                d = jax.tree.map(lambda x: x, btmpl)
                nnx.replace_by_pure_dict(d, p.direction.get("layers", {}))
                shift = (d, p.step)
                p = {**top, "layers": p.params.get("layers", {})}
            if not is_stacked(p) and p.get("layers"):
                raise ValueError("these parameters are per block; this function takes the stacked layout "
                                 "(ngdiff_jax.models.stacked.stack).")
            st = jax.tree.map(lambda x: x, tmpl)
            nnx.replace_by_pure_dict(st, {k: v for k, v in p.items() if k != "layers"})
            sts.append(st)
            b = jax.tree.map(lambda x: x, btmpl)
            nnx.replace_by_pure_dict(b, p.get("layers", {}))
            blocks.append(b)
            shifts.append(shift)
        m = nnx.merge(graphdef, *sts)  # its blocks hold shapes only: the scan reads `blocks`
        if m.lm_head is None:  # a tied embedding, read twice (lookup and head): the backend's hook
            m.embed.set_value(m.backend.settle_tied_embedding(m.embed[...]))
        return _METHODS[method](m, (block_def, tuple(blocks), tuple(frozen), tuple(shifts)), *args, **kwargs)

    return call, params


def _call(m, blocks, input_ids, attention_mask=None, positions=None):
    input_ids, attention_mask, positions = model_inputs(input_ids, attention_mask, positions)
    return m.forward(input_ids, positions, attention_mask, stacked=blocks)[0]


def _token_logprobs(m, blocks, input_ids, labels, attention_mask=None, positions=None):
    input_ids, attention_mask, positions = model_inputs(input_ids, attention_mask, positions)
    x, _ = m.forward(input_ids, positions, attention_mask, return_hidden=True, stacked=blocks)
    return m._head_logprobs(x, jnp.asarray(labels))


def _hidden_state(m, blocks, input_ids, attention_mask=None, *, layer, positions=None):
    return m.hidden_state(input_ids, attention_mask, layer=layer, positions=positions, stacked=blocks)


# The model's own methods, without the inner `jax.jit` of `CausalLM.__call__`/`token_logprobs`
# (which would take the shape-only blocks as arguments).
_METHODS = {"__call__": _call, "token_logprobs": _token_logprobs, "hidden_state": _hidden_state}


def functional(model, *, release: bool = False) -> tuple[ModelView, dict]:
    """``(view, params)`` as `ngdiff_jax.models.functional`, with ``params`` stacked (module
    doc); ``release``: see `runner`."""
    call, (params,) = runner(model, release=release)

    def apply_fn(params, input_ids, attention_mask=None, positions=None):
        return call("__call__", [params], input_ids, attention_mask, positions)

    def hidden_state(params, input_ids, attention_mask=None, *, layer, positions=None):
        return call("hidden_state", [params], input_ids, attention_mask, layer=layer, positions=positions)

    def token_logprobs(params, input_ids, labels, attention_mask=None, positions=None):
        return call("token_logprobs", [params], input_ids, labels, attention_mask, positions)

    # each takes GeN's probe point unmade (ngdiff_jax.shifted): the scan shifts one block at a time
    return ModelView(takes_shifted(apply_fn), takes_shifted(hidden_state), takes_shifted(token_logprobs)), params
