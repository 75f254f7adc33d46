"""Device meshes with the axes ``data``, ``fsdp``, ``tensor`` and the presets that pair
a mesh shape with the models' logical-axis rules (``ngdiff_jax.models.sharding``).

Presets:

- ``dp``: pure data parallel. Batches split on ``data``; parameters, gradients and
  optimizer state replicated.
- ``fsdp``: fully sharded data parallel. Batches split on ``(data, fsdp)``; every
  parameter (and so its gradients and Adam moments) split on its ``embed`` dimension
  over ``fsdp``.
- ``fsdp_tensor``: FSDP x tensor parallel. As ``fsdp``, and the ``heads``/``kv``/``mlp``/
  ``vocab`` dimensions split over ``tensor`` (Megatron-style column/row split).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import jax
from jax.sharding import AxisType, Mesh

from ngdiff_jax.models import sharding as shd

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")
PRESET_NAMES: tuple[str, ...] = tuple(shd.PRESETS)

__all__ = ["MESH_AXES", "PRESET_NAMES", "MeshConfig", "make_mesh", "preset_config", "resolve_rules"]


@dataclass(frozen=True)
class MeshConfig:
    """Mesh shape and sharding rules.

    ``data``, ``fsdp``, ``tensor`` are axis sizes; one of them may be ``-1``: all the
    devices the others leave. ``rules`` names a preset of logical -> mesh axis rules
    (``dp``, ``fsdp``, ``fsdp_tensor``) or is a rules tuple like
    ``ngdiff_jax.models.sharding.FSDP``. ``axis_types`` is ``auto`` (XLA's sharding
    propagation places the intermediates; what the models are written for) or
    ``explicit`` (sharding in types: every op's output sharding must be determined).
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    rules: str | tuple[tuple[str, Any], ...] = "fsdp"
    axis_types: Literal["auto", "explicit"] = "auto"

    def __post_init__(self):
        sizes = (self.data, self.fsdp, self.tensor)
        if sum(s == -1 for s in sizes) > 1:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1 (the rest of the devices)."
            )
        for name, s in zip(MESH_AXES, sizes):
            if s == 0 or s < -1:
                raise ValueError(
                    f"mesh axis {name}={s}: sizes are positive, or -1 for the remaining devices."
                )
        if self.axis_types not in ("auto", "explicit"):
            raise ValueError(f"mesh axis_types={self.axis_types!r}: choose 'auto' or 'explicit'.")
        resolve_rules(self.rules)  # validates a preset name

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        """The concrete ``(data, fsdp, tensor)`` sizes for ``num_devices`` devices."""
        sizes = [self.data, self.fsdp, self.tensor]
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(
                    f"mesh {dict(zip(MESH_AXES, sizes))} needs a device count divisible by {known}; "
                    f"there are {num_devices} devices."
                )
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices but {num_devices} are "
                "available; make data*fsdp*tensor equal the device count (or set one axis to -1)."
            )
        return tuple(sizes)  # type: ignore[return-value]


def preset_config(
    name: str, *, tensor: int = 2, axis_types: Literal["auto", "explicit"] = "auto"
) -> MeshConfig:
    """The mesh config of a preset: ``dp`` (data=-1), ``fsdp`` (fsdp=-1),
    ``fsdp_tensor`` (fsdp=-1, tensor=``tensor``), each with its own rules."""
    if name == "dp":
        return MeshConfig(data=-1, fsdp=1, tensor=1, rules="dp", axis_types=axis_types)
    if name == "fsdp":
        return MeshConfig(data=1, fsdp=-1, tensor=1, rules="fsdp", axis_types=axis_types)
    if name == "fsdp_tensor":
        return MeshConfig(
            data=1, fsdp=-1, tensor=tensor, rules="fsdp_tensor", axis_types=axis_types
        )
    raise ValueError(f"unknown mesh preset {name!r}; choose from {', '.join(PRESET_NAMES)}.")


def resolve_rules(rules) -> tuple[tuple[str, Any], ...]:
    """A preset name or rules tuple -> the rules tuple."""
    if isinstance(rules, str):
        if rules not in shd.PRESETS:
            raise ValueError(
                f"unknown sharding rules {rules!r}; choose from {', '.join(shd.PRESETS)}."
            )
        return shd.PRESETS[rules]
    if rules is None:
        return shd.FSDP
    out = tuple(tuple(r) for r in rules)
    for r in out:
        if len(r) != 2 or not isinstance(r[0], str):
            raise ValueError(f"sharding rule {r!r} is not a (logical name, mesh axes) pair.")
    return out  # type: ignore[return-value]


def make_mesh(
    config: MeshConfig | str | None = None, *, devices: Sequence[Any] | None = None, **overrides
) -> Mesh:
    """A ``jax.sharding.Mesh`` with axes ``(data, fsdp, tensor)`` over ``devices``
    (default: all devices of all processes).

    ``config`` is a :class:`MeshConfig`, a preset name, or None (the ``fsdp`` preset);
    keyword ``overrides`` replace its fields (``make_mesh("fsdp_tensor", tensor=4)``).
    """
    if config is None:
        config = preset_config("fsdp")
    elif isinstance(config, str):
        config = preset_config(config)
    if overrides:
        config = dataclasses.replace(config, **overrides)
    devs = list(devices) if devices is not None else jax.devices()
    shape = config.shape(len(devs))
    kind = AxisType.Explicit if config.axis_types == "explicit" else AxisType.Auto
    return jax.make_mesh(shape, MESH_AXES, axis_types=(kind,) * 3, devices=devs)
