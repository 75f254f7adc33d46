"""A model as pure functions of its parameter trees: `functional`, the one builder of a `ModelView`.

``functional(model)`` gives ``(view, params)``: ``params`` is the model's state as a pure dict
(``nnx.to_pure_dict``) and the view's ``logits`` / ``hidden_state`` / ``token_logprobs`` are pure,
jittable and differentiable in it (`ngdiff_jax.models.view`). ``functional(model, *filters)``
splits the state by variable type instead (``nnx.split``'s filters; LoRA's frozen base and its
adapters, `ngdiff_jax.models.lora.split`) and the view takes the trees as a tuple.

The layout is the model's: one tree per decoder block for an unrolled model, the blocks' weights
stacked on a leading layer axis for a ``scan_layers=True`` one (`ngdiff_jax.models.stacked`). On
a scanned model the view

* takes GeN's probe point unmade (a `ngdiff_jax.shifted.Shifted` in place of any tree): the layer
  scan makes one block's shifted weights at a time, so the point never exists as a whole tree;
* carries the block weights of ``frozen`` trees (indices of ``filters``, e.g. LoRA's base: never
  differentiated, and differentiating those weights raises) into the scan as the model's backend
  stores them (`ngdiff_jax.backends.Backend.carry`; the CPU backend: bfloat16 as bits), converted
  once here rather than in every call.

Example:

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from ngdiff_jax import models
  >>> from ngdiff_jax.models.testing import tiny_hf_config
  >>> model = models.from_config(tiny_hf_config("llama"), rngs=nnx.Rngs(0))
  >>> view, params = models.functional(model)
  >>> scan_view, stacked_params = models.functional(models.stacked.scanned(model))
  >>> stacked_params["layers"]["attn"]["q_proj"]["kernel"].shape[0] == model.config.num_layers
  True
  >>> ids = jnp.ones((1, 4), jnp.int32)
  >>> bool(jnp.allclose(view(params, ids), scan_view(stacked_params, ids), atol=1e-5))
  True
"""

from __future__ import annotations

from functools import partial

import jax
from flax import nnx

from ngdiff_jax.backends import forward_mode
from ngdiff_jax.models.modeling import (
    CausalLM,
    frozen_weight,
    is_stacked,
    model_inputs,
    release_weights,
    shapes,
    shapes_only,
    with_backend,
)
from ngdiff_jax.models.view import ModelView
from ngdiff_jax.shifted import Shifted, takes_shifted

__all__ = ["functional"]


def _fresh(template, pure: dict):
    """A copy of the state ``template`` with the leaves ``pure`` gives (the others stay as they are)."""
    st = jax.tree.map(lambda x: x, template)
    nnx.replace_by_pure_dict(st, pure)
    return st


def _convert_in_place(tree: dict, fn) -> None:
    """Replace every leaf of the nested dict ``tree`` by ``fn(leaf)``, one at a time (each old leaf
    is released as soon as it is converted, where nothing else holds it); a shape-only leaf (an
    abstract model's) by the shape ``fn`` would give."""
    for k, v in tree.items():
        if isinstance(v, dict):
            _convert_in_place(v, fn)
        else:
            tree[k] = jax.eval_shape(fn, v) if isinstance(v, jax.ShapeDtypeStruct) else fn(v)


_WEIGHTLESS = ("these parameters hold shapes only (jax.ShapeDtypeStruct), no weights: the model gave its arrays "
               "away (functional(..., release=True), stacked.scanned(..., release=True) or abstract_model); "
               "pass the trees the first functional(...) call returned.")


def functional(model: CausalLM, *filters, frozen: tuple[int, ...] = (), release: bool = False):
    """``(view, params)`` for ``model`` (module doc): ``params`` one pure dict, or with ``filters``
    a tuple of them, one per filter, which the view then takes as a tuple.

    ``frozen``: indices of ``filters`` whose trees are never differentiated (a scanned model only).
    ``release``: the model gives its arrays away (keeping its structure, shapes only), so that
    converting the frozen trees holds one leaf more, not a second copy; call the view, or
    `ngdiff_jax.models.with_params`, from then on."""
    frozen = tuple(sorted(set(frozen)))
    if frozen and not filters:
        raise ValueError(f"functional: frozen={frozen} names trees split by filters, and none were given; the "
                         "model's own state as one tree cannot be frozen (e.g. functional(model, nnx.Param, "
                         "lora.LoraParam, frozen=(0,)) freezes the base).")  # fmt: skip
    if any(not 0 <= i < len(filters) for i in frozen):
        raise ValueError(f"functional: frozen={frozen} must index the {len(filters)} filters "
                         f"(0..{len(filters) - 1}).")  # fmt: skip
    if frozen and not model.scan_layers:
        raise ValueError("functional: frozen trees are carried into a layer scan; this model's blocks are "
                         "unrolled: build it with scan_layers=True (models.stacked.scanned), or pass no frozen.")
    graphdef, *states = nnx.split(model, *filters) if filters else nnx.split(model)
    pures = [nnx.to_pure_dict(st) for st in states]
    templates = [shapes(st) for st in states]
    del states
    if release:
        release_weights(model)
    for i in frozen:  # stored as the backend carries them into the scan (modeling._scan_stacked)
        _convert_in_place(pures[i].get("layers", {}), partial(frozen_weight, model.backend))
    single = not filters
    scanned = model.scan_layers

    def trees_of(params):
        if single and isinstance(params, tuple | list):
            raise ValueError(f"this view takes one parameter tree (a dict), got a {type(params).__name__} of "
                             f"{len(params)}; build it with filters (functional(model, *filters)) for a tuple.")
        if not single and not isinstance(params, tuple | list):
            raise ValueError(f"this view takes a tuple of {len(templates)} parameter trees (one per filter), got "
                             f"a {type(params).__name__}.")  # fmt: skip
        trees = (params,) if single else tuple(params)
        if len(trees) != len(templates):
            raise ValueError(f"this view takes {len(templates)} parameter trees (one per filter), got {len(trees)}")
        if shapes_only(trees):
            raise ValueError(_WEIGHTLESS)
        return trees

    def unrolled_model(params):
        trees = trees_of(params)
        for t in trees:
            if isinstance(t, dict) and is_stacked(t):
                raise ValueError("these parameters are in the stacked layout (one tree of [num_layers, ...] "
                                 "arrays); this model's blocks are unrolled: pass models.stacked.unstack(params), "
                                 "or build the view on models.stacked.scanned(model).")  # fmt: skip
        return nnx.merge(graphdef, *(_fresh(tm, t) for tm, t in zip(templates, trees)))

    def scanned_model(params):
        """The model holding all but the blocks' weights, and `CausalLM.forward`'s ``stacked``."""
        sts, layers, shifts = [], [], []
        for tmpl, p in zip(templates, trees_of(params)):
            shift = None
            if isinstance(p, Shifted):  # GeN's probe point: the blocks' weights are shifted in the scan
                top = Shifted(*({k: v for k, v in t.items() if k != "layers"} for t in (p.params, p.direction)),
                              p.step).materialize()
                shift = (p.direction.get("layers", {}), p.step)
                p = {**top, "layers": p.params.get("layers", {})}
            if p.get("layers") and not is_stacked(p):
                raise ValueError("these parameters hold one tree per block; this model's blocks are stacked "
                                 "(scan_layers=True): pass models.stacked.stack(params).")  # fmt: skip
            sts.append(_fresh(tmpl, {k: v for k, v in p.items() if k != "layers"}))
            layers.append(p.get("layers", {}))
            shifts.append(shift)
        m = nnx.merge(graphdef, *sts)  # its blocks hold shapes only: the scan reads `blocks`
        if forward_mode(params):  # the backend's custom_vjp kernels have no forward mode
            with_backend(m, m.backend.portable())
        block_def, *block_templates = nnx.split(m.layers, *filters) if filters else nnx.split(m.layers)
        blocks = tuple(_fresh(bt, lay) for bt, lay in zip(block_templates, layers))
        shifts = tuple(None if sh is None else (_fresh(bt, sh[0]), sh[1]) for bt, sh in zip(block_templates, shifts))
        if m.lm_head is None:  # a tied embedding, read twice (lookup and head): the backend's hook
            m.embed.set_value(m.backend.settle_tied_embedding(m.embed[...]))
        return m, (block_def, blocks, frozen, shifts)

    if not scanned:

        def logits(params, input_ids, attention_mask=None, positions=None):
            return unrolled_model(params)(input_ids, attention_mask, positions)

        def hidden_state(params, input_ids, attention_mask=None, *, layer, positions=None):
            return unrolled_model(params).hidden_state(input_ids, attention_mask, layer=layer, positions=positions)

        def token_logprobs(params, input_ids, labels, attention_mask=None, positions=None):
            return unrolled_model(params).token_logprobs(input_ids, labels, attention_mask, positions)

        view = ModelView(logits, hidden_state, token_logprobs)
    else:

        def logits(params, input_ids, attention_mask=None, positions=None):
            m, blocks = scanned_model(params)
            input_ids, attention_mask, positions = model_inputs(input_ids, attention_mask, positions)
            return m.forward(input_ids, positions, attention_mask, stacked=blocks)[0]

        def hidden_state(params, input_ids, attention_mask=None, *, layer, positions=None):
            m, blocks = scanned_model(params)
            return m.hidden_state(input_ids, attention_mask, layer=layer, positions=positions, stacked=blocks)

        def token_logprobs(params, input_ids, labels, attention_mask=None, positions=None):
            m, blocks = scanned_model(params)
            input_ids, attention_mask, positions = model_inputs(input_ids, attention_mask, positions)
            x, _ = m.forward(input_ids, positions, attention_mask, return_hidden=True, stacked=blocks)
            return m.head_logprobs(x, jax.numpy.asarray(labels))

        # each takes GeN's probe point unmade (ngdiff_jax.shifted): the scan shifts one block at a time
        view = ModelView(takes_shifted(logits), takes_shifted(hidden_state), takes_shifted(token_logprobs))
    return view, (pures[0] if single else tuple(pures))
