"""LoRA (ngdiff_jax.models.lora): every family's projections adapted, gradients on every adapter,
merged weights in transformers and the PEFT adapter in peft give our logits, frozen base."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from ngdiff_jax import models as M  # noqa: E402
from ngdiff_jax.models import lora  # noqa: E402
from ngdiff_jax.models.testing import tiny_hf_model  # noqa: E402

FAMILIES = ["llama_tied", "mistral", "qwen2", "phi", "gpt2"]  # llama: see test_training_lora.py


def _batch(seed=0, B=2, T=9, V=128):
    rs = np.random.RandomState(seed)
    ids = rs.randint(3, V, (B, T)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


def _randomize(adapters, seed=0, std=0.3):
    """Nonzero B (and a fresh A) so the adapters change the logits visibly."""
    leaves, treedef = jax.tree_util.tree_flatten(adapters)
    rs = np.random.RandomState(seed)
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(rs.normal(0, std, x.shape), x.dtype) for x in leaves])


def _torch_logits(tm, ids, mask):
    with torch.no_grad():
        return tm(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.float().numpy()


def _rel(ours, ref, mask):
    v = mask.astype(bool)
    return float(np.abs(np.asarray(ours)[v] - ref[v]).max() / np.abs(ref[v]).max())


@pytest.fixture(scope="module", params=FAMILIES)
def adapted(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    tiny_hf_model(request.param, d / "hf")
    model = M.from_pretrained(d / "hf")
    spec = lora.LoraSpec(rank=3, alpha=6.0, targets=lora.resolve_targets(model.config.model_type, ["all"]))
    lora.attach(model, spec, seed=0)
    apply_fn, base, adapters = lora.split(model)
    return request.param, d, model, spec, apply_fn, base, adapters


def test_targets_cover_every_projection(adapted):
    name, _, model, spec, _, base, adapters = adapted
    # every Dense of every block except the LM head is adapted
    kernels = {p for p in map(lambda kv: kv[0], _flat(base).items()) if p.endswith(".kernel") and "lm_head" not in p}
    adapted_paths = {p.rsplit(".", 2)[0] + ".kernel" for p in _flat(adapters)}  # <projection>.lora.lora_a
    assert kernels == adapted_paths, name
    assert all(k.endswith((".lora.lora_a", ".lora.lora_b")) for k in _flat(adapters))


def _flat(tree):
    return {".".join(str(getattr(k, "key", k)) for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_starts_equal_to_base_and_gradients_reach_every_adapter(adapted):
    name, _, model, _, apply_fn, base, adapters = adapted
    ids, mask = _batch()
    plain = M.from_pretrained(adapted[1] / "hf")
    np.testing.assert_allclose(apply_fn({"base": base, "lora": adapters}, ids, mask), plain(ids, mask), atol=1e-6)

    def loss(a):
        return jnp.mean(apply_fn({"base": base, "lora": a}, ids, mask) ** 2)

    # At init (B = 0) only the B gradients are nonzero; with nonzero B every A gets one too.
    g0 = _flat(jax.grad(loss)(adapters))
    zero_b = [k for k, v in g0.items() if k.endswith("lora_b") and not float(jnp.abs(v).max()) > 0]
    assert not zero_b, f"{name}: LoRA bypassed at {zero_b}"
    g1 = _flat(jax.grad(loss)(_randomize(adapters)))
    zero = [k for k, v in g1.items() if not float(jnp.abs(v).max()) > 0]
    assert not zero, f"{name}: zero LoRA gradient at {zero}"


def test_merged_save_pretrained_and_peft_adapter_match(adapted):
    name, d, model, spec, apply_fn, base, adapters = adapted
    ad = _randomize(adapters, seed=1)
    ids, mask = _batch(1)
    ours = np.asarray(apply_fn({"base": base, "lora": ad}, ids, mask))
    ref_base = _torch_logits(transformers.AutoModelForCausalLM.from_pretrained(d / "hf").eval(), ids, mask)
    assert _rel(ours, ref_base, mask) > 1e-2  # the adapters matter

    merged_dir = d / "merged"
    M.save_pretrained(lora.merged_model(model, base, ad, spec), merged_dir)
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    err = _rel(ours, _torch_logits(merged, ids, mask), mask)
    assert err < 1e-4, (name, "merged", err)

    adapter_dir = lora.save_peft_adapter(model, ad, spec, d / "adapter", base_model_name_or_path=str(d / "hf"))
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(d / "hf").eval()
    pm = peft.PeftModel.from_pretrained(hf_base, adapter_dir).eval()
    err = _rel(ours, _torch_logits(pm, ids, mask), mask)
    assert err < 1e-4, (name, "peft", err)


@pytest.mark.parametrize("targets", [["q", "v"], ["k", "c_proj"]])
def test_gpt2_fused_qkv_subsets_export_to_peft(tmp_path, targets):
    tiny_hf_model("gpt2", tmp_path / "hf")
    model = M.from_pretrained(tmp_path / "hf")
    spec = lora.LoraSpec(rank=2, alpha=3.0, targets=lora.resolve_targets("gpt2", targets))
    lora.attach(model, spec, seed=0)
    apply_fn, base, adapters = lora.split(model)
    ad = _randomize(adapters, seed=2)
    ids, mask = _batch(2)
    ours = np.asarray(apply_fn({"base": base, "lora": ad}, ids, mask))
    lora.save_peft_adapter(model, ad, spec, tmp_path / "adapter")
    pm = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf"),
                                        tmp_path / "adapter").eval()
    assert _rel(ours, _torch_logits(pm, ids, mask), mask) < 1e-4


def test_peft_key_names_and_shapes(tmp_path):
    tiny_hf_model("llama", tmp_path / "hf")
    model = M.from_pretrained(tmp_path / "hf")
    spec = lora.LoraSpec(rank=4, alpha=8, targets=lora.resolve_targets("llama", ["q_proj", "down"]))
    lora.attach(model, spec)
    _, _, adapters = lora.split(model)
    tensors, config = lora.peft_tensors(model, adapters, spec)
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"].shape == (32, 4)
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (4, 64)
    assert len(tensors) == 2 * 2 * 2
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["target_modules"] == ["down_proj", "q_proj"]
    cfg = peft.LoraConfig(**{k: v for k, v in config.items() if k != "peft_type"})
    assert cfg.r == 4 and cfg.lora_alpha == 8


def test_targets_resolution_and_errors():
    assert lora.resolve_targets("llama", ["all"]) == ("q", "k", "v", "o", "gate", "up", "down")
    assert lora.resolve_targets("qwen2", ["v_proj", "q"]) == ("q", "v")
    assert lora.resolve_targets("phi", ["dense", "fc1"]) == ("o", "fc1")
    assert lora.resolve_targets("gpt2", ["c_attn"]) == ("q", "k", "v")
    assert lora.resolve_targets("gpt2", ["c_proj"]) == ("o", "fc2")
    with pytest.raises(ValueError, match=r"'gate' is not a projection of the gpt2 model; valid targets: all, q"):
        lora.resolve_targets("gpt2", ["q", "gate"])
    with pytest.raises(ValueError, match=r"'fc1', 'qproj' are not a projection of the llama model.*down_proj"):
        lora.resolve_targets("llama", ["fc1", "qproj"])
    with pytest.raises(ValueError, match="lora.targets is empty"):
        lora.resolve_targets("llama", [])
    for bad in (dict(rank=0, alpha=1.0), dict(rank=2.5, alpha=1.0), dict(rank=True, alpha=1.0),
                dict(rank=4, alpha=0.0), dict(rank=4, alpha=-1)):
        with pytest.raises(ValueError, match=r"lora\.(rank|alpha)="):
            lora.LoraSpec(targets=("q",), **bad)


def test_bfloat16_base_merged_export_dtype_and_rounding_loss(tmp_path):
    tiny_hf_model("llama", tmp_path / "hf")
    model = M.from_pretrained(tmp_path / "hf", param_dtype=jnp.bfloat16)
    spec = lora.LoraSpec(rank=2, alpha=2.0, targets=lora.resolve_targets("llama", ["q", "down"]))
    lora.attach(model, spec)
    apply_fn, base, adapters = lora.split(model)
    small = _randomize(adapters, seed=3, std=0.01)  # an update far below bfloat16's resolution of W
    ids, mask = _batch(3)
    ours = np.asarray(apply_fn({"base": base, "lora": small}, ids, mask))
    stats = {}
    m32 = lora.merged_model(model, base, small, spec, dtype=jnp.float32, stats=stats)
    assert stats["update_lost"] == 0.0
    assert all(v.dtype == np.float32 for v in _flat(nnx_params(m32)).values())
    np.testing.assert_allclose(np.asarray(m32(ids, mask)), ours, rtol=1e-4, atol=1e-4)
    lora.merged_model(model, base, small, spec, stats=stats)  # base dtype: bfloat16
    assert stats["update_lost"] > 0.5  # most of the tiny update is rounded away (the export warns)


def nnx_params(model):
    from flax import nnx

    return nnx.to_pure_dict(nnx.state(model, nnx.Param))
