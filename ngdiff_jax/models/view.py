"""A model as pure functions of its parameter tree: the one functional view.

`ngdiff_jax.models.functional` (`ngdiff_jax.models.pure`; one tree per block, or the blocks stacked
on a layer axis for a scanned model) builds a :class:`ModelView`, and `ngdiff_jax.models.lora.split`
(a frozen base and the adapters) wraps it; the unlearning step and its objectives call nothing
else. Its three functions are pure and jittable:

* ``logits(params, input_ids, attention_mask=None, positions=None) -> float32 [B, T, V]``;
* ``hidden_state(params, input_ids, attention_mask=None, *, layer, positions=None) -> [B, T, E]``,
  the residual stream after block ``layer`` (RMU);
* ``token_logprobs(params, input_ids, labels, attention_mask=None, positions=None)`` -> a
  `TokenLogprobs` of the labels through the chunked head (no ``[B, T, V]`` logits).

A view is callable as its ``logits`` (``view(params, ids, mask)``), so code written for a bare
``apply_fn`` keeps working, and :meth:`ModelView.of` turns any logits function into a view (its
``hidden_state`` / ``token_logprobs`` attributes, when it has them).

Example:

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from ngdiff_jax import models
  >>> from ngdiff_jax.models.testing import tiny_hf_config
  >>> view, params = models.functional(models.from_config(tiny_hf_config("llama"), rngs=nnx.Rngs(0)))
  >>> ids = jnp.ones((1, 4), jnp.int32)
  >>> lp = view.logprobs(params, ids, ids)
  >>> bool(jnp.allclose(lp.logp, view.logprobs_from_logits(params, ids, ids).logp, atol=1e-5))
  True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ngdiff_jax.models.logprobs import TokenLogprobs, token_logprobs
from ngdiff_jax.shifted import accepts_shifted

__all__ = ["ModelView"]


@dataclasses.dataclass(frozen=True)
class ModelView:
    """``logits``, ``hidden_state`` and ``token_logprobs`` of one parameter layout (module doc).
    ``hidden_state`` / ``token_logprobs`` may be None for a view made from a bare logits function:
    `logprobs` then computes the log-probs from the logits, and reading a hidden state fails."""

    logits: Callable[..., Any]
    hidden_state: Callable[..., Any] | None = None
    token_logprobs: Callable[..., Any] | None = None

    def __call__(self, params, input_ids, attention_mask=None, positions=None):
        return self.logits(params, input_ids, attention_mask, *_given(positions))

    @classmethod
    def of(cls, fn: Callable[..., Any]) -> ModelView:
        """``fn`` itself when it is a view, else the view of a logits function ``fn`` (with its
        ``hidden_state`` / ``token_logprobs`` attributes, if any)."""
        if isinstance(fn, ModelView):
            return fn
        if not callable(fn):
            raise TypeError(f"expected a ModelView or a logits function (params, ids, mask) -> logits, got "
                            f"{type(fn).__name__}; build one with ngdiff_jax.models.functional(model).")  # fmt: skip
        return cls(fn, getattr(fn, "hidden_state", None), getattr(fn, "token_logprobs", None))

    @property
    def functions(self) -> tuple[Callable[..., Any], ...]:
        """The view's functions that are set."""
        return tuple(f for f in (self.logits, self.hidden_state, self.token_logprobs) if f is not None)

    @property
    def accepts_shifted(self) -> bool:
        """Every function takes GeN's probe point unmade (`ngdiff_jax.shifted`)."""
        return all(accepts_shifted(f) for f in self.functions)

    def logprobs(self, params, input_ids, labels, attention_mask=None, positions=None) -> TokenLogprobs:
        """The labels' log-probs: ``token_logprobs``, or computed from ``logits`` when the view has none."""
        if self.token_logprobs is not None:
            return self.token_logprobs(params, input_ids, labels, attention_mask, *_given(positions))
        return self.logprobs_from_logits(params, input_ids, labels, attention_mask, positions)

    def logprobs_from_logits(self, params, input_ids, labels, attention_mask=None, positions=None) -> TokenLogprobs:
        """The labels' log-probs from the full ``[B, T, V]`` logits (the reference for `logprobs`)."""
        return TokenLogprobs(*token_logprobs(self(params, input_ids, attention_mask, positions), labels))

    def hidden(self, params, input_ids, attention_mask=None, *, layer: int, positions=None):
        """``hidden_state``, or a clear error for a view without one."""
        if self.hidden_state is None:
            raise ValueError("this model view has no hidden_state (a bare logits function); build it with "
                             "ngdiff_jax.models.functional(model) or pass hidden_fn= to the step.")  # fmt: skip
        extra = {} if positions is None else {"positions": positions}
        return self.hidden_state(params, input_ids, attention_mask, layer=layer, **extra)

    def replace(self, **changes) -> ModelView:
        """A copy with some functions replaced (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def map(self, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> ModelView:
        """The view with ``wrap`` applied to each function that is set (e.g. to bind part of the
        parameters: `ngdiff_jax.training.lora_run`)."""
        return ModelView(*(None if f is None else wrap(f) for f in (self.logits, self.hidden_state,
                                                                      self.token_logprobs)))  # fmt: skip


def _given(positions) -> tuple:
    """``(positions,)`` when given: a function written without a ``positions`` argument still fits."""
    return () if positions is None else (positions,)
