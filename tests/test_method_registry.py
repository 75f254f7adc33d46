"""The typed method registries (`ngdiff_jax.training.method_config`): every registered choice
builds, the YAML loader and ``draccus.decode`` agree, and every misuse is a one-line error that
names the key, the value and the fix."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import draccus
import optax
import pytest

from ngdiff_jax.config_loader import ConfigError, build, load_config, to_dict
from ngdiff_jax.population.members import Member, concrete_configs
from ngdiff_jax.training import OptimConfig, UnlearnConfig, available_methods, load_method, make_optimizer
from ngdiff_jax.training import method_config as mc
from ngdiff_jax.training.methods import forget_objective
from ngdiff_jax.training.objectives import Objective

REGISTRIES = (mc.ForgetObjective, mc.RetainObjective, mc.Combiner, mc.RateRule)


def _cli(*overrides):
    return load_config(UnlearnConfig, None, ["model_path=x", *overrides]).method


@pytest.mark.parametrize("name", available_methods())
def test_every_named_method_round_trips_through_yaml_and_draccus(name):
    m = load_method(name)
    d = to_dict(m)
    assert all(list(d[s])[0] == "type" for s in ("forget", "retain", "combiner", "rate")), d
    assert build(mc.MethodConfig, d, where="method") == m
    assert draccus.decode(mc.MethodConfig, d) == m  # the same registries, read by draccus
    assert draccus.decode(mc.MethodConfig, draccus.encode(m)) == m


@pytest.mark.parametrize("registry", REGISTRIES, ids=lambda r: r.__name__)
def test_every_registered_choice_builds_with_its_defaults(registry):
    names = mc.choice_names(registry)
    assert len(names) == len(set(names)) >= 3
    for name in names:
        choice = registry.get_choice_class(name)()
        assert choice.kind == name
        assert dataclasses.is_dataclass(choice) and choice.__dataclass_params__.frozen
        if registry in (mc.ForgetObjective, mc.RetainObjective):
            built = choice.build()
            assert (built is None) == (name == "none"), name
            assert built is None or isinstance(built, Objective)
        elif registry is mc.Combiner:
            assert isinstance(choice.build(OptimConfig()), optax.GradientTransformation)
        else:
            assert choice.adaptive == (name == "gen")


def test_the_flags_a_pipeline_reads_come_from_the_choices():
    assert load_method("npo").needs_reference and not load_method("ngdiff").needs_reference
    assert load_method("ga_klr").needs_reference  # the retain side's KL
    assert load_method("idk_nll").needs_alternate and not load_method("idk_nll").needs_reference
    assert load_method("rmu").needs_hidden and load_method("rmu").forget.hidden_layer == 7
    assert load_method("ngdiff").probe == "retain" and load_method("gdiff").probe == "retain"
    assert load_method("idk_dpo").idk_path is None and load_method("ngdiff").idk_path is None


def test_overrides_reach_fields_and_a_new_type_starts_from_its_defaults():
    assert _cli("method=npo", "method.forget.beta=0.2").forget == mc.NPO(beta=0.2)
    assert _cli("method=gdiff", "method.combiner.forget_weight=0.5").combiner == mc.GDiff(1.0, 0.5)
    # another type replaces the section: linear's warm-up is not carried into constant
    assert _cli("method=npo", "method.rate.type=constant").rate == mc.ConstantRate(warmup_epochs=0.0)
    assert _cli("method=npo", "method.rate=constant", "method.rate.warmup_epochs=0.5").rate == mc.ConstantRate(0.5)
    assert _cli("method=npo", "method.forget={type: ga}").forget == mc.GA()
    # a choice without settings may be written as its name, inline too
    m = _cli("method={name: c, forget: npo, retain: kl, combiner: pcgrad, rate: cosine}")
    assert (m.forget, m.retain, m.combiner, m.rate) == (mc.NPO(), mc.RetainKL(), mc.PCGrad(), mc.CosineRate())
    # load_method merges section by section (the sweep's overrides)
    assert load_method("simnpo", forget={"beta": 2.0}).forget == mc.SimNPO(beta=2.0, delta=0.0)
    assert load_method("ngdiff", rate="constant").rate == mc.ConstantRate()


@pytest.mark.parametrize("overrides, message", [
    (["method.beta=0.2"], "method.beta=0.2: this key is now method.forget.beta; write method.forget.beta=0.2 ("),
    (["method=rmu", "method.rmu_layer=3"], "this key is now method.forget.layer and method.retain.layer; write "
                                           "method.forget.layer=3 method.retain.layer=3"),
    (["method.lr_rule=constant"], "this key is now method.rate.type; write method.rate.type=constant"),
    (["method.forget.type=npx"], "method.forget.type='npx' is not one of ga, nll, npo, simnpo"),
    (["method.combiner=sgd"], "method.combiner.type='sgd' is not one of ngdiff, gdiff, mgda, pcgrad"),
    (["method.combiner.forget_weight=0.5"], "method.combiner.forget_weight is not a setting of method.combiner."
                                            "type=ngdiff (its settings: none); forget_weight belongs to gdiff: write "
                                            "e.g. method.combiner={type: gdiff, forget_weight: 0.5}"),
    (["method.forget.beta=0.3"], "beta belongs to npo, simnpo, wga, undial, dpo"),
    (["method.forget.zzz=1"], "(its settings: none); drop it"),
    (["method=npo", "method.forget.betta=1"], "method.forget.betta is not a setting of method.forget.type=npo (its "
                                              "settings: beta); did you mean method.forget.beta?"),
    (["method=gdiff", "method.rate.probe=sum"], "method.rate.probe is not a setting of method.rate.type=linear "
                                                "(its settings: warmup_epochs); probe belongs to gen"),
    (["method.rate.probe=x"], "method.rate.probe='x' is not one of 'retain', 'forget', 'sum'"),
    (["method=npo", "method.forget.beta=-1"], "method.forget.beta=-1.0: must be > 0; set e.g. method.forget.beta=0.1"),
    (["method=ceu", "method.forget.ignore_first_n=-1"], "method.forget.ignore_first_n=-1: must be an integer >= 0"),
    (["method=gdiff", "method.combiner.forget_weight=0", "method.combiner.retain_weight=0"], "always zero"),
    (["method=rmu", "method.forget.layer=3"], "method.forget.layer=3 and method.retain.layer=7: RMU steers"),
    (["method=ga", "method.rate=gen"], "method.retain.type=none; set method.rate.probe=forget or a retain loss"),
    (["method.forget={beta: 1}", "method.forget.type=null"], "method.forget has no type; set method.forget.type"),
])  # fmt: skip
def test_misuse_is_one_line_naming_key_value_and_fix(overrides, message):
    with pytest.raises((ConfigError, ValueError)) as e:
        _cli(*overrides)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_population_setting_must_be_a_field_of_the_chosen_type():
    def member(key, value):
        return Member(0, 0, {"optim.lr": 1e-3, key: value})

    m, _ = concrete_configs(load_method("npo"), OptimConfig(), member("method.forget.beta", 0.3))
    assert m.forget == mc.NPO(beta=0.3)
    m, _ = concrete_configs(load_method("gdiff"), OptimConfig(), member("method.combiner.retain_weight", 0.5))
    assert m.combiner == mc.GDiff(0.5, 1.0)
    no_beta = r"settings.method.forget.beta: method.forget.type=ga has no setting 'beta' \(its settings: none\)"
    with pytest.raises(ValueError, match=no_beta):
        concrete_configs(load_method("ngdiff"), OptimConfig(), member("method.forget.beta", 0.3))
    with pytest.raises(ValueError, match="method.forget.beta=-1.0: must be > 0"):  # the field's own check runs
        concrete_configs(load_method("npo"), OptimConfig(), member("method.forget.beta", -1.0))


@pytest.fixture
def scaled_ga():
    """A new forget objective, registered for one test (then removed: the registries are global)."""

    @mc.ForgetObjective.register_subclass("scaled_ga")
    @dataclasses.dataclass(frozen=True)
    class ScaledGA(mc.ForgetObjective):
        needs_reference: ClassVar[bool] = False
        scale: float = 1.0

        def __post_init__(self):
            if not self.scale > 0:
                raise ValueError(f"method.forget.scale={self.scale!r}: must be > 0; set e.g. method.forget.scale=1.")

        def build(self):
            ga = mc.GA().build()
            return Objective(lambda model, params, batch, ref: tuple(
                (self.scale * loss, nll) for loss, nll in [ga.loss(model, params, batch, ref)])[0])

    yield ScaledGA
    del mc.ForgetObjective._choice_registry["scaled_ga"]


def test_adding_a_method_is_one_dataclass_and_one_yaml(scaled_ga, tmp_path):
    f = tmp_path / "scaled.yaml"
    f.write_text("name: scaled\nforget: {type: scaled_ga, scale: 2.0}\nretain: nll\ncombiner: ngdiff\nrate: gen\n")
    m = _cli(f"method={f}")
    assert m.forget == scaled_ga(scale=2.0) and isinstance(forget_objective(m), Objective)
    make_optimizer(m, OptimConfig(), 10)
    assert _cli(f"method={f}", "method.forget.scale=3").forget.scale == 3.0
    with pytest.raises(ValueError, match="method.forget.scale=-1.0: must be > 0"):
        _cli(f"method={f}", "method.forget.scale=-1")


def test_naming_a_sections_own_type_keeps_its_settings_and_override_order_does_not_matter():
    assert _cli("method=npo", "method.rate=linear").rate == mc.LinearRate(warmup_epochs=1.0)
    assert _cli("method=satimp", "method.combiner=gdiff").combiner == mc.GDiff(1.0, 0.1)
    a = _cli("method=npo", "method.rate.warmup_epochs=0.5", "method.rate=constant").rate
    b = _cli("method=npo", "method.rate=constant", "method.rate.warmup_epochs=0.5").rate
    assert a == b == mc.ConstantRate(warmup_epochs=0.5)


def test_a_run_saved_with_the_flat_keys_is_compared_under_the_new_ones():
    """A run started before the typed sections recorded ``method.beta``...: resuming it with another
    beta must be refused, not pass because the old and new keys never meet."""
    from ngdiff_jax.training.checkpoint import flat_settings, settings_diff

    now = flat_settings({"method": to_dict(load_method("npo", forget={"beta": 0.5}))})
    old = {"method.name": "npo", "method.forget_loss": "npo", "method.retain_loss": "nll", "method.combiner": "gdiff",
           "method.lr_rule": "linear", "method.beta": 0.1, "method.warmup_epochs": 1.0, "method.rmu_layer": 7,
           "method.retain_weight": 1.0, "method.forget_weight": 1.0, "method.max_grad_norm": 1.0}  # fmt: skip
    assert settings_diff(old, now) == ["method.forget.beta"]
    assert settings_diff({**old, "method.beta": 0.5}, now) == []
    assert settings_diff({**old, "method.beta": 0.5, "method.combiner": "ngdiff"}, now) == ["method.combiner.type"]


def test_a_population_member_is_checked_whole_not_one_setting_at_a_time():
    base = load_method("gdiff", combiner={"retain_weight": 0.0})
    m = Member(0, 0, {"optim.lr": 1e-3, "method.combiner.forget_weight": 0.0, "method.combiner.retain_weight": 1.0})
    assert concrete_configs(base, OptimConfig(), m)[0].combiner == mc.GDiff(1.0, 0.0)


def test_a_sweep_entry_names_where_its_method_fails(tmp_path):
    from ngdiff_jax.sweep.config import SweepMethod, method_config

    old = tmp_path / "old.yaml"
    old.write_text("name: old\nforget_loss: npo\nbeta: 0.1\n")  # a method file in the flat keys
    with pytest.raises(ConfigError, match=r"^sweep.methods.old: method.forget_loss='npo': this key is now"):
        method_config("old", SweepMethod(method=str(old), overrides={"rate": "constant"}))

    with pytest.raises(ConfigError, match=r"^sweep.methods.fixed.overrides \(merged .*\): method.lr_rule='constant': "
                                          r"this key is now method.rate.type"):  # fmt: skip
        method_config("fixed", SweepMethod(method="ngdiff", overrides={"lr_rule": "constant"}))
    fixed = method_config("fixed", SweepMethod(method="ngdiff", overrides={"rate": "constant"}))
    assert fixed.rate == mc.ConstantRate() and fixed.name == "fixed"
