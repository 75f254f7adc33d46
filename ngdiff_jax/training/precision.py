"""Precision and device set-up shared by ``finetune`` and ``unlearn``.

- :func:`with_moment_dtype`: an optax transformation whose parameter-shaped floating state
  (Adam's moments) is stored in a chosen dtype, whatever the parameters' dtype.
- :func:`run_mesh`: the device mesh of a run. ``mesh.preset: none`` is a one-device mesh, so
  a single device and a pod slice go through the same jitted, sharded step, loop, checkpoints
  and export.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

__all__ = ["bf16_rate_warning", "frozen_fraction", "gen_bf16_warning", "run_mesh", "with_moment_dtype"]


def _floating(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def with_moment_dtype(tx, dtype):
    """``tx`` with its optimizer state initialized from the parameters cast to ``dtype`` (so
    moment estimates are stored in ``dtype``) and every state leaf kept in its initial dtype
    after an update. Updates are computed in the promoted dtype; ``optax.apply_updates`` casts
    them to each parameter's dtype."""
    dtype = jnp.dtype(dtype)
    extra = isinstance(tx, optax.GradientTransformationExtraArgs)

    def init_fn(params):
        return tx.init(jax.tree.map(lambda p: p.astype(dtype) if _floating(p) else p, params))

    def update_fn(updates, state, params=None, **extra_args):
        new_updates, new_state = tx.update(updates, state, params, **extra_args)
        new_state = jax.tree.map(lambda n, o: n.astype(jnp.result_type(o)), new_state, state)
        return new_updates, new_state

    if extra:
        return optax.GradientTransformationExtraArgs(init_fn, update_fn)
    return optax.GradientTransformation(init_fn, lambda u, s, p=None: update_fn(u, s, p))


def run_mesh(mesh_section, distributed_section):
    """``(mesh, rules, main_process)`` for a run: the configured mesh (after
    ``jax.distributed`` is initialized), or a one-device mesh for ``mesh.preset: none``."""
    from ngdiff_jax import parallel as par

    if mesh_section.enabled:
        par.initialize(distributed_section.distributed_config())  # before anything touches devices
        mesh_cfg = mesh_section.mesh_config()
        return par.make_mesh(mesh_cfg), mesh_cfg.rules, par.is_main_process()
    mesh_cfg = par.MeshConfig(data=1, fsdp=1, tensor=1, rules="fsdp")
    return par.make_mesh(mesh_cfg, devices=jax.local_devices()[:1]), mesh_cfg.rules, True


def frozen_fraction(params, lr: float) -> float | None:
    """The fraction of the nonzero bfloat16 weights that an update of size ``lr`` leaves unchanged:
    ``w + u`` rounds back to ``w`` when ``|u|`` is at most half of ``w``'s spacing,
    ``2**(floor(log2|w|) - 8)`` (bfloat16 keeps 8 significant bits). None without bfloat16 weights.
    Adam's update of a coordinate is about ``lr`` in size, so this is the share of the weights
    its steps cannot move."""
    leaves = [x for x in jax.tree.leaves(params) if hasattr(x, "dtype") and x.dtype == jnp.bfloat16]
    if not leaves:
        return None
    counts = [_frozen_and_nonzero(x, jnp.float32(lr)) for x in leaves]  # fused reductions, no full-size copies
    frozen, total = (sum(int(c[i]) for c in counts) for i in (0, 1))
    return frozen / total if total else None


def gen_bf16_warning(params, lr: float, *, threshold: float = 0.1) -> str | None:
    """One warning line when GeN would probe bfloat16 weights: its probe points ``w + t * lr * d``
    round back to ``w`` for :func:`frozen_fraction` of them (>= ``threshold``), so the losses it
    fits its parabola to barely differ and the fitted rate is unreliable; None otherwise."""
    frac = frozen_fraction(params, float(lr))
    if frac is None or frac < threshold:
        return None
    return (f"warning: method.rate.type=gen with precision.params=bfloat16 at optim.lr={float(lr):g}: GeN's probe "
            f"points round back to the current weights for {frac:.0%} of them, so the rate it fits is unreliable; "
            "set precision.params=float32 (float32 master weights; precision.compute=bfloat16 keeps the speed).")


@jax.jit
def _frozen_and_nonzero(x, lr):
    a = jnp.abs(x.astype(jnp.float32))
    nz = a > 0
    half_spacing = jnp.exp2(jnp.floor(jnp.log2(jnp.where(nz, a, 1.0))) - 8.0)
    return jnp.sum(nz & (lr <= half_spacing)), jnp.sum(nz)


def bf16_rate_warning(params, lr: float, *, threshold: float = 0.5) -> str | None:
    """One warning line when bfloat16 weights at rate ``lr`` would mostly not move
    (:func:`frozen_fraction` >= ``threshold``), naming the fix; None otherwise."""
    frac = frozen_fraction(params, float(lr))
    if frac is None or frac < threshold:
        return None
    return (f"warning: precision.params=bfloat16 with optim.lr={float(lr):g}: an update of that size rounds away "
            f"for {frac:.0%} of the weights (bfloat16 keeps 8 significant bits), so the run changes the model "
            "less than its rate says; set precision.params=float32 (float32 master weights; precision.compute="
            "bfloat16 keeps the speed) or raise optim.lr.")  # fmt: skip
