"""The two-task unlearning step jitted over a device mesh.

:func:`shard_unlearn_step` wraps a step from ``ngdiff_jax.training.make_unlearn_step``
(``step(params, opt_state, forget_batch, retain_batch, rng, ref_params=None)``) in
``jax.jit`` with explicit input and output shardings: parameters (and the reference
model) per the rules, optimizer state mirroring them, batches split over the batch
axes, RNG and metrics replicated. XLA's SPMD partitioner inserts the collectives, so
the global gradient norms of NGDiff (and GeN's probes) are computed over all shards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from ngdiff_jax.backends import Backend, for_platform
from ngdiff_jax.parallel.memory import (
    CompiledMemory,
    MemoryEstimate,
    compiled_memory,
    estimate_memory,
)
from ngdiff_jax.parallel.mesh import resolve_rules
from ngdiff_jax.parallel.shardings import (
    batch_sharding,
    opt_state_shardings,
    param_shardings,
    place,
    replicated,
    shard_batch,
    sharding_report,
)

log = logging.getLogger(__name__)

__all__ = ["ShardedStep", "shard_unlearn_step"]


@dataclass
class ShardedStep:
    """A jitted step with its shardings. Call it like the wrapped step
    (``step(params, opt_state, *batches, rng[, ref_params])`` with ``num_batches`` batches);
    inputs that are not yet on their shardings (host arrays, single-device arrays) are
    placed first."""

    fn: Any  # the jitted function
    mesh: Mesh
    rules: tuple
    param_shardings: Any
    opt_state_shardings: Any
    batch_sharding: NamedSharding
    with_reference: bool
    memory: MemoryEstimate
    report: dict[str, list[str]]
    num_batches: int = 2
    frozen_shardings: tuple = ()  # shardings of the trailing frozen arguments (e.g. a LoRA base)
    bits_params: bool = False  # bfloat16 parameters cross the jit boundary as their bits (see below)
    backend: Backend = field(default_factory=for_platform, repr=False)  # host-side hooks
    _compiled: set = field(default_factory=set, repr=False)  # batch shapes compiled so far

    def place_state(self, params, opt_state, ref_params=None):
        """``(params, opt_state[, ref_params])`` on their shardings, no two leaves sharing a buffer
        (so params and optimizer state can be donated)."""
        trees = (params, opt_state) + ((ref_params,) if ref_params is not None else ())
        shs = (self.param_shardings, self.opt_state_shardings) + (
            (self.param_shardings,) if ref_params is not None else ()
        )
        return place(trees, shs)

    def place_batch(self, batch):
        return shard_batch(batch, self.batch_sharding)

    def _args(self, params, opt_state, *rest):
        n, f = self.num_batches, len(self.frozen_shardings)
        if f:
            rest, frozen = rest[:-f], rest[-f:]
        else:
            frozen = ()
        if len(rest) not in (n + 1, n + 2):
            raise TypeError(
                f"this sharded step takes params, opt_state, {n} batch(es), rng[, ref_params]"
                + (f", {f} frozen argument(s)." if f else ".")
            )
        batches, rng = rest[:n], rest[n]
        ref_params = rest[n + 1] if len(rest) == n + 2 else None
        if (ref_params is not None) != self.with_reference:
            raise ValueError(
                "this sharded step was built "
                + ("with" if self.with_reference else "without")
                + " a reference model; pass ref_params "
                + ("" if self.with_reference else "only ")
                + "when shard_unlearn_step got ref_params."
            )
        args = (
            place(params, self.param_shardings),
            place(opt_state, self.opt_state_shardings),
            *(self.place_batch(b) for b in batches),
            place(rng, replicated(self.mesh)),
        )
        if ref_params is not None:
            args += (place(ref_params, self.param_shardings),)
        return args + tuple(place(x, s) for x, s in zip(frozen, self.frozen_shardings))

    def __call__(self, params, opt_state, *rest):
        args = self._args(params, opt_state, *rest)
        if self.bits_params:
            args = (_encode(self.backend, args[0]), *args[1:])
        shapes = tuple((x.shape, str(x.dtype)) for x in jax.tree_util.tree_leaves(args[2:2 + self.num_batches]))
        if shapes not in self._compiled:
            # Compile first (the call below finds it in jax's cache), then hand the compiler's
            # freed memory back before the step allocates its own (the backend's hook,
            # `Backend.release_host_memory`).
            self.backend.release_host_memory()  # what loading and converting the weights freed
            self.fn.lower(*args).compile()
            self.backend.release_host_memory()
            self._compiled.add(shapes)
        # What the last step and the host freed between steps (the backend's hook; see
        # ngdiff_jax.backends.cpu.host_memory for what it saves on CPU).
        self.backend.release_host_memory()
        out = self.fn(*args)
        return (_decode(self.backend, out[0]), *out[1:]) if self.bits_params else out

    def loop_step(self, params, opt_state, batches, rng, *extra):
        """The calling convention of ``ngdiff_jax.training.run_loop`` (``batches`` a tuple;
        ``extra`` is ``(ref_params or None, *frozen)``, or ``(*frozen,)``)."""
        extra = tuple(x for x in extra if x is not None)
        return self(params, opt_state, *batches, rng, *extra)

    def lower(self, params, opt_state, *rest):
        args = self._args(params, opt_state, *rest)
        if self.bits_params:
            args = (jax.tree_util.tree_map(partial(_carried_struct, self.backend), args[0]), *args[1:])
        return self.fn.lower(*args)

    def compiled_memory(self, *args, **kwargs) -> CompiledMemory:
        """XLA's per-device memory numbers for the step compiled on these arguments."""
        return compiled_memory(self.lower(*args, **kwargs).compile())


def shard_unlearn_step(
    step_fn: Callable,
    mesh: Mesh,
    rules,
    params,
    opt_state,
    *,
    ref_params=None,
    donate: bool = True,
    strict: bool = False,
    print_memory: bool = False,
    num_batches: int = 2,
    frozen: tuple = (),
    shardings=None,
    backend: Backend | None = None,
) -> ShardedStep:
    """Jit ``step_fn`` over ``mesh`` with shardings from ``rules`` (preset name or tuple).

    ``params``/``opt_state`` (arrays or ``ShapeDtypeStruct``s) fix the trees and shapes;
    ``ref_params`` (or any non-None placeholder of the params' shapes) makes the step take
    a reference model, sharded like the parameters. With ``donate`` the params and
    optimizer-state buffers are reused for the outputs (keep no other reference to them).
    ``num_batches`` is the number of batch arguments (2 for unlearning: forget, retain;
    1 for :func:`ngdiff_jax.training.make_finetune_step`). ``frozen`` are trailing arguments
    after ``ref_params`` that are neither donated nor differentiated (a LoRA run's base model):
    they keep the shardings they already have. ``shardings`` overrides the parameters'
    shardings (a tree like ``params``; e.g. replicated LoRA adapters, which have no rules).

    Parameters whose rule asks for a mesh axis that does not divide their size are
    replicated on that dimension: they are logged as a warning, or with ``strict`` raise.
    ``print_memory`` prints the per-device memory estimate (also in ``.memory``).

    ``backend`` (default the platform's, `ngdiff_jax.backends`) supplies the host-side hooks; with
    its ``bits_params`` (the CPU backend's) and ``donate``, the bfloat16 parameters enter and leave
    the jitted step as the backend carries them (`Backend.carry`), converted in place (donated)
    around each call; the step itself sees bfloat16 (see `ngdiff_jax.backends.cpu.ordering` for
    what that saves on CPU).
    """
    _require_auto_axes(mesh)
    rules = resolve_rules(rules)
    p_sh = param_shardings(params, mesh, rules) if shardings is None else shardings
    o_sh = opt_state_shardings(opt_state, params, p_sh, mesh)
    b_sh = batch_sharding(mesh, rules)
    rep = replicated(mesh)
    if shardings is None:
        report = sharding_report(params, mesh, rules)
    else:
        report = {"fallback": [], "sharded": [], "replicated": []}
    f_sh = tuple(jax.tree_util.tree_map(lambda x: x.sharding, t) for t in frozen)
    if report["fallback"]:
        msg = (
            "these parameter dimensions cannot be split as the rules ask (size not divisible by the mesh "
            "axes) and are replicated: " + "; ".join(report["fallback"])
        )
        if strict:
            raise ValueError(msg + ". Change the mesh shape or the rules.")
        log.warning(msg)
    with_ref = ref_params is not None
    in_sh = (p_sh, o_sh, *([b_sh] * num_batches), rep) + ((p_sh,) if with_ref else ()) + f_sh
    backend = for_platform() if backend is None else backend
    bits_params = backend.bits_params and donate and any(
        x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(params))  # fmt: skip
    fn = jax.jit(
        _carried_boundary(step_fn, backend) if bits_params else step_fn,
        in_shardings=in_sh,
        out_shardings=(p_sh, o_sh, rep),
        donate_argnums=(0, 1) if donate else (),
    )
    memory = estimate_memory(params, opt_state, p_sh, o_sh, reference=with_ref, grads=2 if num_batches == 2 else 1)
    if print_memory:
        print(memory.format(), flush=True)
    return ShardedStep(
        fn=fn,
        mesh=mesh,
        rules=rules,
        param_shardings=p_sh,
        opt_state_shardings=o_sh,
        batch_sharding=b_sh,
        with_reference=with_ref,
        memory=memory,
        report=report,
        num_batches=num_batches,
        frozen_shardings=f_sh,
        bits_params=bits_params,
        backend=backend,
    )


# In place: the outputs reuse the donated inputs' buffers (same sizes).
def _require_auto_axes(mesh: Mesh) -> None:
    """The models place their intermediates by XLA's sharding propagation (``Auto`` axes); with
    ``Explicit`` axes (sharding in types) their gathers and reshapes would need an output sharding
    each, which they do not give: refuse such a mesh, naming the fix."""
    from jax.sharding import AxisType

    explicit = [n for n, t in zip(mesh.axis_names, getattr(mesh, "axis_types", ())) if t == AxisType.Explicit]
    if explicit:
        raise ValueError(
            f"mesh axes {explicit} are Explicit (sharding in types, the default of jax.make_mesh in recent JAX): "
            "the models are written for XLA's sharding propagation. Make the mesh with Auto axes: "
            "jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names)), or "
            "ngdiff_jax.parallel.make_mesh(...) / mesh.axis_types=auto (the default)."
        )


@partial(jax.jit, static_argnums=0, donate_argnums=1)
def _encode(backend, tree):
    return jax.tree_util.tree_map(backend.carry, tree)


@partial(jax.jit, static_argnums=0, donate_argnums=1)
def _decode(backend, tree):
    return jax.tree_util.tree_map(backend.uncarry, tree)


def _carried_struct(backend, x):
    out = jax.eval_shape(backend.carry, jax.ShapeDtypeStruct(x.shape, x.dtype))
    return jax.ShapeDtypeStruct(x.shape, out.dtype, sharding=getattr(x, "sharding", None))


def _carried_boundary(step_fn, backend):
    """``step_fn`` taking and returning its parameters (the first argument and output) as
    ``backend`` carries them (`Backend.carry`)."""

    def step(params, *rest):
        new_params, *out = step_fn(jax.tree_util.tree_map(backend.uncarry, params), *rest)
        return (jax.tree_util.tree_map(backend.carry, new_params), *out)

    return step
