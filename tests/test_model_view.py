"""The one functional view (`ngdiff_jax.models.ModelView`): every builder returns one, its
functions agree across the parameter layouts, a bare logits function becomes one, and the
unlearning step takes either."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ngdiff_jax import models
from ngdiff_jax.models import ModelView, lora, stacked
from ngdiff_jax.models.testing import tiny_hf_config

IDS = jnp.asarray(np.random.RandomState(0).randint(3, 100, (2, 7)), jnp.int32)
MASK = jnp.ones_like(IDS).at[1, 5:].set(0)


def _model():
    return models.from_config(tiny_hf_config("llama"), rngs=nnx.Rngs(0))


def _views():
    """``{layout: (view, params)}`` of the same weights; LoRA's adapters are zero-effect (B = 0)."""
    plain, p = models.functional(_model())
    st, sp = models.functional(stacked.scanned(_model()))
    spec = lora.LoraSpec(rank=2, alpha=2.0, targets=("q", "v"))
    m = _model()
    lora.attach(m, spec)
    lv, base, adapters = lora.split(m)
    m2 = stacked.scanned(_model())
    lora.attach(m2, spec)
    lsv, sbase, sadapters = lora.split(m2)
    return {"plain": (plain, p), "stacked": (st, sp), "lora": (lv, {"base": base, "lora": adapters}),
            "lora_stacked": (lsv, {"base": sbase, "lora": sadapters})}


@pytest.mark.slow  # over 4 s on 2 cores: the full suite (pyproject's markers)
def test_every_builder_returns_one_view_that_agrees_across_layouts():
    views = _views()
    ref_view, ref_params = views["plain"]
    want_logits = ref_view(ref_params, IDS, MASK)
    want_lp = ref_view.logprobs(ref_params, IDS, IDS, MASK)
    want_h = ref_view.hidden(ref_params, IDS, MASK, layer=0)
    for name, (view, params) in views.items():
        assert isinstance(view, ModelView), name
        np.testing.assert_allclose(view(params, IDS, MASK), want_logits, atol=2e-5, err_msg=name)
        np.testing.assert_array_equal(view(params, IDS, MASK), view.logits(params, IDS, MASK))
        lp = view.logprobs(params, IDS, IDS, MASK)
        np.testing.assert_allclose(lp.logp, want_lp.logp, atol=2e-5, err_msg=name)
        np.testing.assert_allclose(lp.logp, view.logprobs_from_logits(params, IDS, IDS, MASK).logp, atol=2e-5)
        np.testing.assert_allclose(view.hidden(params, IDS, MASK, layer=0), want_h, atol=2e-5, err_msg=name)
    # the stacked layouts take GeN's probe point unmade (ngdiff_jax.shifted); the others make it
    assert views["stacked"][0].accepts_shifted and not views["plain"][0].accepts_shifted


def test_a_bare_logits_function_is_a_view():
    view, params = models.functional(_model())

    def logits_only(p, ids, mask):  # no positions argument, no attributes
        return view(p, ids, mask)

    bare = ModelView.of(logits_only)
    assert bare.token_logprobs is None and bare.hidden_state is None and ModelView.of(bare) is bare
    np.testing.assert_allclose(bare.logprobs(params, IDS, IDS, MASK).logp, view.logprobs(params, IDS, IDS, MASK).logp,
                               atol=2e-5)  # fmt: skip
    with pytest.raises(ValueError, match="has no hidden_state"):
        bare.hidden(params, IDS, MASK, layer=0)
    with pytest.raises(TypeError, match="expected a ModelView or a logits function"):
        ModelView.of({"not": "callable"})
    # map binds part of the parameters (what a LoRA run does with its frozen base)
    bound = view.map(lambda f: lambda p, *a, **kw: f({**params, "embed": p}, *a, **kw))
    np.testing.assert_array_equal(bound(params["embed"], IDS, MASK), view(params, IDS, MASK))


def test_the_step_takes_a_view_or_a_bare_function():
    from ngdiff_jax.training import OptimConfig, load_method, make_optimizer, make_unlearn_step

    view, params = models.functional(_model())
    method = load_method("ngdiff", rate="constant")
    tx = make_optimizer(method, OptimConfig(lr=1e-3), total_steps=2)
    batch = {"input_ids": IDS, "attention_mask": MASK, "labels": jnp.where(MASK == 1, IDS, -100)}
    outs = []
    for fn in (view, lambda p, ids, mask: view(p, ids, mask)):
        step = jax.jit(make_unlearn_step(fn, method, tx))
        outs.append(step(params, tx.init(params), batch, batch, jax.random.PRNGKey(0)))
    for a, b in zip(jax.tree.leaves(outs[0][0]), jax.tree.leaves(outs[1][0])):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert float(outs[0][2]["forget_loss"]) == pytest.approx(float(outs[1][2]["forget_loss"]), rel=1e-5)
