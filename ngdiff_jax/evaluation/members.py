"""Several models of one architecture evaluated as one: a population's members.

:class:`Members` holds ``K`` models' weights with a leading member axis. The evaluation
runners (:class:`~ngdiff_jax.evaluation.scoring.Scorer`,
:func:`~ngdiff_jax.evaluation.generation.generate_texts`,
:func:`~ngdiff_jax.evaluation.mia.model_statistics`, hence
:func:`~ngdiff_jax.evaluation.evaluate_tofu_members`) accept it wherever they accept a
``CausalLM``: every compiled program (:mod:`~ngdiff_jax.evaluation.engine`) is then ``vmap``-ed
over the members, so one program scores or decodes the same rows for all ``K`` models, and
each result gains a leading member axis.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

__all__ = ["Members", "split_model"]


class Members:
    """``K`` models like ``template`` whose weights are ``params`` (a pure dict as from
    ``ngdiff_jax.models.functional``, every leaf with a leading member axis ``K``)."""

    def __init__(self, template, params):
        leaves = jax.tree_util.tree_leaves(params)
        if not leaves:
            raise ValueError("Members needs parameters with a leading member axis; got an empty tree.")
        self.k = int(leaves[0].shape[0])
        graphdef, state = nnx.split(template)
        per_member = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), params)
        expected = jax.tree.map(lambda x: (tuple(x.shape), x.dtype), nnx.to_pure_dict(state))
        got = jax.tree.map(lambda x: (tuple(x.shape), x.dtype), per_member)
        if expected != got:
            layout = ("stacked on a layer axis (models.stacked.stack), as the template's blocks are scanned"
                      if getattr(template, "scan_layers", False) else "per block, as the template's")
            raise ValueError("Members: the parameters (without their member axis) do not match the template "
                             f"model's shapes and dtypes; pass the full model's parameters, {layout}.")  # fmt: skip
        st = jax.tree.map(lambda x: x, state)
        nnx.replace_by_pure_dict(st, params)
        self.graphdef, self.state = graphdef, st
        self.config = getattr(template, "config", None)
        self.dtype = getattr(template, "dtype", None)

    def __len__(self) -> int:
        return self.k


def split_model(model) -> tuple[Any, Any, int | None]:
    """``(graphdef, state, members)``: ``members`` is ``K`` for :class:`Members`, else None."""
    if isinstance(model, Members):
        return model.graphdef, model.state, model.k
    graphdef, state = nnx.split(model)
    return graphdef, state, None
