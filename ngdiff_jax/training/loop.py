"""The training loop: jitted steps, JSON-lines log, rich progress bar, orbax checkpoints, resume.

The loop is generic over the step: ``step(params, opt_state, batches, rng, *extra)
-> (params, opt_state, metrics)`` where ``batches`` is a tuple with one batch per
data stream (``(forget, retain)`` for unlearning, ``(train,)`` for finetuning).
It is jitted here with ``params`` and ``opt_state`` donated.

Every ``checkpoint_every`` steps (and at the end) the loop saves params,
optimizer state, RNG key, step and the position of every data stream. Starting
the loop again with the same ``out_dir`` restores the newest checkpoint and
continues; because batches are a pure function of ``(seed, epoch, index)`` and
the step is deterministic, the result equals that of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ngdiff_jax.backends import for_platform as backend_defaults
from ngdiff_jax.training.checkpoint import Checkpointer

__all__ = ["LoopResult", "default_log_every", "live_device_bytes", "run_loop"]

EvalFn = Callable[[int, Any], Mapping[str, Any]]


@dataclass
class LoopResult:
    params: Any
    opt_state: Any
    rng: jax.Array
    step: int
    resumed_from: int | None
    last_metrics: dict[str, float] = field(default_factory=dict)
    # median over the logged intervals after the first (compiling) one of their mean step time
    step_time_s: float = float("nan")
    evals: list[dict[str, Any]] = field(default_factory=list)


def _host(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics as JSON-able Python numbers; a population's ``[K]`` metrics as lists."""
    out = {}
    for k, v in jax.device_get(dict(metrics)).items():
        a = np.asarray(v)
        if a.ndim:
            out[k] = a.tolist()
        elif np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_:
            out[k] = int(a)
        else:
            out[k] = float(a)
    return out


def _check_meta(saved: Mapping[str, Any], current: Mapping[str, Any], directory: Path) -> None:
    from ngdiff_jax.errors import InputError
    from ngdiff_jax.training.checkpoint import flat_settings, settings_diff

    saved, current = flat_settings(dict(saved)), flat_settings(dict(current))
    diff = settings_diff(saved, current)
    if diff:
        detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in diff[:5])
        raise InputError(
            f"the checkpoints in {directory} were written by a run with different settings ({detail}). "
            f"Use a new output directory, or set {diff[0]}={saved.get(diff[0])!r} to resume that run."
        )


def _truncate_log(path: Path, last_step: int) -> None:
    """Drop log lines after ``last_step`` (written after the checkpoint being resumed)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if rec.get("step", 0) <= last_step:
            keep.append(line)
    path.write_text("".join(x + "\n" for x in keep))


def _fmt(metrics: Mapping[str, float], keys: Sequence[str]) -> str:
    parts = []
    for k in keys:
        if k in metrics:
            v = metrics[k]
            if isinstance(v, list):  # a population: the range over its members
                finite = [x for x in v if isinstance(x, (int, float)) and math.isfinite(x)]
                v = f"{min(finite):.3g}..{max(finite):.3g}" if finite else "nan"
                parts.append(f"{k}={v}")
            else:
                parts.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


def run_loop(
    step_fn: Callable[..., tuple[Any, Any, Mapping[str, Any]]],
    params: Any,
    opt_state: Any,
    *,
    streams: Mapping[str, Any],
    num_steps: int,
    rng: jax.Array,
    out_dir: str | Path,
    extra_args: tuple = (),
    checkpoint_every: int = 50,
    max_checkpoints: int | None = 2,
    log_every: int | None = None,
    eval_fn: EvalFn | None = None,
    eval_every: int = 0,
    progress: bool = True,
    meta: Mapping[str, Any] | None = None,
    show: Sequence[str] = ("forget_loss", "retain_loss", "loss", "learning_rate", "skipped"),
    donate: bool = True,
    jit: bool = True,
) -> LoopResult:
    """Run ``num_steps`` steps of ``step_fn`` (resuming from ``out_dir/checkpoints`` if present).

    Args:
      step_fn: ``step(params, opt_state, batches, rng, *extra_args) -> (params, opt_state, metrics)``
        (pure; jitted here).
      streams: name -> ``ngdiff_jax.data.Batcher`` (anything with ``next()``, ``state()``,
        ``restore(dict)``); ``batches`` holds one batch from each, in this order.
      rng: the initial key (``jax.random.PRNGKey(seed)``); split once per step, saved with checkpoints.
      out_dir: gets ``log.jsonl`` (one JSON object per logged step), ``checkpoints/`` and, with an
        ``eval_fn``, ``eval.jsonl``.
      params, opt_state: the initial state. The loop **owns** it: with ``donate`` its buffers are
        donated to the first step (or deleted when a checkpoint is restored), so the loop holds one
        copy of the state; pass copies to keep using them.
      extra_args: passed to every step after ``rng`` (e.g. ``(ref_params,)``); not donated.
      checkpoint_every: save every K steps (and after the last); 0 disables checkpoints.
      log_every: fetch the metrics (a host sync), write a ``log.jsonl`` line and update the
        progress bar every K steps and at the last; between them the loop only dispatches steps,
        so the host prepares the next batch while the device computes. ``time_s`` is the mean
        step time since the last logged step. ``None``: `default_log_every` (1 on CPU, where the
        device is the host, 10 on accelerators).
      eval_fn: ``eval_fn(step, params) -> dict`` called at step 0, every ``eval_every`` steps
        and at the end (the hook the evaluation code plugs into). If it has a true
        ``should_stop`` attribute the loop stops there (early stopping, ``training/selection.py``).
      meta: JSON-able settings stored with every checkpoint; resuming with other settings is an error.
      jit: False when ``step_fn`` is already jitted (e.g. ``ngdiff_jax.parallel.ShardedStep``, with its
        own shardings and donation); it is then called as is.

    Checkpoints restore onto the shardings of ``params``/``opt_state``/``rng`` (orbax, sharded). In a
    multi-process run every process calls this; only process 0 writes the log files.
    """
    log_every = default_log_every() if log_every is None else int(log_every)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "log.jsonl"
    eval_path = out_dir / "eval.jsonl"
    meta = dict(meta or {})
    names = list(streams)
    main = jax.process_index() == 0

    ckpt = Checkpointer(out_dir / "checkpoints", max_to_keep=max_checkpoints) if checkpoint_every > 0 else None
    start = 0
    resumed_from = None
    restored = None
    if ckpt is not None and ckpt.latest_step() is not None:
        # An abstract target: restoring does not need the initial state's buffers.
        target = jax.tree_util.tree_map(_abstract, {"params": params, "opt_state": opt_state, "rng": rng})
        current = json.loads(json.dumps(meta))
        restored = ckpt.restore_newest_valid(  # falls back past damaged checkpoints (moved aside)
            target, check_meta=lambda s: _check_meta(s.get("settings", {}), current, ckpt.directory)
        )
    if restored is not None:
        if donate:  # the loop owns the initial state: release it, the restored one replaces it
            _release((params, opt_state), keep=extra_args)
        del params, opt_state
        _, state, saved = restored
        del restored
        params, opt_state, rng = state["params"], state["opt_state"], state["rng"]
        del state
        start = resumed_from = int(saved["step"])
        for name in names:
            streams[name].restore(saved["data"][name])
        if main:
            _truncate_log(log_path, start)
            _truncate_log(eval_path, start)
    elif main:
        for p in (log_path, eval_path):
            if p.exists():
                p.unlink()

    if donate:
        # The loop owns ``params``/``opt_state`` and donates them: no copy is made, except of
        # leaves that are one buffer seen twice (optax inits) or shared with ``extra_args``.
        params, opt_state = _unshared((params, opt_state), keep=extra_args)
    jitted = jax.jit(step_fn, donate_argnums=(0, 1) if donate else ()) if jit else step_fn
    result = LoopResult(None, None, rng, start, resumed_from)
    times: list[float] = []

    def save(step: int):
        if ckpt is None:
            return
        ckpt.save(
            step,
            {"params": params, "opt_state": opt_state, "rng": rng},
            {"step": step, "data": {n: streams[n].state() for n in names}, "settings": meta},
        )

    def evaluate(step: int):
        if eval_fn is None:
            return
        rec = {"step": step, **{k: _jsonable(v) for k, v in dict(eval_fn(step, params)).items()}}
        result.evals.append(rec)
        if main:
            if step <= start:  # a finished run run again evaluates its last step again: replace that row
                _truncate_log(eval_path, step - 1)
            with open(eval_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    if eval_fn is not None and start == 0:
        evaluate(0)

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        disable=not (progress and main),
    )
    metrics: dict[str, float] = {}
    with bar, (open(log_path, "a") if main else contextlib.nullcontext()) as log:
        task = bar.add_task(out_dir.name or "train", total=num_steps, completed=start, info="")
        last = synced = start
        t_sync = time.perf_counter()
        for step in range(start + 1, num_steps + 1):
            if getattr(eval_fn, "should_stop", False):  # early stopping (training/selection.py)
                break
            last = step
            batches = tuple(next(streams[n]) for n in names)
            rng, sub = jax.random.split(rng)
            params, opt_state, raw = jitted(params, opt_state, batches, sub, *extra_args)
            if step % log_every == 0 or step == num_steps:
                metrics = _host(raw)  # the only host sync of a step (others are dispatched only)
                now = time.perf_counter()
                times.append((now - t_sync) / (step - synced))  # mean step time since the last sync
                t_sync, synced = now, step
                if main:
                    log.write(json.dumps({"step": step, **metrics, "time_s": round(times[-1], 5)}) + "\n")
                    log.flush()
                bar.update(task, completed=step, info=_fmt(metrics, show))
            if ckpt is not None and (step % checkpoint_every == 0 or step == num_steps):
                save(step)
                t_sync, synced = time.perf_counter(), step  # the save waited for the step: not a step's time
            if eval_fn is not None and eval_every > 0 and step % eval_every == 0 and step != num_steps:
                evaluate(step)
                t_sync, synced = time.perf_counter(), step  # the evaluation's time is not a step's
                if getattr(eval_fn, "should_stop", False) and ckpt is not None and step % checkpoint_every:
                    save(step)  # a resumed run starts from the stop
        stopped = getattr(eval_fn, "should_stop", False)
        if eval_fn is not None and not stopped and (start < num_steps or not result.evals):
            evaluate(num_steps)
    if ckpt is not None:
        ckpt.close()
    result.params, result.opt_state, result.rng = params, opt_state, rng
    result.step = last if getattr(eval_fn, "should_stop", False) else max(start, num_steps)
    if not metrics and log_path.exists():  # nothing left to run: report the logged last step
        lines = log_path.read_text().splitlines()
        if lines:
            metrics = {k: v for k, v in json.loads(lines[-1]).items() if k not in ("step", "time_s")}
    result.last_metrics = metrics
    if len(times) > 1:
        result.step_time_s = float(np.median(times[1:]))
    return result


def default_log_every(backend: str | None = None) -> int:
    """1 on CPU (the device is the host: a sync costs nothing), 10 on accelerators, where fetching
    a step's metrics stalls the host until the device finishes that step."""
    return backend_defaults(backend).log_every


def _abstract(x):
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x


def _buffer_ids(x) -> tuple:
    if not isinstance(x, jax.Array) or x.is_deleted():
        return ()
    try:
        return tuple(s.data.unsafe_buffer_pointer() for s in x.addressable_shards)
    except Exception:  # backends without raw pointers: fall back to object identity
        return (id(x),)


def _unshared(tree, keep=()):
    """``tree`` with a fresh copy of every leaf whose buffer appears earlier in ``tree`` or in ``keep``."""
    seen = {b for leaf in jax.tree_util.tree_leaves(keep) for b in _buffer_ids(leaf)}

    def one(x):
        ids = _buffer_ids(x)
        if ids and seen.intersection(ids):
            x = jnp.array(x, copy=True)
            ids = _buffer_ids(x)
        seen.update(ids)
        return x

    return jax.tree_util.tree_map(one, tree)


def _release(tree, keep=()) -> None:
    """Delete the device buffers of ``tree`` that ``keep`` does not share."""
    shared = {b for leaf in jax.tree_util.tree_leaves(keep) for b in _buffer_ids(leaf)}
    for x in jax.tree_util.tree_leaves(tree):
        ids = _buffer_ids(x)
        if ids and not shared.intersection(ids):
            x.delete()
            for b in ids:
                shared.add(b)


def live_device_bytes() -> int:
    """Bytes of all live (not deleted) ``jax.Array`` buffers in this process (each shard once)."""
    total, seen = 0, set()
    for a in jax.live_arrays():
        for s in a.addressable_shards:
            try:
                key = s.data.unsafe_buffer_pointer()
            except Exception:
                key = id(s.data)
            if key not in seen:
                seen.add(key)
                total += s.data.nbytes
    return total


def _jsonable(v):
    if isinstance(v, (str, bool, int, float)) or v is None:
        return v
    a = np.asarray(jax.device_get(v))
    if a.ndim == 0:
        return a.item()
    return a.tolist()


def steps_for_epochs(epochs: float, batches_per_epoch: int) -> int:
    """``ceil(epochs * batches_per_epoch)``, at least 1."""
    return max(1, math.ceil(epochs * batches_per_epoch))
