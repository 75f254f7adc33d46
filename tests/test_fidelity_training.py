"""open-unlearning's trainer settings for the fixed-rate baselines (issue 23).

Each test transcribes what open-unlearning (locuslab/open-unlearning) and the Hugging Face
Trainer it runs on compute, and checks ours against it:

* SimNPO's defaults (``configs/trainer/SimNPO.yaml``: beta 4.5, delta 0, gamma 0.125, alpha 1);
* the warm-up length (``src/trainer/__init__.py``, ``load_trainer_args``: ``warmup_steps =
  int(warmup_epochs * len(dataset) // (batch * accumulation * devices))``, with
  ``warmup_epochs: 1.0`` in ``configs/experiment/unlearn/tofu/default.yaml``) and the rate
  schedule (``transformers.get_linear_schedule_with_warmup``, the Trainer's default);
* clipping the total gradient to norm 1.0 (``TrainingArguments.max_grad_norm``, applied by
  ``torch.nn.utils.clip_grad_norm_`` to the gradient of ``gamma * L_f + alpha * L_r``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ngdiff_jax import optim as O
from ngdiff_jax.optim import TaskGrads
from ngdiff_jax.training import OptimConfig, load_method, make_optimizer
from ngdiff_jax.training.config_schema import MethodConfig, UnlearnConfig
from ngdiff_jax.training.method_config import GA, ConstantRate, GDiff, RetainNLL
from ngdiff_jax.training.methods import learning_rate_schedule, warmup_steps

#: open-unlearning configs/trainer/*.yaml handlers whose runs go through the Trainer's schedule
FIXED_RATE_BASELINES = ("ga", "gdiff", "ga_gdr", "ga_klr", "npo", "npo_gdr", "npo_klr", "simnpo", "idk_dpo",
                        "idk_nll", "rmu", "wga", "satimp", "ceu", "undial")  # fmt: skip


def _hf_linear_with_warmup(step: int, warm: int, total: int) -> float:
    """transformers.optimization._get_linear_schedule_with_warmup_lr_lambda, verbatim."""
    if step < warm:
        return float(step) / float(max(1, warm))
    return max(0.0, float(total - step) / float(max(1, total - warm)))


def _ou_warmup_steps(warmup_epochs, dataset_len, batch_size, grad_accum_steps=1, num_devices=1):
    """open-unlearning src/trainer/__init__.py, load_trainer_args."""
    return int((warmup_epochs * dataset_len) // (batch_size * grad_accum_steps * num_devices))


def _torch_clip(grads: list[np.ndarray], max_norm: float) -> list[np.ndarray]:
    """torch.nn.utils.clip_grad_norm_ (norm_type 2, foreach): total norm of the per-tensor norms,
    clip_coef = max_norm / (total_norm + 1e-6), clamped to 1."""
    total = np.linalg.norm(np.stack([np.linalg.norm(g.astype(np.float64)) for g in grads]))
    coef = min(max_norm / (total + 1e-6), 1.0)
    return [g * coef for g in grads]


def test_simnpo_defaults_are_open_unlearnings():
    m = load_method("simnpo")
    # configs/trainer/SimNPO.yaml: delta 0.0, beta 4.5, alpha 1.0, gamma 0.125, retain NLL
    assert (m.forget.beta, m.forget.delta, m.combiner.retain_weight, m.combiner.forget_weight) == (4.5, 0.0, 1.0, 0.125)
    assert (m.forget.kind, m.retain.kind, m.combiner.kind) == ("simnpo", "nll", "gdiff")


@pytest.mark.parametrize("name", FIXED_RATE_BASELINES)
def test_fixed_rate_baselines_use_the_trainers_schedule_and_clipping(name):
    m = load_method(name)
    assert (m.rate.kind, m.rate.warmup_epochs, m.max_grad_norm) == ("linear", 1.0, 1.0), name


@pytest.mark.parametrize("name", ("ngdiff", "ngdiff_npo"))
def test_gen_methods_keep_the_papers_rule(name):
    m = load_method(name)
    assert (m.rate.kind, m.max_grad_norm) == ("gen", None) and not hasattr(m.rate, "warmup_epochs")


@pytest.mark.parametrize("rows, batch", [(40, 32), (400, 32), (20, 8), (20, 16), (7, 8), (4000, 32)])
def test_warmup_steps_count_one_epoch_as_open_unlearning(rows, batch):
    m = load_method("gdiff")
    assert warmup_steps(m, OptimConfig(), rows / batch) == _ou_warmup_steps(1.0, rows, batch)
    half = load_method("gdiff", rate={"warmup_epochs": 0.5})
    assert warmup_steps(half, OptimConfig(), rows / batch) == _ou_warmup_steps(0.5, rows, batch)


@pytest.mark.parametrize("warm, total", [(2, 20), (1, 5), (12, 125), (0, 10)])
def test_linear_schedule_is_hugging_faces(warm, total):
    lr = 3e-4
    sched = learning_rate_schedule("linear", OptimConfig(lr=lr), total, warm)
    for step in range(total + 2):
        assert float(sched(step)) == pytest.approx(lr * _hf_linear_with_warmup(step, warm, total), rel=1e-6, abs=1e-12)


def test_rates_the_optimizer_applies_follow_the_schedule():
    """The rate recorded by the built optimizer at each of its steps (what the run logs)."""
    m = load_method("gdiff")
    total, rows, batch, lr = 10, 20, 8, 1e-3
    tx = make_optimizer(m, OptimConfig(lr=lr), total, steps_per_epoch=rows / batch)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    g = {"w": jnp.array([0.1, -0.2, 0.3])}
    seen = []
    for _ in range(total):
        _, state = tx.update(TaskGrads(retain=g, forget=g), state, params)
        seen.append(float(O.inject_stats(state)["learning_rate"]))
    warm = _ou_warmup_steps(1.0, rows, batch)
    np.testing.assert_allclose(seen, [lr * _hf_linear_with_warmup(s, warm, total) for s in range(total)], rtol=1e-6)


@pytest.mark.parametrize("scale", [1e-3, 0.3, 1.0, 5.0, 1e4])
def test_total_norm_clipping_is_torchs_on_the_summed_gradient(scale):
    rng = np.random.default_rng(0)
    g_r = {"a": rng.normal(size=(4, 3)).astype(np.float32) * scale, "b": rng.normal(size=5).astype(np.float32)}
    g_f = {"a": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32) * scale}
    # GradDiff's loss gamma * L_f + alpha * L_r: its gradient is the weighted sum (simnpo's weights)
    alpha, gamma = 1.0, 0.125
    summed = [alpha * g_r[k] + gamma * g_f[k] for k in ("a", "b")]
    want = _torch_clip(summed, 1.0)
    tx = optax.chain(O.gdiff(alpha, gamma), O.clip_by_total_norm(1.0))
    grads = TaskGrads(retain=jax.tree.map(jnp.asarray, g_r), forget=jax.tree.map(jnp.asarray, g_f))
    out, _ = tx.update(grads, tx.init(g_r))
    np.testing.assert_allclose(np.asarray(out["a"]), want[0], rtol=2e-6, atol=1e-9)
    np.testing.assert_allclose(np.asarray(out["b"]), want[1], rtol=2e-6, atol=1e-9)


def test_clipping_sits_between_the_combiner_and_adam():
    """With max_grad_norm the optimizer's direction is Adam of the clipped sum: at step 1 Adam's
    update is sign-like, so compare against optax's Adam fed the torch-clipped gradient."""
    m = MethodConfig(name="c", forget=GA(), retain=RetainNLL(), combiner=GDiff(), rate=ConstantRate(),
                     max_grad_norm=0.5)
    tx = make_optimizer(m, OptimConfig(lr=1e-2), 5)
    params = {"w": jnp.zeros(4)}
    g_r, g_f = {"w": jnp.array([3.0, -1.0, 0.5, 2.0])}, {"w": jnp.array([1.0, 1.0, -4.0, 0.0])}
    state = tx.init(params)
    adam = optax.adam(1e-2)
    a_state = adam.init(params)
    for _ in range(3):
        u, state = tx.update(TaskGrads(retain=g_r, forget=g_f), state, params)
        clipped = _torch_clip([np.asarray(g_r["w"] + g_f["w"])], 0.5)[0]
        v, a_state = adam.update({"w": jnp.asarray(clipped)}, a_state, params)
        np.testing.assert_allclose(np.asarray(u["w"]), np.asarray(v["w"]), rtol=1e-5, atol=1e-9)


# clipping under shard_map (the norm summed over the shards): tests/test_optim_compose.py's 8-device script


def test_bad_settings_fail_with_the_fix():
    with pytest.raises(ValueError, match=r"method.rate.warmup_epochs is not a setting of method.rate.type=gen "
                                         r"\(its settings: probe\); warmup_epochs belongs to constant, linear, cosine"):
        load_method("ngdiff", rate={"warmup_epochs": 1.0})
    with pytest.raises(ValueError, match="pass steps_per_epoch="):
        make_optimizer(load_method("gdiff"), OptimConfig(), 10)
    with pytest.raises(ValueError, match="both set a warm-up"):
        make_optimizer(load_method("gdiff"), OptimConfig(warmup_steps=3), 10, steps_per_epoch=2.0)
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        O.clip_by_total_norm(0.0)
    # fine-tuning's keys in an unlearning config were ignored before: now refused with the method key
    with pytest.raises(ValueError, match=r"optim.max_grad_norm=1.0 is fine-tuning's setting.*method.max_grad_norm"):
        UnlearnConfig(model_path="x", optim=OptimConfig(max_grad_norm=1.0))
    with pytest.raises(ValueError, match=r"optim.schedule=linear is fine-tuning's.*method.rate=linear"):
        UnlearnConfig(model_path="x", optim=OptimConfig(schedule="linear"))
