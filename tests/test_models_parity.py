"""Parity with transformers (PyTorch) for every family: load, forward, save, greedy generate."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from ngdiff_jax import models as M  # noqa: E402
from ngdiff_jax.models.testing import TINY_CONFIGS, tiny_hf_model  # noqa: E402

FAMILIES = list(TINY_CONFIGS)
RTOL = 1e-4


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
    """float32 matmuls at full precision: on a GPU JAX's default (TF32, or bf16 passes on TPU)
    would miss RTOL by orders of magnitude; on CPU this changes nothing."""
    import jax

    with jax.default_matmul_precision("highest"):
        yield


def _batch(seed=0, B=3, T=10, V=128):
    rs = np.random.RandomState(seed)
    ids = rs.randint(3, V, (B, T)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0  # right padding (training/scoring layout)
    mask[2, 4:] = 0
    return ids, mask


def _torch_logits(tm, ids, mask):
    with torch.no_grad():
        return tm(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.float().numpy()


def _rel(ours, ref, mask):
    v = mask.astype(bool)
    return float(np.abs(np.asarray(ours)[v] - ref[v]).max() / np.abs(ref[v]).max())


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    tm = tiny_hf_model(request.param, d / "hf")
    model = M.from_pretrained(d / "hf")
    return request.param, tm, model, d


def test_logits_match_transformers(fam):
    name, tm, model, _ = fam
    ids, mask = _batch()
    ref = _torch_logits(tm, ids, mask)
    ours = model(jnp.asarray(ids), jnp.asarray(mask))
    assert ours.shape == ref.shape and ours.dtype == jnp.float32
    err = _rel(ours, ref, mask)
    print(f"{name}: logits max rel err {err:.2e}")
    assert err < RTOL, (name, err)


def test_save_pretrained_roundtrip_transformers(fam):
    name, tm, model, d = fam
    out = d / "ours"
    M.save_pretrained(model, out, max_shard_size=20_000)  # forces several shards
    assert (out / "model.safetensors.index.json").exists()
    tm2 = transformers.AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    ids, mask = _batch(1)
    ref = _torch_logits(tm, ids, mask)
    assert _rel(_torch_logits(tm2, ids, mask), ref, mask) < 1e-6
    again = M.from_pretrained(out)
    np.testing.assert_array_equal(np.asarray(again(ids, mask)), np.asarray(model(ids, mask)))


def _hf_generate(tm, ids, mask, n, eos, pad):
    with torch.no_grad():
        g = tm.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                        max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    g = g[:, ids.shape[1]:].numpy()
    out = np.full((ids.shape[0], n), pad, np.int64)
    out[:, : g.shape[1]] = g
    return out


def test_greedy_generate_matches_transformers(fam):
    name, tm, model, _ = fam
    rs = np.random.RandomState(2)
    B, P, N, pad = 4, 7, 10, 0
    ids = rs.randint(3, 128, (B, P)).astype(np.int32)
    mask = np.ones_like(ids)
    for b, npad in enumerate([0, 3, 1, 5]):  # left padding
        ids[b, :npad], mask[b, :npad] = pad, 0
    # First without a reachable EOS, then make a token the model emits early in row 0 the EOS.
    free = _hf_generate(tm, ids, mask, N, eos=127, pad=pad)
    eos = int(free[0, 2])
    ref = _hf_generate(tm, ids, mask, N, eos=eos, pad=pad)
    ours = M.generate(model, ids, mask, max_new_tokens=N, eos_token_id=eos, pad_token_id=pad)
    assert ours.shape == (B, N)
    np.testing.assert_array_equal(ours, ref, err_msg=name)
    assert (ref == eos).any(axis=1).any() and (ref[:, -1] == pad).any(), "test should stop some rows at EOS"
    # a list of eos ids is accepted (same compiled program: same bucket, same eos set)
    ours2 = M.generate(model, ids, mask, max_new_tokens=N, eos_token_id=[eos], pad_token_id=pad)
    np.testing.assert_array_equal(ours2, ref)


def test_hidden_state_matches_transformers_hidden_states(fam):
    # hidden_states[i + 1] of transformers is the output of block i (before the final norm for i < n-1)
    name, tm, model, _ = fam
    if name != "llama":
        pytest.skip("one family is enough: the block loop is shared")
    ids, mask = _batch()
    with torch.no_grad():
        hs = tm(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask), output_hidden_states=True)
    n = model.config.num_layers
    assert n >= 2
    apply_fn, params = M.functional(model)
    for layer in range(n - 1):
        ref = hs.hidden_states[layer + 1].float().numpy()
        ours = model.hidden_state(jnp.asarray(ids), jnp.asarray(mask), layer=layer)
        assert _rel(ours, ref, mask) < RTOL, layer
        np.testing.assert_allclose(
            apply_fn.hidden_state(params, ids, mask, layer=layer - n), ours, rtol=1e-6, atol=1e-6
        )
    with pytest.raises(ValueError, match="out of range"):
        model.hidden_state(jnp.asarray(ids), jnp.asarray(mask), layer=n)
