"""The finetuning pipeline behind ``ngdiff finetune``: train a causal LM on a QA split.

Builds TOFU's target model (split ``full``) or a retain-only reference model
(``retain90`` ...), from scratch (``model``: a config in ``configs/models``, with
a byte-level BPE tokenizer trained on the split when none is given) or from a
pretrained ``model_path``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import jax
import yaml

from ngdiff_jax.config_loader import to_dict
from ngdiff_jax.data import jsonio
from ngdiff_jax.data.formatting import save_format
from ngdiff_jax.training import checkpoint, data_assembly, divergence, model_io, precision, validation
from ngdiff_jax.training.config_schema import FinetuneConfig
from ngdiff_jax.training.loop import LoopResult, run_loop, steps_for_epochs
from ngdiff_jax.training.methods import make_finetune_optimizer
from ngdiff_jax.training.step import make_finetune_step

__all__ = ["build_model", "run_finetune"]


def build_model(cfg: FinetuneConfig, rows: list[dict], out: Path, *, mesh=None, rules=None):
    """``(model, tokenizer)``: pretrained from ``model_path`` (loaded onto ``mesh`` when given),
    or new from ``model`` (+ trained tokenizer), in ``cfg.precision``'s dtypes."""
    from flax import nnx

    from ngdiff_jax import models
    from ngdiff_jax.parallel.mesh import resolve_rules

    prec = cfg.precision
    kw = {"dtype": prec.jnp("compute"), "param_dtype": prec.jnp("params")}
    if cfg.model_path is not None:
        model = models.from_pretrained(model_io.model_dir(cfg.model_path), mesh=mesh,
                                       rules=None if rules is None else resolve_rules(rules), **kw)  # fmt: skip
        tok = model_io.load_tokenizer(cfg.tokenizer or cfg.model_path)
        return model, tok
    hf = dict(cfg.model.hf)
    if "model_type" not in hf:
        raise ValueError("model.hf needs a `model_type` (e.g. llama) and the sizes of the model.")
    if cfg.tokenizer is not None:
        tok = model_io.load_tokenizer(cfg.tokenizer)
    else:
        tok_dir = out / "tokenizer"
        if (tok_dir / "tokenizer.json").is_file():  # resuming: reuse the tokenizer trained before
            tok = model_io.load_tokenizer(str(tok_dir))
        else:
            from ngdiff_jax.data import train_tokenizer

            size = cfg.model.tokenizer_vocab_size or hf.get("vocab_size")
            if size is None:
                raise ValueError("set model.tokenizer_vocab_size or model.hf.vocab_size to train a tokenizer.")
            f = cfg.format
            if cfg.data.kind == "text":
                texts = list(rows)
            else:
                texts = [t for r in rows for t in (r["question"], r["answer"])]
                texts += [
                    f.user_start_tag + r["question"] + f.user_end_tag + f.asst_start_tag + f.answer_prefix
                    + r["answer"] for r in rows
                ]
            tok = train_tokenizer(texts, tok_dir, vocab_size=int(size))
    hf["vocab_size"] = len(tok)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tok, name, None) is not None:
            hf[name] = int(getattr(tok, name))
    model = models.from_config(hf, rngs=nnx.Rngs(cfg.run.seed), **kw)
    return model, tok


@validation.guarded("finetune", ignore=("mesh", "distributed"))  # validation, lock, output ownership
def run_finetune(cfg: FinetuneConfig, *, eval_fn=None) -> tuple[LoopResult, dict[str, Any]]:
    """Train on ``cfg.data.split`` and export to ``<output_dir>/model`` (tokenizer included).

    The same single code path as ``ngdiff unlearn``: a (one-device for ``mesh.preset: none``)
    mesh, a sharded jitted step (``run.micro_batches``, ``run.remat``, ``precision.*``), one
    copy of parameters and optimizer state in the loop, the export gathered to process 0."""
    from ngdiff_jax import models
    from ngdiff_jax import parallel as par

    mesh, rules, main = precision.run_mesh(cfg.mesh, cfg.distributed)
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if main:
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    rows = data_assembly.load_split(cfg.data, cfg.data.split)
    model, tok = build_model(cfg, rows, out, mesh=mesh, rules=rules)
    examples = data_assembly.encode_split(rows, tok, cfg.data, cfg.format, where=f"data.split={cfg.data.split}")
    train = data_assembly.make_batcher(examples, tok, cfg.data, seed=cfg.run.seed)
    num_steps = cfg.run.steps if cfg.run.steps is not None else steps_for_epochs(cfg.run.epochs, len(train))

    if cfg.run.scan_layers:  # the blocks as one block stacked on the layer axis, run as one scan
        model = models.stacked.scanned(model, release=True)
    models.set_remat(model, cfg.run.remat)
    lora_run = None
    if cfg.lora.enabled:  # train adapters only; the base is a frozen extra step argument
        from ngdiff_jax.training.lora_run import LoraRun

        lora_run = LoraRun(model, cfg.lora, seed=cfg.run.seed)
        params = lora_run.adapters
    else:
        apply_fn, params = models.functional(model)
        if cfg.run.scan_layers and eval_fn is not None:  # a caller's hook gets the per-block layout
            eval_fn = lambda step, p, fn=eval_fn: fn(step, models.stacked.unstack(p))  # noqa: E731
    model = models.abstract_like(model, scan_layers=False)  # the per-block structure for the export
    tx = make_finetune_optimizer(cfg.optim, num_steps)
    prec = cfg.precision
    # every process computes it (the weights may be sharded over processes), the first one prints it
    line = None if lora_run is not None else precision.bf16_rate_warning(params, cfg.optim.lr)
    if main and line:
        print(line, file=sys.stderr)
    if prec.moments != prec.params:
        tx = precision.with_moment_dtype(tx, prec.jnp("moments"))
    k = cfg.run.micro_batches
    if lora_run is None:
        ft_step = make_finetune_step(apply_fn, tx, micro_batches=k,
                                     grad_sharding=par.param_shardings(params, mesh, rules))  # fmt: skip
        frozen, shardings = (), None
    else:
        ft_step = lora_run.bind(lambda fn: make_finetune_step(fn, tx, micro_batches=k))
        frozen = lora_run.frozen
        shardings = jax.tree_util.tree_map(lambda _: par.replicated(mesh), params)  # adapters: no rules
        if eval_fn is not None:  # a caller's hook gets the merged full params
            eval_fn = lambda step, adapters, fn=eval_fn: fn(step, lora_run.merged_params(adapters))  # noqa: E731
    sharded = par.shard_unlearn_step(
        ft_step, mesh, rules, params, jax.eval_shape(tx.init, params), strict=cfg.mesh.strict,
        print_memory=main and cfg.mesh.enabled, num_batches=1, frozen=frozen, shardings=shardings,
        backend=model.backend,
    )  # fmt: skip
    opt_state = jax.jit(tx.init, out_shardings=sharded.opt_state_shardings)(params)
    params, opt_state = sharded.place_state(params, opt_state)
    rng = par.place(jax.random.PRNGKey(cfg.run.seed), par.replicated(mesh))

    settings = checkpoint.resume_settings(cfg, ignore=("mesh", "distributed"))
    t0 = time.perf_counter()
    # The loop owns (and donates) params and opt_state from here on.
    before = divergence.fingerprint(params)  # an unchanged model is a failure, not a result
    result = run_loop(
        sharded.loop_step,
        params,
        opt_state,
        streams={"train": train},
        num_steps=num_steps,
        rng=rng,
        out_dir=out,
        extra_args=frozen,
        checkpoint_every=cfg.run.checkpoint_every,
        max_checkpoints=cfg.run.max_checkpoints,
        log_every=cfg.run.log_every,
        eval_fn=eval_fn,
        eval_every=cfg.run.eval_every,
        progress=cfg.run.progress,
        meta=settings,
        show=("loss", "grad_norm"),
        jit=False,
    )
    del params, opt_state
    wall = time.perf_counter() - t0
    result.opt_state = None  # not needed for the export: free it first
    divergence.check_run(result, out, cfg, params=result.params)  # a diverged run is not exported
    divergence.check_changed(before, result, out, cfg)
    card = {"base_model": cfg.model_path, "method": "fine-tuning (ngdiff-jax)",
            "data": {"source": cfg.data.source or "TOFU", "split": cfg.data.split},
            "metrics": {"steps": result.step, **(result.last_metrics or {})}}
    exported = models.stacked.unstack(result.params) if cfg.run.scan_layers and lora_run is None else result.params
    model_dir, adapter_dir = model_io.export_run(
        out, model, exported, tok, lora_run=lora_run, card=card, dtype=prec.jnp("export"), main=main,
        write_format=lambda d: save_format(cfg.format, d, stage="finetune", split=cfg.data.split),
    )
    summary = {
        "steps": result.step,
        "resumed_from": result.resumed_from,
        "last_metrics": result.last_metrics,
        "step_time_s": result.step_time_s,
        "wall_s": wall,
        "model_dir": str(model_dir),
    }
    if lora_run is not None:
        summary["lora"] = {**lora_run.summary(), "adapter_dir": str(adapter_dir)}
    if main:
        jsonio.write_json(out / "summary.json", summary)
    return result, summary
