"""Scale-out: device meshes (``data``, ``fsdp``, ``tensor``), sharding rules, the unlearning
step jitted over a mesh, memory estimates, ``jax.distributed`` and sharded I/O.

Everything is JAX's own SPMD: ``jax.jit`` with input/output shardings over a mesh; XLA
inserts the collectives. See docs/SCALING.md.
"""

from ngdiff_jax.parallel.distributed import DistributedConfig, initialize, is_main_process
from ngdiff_jax.parallel.io import (
    abstract_state,
    gather_to_host,
    load_sharded,
    restore_sharded,
    save_pretrained_gathered,
    save_sharded,
)
from ngdiff_jax.parallel.memory import (
    CompiledMemory,
    MemoryEstimate,
    compiled_memory,
    estimate_for_model,
    estimate_memory,
)
from ngdiff_jax.parallel.mesh import (
    MESH_AXES,
    PRESET_NAMES,
    MeshConfig,
    make_mesh,
    preset_config,
    resolve_rules,
)
from ngdiff_jax.parallel.shardings import (
    batch_axes,
    batch_sharding,
    opt_state_shardings,
    param_shardings,
    place,
    replicated,
    shard_batch,
    sharding_report,
)
from ngdiff_jax.parallel.step import ShardedStep, shard_unlearn_step

__all__ = [
    "MESH_AXES",
    "PRESET_NAMES",
    "CompiledMemory",
    "DistributedConfig",
    "MemoryEstimate",
    "MeshConfig",
    "ShardedStep",
    "abstract_state",
    "batch_axes",
    "batch_sharding",
    "compiled_memory",
    "estimate_for_model",
    "estimate_memory",
    "gather_to_host",
    "initialize",
    "is_main_process",
    "load_sharded",
    "make_mesh",
    "opt_state_shardings",
    "param_shardings",
    "place",
    "preset_config",
    "replicated",
    "resolve_rules",
    "restore_sharded",
    "save_pretrained_gathered",
    "save_sharded",
    "shard_batch",
    "shard_unlearn_step",
    "sharding_report",
]
