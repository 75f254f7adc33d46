"""``CausalLM(scan_layers=True)``: the blocks as one block stacked on a layer axis (``nnx.vmap`` to
build), run as one scan, the KV cache included. Everything a model computes equals the unrolled
model's: logits, log-probs, hidden states, greedy generations, the evaluation engine's programs."""

import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ngdiff_jax import models
from ngdiff_jax.models import kv_cache, stacked
from ngdiff_jax.models import modeling as M
from ngdiff_jax.models.config import ModelConfig
from ngdiff_jax.models.testing import tiny_hf_config

# llama in the development tier; the others (a sliding window, biases, partial rotary + LayerNorm + a
# parallel block, learned positions) in the full suite
FAMILIES = ["llama", *(pytest.param(f, marks=pytest.mark.slow) for f in ("mistral", "qwen2", "phi", "gpt2"))]


def _pair(family, **kw):
    model = models.from_config(tiny_hf_config(family, **kw), rngs=nnx.Rngs(0))
    return model, stacked.scanned(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_scanned_model_computes_what_the_unrolled_one_does(family):
    model, scan = _pair(family)
    assert scan.scan_layers and not model.scan_layers
    n = model.config.num_layers
    assert scan.layers.attn.q_proj.kernel[...].shape[0] == n  # one block, every weight [layers, ...]
    ids = jax.random.randint(jax.random.key(1), (3, 12), 0, model.config.vocab_size)
    np.testing.assert_allclose(scan(ids), model(ids), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(scan.token_logprobs(ids, ids).logp, model.token_logprobs(ids, ids).logp,
                               rtol=1e-6, atol=1e-6)  # fmt: skip
    for layer in (0, -1):
        np.testing.assert_allclose(scan.hidden_state(ids, layer=layer), model.hidden_state(ids, layer=layer),
                                   rtol=1e-6, atol=1e-6)  # fmt: skip
    prompts = np.asarray(ids)
    np.testing.assert_array_equal(models.generate(scan, prompts, max_new_tokens=6),
                                  models.generate(model, prompts, max_new_tokens=6))  # fmt: skip
    back = stacked.unrolled(scan)
    assert not back.scan_layers
    for a, b in zip(jax.tree.leaves(nnx.state(back)), jax.tree.leaves(nnx.state(model))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # over 4 s on 2 cores: the full suite (pyproject's markers)
def test_the_kv_cache_path_of_the_scan_decodes_as_the_unrolled_model():
    """The decode loop on the stacked cache gives the unrolled model's tokens; a cache written in
    blocks (the engine's prefill) equals one written at once and the unrolled model's, stacked; each
    layout refuses the other's cache."""
    cfg = ModelConfig.from_hf(tiny_hf_config("llama"))
    model = M.CausalLM(cfg, rngs=nnx.Rngs(0))
    scan = stacked.scanned(model)
    ids = np.asarray(jax.random.randint(jax.random.key(2), (2, 9), 0, cfg.vocab_size))
    np.testing.assert_array_equal(models.generate(scan, ids, max_new_tokens=7),
                                  models.generate(model, ids, max_new_tokens=7))  # fmt: skip
    pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
    valid = jnp.ones((2, 12), jnp.int32)
    whole, c1 = scan.forward(ids, pos, valid, scan.init_cache(2, 12), 0)
    _, part = scan.forward(ids[:, :4], pos[:, :4], valid, scan.init_cache(2, 12), 0)
    rest, c2 = scan.forward(ids[:, 4:], pos[:, 4:], valid, part, 4)
    np.testing.assert_allclose(rest, whole[:, 4:], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c2[0][..., :9, :, :], c1[0][..., :9, :, :], rtol=1e-6, atol=1e-6)
    _, unrolled_cache = model.forward(ids, pos, valid, model.init_cache(2, 12), 0)
    np.testing.assert_allclose(c1[0], jnp.stack([k for k, _ in unrolled_cache]), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="one \\(k, v\\) pair stacked"):
        scan.forward(ids, pos, valid, unrolled_cache, 0)
    with pytest.raises(ValueError, match="a list of \\(k, v\\) per block"):
        model.forward(ids, pos, valid, c1, 0)


def test_kv_cache_helpers_take_either_layout():
    per_block = [(jnp.arange(2 * 4 * 1 * 2.0).reshape(2, 4, 1, 2),) * 2] * 3
    stacked_cache = tuple(jnp.stack([c[j] for c in per_block]) for j in range(2))
    for cache in (per_block, stacked_cache):
        assert jax.tree.leaves(kv_cache.slots(cache, 3))[0].shape[-3] == 3
        assert jax.tree.leaves(kv_cache.concat(cache, cache))[0].shape[-3] == 8
        pad = jax.tree.leaves(kv_cache.padded(cache, 2, 5))[0]
        assert pad.shape[-3] == 7 and not pad[..., 2:, :, :].any()
        w = jax.tree.leaves(kv_cache.write(cache, kv_cache.slots(cache, 1), 3))[0]
        np.testing.assert_array_equal(w[..., 3, :, :], w[..., 0, :, :])
        b = jax.tree.leaves(kv_cache.broadcast(kv_cache.slots(jax.tree.map(lambda a: a[..., :1, :, :, :], cache),
                                                               4), 5))[0]  # fmt: skip
        assert b.shape[-4] == 5


@pytest.mark.slow  # over 4 s on 2 cores: the full suite (pyproject's markers)
def test_engine_programs_equal_on_either_layout(monkeypatch):
    """The evaluation engine's block-causal scoring and generation (shared prefix, blocked prefill,
    teacher-forced continuations) give the same numbers on a scanned model."""
    from ngdiff_jax.evaluation import engine
    from ngdiff_jax.evaluation.batching import Timings

    monkeypatch.setattr(engine, "ATTENTION_BLOCK", 8)
    model, scan = _pair("llama")
    V = model.config.vocab_size
    rng = np.random.default_rng(0)
    ids = rng.integers(1, V, (2, 20)).astype(np.int32)
    lengths = np.array([20, 13], np.int32)
    labels = np.where(np.arange(20)[None] < lengths[:, None], ids, -100).astype(np.int32)
    shared = rng.integers(1, V, (1, 8)).astype(np.int32)
    prompts = rng.integers(1, V, (2, 19)).astype(np.int32)
    mask = np.ones_like(prompts)
    mask[1, :5] = 0
    teach = rng.integers(1, V, (2, 6)).astype(np.int32)
    outs = []
    for m in (model, scan):
        graphdef, state = nnx.split(m)
        t = Timings()
        s = engine.score_plain(graphdef, state, ids, lengths, labels, timings=t, phase="score")
        g = engine.generate(graphdef, state, shared, np.int32(8), prompts, mask, np.array([True, True]),
                            max_new_tokens=5, pad_id=0, eos=(), n_buf=8, teach=teach, timings=t,
                            phase="gen")  # fmt: skip
        outs.append((s, g))
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-5, atol=1e-5)


def test_save_and_load_a_scanned_model():
    model, scan = _pair("qwen2")
    ids = jnp.ones((1, 5), jnp.int32)
    with tempfile.TemporaryDirectory() as d:
        models.save_pretrained(scan, d)  # written per block, as Hugging Face reads it
        plain = models.from_pretrained(d)
        again = models.from_pretrained(d, scan_layers=True)
        auto = models.from_pretrained(d, scan_layers=None)
    assert not plain.scan_layers and again.scan_layers and auto.scan_layers
    np.testing.assert_allclose(plain(ids), model(ids), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(again(ids), model(ids), rtol=1e-6, atol=1e-6)


def test_blocks_that_differ_are_not_scanned():
    cfg = tiny_hf_config("gpt2", scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx.*scan_layers=False"):
        M.CausalLM(ModelConfig.from_hf(cfg), rngs=nnx.Rngs(0), scan_layers=True)
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        stacked.scanned(models.from_config(cfg, rngs=nnx.Rngs(0)))
    with tempfile.TemporaryDirectory() as d:
        models.save_pretrained(models.from_config(cfg, rngs=nnx.Rngs(0)), d)
        assert not models.from_pretrained(d, scan_layers=None).scan_layers  # the default falls back


def test_with_params_checks_the_layout():
    model, scan = _pair("llama")
    _, per_block = models.functional(model)
    _, stacked_params = models.functional(scan)
    assert stacked.is_stacked(stacked_params)
    with pytest.raises(ValueError, match="models.stacked.stack"):
        models.with_params(scan, per_block)
    with pytest.raises(ValueError, match="unstack"):
        models.with_params(model, stacked_params)
    ids = jnp.ones((1, 4), jnp.int32)
    np.testing.assert_allclose(models.with_params(scan, stacked_params)(ids), model(ids), rtol=1e-6, atol=1e-6)


def test_a_model_with_adapters_is_converted_without_them_first():
    from ngdiff_jax.models import lora

    model = models.from_config(tiny_hf_config("llama"), rngs=nnx.Rngs(0))
    lora.attach(model, lora.LoraSpec(rank=2, alpha=4.0, targets=lora.resolve_targets("llama", ["all"])), seed=0)
    with pytest.raises(ValueError, match="LoRA adapters.*lora.attach"):
        stacked.scanned(model)


def test_quantization_checks_quantize_a_scanned_model_block_by_block():
    """The int8/int4 robustness checks quantize each block's weights as the unrolled model's (norms and
    biases, one dimension per block, stay), not the stacked arrays as one."""
    from ngdiff_jax.evaluation.robustness import _requantized

    model, scan = _pair("qwen2")  # biases on q/k/v
    ids = jnp.ones((1, 6), jnp.int32)
    for bits in (8, 4):
        q_scan = _requantized(scan, bits)
        assert q_scan.scan_layers
        np.testing.assert_allclose(q_scan(ids), _requantized(model, bits)(ids), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(q_scan.layers.attn_norm.scale[...], scan.layers.attn_norm.scale[...])


def test_members_name_the_layout_they_need():
    from ngdiff_jax.evaluation.members import Members

    model, scan = _pair("llama")
    _, per_block = models.functional(model)
    batched = jax.tree.map(lambda a: a[None], per_block)
    with pytest.raises(ValueError, match="stacked on a layer axis"):
        Members(scan, batched)
    Members(scan, jax.tree.map(lambda a: a[None], models.functional(scan)[1]))  # the stacked layout: accepted


def test_lora_on_a_scanned_model_draws_the_unrolled_models_adapters_and_saves_both_ways(tmp_path):
    """Issue 25 part 3: LoRA attaches to a scanned model (one adapter per target, stacked on the layer
    axis), one seed draws the same adapters in either layout, and the export of a scanned run (per block,
    PEFT's keys) is the unrolled run's."""
    from safetensors.numpy import load_file

    from ngdiff_jax.models import lora

    spec = lora.LoraSpec(rank=2, alpha=4.0, targets=lora.resolve_targets("llama", ["q", "down"]))
    model, scan = _pair("llama")
    lora.attach(model, spec, seed=7)
    lora.attach(scan, spec, seed=7)
    assert scan.layers.attn.q_proj.lora.lora_a[...].shape == (model.config.num_layers, model.config.hidden_size, 2)
    _, _, adapters = lora.split(model)
    _, _, scan_adapters = lora.split(scan)
    assert jax.tree.structure(stacked.stack(adapters)) == jax.tree.structure(scan_adapters)
    for a, b in zip(jax.tree.leaves(stacked.stack(adapters)), jax.tree.leaves(scan_adapters)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(stacked.stack(lora.initial_adapters(model, spec, seed=3))),
                    jax.tree.leaves(lora.initial_adapters(scan, spec, seed=3))):  # fmt: skip
        np.testing.assert_array_equal(a, b)
    moved = jax.tree.map(lambda x: x + 0.01, adapters)
    lora.save_peft_adapter(model, moved, spec, tmp_path / "a")
    lora.save_peft_adapter(scan, stacked.unstack(stacked.stack(moved)), spec, tmp_path / "b")
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in "ab")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        lora.attach(scan, spec)


def test_the_functional_builder_checks_its_arguments_and_keeps_forward_mode():
    """`models.functional` is the one builder: frozen trees only on a scanned model and only by filter
    index, and a scanned model's view (the CPU kernels included) supports jax.jvp."""
    from ngdiff_jax.models import lora

    model = models.from_config(tiny_hf_config("llama"), rngs=nnx.Rngs(0), backend="cpu_fast")
    scan = stacked.scanned(model)
    with pytest.raises(ValueError, match="frozen=.*none were given"):
        models.functional(scan, frozen=(0,))
    with pytest.raises(ValueError, match=r"frozen=\(1,\) must index the 1 filters \(0..0\)"):
        models.functional(scan, nnx.Param, frozen=(1,))
    with pytest.raises(ValueError, match="unrolled: build it with scan_layers=True"):
        models.functional(model, nnx.Param, frozen=(0,))
    view, params = models.functional(scan)
    plain_view, plain = models.functional(model)
    ids = jax.random.randint(jax.random.key(1), (2, 8), 0, model.config.vocab_size)
    tangent = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), params)
    _, dy = jax.jvp(lambda p: view(p, ids).sum(), (params,), (tangent,))
    _, want = jax.jvp(lambda p: plain_view(p, ids).sum(), (plain,), (stacked.unstack(tangent),))
    np.testing.assert_allclose(float(dy), float(want), rtol=1e-4)
    trees_view, trees = models.functional(scan, nnx.Param)  # filters: a tuple of trees
    assert isinstance(trees, tuple) and len(trees) == 1
    np.testing.assert_array_equal(trees_view(trees, ids), view(params, ids))
    with pytest.raises(ValueError, match="takes 1 parameter trees"):
        trees_view((params, params), ids)
    lora.attach(scan, lora.LoraSpec(rank=2, alpha=4.0, targets=("q",)))
    lora.split(scan, release=True)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(scan)))


def test_weightless_models_and_wrong_tree_shapes_fail_with_one_line():
    """A model that gave its arrays away (release=True) is refused by the view and the conversions with
    a message naming what happened, not a TypeError from inside JAX; a view's trees are checked too."""
    from ngdiff_jax.models import lora

    model = models.from_config(tiny_hf_config("llama"), rngs=nnx.Rngs(0), backend="cpu_fast",
                               dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)  # fmt: skip
    scan = stacked.scanned(model, release=True)
    ids = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="holds shapes only, no weights"):
        stacked.scanned(model)
    lora.attach(scan, lora.LoraSpec(rank=2, alpha=4.0, targets=("q",)))
    view, base, adapters = lora.split(scan, release=True)
    assert view({"base": base, "lora": adapters}, ids).shape == (1, 4, model.config.vocab_size)
    view2, base2, adapters2 = lora.split(scan)  # again, on the released model: shapes only
    with pytest.raises(ValueError, match=r"hold shapes only.*the model gave its arrays away"):
        view2({"base": base2, "lora": adapters2}, ids)
    one_view, params = models.functional(stacked.scanned(models.from_config(tiny_hf_config("llama"),
                                                                            rngs=nnx.Rngs(0))))  # fmt: skip
    with pytest.raises(ValueError, match="takes one parameter tree"):
        one_view((params,), ids)
    split_view, trees = models.functional(stacked.scanned(models.from_config(tiny_hf_config("llama"),
                                                                              rngs=nnx.Rngs(0))), nnx.Param)
    with pytest.raises(ValueError, match="takes a tuple of 1 parameter trees"):
        split_view(trees[0], ids)
    with pytest.raises(ValueError, match="none were given"):
        models.functional(scan, frozen=(0,))
