"""``run.scan_layers``: the decoder blocks as one block whose weights are stacked on a leading layer
axis (a ``scan_layers=True`` model, `ngdiff_jax.models.stacked`) and run as one ``lax.scan``. The
forward pass, the log-probs, the hidden states and the gradients equal the unrolled model's (both
kernel settings, with and without remat, with LoRA); the compiled step holds one block; pipelines
trained either way export the same weights; blocks that differ are refused with a message naming
the key."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ngdiff_jax import models as M
from ngdiff_jax.cli import main
from ngdiff_jax.models import lora, stacked
from ngdiff_jax.models.config import ModelConfig
from ngdiff_jax.models.testing import tiny_hf_config


def _model(backend="xla", layers=3, **overrides):
    cfg = ModelConfig.from_hf(tiny_hf_config("llama", num_hidden_layers=layers, **overrides))
    return M.CausalLM(cfg, rngs=nnx.Rngs(0), backend=backend)


def _ids(vocab, B=2, T=12, seed=1):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, vocab)


def _max_diff(a, b):
    return max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.slow
@pytest.mark.parametrize("kernels", ["xla", "cpu_fast"])
@pytest.mark.parametrize("remat", ["none", "full"])
def test_stacked_model_equals_the_unrolled_one(kernels, remat):
    model = _model(kernels)
    M.set_remat(model, remat)
    ids = _ids(model.config.vocab_size)
    labels = ids.at[:, :3].set(-100)
    plain_fn, plain = M.functional(model)
    fn, params = M.functional(stacked.scanned(model))
    assert stacked.is_stacked(params) and not stacked.is_stacked(plain)
    assert params["layers"]["attn"]["q_proj"]["kernel"].shape[0] == 3

    np.testing.assert_allclose(fn(params, ids), plain_fn(plain, ids), atol=1e-5)
    for layer in (0, 1, -1):
        np.testing.assert_allclose(fn.hidden_state(params, ids, layer=layer),
                                   plain_fn.hidden_state(plain, ids, layer=layer), atol=1e-5)  # fmt: skip

    def loss(f):
        return lambda p: f.token_logprobs(p, ids, labels).logp.sum()

    l0, g0 = jax.value_and_grad(loss(plain_fn))(plain)
    l1, g1 = jax.jit(jax.value_and_grad(loss(fn)))(params)
    assert abs(float(l0) - float(l1)) < 1e-4 * abs(float(l0))
    g1 = stacked.unstack(g1)
    assert jax.tree.structure(g1) == jax.tree.structure(g0)
    scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g0))
    assert _max_diff(g0, g1) < 1e-5 * scale


def test_stack_consumes_blocks_and_unstack_inverts_it():
    _, plain = M.functional(_model())
    copy = jax.tree.map(lambda x: x, plain)
    out = stacked.stack(copy, consume=True)
    assert copy["layers"] == {}  # the blocks were handed over, so they can be freed as they are stacked
    back = stacked.unstack(out)
    assert jax.tree.structure(back) == jax.tree.structure(plain) and _max_diff(back, plain) == 0.0
    with pytest.raises(ValueError, match="already stacked"):
        stacked.stack(out)
    with pytest.raises(ValueError, match="not stacked"):
        stacked.unstack(plain)


def test_release_leaves_the_model_with_shapes_only():
    model = _model()
    _, want = M.functional(model)
    scan = stacked.scanned(model, release=True)
    leaves = jax.tree.leaves(nnx.state(model))
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    _, params = M.functional(scan)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(params))
    assert _max_diff(stacked.unstack(params), want) == 0.0


def test_per_block_params_given_to_the_stacked_function_fail_clearly():
    model = _model()
    fn, stacked_params = M.functional(stacked.scanned(model))
    plain_fn, plain = M.functional(model)
    with pytest.raises(ValueError, match=r"one tree per block.*models.stacked.stack\(params\)"):
        fn(plain, _ids(model.config.vocab_size))
    with pytest.raises(ValueError, match=r"stacked layout.*models.stacked.unstack\(params\)"):
        plain_fn(stacked_params, _ids(model.config.vocab_size))


@pytest.mark.parametrize("kernels", [pytest.param("xla", marks=pytest.mark.slow), "cpu_fast"])  # xla: over 4 s
def test_lora_stacked_equals_per_block(kernels):
    spec = lora.LoraSpec(rank=2, alpha=4.0, targets=lora.resolve_targets("llama", ["all"]))
    grads = []
    for is_stacked in (False, True):
        model = stacked.scanned(_model(kernels)) if is_stacked else _model(kernels)
        lora.attach(model, spec, seed=0)  # the same adapters in either layout
        # B = 0 at init: give the adapters a value so that both factors get a gradient
        for layer in [model.layers] if is_stacked else model.layers:
            layer.attn.q_proj.lora.lora_b[...] = jnp.full(layer.attn.q_proj.lora.lora_b[...].shape, 0.1)
        M.set_remat(model, "full")
        fn, base, adapters = lora.split(model)
        ids = _ids(model.config.vocab_size)
        g = jax.grad(lambda a, fn=fn, base=base, ids=ids: fn.token_logprobs({"base": base, "lora": a}, ids, ids)
                     .logp.sum())(adapters)  # fmt: skip
        grads.append(stacked.unstack(g) if is_stacked else g)
    assert jax.tree.structure(grads[0]) == jax.tree.structure(grads[1])
    scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(grads[0]))
    assert scale > 0 and _max_diff(*grads) < 1e-5 * scale


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_frozen_base_is_not_silently_differentiated(dtype):
    model = stacked.scanned(_model("xla"))
    lora.attach(model, lora.LoraSpec(rank=2, alpha=4.0, targets=lora.resolve_targets("llama", ["q"])), seed=0)
    fn, base, adapters = lora.split(model)
    # a bfloat16 base is stored as its bits (no float32 copy in the scan on XLA:CPU), as integers
    assert {str(x.dtype) for x in jax.tree.leaves(base["layers"])} == {"float32"}
    ids = _ids(model.config.vocab_size)
    base = jax.tree.map(lambda x: x.astype(dtype), base)

    def loss(b):
        return fn.token_logprobs({"base": b, "lora": adapters}, ids, ids).logp.sum()

    with pytest.raises(ValueError, match="frozen weight"):
        jax.grad(loss)(base)


@pytest.mark.parametrize("backend,stored", [("cpu_fast", "uint16"), ("xla", "bfloat16")])
def test_a_bfloat16_base_is_stored_as_the_backend_carries_it(backend, stored):
    """The CPU backend stores a stacked frozen bfloat16 base as bits (its layer scan slices them
    without a float32 copy), the portable one as it is; both read back the same weights."""
    cfg = ModelConfig.from_hf(tiny_hf_config("llama", num_hidden_layers=2))
    model = M.CausalLM(cfg, rngs=nnx.Rngs(0), backend=backend, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    _, plain = M.functional(model)
    model = stacked.scanned(model, release=True)
    lora.attach(model, lora.LoraSpec(rank=2, alpha=4.0, targets=lora.resolve_targets("llama", ["all"])), seed=0)
    fn, base, adapters = lora.split(model, release=True)
    assert {str(x.dtype) for x in jax.tree.leaves(base["layers"])} == {stored}
    back = stacked.unstack(base)["layers"][1]["mlp"]["up_proj"]["kernel"]
    assert back.dtype == jnp.bfloat16
    want = plain["layers"][1]["mlp"]["up_proj"]["kernel"]
    np.testing.assert_array_equal(np.asarray(back, np.float32), np.asarray(want, np.float32))
    host = stacked.unstack(base, host=True)["layers"][1]["mlp"]["up_proj"]["kernel"]
    assert isinstance(host, np.ndarray) and not host.flags["OWNDATA"]  # a view: exporting copies nothing


def test_blocks_that_differ_are_refused_naming_the_key():
    cfg = ModelConfig.from_hf(tiny_hf_config("gpt2", scale_attn_by_inverse_layer_idx=True))
    model = M.CausalLM(cfg, rngs=nnx.Rngs(0), backend="xla")
    with pytest.raises(ValueError, match="run.scan_layers=false"):
        stacked.scanned(model)


def test_stacked_params_shard_with_a_replicated_layer_axis():
    axes = M.logical_axes(M.functional(stacked.scanned(_model()))[1])
    assert axes["layers"]["attn"]["q_proj"]["kernel"] == ("layers", "embed", "heads", "head_dim")
    assert axes["embed"] == ("vocab", "embed")


def _step_dots(params_fn, layers):
    """Matrix multiplications in the compiled NGDiff + GeN step of a ``layers``-block model."""
    from ngdiff_jax.training import OptimConfig, load_method, make_optimizer, make_unlearn_step

    fn, params = params_fn(_model("cpu_fast", layers))
    method = load_method("ngdiff")
    tx = make_optimizer(method, OptimConfig(), 10)
    b = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    batch = {"input_ids": b, "attention_mask": b, "labels": b}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    step = jax.jit(make_unlearn_step(fn, method, tx))
    text = step.lower(abstract, jax.eval_shape(tx.init, abstract), batch, batch,
                      jax.ShapeDtypeStruct((2,), jnp.uint32)).compile().as_text()  # fmt: skip
    return text.count(" dot(")


@pytest.mark.xla_cpu
@pytest.mark.slow
def test_the_scanned_step_compiles_one_block():
    unrolled = [_step_dots(M.functional, n) for n in (2, 4)]
    scanned = [_step_dots(lambda m: M.functional(stacked.scanned(m)), n) for n in (2, 4)]
    assert unrolled[1] > unrolled[0]  # every block's matmuls, once per block
    assert scanned[1] == scanned[0] < unrolled[0]  # one block, whatever the depth


@pytest.fixture(scope="module")
def tiny(synthetic_model):
    """The synthetic benchmark + a tiny llama (and tokenizer) saved like a finetune export (conftest)."""
    return synthetic_model(2)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["lora.rank=4", "lora.targets=all"]], ids=["full", "lora"])
def test_unlearn_with_scan_layers_exports_what_the_unrolled_run_exports(tiny, tmp_path, extra, capsys):
    from safetensors.numpy import load_file

    runs = {}
    for scan in ("false", "true"):
        out = tmp_path / f"scan_{scan}"
        rc = main(["unlearn", "--config", "synthetic_ngdiff", f"data.source={tiny['bench']}",
                   f"model_path={tiny['model']}", f"run.output_dir={out}", "run.progress=false", "run.steps=3",
                   "run.checkpoint_every=0", "run.eval_every=3", "run.remat=full", f"run.scan_layers={scan}",
                   *extra])  # fmt: skip
        assert rc == 0, capsys.readouterr().err
        summary = json.loads((out / "summary.json").read_text())
        runs[scan] = (summary, load_file(str(out / "model" / "model.safetensors")))
        if extra:  # the PEFT adapter too
            runs[scan + "_adapter"] = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    if extra:
        a0, a1 = runs["false_adapter"], runs["true_adapter"]
        assert a0.keys() == a1.keys() and any("layers.1." in k for k in a0)
        assert max(float(np.abs(a0[k] - a1[k]).max()) for k in a0) < 1e-5
    (s0, w0), (s1, w1) = runs["false"], runs["true"]
    assert w0.keys() == w1.keys()
    before = load_file(str(tiny["model"] / "model.safetensors"))
    moved = max(float(np.abs(w1[k] - before[k]).max()) for k in w1)
    diff = max(float(np.abs(w0[k] - w1[k]).max()) for k in w0)
    assert moved > 1e-4  # the runs trained
    assert diff < 1e-2 * moved  # float32 summation order only (Adam rescales it for tiny gradients)
    for k in ("forget_loss", "retain_loss", "forget_grad_norm", "retain_grad_norm"):
        assert abs(s0["last_metrics"][k] - s1["last_metrics"][k]) < 1e-5 * max(1.0, abs(s0["last_metrics"][k]))
    assert s0["evals"][-1]["forget_nll"] == pytest.approx(s1["evals"][-1]["forget_nll"], rel=1e-5)


def test_finetune_with_scan_layers(tiny, tmp_path, capsys):
    out = tmp_path / "ft"
    rc = main(["finetune", f"model_path={tiny['model']}", f"data.source={tiny['bench']}", "data.split=forget10",
               "data.batch_size=4", f"run.output_dir={out}", "run.progress=false", "run.steps=2",
               "run.checkpoint_every=0", "run.scan_layers=true", "run.remat=full"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert M.from_pretrained(out / "model").config.num_layers == 2


def test_scan_without_remat_warns():
    from ngdiff_jax.training.config_schema import RunConfig

    with pytest.warns(UserWarning, match="run.remat=full"):
        RunConfig(scan_layers=True)


def _bf16_stacked(kernels, layers=4, **overrides):
    cfg = ModelConfig.from_hf(tiny_hf_config("llama", num_hidden_layers=layers, **overrides))
    model = M.CausalLM(cfg, rngs=nnx.Rngs(0), backend=kernels, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    M.set_remat(model, "full")
    return model


@pytest.mark.xla_cpu
@pytest.mark.slow  # over 4 s on 2 cores: the full suite (pyproject's markers)
def test_bfloat16_stacked_weights_are_not_widened_for_the_scan():
    """XLA:CPU converts a bfloat16 array that a loop slices to float32 before the loop: under a
    plain scan (``backend="xla"``) the gradient holds a float32 copy of each stacked weight;
    cpu_fast's `kernels.remat_scan` slices their bits and holds none, with the same gradients."""
    hlo, grads = {}, {}
    for kernels in ("xla", "cpu_fast"):
        model = _bf16_stacked(kernels)
        ids = _ids(model.config.vocab_size)
        fn, params = M.functional(stacked.scanned(model))
        loss = lambda p, fn=fn, ids=ids: fn.token_logprobs(p, ids, ids).logp.sum()  # noqa: E731
        hlo[kernels] = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
        grads[kernels] = jax.jit(jax.grad(loss))(params)
    gate = params["layers"]["mlp"]["gate_proj"]["kernel"]
    widened = "f32[" + ",".join(map(str, gate.shape)) + "]"
    if widened not in hlo["xla"]:
        pytest.skip("this XLA no longer widens a sliced bfloat16 array before its loop")
    assert widened not in hlo["cpu_fast"]
    for a, b in zip(jax.tree.leaves(grads["xla"]), jax.tree.leaves(grads["cpu_fast"])):
        assert a.dtype == b.dtype == jnp.bfloat16
        scale = float(jnp.abs(a.astype(jnp.float32)).max()) + 1e-6
        assert float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max()) <= 0.05 * scale


#: XLA:CPU's own settings of the two flags in tests/conftest.py's FAST_COMPILE that change what it emits
#: (the third, the LLVM module split, does not), as per-compile options
XLA_CPU_DEFAULTS = {"xla_backend_optimization_level": 3, "xla_cpu_use_fusion_emitters": True}


def _bits_step(bits: bool, steps: int, compiler_options: dict | None = None):
    """``(params after `steps` steps, copies, first param donated)`` of a stacked bfloat16 NGDiff
    step sharded on the XLA:CPU backend with ``bits_params=bits``; ``copies``: the compiled step's fusions that make a
    bits copy (``u16``) of a stacked weight from its argument (compiled with ``compiler_options``)."""
    from ngdiff_jax import parallel as par
    from ngdiff_jax.training import OptimConfig, load_method, make_optimizer, make_unlearn_step

    model = _bf16_stacked("cpu_fast", hidden_size=128, intermediate_size=512)
    ids = _ids(model.config.vocab_size, B=2, T=16)
    fn, p = M.functional(stacked.scanned(model))
    method = load_method("ngdiff")
    tx = make_optimizer(method, OptimConfig(), 10)
    step = make_unlearn_step(fn, method, tx)
    mesh = par.make_mesh(par.MeshConfig(data=1, fsdp=1, tensor=1, rules="fsdp"), devices=jax.devices()[:1])
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "labels": ids}
    rng = jax.random.key_data(jax.random.key(0))
    import dataclasses

    backend = dataclasses.replace(model.backend, bits_params=bits)
    sharded = par.shard_unlearn_step(step, mesh, "fsdp", p, jax.eval_shape(tx.init, p), backend=backend)
    assert sharded.bits_params is bits
    p, opt = sharded.place_state(p, tx.init(p))
    gate = p["layers"]["mlp"]["gate_proj"]["kernel"]
    copy_of_arg = re.compile(r"= u16\[" + ",".join(map(str, gate.shape)) + r"\]\S* fusion\(%params")
    copies = len(copy_of_arg.findall(sharded.lower(p, opt, batch, batch, rng).compile(compiler_options).as_text()))
    for _ in range(steps):
        p, opt, _ = sharded(p, opt, batch, batch, rng)
    return p, copies, gate.is_deleted()


@pytest.mark.xla_cpu
@pytest.mark.slow
def test_bfloat16_params_cross_the_sharded_step_as_bits():
    """`ShardedStep` on a backend with ``bits_params`` (XLA:CPU's): the same parameters after two steps, bit for bit, as
    without; the caller's parameters are donated and come back as bfloat16."""
    (plain, _, _), (bits, _, donated) = _bits_step(False, 2), _bits_step(True, 2)
    assert donated
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(bits)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))


@pytest.mark.xla_cpu
@pytest.mark.slow
def test_bfloat16_params_as_bits_are_not_copied_in_the_step():
    """With XLA:CPU's default flags (the tests compile without its fusion emitters, which makes the
    conversion a free bitcast), a bfloat16 argument that a loop reads as bits is copied into a
    new buffer: one fusion per stacked weight. Passed as bits (``bits_params``) it is not. The
    defaults are given per compile, in this process, over conftest's FAST_COMPILE flags (with
    those the step has no copy: [0, 0])."""
    assert [_bits_step(b, 0, XLA_CPU_DEFAULTS)[1] for b in (False, True)] == [2, 0]  # gate and up have this shape


@pytest.mark.slow
def test_lora_with_scan_layers_selects_on_the_full_tofu_evaluation(tiny, tmp_path, capsys):
    """Model selection evaluates a LoRA run's merged weights in a plain per-block model (it put them
    into the model that carried the adapters: an internal error once the scan took its arrays), and
    scores what the unrolled run scores."""
    best = {}
    for scan in ("false", "true"):
        out = tmp_path / f"sel_{scan}"
        rc = main(["unlearn", "--config", "synthetic_ngdiff", f"data.source={tiny['bench']}",
                   f"model_path={tiny['model']}", f"run.output_dir={out}", "run.progress=false", "run.steps=2",
                   "run.checkpoint_every=0", "run.remat=full", f"run.scan_layers={scan}", "lora.rank=4",
                   "run.eval_every=2", "selection.every=2", "selection.tofu=true", "selection.tofu_limit=2",
                   "selection.tofu_max_new_tokens=4", "selection.maximize=forget_truth_ratio",
                   "data.buckets=[128]"])  # fmt: skip
        assert rc == 0, capsys.readouterr().err
        best[scan] = json.loads((out / "selection.json").read_text())["best"]["metrics"]
    for k in ("forget_Q_A_Prob", "retain_Q_A_Prob", "forget_truth_ratio", "wf_Q_A_Prob"):
        assert best["true"][k] == pytest.approx(best["false"][k], rel=1e-4), k
