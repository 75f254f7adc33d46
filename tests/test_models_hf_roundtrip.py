"""The Hugging Face round trip keeps ``generation_config.json`` (multi-EOS stop tokens, pad) and
writes a model card."""

from __future__ import annotations

import json

import pytest

from ngdiff_jax import models
from ngdiff_jax.models.testing import tiny_hf_model


@pytest.fixture(scope="module")
def multi_eos_dir(tmp_path_factory):
    import transformers

    d = tmp_path_factory.mktemp("multi_eos")
    tiny_hf_model("llama_tied", d)
    transformers.GenerationConfig(eos_token_id=[2, 7], pad_token_id=0, bos_token_id=1).save_pretrained(str(d))
    return d


def test_generation_config_round_trip(multi_eos_dir, tmp_path):
    import transformers

    model = models.from_pretrained(multi_eos_dir)
    assert model.config.eos_token_id == 2  # config.json
    assert model.config.eos_ids == (2, 7)  # generation_config.json wins, as in transformers' generate
    assert model.config.pad_id == 0
    out = tmp_path / "export"
    models.save_pretrained(model, out, card={"base_model": "org/tiny", "method": "ngdiff",
                                             "data": {"forget": "forget10"}, "metrics": {"forget_quality": 0.5}})
    gen = transformers.GenerationConfig.from_pretrained(str(out))
    assert gen.eos_token_id == [2, 7] and gen.pad_token_id == 0
    assert models.from_pretrained(out).config.eos_ids == (2, 7)
    card = (out / "README.md").read_text()
    for text in ("base_model: org/tiny", "**Base model:** org/tiny", "**Method:** ngdiff", "forget=forget10",
                 "| forget_quality | 0.5 |", "**Stop tokens:** [2, 7]"):
        assert text in card


def test_generation_config_from_model_config(tmp_path):
    d = tmp_path / "plain"
    tiny_hf_model("llama", d)
    (d / "generation_config.json").unlink(missing_ok=True)
    model = models.from_pretrained(d)
    models.save_pretrained(model, tmp_path / "out")
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["pad_token_id"] == 0 and gen["bos_token_id"] == 1
    assert (tmp_path / "out" / "README.md").exists()


def test_bad_generation_config_names_the_file(tmp_path):
    d = tmp_path / "bad"
    tiny_hf_model("llama", d)
    (d / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="generation_config.json.*fix or delete"):
        models.from_pretrained(d)
