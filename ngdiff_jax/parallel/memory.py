"""Per-device memory: an estimate from shapes and shardings, and XLA's own numbers.

:func:`estimate_memory` adds up, per device, the bytes of the parameter shards, two
gradient trees (forget and retain task, sharded like the parameters), the optimizer
state shards and (for NPO/KL methods) the frozen reference model. It needs only
shapes, so it also works on ``jax.eval_shape`` outputs for a model that does not fit
(:func:`estimate_for_model`). :func:`compiled_memory` reads the compiled step's
``memory_analysis()`` (arguments, outputs, aliased donations, temporaries).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

__all__ = [
    "CompiledMemory",
    "MemoryEstimate",
    "compiled_memory",
    "estimate_for_model",
    "estimate_memory",
    "shard_bytes",
    "tree_shard_bytes",
]


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def shard_bytes(x, sharding: NamedSharding) -> int:
    """Bytes of one device's shard of ``x`` (array or ShapeDtypeStruct) under ``sharding``."""
    shape = tuple(np.shape(x)) if not hasattr(x, "shape") else tuple(x.shape)
    dims = list(shape)
    for i, entry in enumerate(tuple(sharding.spec)[: len(dims)]):
        n = math.prod(sharding.mesh.shape[a] for a in _axes(entry))
        dims[i] = -(-dims[i] // n)
    return int(math.prod(dims)) * np.dtype(x.dtype).itemsize


def tree_shard_bytes(tree, shardings) -> int:
    """Per-device bytes of a pytree under a matching pytree of shardings."""
    return int(
        sum(
            shard_bytes(x, s)
            for x, s in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings))
        )
    )


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**27 else f"{n / 2**20:.3f} MiB"


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-device bytes of the step's persistent trees on ``mesh_shape``."""

    mesh_shape: dict[str, int]
    params: int
    grads: int  # both task gradients
    opt_state: int
    reference: int
    total_params: int  # unsharded parameter bytes, for scale

    @property
    def total(self) -> int:
        return self.params + self.grads + self.opt_state + self.reference

    def format(self) -> str:
        mesh = " x ".join(f"{k}={v}" for k, v in self.mesh_shape.items())
        return (
            f"per-device memory estimate on mesh {mesh} (model {_gib(self.total_params)} unsharded):\n"
            f"  parameters       {_gib(self.params)}\n"
            f"  {round(self.grads / self.params) if self.params else 2} gradient trees {_gib(self.grads)}\n"
            f"  optimizer state  {_gib(self.opt_state)}\n"
            f"  reference model  {_gib(self.reference)}\n"
            f"  total            {_gib(self.total)} (+ activations and temporaries)"
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}


def estimate_memory(
    params, opt_state, p_shardings, o_shardings, *, reference: bool = False, grads: int = 2
) -> MemoryEstimate:
    """Per-device bytes for parameters, ``grads`` gradient trees (2 for unlearning: forget and
    retain task), optimizer state and (if ``reference``) the reference model, from
    shapes/dtypes and shardings."""
    p = tree_shard_bytes(params, p_shardings)
    mesh = jax.tree_util.tree_leaves(p_shardings)[0].mesh
    total = int(
        sum(
            math.prod(x.shape) * np.dtype(x.dtype).itemsize
            for x in jax.tree_util.tree_leaves(params)
        )
    )
    return MemoryEstimate(
        mesh_shape=dict(mesh.shape),
        params=p,
        grads=grads * p,
        opt_state=tree_shard_bytes(opt_state, o_shardings),
        reference=p if reference else 0,
        total_params=total,
    )


def estimate_for_model(
    model_config, tx, mesh, rules, *, reference: bool = False, param_dtype=None
) -> MemoryEstimate:
    """:func:`estimate_memory` for a model config without allocating it (``eval_shape``).

    ``mesh`` may be a ``jax.sharding.AbstractMesh`` (e.g. a 64-chip slice described on a
    laptop); ``tx`` is the optax chain (its state shapes come from ``eval_shape(tx.init)``).
    """
    import jax.numpy as jnp
    from flax import nnx

    from ngdiff_jax.models import CausalLM, ModelConfig
    from ngdiff_jax.parallel.shardings import opt_state_shardings, param_shardings

    dt = param_dtype or jnp.float32
    cfg = ModelConfig.from_hf(model_config)
    abstract = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0), dtype=dt, param_dtype=dt))
    params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    opt = jax.eval_shape(tx.init, params)
    p_sh = param_shardings(params, mesh, rules)
    o_sh = opt_state_shardings(opt, params, p_sh, mesh)
    return estimate_memory(params, opt, p_sh, o_sh, reference=reference)


@dataclass(frozen=True)
class CompiledMemory:
    """``memory_analysis()`` of a compiled program, bytes per device."""

    argument: int
    output: int
    alias: int
    temp: int
    generated_code: int

    @property
    def peak(self) -> int:
        """Arguments + outputs not aliased to (donated) arguments + temporaries."""
        return self.argument + self.output - self.alias + self.temp

    def format(self) -> str:
        return (
            f"compiled step per device: arguments {_gib(self.argument)}, outputs {_gib(self.output)} "
            f"(aliased {_gib(self.alias)}), temporaries {_gib(self.temp)}, peak {_gib(self.peak)}"
        )


def compiled_memory(compiled) -> CompiledMemory:
    """Read ``compiled.memory_analysis()`` (``jitted.lower(...).compile()``)."""
    m = compiled.memory_analysis()
    if m is None:
        raise RuntimeError("this backend gives no memory analysis for compiled programs.")
    return CompiledMemory(
        argument=int(m.argument_size_in_bytes),
        output=int(m.output_size_in_bytes),
        alias=int(m.alias_size_in_bytes),
        temp=int(m.temp_size_in_bytes),
        generated_code=int(m.generated_code_size_in_bytes),
    )
