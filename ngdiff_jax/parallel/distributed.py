"""Multi-process JAX (one process per host, or per GPU) through ``jax.distributed``.

Call :func:`initialize` first thing in every process, before any JAX computation.
Its settings come from a :class:`DistributedConfig` or from the environment:

==============================  ===================================================
``NGDIFF_COORDINATOR_ADDRESS``  ``host:port`` of process 0 (same on every process)
``NGDIFF_NUM_PROCESSES``        number of processes
``NGDIFF_PROCESS_ID``           this process's index, ``0 .. n-1``
``NGDIFF_LOCAL_DEVICE_IDS``     optional, comma-separated local device ids to use
``NGDIFF_DISTRIBUTED=auto``     let JAX detect the cluster (Cloud TPU, SLURM, Open MPI,
                                Kubernetes/JobSet): ``jax.distributed.initialize()``
==============================  ===================================================

With none of these set it is a single-process run and nothing is initialized.
On CPU the cross-process collectives use gloo (``cpu_collectives``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import jax

__all__ = ["DistributedConfig", "initialize", "is_main_process"]

ENV_PREFIX = "NGDIFF_"


@dataclass(frozen=True)
class DistributedConfig:
    """Arguments of ``jax.distributed.initialize``; ``auto`` lets JAX detect them all."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    auto: bool = False
    cpu_collectives: str | None = "gloo"
    initialization_timeout: int = 300

    def __post_init__(self):
        if self.auto:
            return
        given = [
            self.coordinator_address is not None,
            self.num_processes is not None,
            self.process_id is not None,
        ]
        if any(given) and not all(given):
            raise ValueError(
                "distributed config needs coordinator_address, num_processes and process_id together "
                f"(got {self.coordinator_address=}, {self.num_processes=}, {self.process_id=}); "
                "or set auto=True on a cluster JAX detects (TPU, SLURM, Open MPI)."
            )
        if self.num_processes is not None and not (
            0 <= (self.process_id or 0) < self.num_processes
        ):
            raise ValueError(
                f"process_id={self.process_id} is outside 0..{self.num_processes - 1}."
            )

    @property
    def enabled(self) -> bool:
        return self.auto or self.coordinator_address is not None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DistributedConfig:
        env = os.environ if env is None else env

        def get(name):
            v = env.get(ENV_PREFIX + name)
            return v if v not in (None, "") else None

        def as_int(name):
            v = get(name)
            if v is None:
                return None
            try:
                return int(v)
            except ValueError:
                raise ValueError(
                    f"environment variable {ENV_PREFIX + name}={v!r} is not an integer."
                ) from None

        mode = get("DISTRIBUTED")
        if mode not in (None, "auto", "0", "off"):
            raise ValueError(f"{ENV_PREFIX}DISTRIBUTED={mode!r}: use 'auto' or leave it unset.")
        ids = get("LOCAL_DEVICE_IDS")
        return cls(
            coordinator_address=get("COORDINATOR_ADDRESS"),
            num_processes=as_int("NUM_PROCESSES"),
            process_id=as_int("PROCESS_ID"),
            local_device_ids=tuple(int(i) for i in ids.split(",")) if ids else None,
            auto=mode == "auto",
        )


def initialize(config: DistributedConfig | None = None) -> bool:
    """Start ``jax.distributed`` from ``config`` (default: the environment).

    Returns True when this is a multi-process run (initialized now or before), False for a
    single process. Must run before any other JAX call that touches devices.
    """
    if jax.distributed.is_initialized():
        return True
    cfg = config if config is not None else DistributedConfig.from_env()
    if not cfg.enabled:
        return False
    if cfg.cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
    if cfg.auto:
        jax.distributed.initialize(initialization_timeout=cfg.initialization_timeout)
    else:
        jax.distributed.initialize(
            coordinator_address=cfg.coordinator_address,
            num_processes=cfg.num_processes,
            process_id=cfg.process_id,
            local_device_ids=list(cfg.local_device_ids)
            if cfg.local_device_ids is not None
            else None,
            initialization_timeout=cfg.initialization_timeout,
        )
    return True


def is_main_process() -> bool:
    """True on process 0 (the one that writes exports and logs)."""
    return jax.process_index() == 0
