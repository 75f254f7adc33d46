"""Bad input: unsupported families, missing/unexpected/misshaped tensors, unreadable files."""

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")

from ngdiff_jax import models as M  # noqa: E402
from ngdiff_jax.models.safetensors_io import SafetensorsFile, write_safetensors  # noqa: E402
from ngdiff_jax.models.testing import tiny_hf_model  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt") / "llama"
    tiny_hf_model("llama", d)
    return d


def _rewrite(src, dst, edit):
    """Copy checkpoint ``src`` to ``dst`` with ``edit(dict name -> array)`` applied to its tensors."""
    shutil.copytree(src, dst)
    f = SafetensorsFile(src / "model.safetensors")
    tensors = {k: f.read(k) for k in f.keys()}
    edit(tensors)
    write_safetensors(dst / "model.safetensors",
                      [(k, v.shape, v.dtype, lambda v=v: v) for k, v in tensors.items()])
    return dst


def test_unsupported_model_type_lists_supported(ckpt, tmp_path):
    d = shutil.copytree(ckpt, tmp_path / "x")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "falcon"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"falcon.*llama, mistral, qwen2, phi, gpt2"):
        M.from_pretrained(d)
    with pytest.raises(ValueError, match="unsupported model_type"):
        M.ModelConfig.from_hf({"model_type": "bert"})


def test_missing_tensor_is_named(ckpt, tmp_path):
    d = _rewrite(ckpt, tmp_path / "m", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        M.from_pretrained(d)


def test_unexpected_tensor_is_named(ckpt, tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.q_proj.bias"] = np.zeros(32, np.float32)
    d = _rewrite(ckpt, tmp_path / "u", edit)
    with pytest.raises(KeyError, match=r"model\.layers\.0\.self_attn\.q_proj\.bias"):
        M.from_pretrained(d)


def test_misshaped_tensor_is_named(ckpt, tmp_path):
    def edit(t):
        t["model.norm.weight"] = np.ones(31, np.float32)
    d = _rewrite(ckpt, tmp_path / "s", edit)
    with pytest.raises(ValueError, match=r"model\.norm\.weight: expected \(32,\), found \(31,\)"):
        M.from_pretrained(d)


def test_unreadable_files_are_named(ckpt, tmp_path):
    d = shutil.copytree(ckpt, tmp_path / "c")
    (d / "model.safetensors").write_bytes(b"\x05\x00garbage")
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        M.from_pretrained(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors"):
        M.from_pretrained(d)
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        M.from_pretrained(d)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        M.from_pretrained(tmp_path / "nowhere")
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json"):
        M.from_pretrained(d)


def test_generate_rejects_right_padding(ckpt):
    model = M.from_pretrained(ckpt)
    ids = np.ones((2, 4), np.int32)
    mask = np.ones_like(ids)
    mask[1, -1] = 0
    with pytest.raises(ValueError, match="left-padded"):
        M.generate(model, ids, mask, max_new_tokens=2, eos_token_id=2, pad_token_id=0)
