"""bfloat16 weights at a rate below their resolution: the run says so and names the fix (issue 24)."""

import jax.numpy as jnp
import numpy as np
import pytest

from ngdiff_jax.training.precision import bf16_rate_warning, frozen_fraction


def test_frozen_fraction_is_what_rounding_does():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(0, 0.02, (64, 64)), jnp.bfloat16)
    for lr in (1e-6, 1e-5, 1e-4, 1e-3):
        # the definition, checked against bfloat16 arithmetic itself: w + lr == w
        stuck = np.asarray((w + jnp.asarray(lr, jnp.bfloat16)) == w) & (np.asarray(w) != 0)
        assert frozen_fraction({"w": w}, lr) == pytest.approx(stuck.mean(), abs=0.01), lr
    assert frozen_fraction({"w": w.astype(jnp.float32)}, 1e-5) is None  # float32 weights: nothing to say


def test_warning_names_the_key_the_value_and_the_fix():
    w = {"w": jnp.full((8, 8), 0.02, jnp.bfloat16), "b": jnp.zeros(8, jnp.bfloat16)}
    line = bf16_rate_warning(w, 1e-5)  # 0.02's half spacing is 2**-14 = 6.1e-5 > 1e-5: every weight stuck
    assert line.startswith("warning: precision.params=bfloat16 with optim.lr=1e-05") and "100%" in line
    assert "precision.params=float32" in line and "\n" not in line
    assert bf16_rate_warning(w, 1e-3) is None  # 1e-3 moves them


def test_gen_on_bfloat16_weights_warns_with_the_fix():
    from ngdiff_jax.training.precision import gen_bf16_warning

    rng = np.random.default_rng(1)
    w = {"w": jnp.asarray(rng.normal(0, 0.02, (32, 32)), jnp.bfloat16)}
    line = gen_bf16_warning(w, 1e-5)
    assert line.startswith("warning: method.rate.type=gen with precision.params=bfloat16 at optim.lr=1e-05")
    assert "precision.params=float32" in line and "\n" not in line
    assert gen_bf16_warning({"w": w["w"].astype(jnp.float32)}, 1e-5) is None  # float32 master weights
    assert gen_bf16_warning(w, 1.0) is None  # a rate every weight resolves
