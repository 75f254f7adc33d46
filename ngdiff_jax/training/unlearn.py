"""The unlearning pipeline behind ``ngdiff unlearn``: model path + method + forget/retain splits."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import yaml

from ngdiff_jax.config_loader import to_dict
from ngdiff_jax.data import jsonio
from ngdiff_jax.data.formatting import save_format
from ngdiff_jax.training import checkpoint, data_assembly, divergence, eval_hook, model_io, precision, validation
from ngdiff_jax.training.config_schema import UnlearnConfig
from ngdiff_jax.training.loop import LoopResult, run_loop, steps_for_epochs
from ngdiff_jax.training.methods import make_optimizer
from ngdiff_jax.training.step import make_unlearn_step

__all__ = ["run_unlearn"]

EvalFn = Callable[[int, Any], dict]


def _settings(cfg: UnlearnConfig) -> dict:
    """What must match for a resume; the device layout (``mesh``, ``distributed``) may
    change, since orbax restores onto the current shardings."""
    return checkpoint.resume_settings(cfg, ignore=("mesh", "distributed"))


@validation.guarded("unlearn", ignore=("mesh", "distributed"))  # validation, lock, output ownership
def run_unlearn(
    cfg: UnlearnConfig,
    *,
    eval_fn: EvalFn | None = None,
    eval_sets: bool = True,
) -> tuple[LoopResult, dict[str, Any]]:
    """Run ``cfg.method`` from ``cfg.model_path`` and export the model to ``<output_dir>/model``.

    With ``run.eval_every > 0`` the hook ``eval_fn(step, params)`` is called every that many
    steps (default: :func:`eval_hook.qa_probability_eval` on the forget and retain batches,
    giving ``forget_prob``/``retain_prob``). Returns the loop result and a summary dict
    (also written to ``<output_dir>/summary.json``). Before any work the config and inputs are
    validated and the output dir is locked (``validation.guarded``); a diverged run raises
    ``DivergedError`` instead of exporting (``divergence.check_run``).

    There is one code path: the step always runs on a device mesh (``ngdiff_jax.parallel``),
    a one-device mesh for ``mesh.preset: none``. With a preset, ``jax.distributed`` is
    initialized from ``cfg.distributed`` (default: the environment) and the per-device memory
    estimate is printed before the first step. The model is loaded shard-wise onto the mesh
    in ``precision.params`` (computing in ``precision.compute``), the step is jitted with the
    preset's shardings (``run.micro_batches``, ``run.remat``), checkpoints are (sharded) orbax
    checkpoints and the export is gathered to process 0 in ``precision.export``.

    Memory: the loop holds exactly one copy of the parameters and the optimizer state (plus
    the reference model for NPO/KL, and a LoRA run's frozen base); the loaded model keeps no
    arrays of its own and the initial state is donated to the first step.
    """
    from ngdiff_jax import models
    from ngdiff_jax import parallel as par

    if cfg.population.enabled:  # many runs as one program (training/population_run.py)
        from ngdiff_jax.training.population_run import run_population

        if eval_fn is not None:
            raise ValueError("run_unlearn: with a population, pass eval_fn to population_run.run_population "
                             "(it takes a population's parameters).")  # fmt: skip
        (Path(cfg.run.output_dir)).mkdir(parents=True, exist_ok=True)
        (Path(cfg.run.output_dir) / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        pop = run_population(cfg)
        return None, {"population": pop.summary, "members": pop.results}

    mesh, rules, main = precision.run_mesh(cfg.mesh, cfg.distributed)
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if main:
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    prec = cfg.precision
    model = models.from_pretrained(
        model_io.model_dir(cfg.model_path), mesh=mesh, rules=par.resolve_rules(rules),
        dtype=prec.jnp("compute"), param_dtype=prec.jnp("params"),
    )  # fmt: skip
    if cfg.run.scan_layers:  # the blocks as one block stacked on the layer axis, run as one scan
        model = models.stacked.scanned(model, release=True)
    models.set_remat(model, cfg.run.remat)
    lora_run = None
    if cfg.lora.enabled:  # train adapters only; the base is a frozen extra step argument
        from ngdiff_jax.training.lora_run import LoraRun

        lora_run = LoraRun(model, cfg.lora, seed=cfg.run.seed)
        apply_fn, params = lora_run.apply_fn, lora_run.adapters
    else:
        apply_fn, params = models.functional(model)
    # every process computes it (the weights may be sharded over processes), the first one prints it
    lines = [] if lora_run is not None else [
        precision.bf16_rate_warning(params, cfg.optim.lr),
        precision.gen_bf16_warning(params, cfg.optim.lr) if cfg.method.rate.adaptive else None]
    for line in filter(None, lines) if main else ():
        print(line, file=sys.stderr)
    # the per-block structure (no adapters, no weights) that the export and model selection fill
    model = models.abstract_like(model, scan_layers=False)
    # the export and the best-model hook take the per-block layout
    to_full = lora_run.merged_params if lora_run is not None else (
        models.stacked.unstack if cfg.run.scan_layers else None)
    tok = model_io.load_tokenizer(cfg.tokenizer or cfg.model_path)
    spec = data_assembly.resolve_format(cfg.format, cfg.model_path, allow_change=cfg.allow_format_change)
    retain_split = data_assembly.resolve_retain_split(cfg.data)
    forget_rows = data_assembly.load_split(cfg.data, cfg.data.forget_split)
    retain_rows = data_assembly.load_split(cfg.data, retain_split)
    forget_ex = data_assembly.encode_split(
        forget_rows, tok, cfg.data, spec, where=f"data.forget_split={cfg.data.forget_split}"
    )
    retain_ex = data_assembly.encode_split(retain_rows, tok, cfg.data, spec, where=f"data.retain_split={retain_split}")
    seed = cfg.run.seed
    forget = data_assembly.forget_stream(forget_rows, forget_ex, tok, cfg.data, cfg.method, seed=seed, spec=spec)
    retain = data_assembly.make_batcher(retain_ex, tok, cfg.data, seed=seed + 1)
    num_steps = cfg.run.steps if cfg.run.steps is not None else steps_for_epochs(cfg.run.epochs, len(forget))

    ref_params = None
    if cfg.method.needs_reference:
        # A separate copy: the step donates `params`, the reference must stay intact.
        ref_params = jax.tree_util.tree_map(jnp.copy, params)
    backend = model.backend  # the model's, chosen once: the step and GeN order and carry their work by it
    tx = make_optimizer(cfg.method, cfg.optim, num_steps, steps_per_epoch=len(forget_ex) / cfg.data.batch_size,
                        backend=backend)
    if prec.moments != prec.params:
        tx = precision.with_moment_dtype(tx, prec.jnp("moments"))
    k = cfg.run.micro_batches
    if lora_run is None:
        unlearn_step = make_unlearn_step(apply_fn, cfg.method, tx, micro_batches=k, backend=backend,
                                         grad_sharding=par.param_shardings(params, mesh, rules))  # fmt: skip
        frozen, shardings = (), None
    else:
        unlearn_step = lora_run.bind(lambda fn: make_unlearn_step(fn, cfg.method, tx, micro_batches=k,
                                                                  backend=backend))
        frozen = lora_run.frozen
        shardings = jax.tree_util.tree_map(lambda _: par.replicated(mesh), params)  # adapters: no rules
    sharded = par.shard_unlearn_step(
        unlearn_step, mesh, rules, params, jax.eval_shape(tx.init, params), ref_params=ref_params,
        strict=cfg.mesh.strict, print_memory=main and cfg.mesh.enabled, frozen=frozen, shardings=shardings,
        backend=backend,
    )  # fmt: skip
    _check_batch_size(cfg, sharded)
    opt_state = jax.jit(tx.init, out_shardings=sharded.opt_state_shardings)(params)
    if ref_params is not None:
        params, opt_state, ref_params = sharded.place_state(params, opt_state, ref_params)
    else:
        params, opt_state = sharded.place_state(params, opt_state)
    rng = par.place(jax.random.PRNGKey(seed), par.replicated(mesh))

    default_eval = eval_fn is None and (cfg.run.eval_every > 0 or cfg.selection.enabled) and eval_sets
    if default_eval:
        from ngdiff_jax.data import make_batches

        pad = model_io.pad_id(tok)
        kw = {"pad_id": pad, "buckets": list(cfg.data.buckets) if cfg.data.buckets else None,
              "max_length": cfg.data.max_length}  # fmt: skip
        eval_fn = eval_hook.qa_probability_eval(
            apply_fn,
            {
                "forget": make_batches(forget_ex, cfg.data.batch_size, **kw),
                "retain": make_batches(
                    retain_ex[: max(len(forget_ex), cfg.data.batch_size)], cfg.data.batch_size, **kw
                ),
            },
        )

    if lora_run is None and cfg.run.scan_layers and eval_fn is not None and not default_eval:
        eval_fn = lambda step, p, fn=eval_fn: fn(step, models.stacked.unstack(p))  # noqa: E731  (per-block layout)
    if lora_run is not None and eval_fn is not None:
        # the default hook takes {"base", "lora"}; a caller's hook gets the merged full params
        eval_fn = lora_run.wrap_eval(eval_fn) if default_eval else (
            lambda step, adapters, fn=eval_fn: fn(step, lora_run.merged_params(adapters)))
    eval_every, selector = cfg.run.eval_every, None
    if cfg.selection.enabled:  # model selection wraps the hook (training/selection.py)
        selector = _selector(cfg, eval_fn, model=model, tok=tok, spec=spec, out=out, main=main, mesh=mesh, par=par,
                             to_full=to_full)  # fmt: skip
        eval_fn, eval_every = selector, cfg.selection.every
    before = divergence.fingerprint(params)  # an unchanged model is a failure, not a result
    t0 = time.perf_counter()
    # The loop owns (and donates) params and opt_state from here on.
    result = run_loop(
        sharded.loop_step,
        params,
        opt_state,
        streams={"forget": forget, "retain": retain},
        num_steps=num_steps,
        rng=rng,
        out_dir=out,
        extra_args=(ref_params, *frozen),
        checkpoint_every=cfg.run.checkpoint_every,
        max_checkpoints=cfg.run.max_checkpoints,
        log_every=cfg.run.log_every,
        eval_fn=eval_fn,
        eval_every=eval_every,
        progress=cfg.run.progress,
        meta=_settings(cfg),
        jit=False,
    )
    del params, opt_state, ref_params
    wall = time.perf_counter() - t0
    result.opt_state = None  # not needed for the export: free it first
    divergence.check_run(result, out, cfg, params=result.params)  # a diverged run is not exported
    divergence.check_changed(before, result, out, cfg)
    card = {"base_model": cfg.model_path, "method": f"{cfg.method.name} (ngdiff-jax unlearning)",
            "data": {"source": cfg.data.source or "TOFU", "forget": cfg.data.forget_split, "retain": retain_split},
            "metrics": {"steps": result.step, **(result.evals[-1] if result.evals else result.last_metrics or {})}}
    exported = result.params if lora_run is not None or to_full is None else to_full(result.params)
    model_dir, adapter_dir = model_io.export_run(
        out, model, exported, tok, lora_run=lora_run, card=card, dtype=prec.jnp("export"), main=main,
        write_format=lambda d: save_format(spec, d, stage="unlearn", method=cfg.method.name,
                                           forget_split=cfg.data.forget_split, retain_split=retain_split),
    )  # fmt: skip
    summary = {
        "method": cfg.method.name,
        "steps": result.step,
        "resumed_from": result.resumed_from,
        "last_metrics": result.last_metrics,
        "step_time_s": result.step_time_s,
        "wall_s": wall,
        "model_dir": str(model_dir),
        "evals": result.evals,
    }
    if selector is not None:
        summary["selection"] = selector.summary()
        if selector.best is None and main:
            print(f"warning: no evaluated point met the selection criterion ({selector.criterion.describe()}); "
                  f"no best_model was written (the last model is in {model_dir}).", file=sys.stderr)  # fmt: skip
    if lora_run is not None:
        summary["lora"] = {**lora_run.summary(), "adapter_dir": str(adapter_dir)}
    if cfg.mesh.enabled:
        summary["mesh"] = dict(mesh.shape)
        summary["memory_estimate"] = sharded.memory.as_dict()
    if main:
        jsonio.write_json(out / "summary.json", summary)
    return result, summary


def _selector(cfg: UnlearnConfig, hook, *, model, tok, spec, out: Path, main: bool, mesh, par, to_full):
    """The :class:`selection.Selector` of ``cfg.selection``: the probability hook (``hook``) or the
    full TOFU metrics, the criterion, and the best-model export (gathered on a mesh)."""
    from ngdiff_jax.data import QAFormatter
    from ngdiff_jax.training import selection

    sel = cfg.selection
    if sel.retain_eval and not Path(sel.retain_eval).is_file():
        raise FileNotFoundError(
            f"selection.retain_eval={sel.retain_eval}: no such file; evaluate the retain model first "
            "(ngdiff eval --model <retain> --role retain --out <file>) and give that file."
        )
    if sel.tofu:
        evaluate = selection.tofu_evaluate(
            model, tok, data_dir=data_assembly.resolve_source(cfg.data.source), forget_split=cfg.data.forget_split,
            retain_eval=sel.retain_eval, limit=sel.tofu_limit, batch_size=cfg.data.batch_size,
            buckets=list(cfg.data.buckets) if cfg.data.buckets else None, formatter=QAFormatter(tok, spec=spec),
            to_full=to_full, max_new_tokens=sel.tofu_max_new_tokens,
        )  # fmt: skip
    elif hook is not None:
        evaluate = hook
    else:
        raise ValueError("selection needs an evaluation: set selection.tofu=true or keep the default hook.")
    export = None
    if sel.export_best:
        def export(params, directory):
            full = to_full(params) if to_full is not None else params
            if mesh is None:
                model_io.save_model(model, full, directory, tok)
            else:
                par.save_pretrained_gathered(model, full, directory, tokenizer=tok)

    return selection.Selector(sel.criterion(), evaluate, out, export=export, patience=sel.patience, main=main)


def _check_batch_size(cfg: UnlearnConfig, sharded) -> None:
    from ngdiff_jax.parallel.shardings import batch_axes

    n = 1
    for a in batch_axes(sharded.mesh, sharded.rules):
        n *= sharded.mesh.shape[a]
    k = cfg.run.micro_batches
    if cfg.data.batch_size % (n * k):
        per = f" x {k} micro-batches" if k > 1 else ""
        raise ValueError(
            f"data.batch_size={cfg.data.batch_size} is not divisible by the {n} devices that split the batch{per} "
            f"on mesh {dict(sharded.mesh.shape)} (mesh.preset={cfg.mesh.preset}); use a multiple of {n * k}."
        )
