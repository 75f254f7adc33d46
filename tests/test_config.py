"""YAML configs, key=value overrides and schema errors (ngdiff_jax.config_loader, training.config_schema)."""

import pytest

from ngdiff_jax.config_loader import ConfigError, apply_overrides, build, load_config, parse_override
from ngdiff_jax.training.config_schema import FinetuneConfig, MethodConfig, UnlearnConfig
from ngdiff_jax.training.methods import available_methods, load_method


def test_parse_override_values_are_yaml_scalars():
    assert parse_override("optim.lr=1e-4") == (["optim", "lr"], 1e-4)
    assert parse_override("run.steps=50") == (["run", "steps"], 50)
    assert parse_override("run.progress=false") == (["run", "progress"], False)
    assert parse_override("tokenizer=null") == (["tokenizer"], None)
    assert parse_override("data.buckets=[32, 64]") == (["data", "buckets"], [32, 64])
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("optim.lr")


def test_all_named_methods_load():
    names = available_methods()
    for n in ("ga", "gdiff", "npo", "simnpo", "ngdiff", "ngdiff_npo", "mgda", "pcgrad"):
        assert n in names
        m = load_method(n)
        assert m.name == n
    assert load_method("ngdiff").combiner.kind == "ngdiff" and load_method("ngdiff").rate.kind == "gen"
    assert load_method("ga").retain.kind == "none"
    assert load_method("npo").needs_reference and not load_method("ngdiff").needs_reference


def test_unlearn_config_with_overrides(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("model_path: some/model\nmethod: npo\noptim:\n  lr: 1.0e-5\nrun:\n  steps: 10\n")
    cfg = load_config(UnlearnConfig, f, ["method=ngdiff_npo", "run.steps=50", "optim.lr=1e-4",
                                               "method.forget.beta=0.3"])  # fmt: skip
    assert isinstance(cfg.method, MethodConfig)
    assert cfg.method.name == "ngdiff_npo" and cfg.method.forget.beta == 0.3
    assert cfg.run.steps == 50 and cfg.optim.lr == 1e-4
    # default method (ngdiff) when none given; a nested override extends it
    cfg = load_config(UnlearnConfig, None, ["model_path=x", "method.rate.probe=sum"])
    assert cfg.method.name == "ngdiff" and cfg.method.rate.probe == "sum" == cfg.method.probe
    # inline method mapping
    cfg = build(UnlearnConfig, {"model_path": "x", "method": {"_base": None, "forget": "npo", "name": "mine"}})
    assert cfg.method.forget.kind == "npo" and cfg.method.combiner.kind == "ngdiff"


def test_unknown_key_names_it_and_valid_keys():
    with pytest.raises(ConfigError, match=r"'optim.lrr'.*valid keys are: .*\blr\b"):
        load_config(UnlearnConfig, None, ["model_path=x", "optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"'stepz'.*valid keys are"):
        load_config(UnlearnConfig, None, ["model_path=x", "stepz=3"])
    with pytest.raises(ConfigError, match=r"'method.bogus'"):
        load_config(UnlearnConfig, None, ["model_path=x", "method.bogus=1"])


def test_bad_values_and_missing_files():
    with pytest.raises(ConfigError, match="run.steps='many' must be an integer"):
        load_config(UnlearnConfig, None, ["model_path=x", "run.steps=many"])
    with pytest.raises(ConfigError, match="method.combiner.type='sgd' is not one of ngdiff, gdiff, mgda, pcgrad"):
        load_config(UnlearnConfig, None, ["model_path=x", "method.combiner=sgd"])
    pattern = r"config 'nosuch' not found.*configs/methods/nosuch.yaml.*Available.*ngdiff"
    with pytest.raises(FileNotFoundError, match=pattern):
        load_config(UnlearnConfig, None, ["model_path=x", "method=nosuch"])
    with pytest.raises(ValueError, match="unlearn needs `model_path`"):
        load_config(UnlearnConfig, None, [])
    with pytest.raises(ValueError, match="exactly one of `model`"):
        load_config(FinetuneConfig, None, [])
    with pytest.raises(ValueError, match="method.retain.type=none; set method.rate.probe=forget"):
        build(MethodConfig, {"retain": "none", "rate": {"type": "gen", "probe": "retain"}})
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(UnlearnConfig, None, ["model_path"])


def test_apply_overrides_does_not_mutate():
    base = {"a": {"b": 1}}
    out = apply_overrides(base, ["a.b=2", "a.c.d=3"])
    assert base == {"a": {"b": 1}} and out == {"a": {"b": 2, "c": {"d": 3}}}
