"""The population pipeline: ``ngdiff unlearn`` with a ``population:`` section.

Every member (seed x learning rate x settings, :class:`ngdiff_jax.population.PopulationSection`)
is the run ``ngdiff unlearn`` would make with those values; members run together as one
compiled program with a leading member axis (:func:`ngdiff_jax.population.population_step`),
``population.chunk_size`` members at a time. Members are spread over the local devices along a
``member`` mesh axis, over no more devices than a chunk has members (a chunk is padded with
copies of its last member to a multiple of the device count; the copies are dropped). With LoRA
every member trains its own adapters on one shared frozen base (memory: the base once plus K x
adapters and their optimizer state).

Output directory::

    population.json        the members (index, seed, values) and, when done, their results
    chunks/c000/           one chunk's loop: log.jsonl (per-member lists), eval.jsonl,
                           checkpoints/, result.json when the chunk is finished
    members/m000/model     each member's export (population.export), adapter/ with LoRA

A killed population resumes chunk by chunk: finished chunks are read back, the unfinished one
continues from its newest checkpoint. A member whose weights become non-finite or that skips
more steps than ``run.max_skipped_fraction`` allows is stopped there and flagged
(``diverged``, ``stopped_at``); it is not exported and the others go on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ngdiff_jax.data import jsonio
from ngdiff_jax.population import (
    MEMBER_AXIS,
    Member,
    MemberStreams,
    concrete_configs,
    init_member_state,
    member_values,
    population_step,
    traced_configs,
)

__all__ = ["PopulationRun", "run_population"]

#: ``on_chunk(members, params, results)``: called when a chunk has finished training, with its real
#: members, their final parameters (leading member axis; the full model's layout) and results.
OnChunk = Callable[[list[Member], Any, list[dict]], None]


@dataclass
class PopulationRun:
    """What :func:`run_population` returns."""

    members: list[Member]
    results: list[dict]  # per member, in member order (see `_member_result`)
    summary: dict = field(default_factory=dict)


def _stack(trees: Sequence[Any]):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _repeat(tree, k: int):
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (k,) + x.shape).copy(), tree)


def _index(tree, k: int):
    return jax.tree.map(lambda x: x[k], tree)


class _Setup:
    """The parts of a population shared by every chunk: model, data, step builder."""

    def __init__(self, cfg, members: list[Member]):
        from ngdiff_jax import models
        from ngdiff_jax.training import data_assembly, model_io
        from ngdiff_jax.training.data_assembly import resolve_format, resolve_retain_split

        self.cfg = cfg
        prec = cfg.precision
        model = models.from_pretrained(model_io.model_dir(cfg.model_path), dtype=prec.jnp("compute"),
                                       param_dtype=prec.jnp("params"))  # fmt: skip
        if cfg.run.scan_layers:  # the blocks as one block stacked on the layer axis, run as one scan
            model = models.stacked.scanned(model, release=True)
        models.set_remat(model, cfg.run.remat)
        self.lora_run = None
        if cfg.lora.enabled:
            from ngdiff_jax.models import lora
            from ngdiff_jax.training.lora_run import LoraRun

            self.lora_run = LoraRun(model, cfg.lora, seed=members[0].seed)
            self.apply_fn = self.lora_run.apply_fn
            self._adapters = {}

            def initial(seed):  # in the model's layout, as the run's own adapters
                if seed not in self._adapters:
                    self._adapters[seed] = lora.initial_adapters(self.lora_run.model, self.lora_run.spec, seed=seed)
                return self._adapters[seed]

            self.initial_params = initial
        else:
            self.apply_fn, params = models.functional(model)
            self.initial_params = lambda seed: params
        # the per-block structure (no adapters, no weights) that the export and evaluation fill
        self.model = models.abstract_like(model, scan_layers=False)
        self.to_full = (self.lora_run.merged_params if self.lora_run is not None
                        else models.stacked.unstack if cfg.run.scan_layers else None)  # fmt: skip
        self.tok = model_io.load_tokenizer(cfg.tokenizer or cfg.model_path)
        self.spec = resolve_format(cfg.format, cfg.model_path, allow_change=cfg.allow_format_change)
        self.retain_split = resolve_retain_split(cfg.data)
        self.forget_rows = data_assembly.load_split(cfg.data, cfg.data.forget_split)
        retain_rows = data_assembly.load_split(cfg.data, self.retain_split)
        self.forget_ex = data_assembly.encode_split(self.forget_rows, self.tok, cfg.data, self.spec,
                                                    where=f"data.forget_split={cfg.data.forget_split}")  # fmt: skip
        self.retain_ex = data_assembly.encode_split(retain_rows, self.tok, cfg.data, self.spec,
                                                    where=f"data.retain_split={self.retain_split}")  # fmt: skip
        from ngdiff_jax.training.loop import steps_for_epochs

        self.pad_id = model_io.pad_id(self.tok)
        per_epoch = len(data_assembly.make_batcher(self.forget_ex, self.tok, cfg.data, seed=0))  # as run_unlearn's
        self.num_steps = cfg.run.steps if cfg.run.steps is not None else steps_for_epochs(cfg.run.epochs, per_epoch)

    # ---------------------------------------------------------------- per member / chunk pieces
    def streams(self, members: list[Member]) -> dict[str, MemberStreams]:
        from ngdiff_jax.training import data_assembly

        cfg = self.cfg
        forget = [data_assembly.forget_stream(self.forget_rows, self.forget_ex, self.tok, cfg.data, cfg.method,
                                              seed=m.seed, spec=self.spec) for m in members]  # fmt: skip
        retain = [data_assembly.make_batcher(self.retain_ex, self.tok, cfg.data, seed=m.seed + 1) for m in members]
        return {"forget": MemberStreams(forget, pad_id=self.pad_id),
                "retain": MemberStreams(retain, pad_id=self.pad_id)}  # fmt: skip

    def optimizer(self, values, *, member_axis=MEMBER_AXIS):
        from ngdiff_jax.training import precision
        from ngdiff_jax.training.methods import make_optimizer

        method, optim = traced_configs(self.cfg.method, self.cfg.optim, values)
        tx = make_optimizer(method, optim, self.num_steps, member_axis=member_axis, backend=self.model.backend,
                            steps_per_epoch=len(self.forget_ex) / self.cfg.data.batch_size)
        prec = self.cfg.precision
        if prec.moments != prec.params:
            tx = precision.with_moment_dtype(tx, prec.jnp("moments"))
        return method, tx

    def build(self, values):
        from ngdiff_jax.training.step import make_unlearn_step

        method, tx = self.optimizer(values)
        k, backend = self.cfg.run.micro_batches, self.model.backend
        if self.lora_run is None:
            return make_unlearn_step(self.apply_fn, method, tx, micro_batches=k, backend=backend)
        return self.lora_run.bind(lambda fn: make_unlearn_step(fn, method, tx, micro_batches=k, backend=backend))

    def full_params(self, params):
        """One member's parameters in the full model's per-block layout."""
        return self.to_full(params) if self.to_full is not None else params


class _CompileFirst:
    """A jitted step that compiles each new batch shape before running it and hands the compiler's
    freed memory back first (the backend's hook, `Backend.release_host_memory`), as the single
    run's sharded step does: the step's buffers then reuse those pages instead of adding to them."""

    def __init__(self, fn, backend):
        self.fn, self.shapes, self.backend = fn, set(), backend

    def __call__(self, *args):
        shapes = tuple((x.shape, str(x.dtype)) for x in jax.tree_util.tree_leaves(args[2]))
        if shapes not in self.shapes:
            self.backend.release_host_memory()
            self.fn.lower(*args).compile()
            self.backend.release_host_memory()
            self.shapes.add(shapes)
        return self.fn(*args)


def _devices(cfg, members: Sequence[Member]) -> list:
    """The devices of the ``member`` mesh axis: with ``population.spread`` every local device but no
    more than the largest chunk has members (a device beyond those would compute only padding
    copies: 7 of 8 simulated CPU devices for one member), else the first."""
    if not cfg.population.spread:
        return list(jax.local_devices()[:1])
    return list(jax.local_devices()[: max(len(c) for c in cfg.population.chunks(members))])


def _shardings(mesh, extra_axes):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from ngdiff_jax.population import MemberState

    per, rep = NamedSharding(mesh, P(MEMBER_AXIS)), NamedSharding(mesh, P())
    state = MemberState(opt_state=per, key=per, alive=per, stopped_at=per, count=rep)
    extra = tuple(per if a == 0 else rep for a in extra_axes)
    return per, rep, state, extra


def _member_result(m: Member, k: int, metrics: dict, state, evals: list[dict], num_steps: int) -> dict:
    def pick(v):
        return v[k] if isinstance(v, list) else v

    last = {key: pick(v) for key, v in metrics.items()}
    alive = bool(np.asarray(state.alive)[k])
    stopped = int(np.asarray(state.stopped_at)[k])
    bad_loss = [key for key, v in last.items() if "loss" in key and isinstance(v, float) and not math.isfinite(v)]
    return {
        **m.to_dict(),
        "diverged": (not alive) or bool(bad_loss),
        "stopped_at": stopped or None,
        "steps": stopped or num_steps,
        "last_metrics": last,
        "evals": [{key: pick(v) for key, v in e.items()} for e in evals],
    }


def run_population(
    cfg,
    *,
    eval_fn: Callable[[int, Any], dict] | None = None,
    on_chunk: OnChunk | None = None,
    export: bool | None = None,
    all_diverged_fails: bool = True,
) -> PopulationRun:
    """Train every member of ``cfg.population`` (validated and owned by the caller, as
    :func:`ngdiff_jax.training.run_unlearn` does; see the module doc).

    ``eval_fn(step, params) -> {metric: [value per member]}`` is called every ``run.eval_every``
    steps on the chunk's parameters (leading member axis, the training layout; default: the
    mean answer probability of the forget and retain batches, per member). ``on_chunk`` sees
    each finished chunk (see :data:`OnChunk`). ``export`` (default ``population.export``)
    writes each member's model to ``members/<key>/model``. A population whose every member
    diverged raises :class:`~ngdiff_jax.errors.DivergedError` (exit 1), and one whose every member
    ended bit-identical to its input (``unchanged``: not exported) raises ``UnchangedError``
    (exit 1), unless ``all_diverged_fails`` is false (a sweep reports it as a finding).
    """
    from jax.sharding import Mesh

    from ngdiff_jax.training import checkpoint
    from ngdiff_jax.training.loop import run_loop

    pop = cfg.population
    members = pop.members(seed=cfg.run.seed, lr=cfg.optim.lr)
    for m in members:  # every member's settings checked as a single run's, before any work
        try:
            concrete_configs(cfg.method, cfg.optim, m)
        except ValueError as e:
            raise ValueError(f"population member {m.key} ({m.name}): {e}") from None
    export = pop.export if export is None else export
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup = _Setup(cfg, members)
    devices = _devices(cfg, members)
    mesh = Mesh(np.array(devices), (MEMBER_AXIS,))
    max_skipped = math.floor(cfg.run.max_skipped_fraction * setup.num_steps)
    shared_ref = cfg.method.needs_reference and setup.lora_run is None
    extra_axes = ((None,) if shared_ref else (0,)) if cfg.method.needs_reference else ()
    extra_axes = extra_axes + ((None,) if setup.lora_run is not None else ())
    per, rep, state_sh, extra_sh = _shardings(mesh, extra_axes)
    at_once = pop.at_once
    if at_once is not None and at_once % len(devices):
        raise ValueError(f"population.at_once={at_once} is not a multiple of the {len(devices)} devices the members "
                         "are spread over; use a multiple, or population.spread=false.")  # fmt: skip
    step = population_step(setup.build, max_skipped=max_skipped, extra_axes=extra_axes, at_once=at_once)
    jitted = _CompileFirst(jax.jit(
        step,
        in_shardings=(per, state_sh, (per, per), rep, per, *extra_sh),
        out_shardings=(per, state_sh, per),
        donate_argnums=(0, 1),
    ), setup.model.backend)
    init = jax.jit(lambda values, params, seeds: init_member_state(
        lambda v: setup.optimizer(v)[1].init, params, values, seeds), out_shardings=state_sh)  # fmt: skip
    jsonio.write_json(out / "population.json", {"members": [m.to_dict() for m in members],
                                                "num_steps": setup.num_steps, "devices": len(devices)})  # fmt: skip
    settings = checkpoint.resume_settings(cfg, ignore=("mesh", "distributed"))

    results: list[dict] = []
    t_start = time.perf_counter()
    for ci, chunk in enumerate(pop.chunks(members)):
        cdir = out / "chunks" / f"c{ci:03d}"
        done = cdir / "result.json"
        if done.is_file():
            saved = jsonio.read_json(done)
            if [r["index"] for r in saved["members"]] == [m.index for m in chunk]:
                results.extend(saved["members"])
                continue
        ghosts = (-len(chunk)) % (at_once if at_once is not None and at_once < len(chunk) else len(devices))
        padded = chunk + [chunk[-1]] * ghosts
        k = len(padded)
        values = {key: jnp.asarray(v) for key, v in member_values(padded).items()}
        seeds = [m.seed for m in padded]
        params = _stack([setup.initial_params(m.seed) for m in padded]) if setup.lora_run is not None else \
            _repeat(setup.initial_params(0), k)
        params = jax.device_put(params, per)
        extra: tuple = ()
        if cfg.method.needs_reference:
            extra += ((jax.device_put(setup.initial_params(0), rep),) if shared_ref else
                      (jax.device_put(jax.tree.map(jnp.copy, params), per),))
        if setup.lora_run is not None:
            extra += (jax.device_put(setup.lora_run.base, rep),)
        state = init(jax.device_put(values, per), params, jnp.asarray(seeds, jnp.uint32))
        setup.model.backend.release_host_memory()  # what loading, stacking and compiling the initial state freed
        streams = setup.streams(padded)
        hook = eval_fn if eval_fn is not None else _default_eval(setup, cfg)
        chunk_eval = None if hook is None else (lambda s, p, fn=hook: fn(s, p))
        eval_every = cfg.run.eval_every
        selection = None
        if cfg.selection.enabled:  # each member's best step, as a single run's selection keeps it
            selection = _MemberSelection(cfg, setup, chunk, out, hook)
            chunk_eval, eval_every = selection, cfg.selection.every
        before = np.asarray(_member_fingerprints(params))  # a member whose weights never move is no result
        result = run_loop(
            jitted, params, state, streams=streams, num_steps=setup.num_steps,
            rng=jax.random.PRNGKey(0), out_dir=cdir, extra_args=(jax.device_put(values, per), *extra),
            checkpoint_every=cfg.run.checkpoint_every, max_checkpoints=cfg.run.max_checkpoints,
            log_every=cfg.run.log_every, eval_fn=chunk_eval, eval_every=eval_every,
            progress=cfg.run.progress, meta={**settings, "chunk": [m.index for m in chunk], "ghosts": ghosts},
            jit=False,
        )  # fmt: skip
        evals = jsonio.read_records(cdir / "eval.jsonl") if (cdir / "eval.jsonl").is_file() else []
        chunk_results = [_member_result(m, i, result.last_metrics, result.opt_state, evals, setup.num_steps)
                         for i, m in enumerate(chunk)]  # fmt: skip
        if selection is not None:
            for r, sel in zip(chunk_results, selection.selectors):
                r["selection"] = sel.summary()
        n = len(chunk)
        after = np.asarray(_member_fingerprints(result.params))
        for i, r in enumerate(chunk_results):
            r["unchanged"] = bool(r["steps"] >= 1 and before[i] == after[i] and not r["diverged"])
        final = jax.tree.map(lambda x, n=n: x[:n], result.params)
        if on_chunk is not None:
            on_chunk(chunk, _full_members(setup, final, len(chunk)), chunk_results)
        if export:
            for i, (m, r) in enumerate(zip(chunk, chunk_results)):
                if not (r["diverged"] or r["unchanged"]):
                    r["model_dir"] = str(_export_member(cfg, setup, out / "members" / m.key, _index(final, i), m))
        jsonio.write_json(done, {"members": chunk_results, "wall_s": round(time.perf_counter() - t_start, 2),
                                 "step_time_s": result.step_time_s})  # fmt: skip
        results.extend(chunk_results)
        del result, final, params, state

    summary = {
        "members": len(members),
        "chunks": len(pop.chunks(members)),
        "devices": len(devices),
        "num_steps": setup.num_steps,
        "diverged": [r["key"] for r in results if r["diverged"]],
        "unchanged": [r["key"] for r in results if r.get("unchanged")],
        "wall_s": round(time.perf_counter() - t_start, 2),
    }
    jsonio.write_json(out / "population.json", {"members": results, "num_steps": setup.num_steps,
                                                "devices": len(devices), "summary": summary})  # fmt: skip
    jsonio.write_json(out / "summary.json", {"population": summary})
    if all_diverged_fails and results and all(r["diverged"] for r in results):
        from ngdiff_jax.errors import DivergedError

        raise DivergedError(
            f"every member of the population diverged (details in {out / 'population.json'}); lower the rates "
            f"(population.lr, now {sorted({r['values']['optim.lr'] for r in results})}) and use a new run.output_dir."
        )
    if all_diverged_fails and results and all(r.get("unchanged") for r in results):
        from ngdiff_jax.training.divergence import UnchangedError

        raise UnchangedError(
            f"every member of the population ended with weights bit-identical to the input (details in "
            f"{out / 'population.json'}): each update rounded away; raise the rates (population.lr, now "
            f"{sorted({r['values']['optim.lr'] for r in results})}) and use a new run.output_dir."
        )
    return PopulationRun(members, results, summary)


def _member_fingerprints(params) -> jax.Array:
    """Each member's :func:`~ngdiff_jax.training.divergence.fingerprint` (a leading member axis)."""
    from ngdiff_jax.training.divergence import fingerprint_array

    return jax.vmap(fingerprint_array)(params)


class _MemberSelection:
    """The loop's ``eval_fn`` for a population with a ``selection`` section: one evaluation of all
    members per point (the probability hook, or ``selection.tofu``'s batched TOFU evaluation),
    then each member's own :class:`~ngdiff_jax.training.selection.Selector` (its ``selection.json``
    and ``best_model`` under ``members/<key>/``, kept across a resume)."""

    def __init__(self, cfg, setup: _Setup, chunk: list[Member], out: Path, hook):
        from ngdiff_jax.training import model_io
        from ngdiff_jax.training.selection import Selector

        sel = cfg.selection
        self.setup, self.k = setup, len(chunk)
        if sel.tofu:
            self.hook = _tofu_members(cfg, setup, [m.key for m in chunk])
        elif hook is not None:
            self.hook = hook
        else:
            raise ValueError("selection needs an evaluation: set selection.tofu=true or run.eval_every for the "
                             "probability hook.")  # fmt: skip
        self.cache: dict = {}

        def export(params, directory):
            model_io.save_model(setup.model, setup.full_params(params), directory, setup.tok)

        self.selectors = []
        for i, m in enumerate(chunk):
            d = out / "members" / m.key
            d.mkdir(parents=True, exist_ok=True)
            self.selectors.append(Selector(sel.criterion(), lambda step, p, i=i: self.cache[i], d,
                                           export=export if sel.export_best else None))  # fmt: skip

    should_stop = False  # selection.patience is refused for populations (members stop together or not at all)

    def __call__(self, step: int, params) -> dict:
        metrics = self.hook(step, params)
        out: dict = {}
        for i, sel in enumerate(self.selectors):
            self.cache[i] = {k: (v[i] if isinstance(v, list) else v) for k, v in metrics.items()}
            for k, v in sel(step, _index(params, i)).items():
                out.setdefault(k, []).append(v)
        return out


def _tofu_members(cfg, setup: _Setup, keys: list[str]):
    """``evaluate(step, params)``: every member's TOFU aggregates (lists), one batched evaluation."""
    from ngdiff_jax.data import QAFormatter
    from ngdiff_jax.evaluation import evaluate_tofu_members
    from ngdiff_jax.training import data_assembly

    sel = cfg.selection

    def evaluate(step, params):
        k = len(keys)
        full = _full_members(setup, jax.tree.map(lambda x: x[:k], params), k)
        rs = evaluate_tofu_members(
            setup.model, full, setup.tok, data_assembly.resolve_source(cfg.data.source), names=keys,
            forget_split=cfg.data.forget_split, retain_reference=sel.retain_eval, batch_size=cfg.data.batch_size,
            buckets=list(cfg.data.buckets) if cfg.data.buckets else None, limit=sel.tofu_limit,
            formatter=QAFormatter(setup.tok, spec=setup.spec), mia_attacks=("min_k",),
            max_new_tokens=sel.tofu_max_new_tokens,
        )  # fmt: skip
        names = [n for n, v in rs[0].aggregates.items() if v is None or isinstance(v, (int, float))]
        return {n: [r.aggregates.get(n) for r in rs] for n in names}

    return evaluate


def _full_members(setup: _Setup, params, k: int):
    """The members' parameters in the full model's per-block layout (leading member axis)."""
    if setup.to_full is None:
        return params
    return _stack([setup.full_params(_index(params, i)) for i in range(k)])


def _default_eval(setup: _Setup, cfg):
    """Per-member mean answer probabilities of fixed forget/retain batches (``run.eval_every``, or
    the ``selection`` hook)."""
    if cfg.run.eval_every <= 0 and not cfg.selection.enabled:
        return None
    from ngdiff_jax.data import make_batches
    from ngdiff_jax.training import eval_hook

    kw = {"pad_id": setup.pad_id, "buckets": list(cfg.data.buckets) if cfg.data.buckets else None,
          "max_length": cfg.data.max_length}  # fmt: skip
    sets = {"forget": make_batches(setup.forget_ex, cfg.data.batch_size, **kw),
            "retain": make_batches(setup.retain_ex[: max(len(setup.forget_ex), cfg.data.batch_size)],
                                   cfg.data.batch_size, **kw)}  # fmt: skip
    apply_fn = setup.apply_fn
    if setup.lora_run is not None:
        base = setup.lora_run.base
        return eval_hook.qa_probability_eval(lambda p, *a: apply_fn({"base": base, "lora": p}, *a), sets, members=True)
    return eval_hook.qa_probability_eval(apply_fn, sets, members=True)


def _export_member(cfg, setup: _Setup, mdir: Path, params, member: Member) -> Path:
    from ngdiff_jax.data.formatting import save_format
    from ngdiff_jax.training import model_io

    mdir.mkdir(parents=True, exist_ok=True)
    card = {"base_model": cfg.model_path, "method": f"{cfg.method.name} (ngdiff-jax unlearning, population member "
            f"{member.key}: {member.name})", "data": {"source": cfg.data.source or "TOFU",
            "forget": cfg.data.forget_split, "retain": setup.retain_split}, "metrics": {}}  # fmt: skip
    exported = params if setup.lora_run is not None else setup.full_params(params)
    model_dir, _ = model_io.export_run(
        mdir, setup.model, exported, setup.tok, lora_run=setup.lora_run, card=card,
        dtype=cfg.precision.jnp("export"), main=True,
        write_format=lambda d: save_format(setup.spec, d, stage="unlearn", method=cfg.method.name,
                                           forget_split=cfg.data.forget_split, retain_split=setup.retain_split),
    )  # fmt: skip
    return model_dir
