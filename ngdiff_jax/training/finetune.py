"""The finetuning pipeline behind ``ngdiff finetune``: train a causal LM on a QA split.

Builds TOFU's target model (split ``full``) or a retain-only reference model
(``retain90`` ...), from scratch (``model``: a config in ``configs/models``, with
a byte-level BPE tokenizer trained on the split when none is given) or from a
pretrained ``model_path``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jax
import yaml

from ngdiff_jax.config_loader import to_dict
from ngdiff_jax.data import jsonio
from ngdiff_jax.data.formatting import save_format
from ngdiff_jax.training import checkpoint, data_assembly, divergence, model_io, ownership
from ngdiff_jax.training.config_schema import FinetuneConfig
from ngdiff_jax.training.loop import LoopResult, run_loop, steps_for_epochs
from ngdiff_jax.training.methods import make_finetune_optimizer
from ngdiff_jax.training.step import make_finetune_step

__all__ = ["build_model", "run_finetune"]


def build_model(cfg: FinetuneConfig, rows: list[dict], out: Path):
    """``(model, tokenizer)``: pretrained from ``model_path``, or new from ``model`` (+ trained tokenizer)."""
    from flax import nnx

    from ngdiff_jax import models

    if cfg.model_path is not None:
        model = model_io.load_model(cfg.model_path)
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
            texts = [t for r in rows for t in (r["question"], r["answer"])]
            texts += [
                f.user_start_tag + r["question"] + f.user_end_tag + f.asst_start_tag + f.answer_prefix + r["answer"]
                for r in rows
            ]
            tok = train_tokenizer(texts, tok_dir, vocab_size=int(size))
    hf["vocab_size"] = len(tok)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tok, name, None) is not None:
            hf[name] = int(getattr(tok, name))
    model = models.from_config(hf, rngs=nnx.Rngs(cfg.run.seed))
    return model, tok


@ownership.guarded("finetune")  # validation, lock, output ownership
def run_finetune(cfg: FinetuneConfig, *, eval_fn=None) -> tuple[LoopResult, dict[str, Any]]:
    """Train on ``cfg.data.split`` and export to ``<output_dir>/model`` (tokenizer included)."""
    from ngdiff_jax import models

    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    rows = data_assembly.load_split(cfg.data, cfg.data.split)
    model, tok = build_model(cfg, rows, out)
    examples = data_assembly.encode_split(rows, tok, cfg.data, cfg.format, where=f"data.split={cfg.data.split}")
    train = data_assembly.make_batcher(examples, tok, cfg.data, seed=cfg.run.seed)
    num_steps = cfg.run.steps if cfg.run.steps is not None else steps_for_epochs(cfg.run.epochs, len(train))

    lora_run = None
    if cfg.lora.enabled:  # train adapters only; the base is a frozen extra step argument
        from ngdiff_jax.training.lora_run import LoraRun

        lora_run = LoraRun(model, cfg.lora, seed=cfg.run.seed)
        params = lora_run.adapters
    else:
        apply_fn, params = models.functional(model)
    tx = make_finetune_optimizer(cfg.optim, num_steps)
    opt_state = tx.init(params)
    if lora_run is None:
        ft_step = make_finetune_step(apply_fn, tx)
    else:
        ft_step = lora_run.bind(lambda fn: make_finetune_step(fn, tx))
        if eval_fn is not None:  # a caller's hook gets the merged full params
            eval_fn = lambda step, adapters, fn=eval_fn: fn(step, lora_run.merged_params(adapters))  # noqa: E731

    def step(params, opt_state, batches, rng, *frozen):
        return ft_step(params, opt_state, batches[0], rng, *frozen)

    settings = checkpoint.resume_settings(cfg)
    t0 = time.perf_counter()
    result = run_loop(
        step,
        params,
        opt_state,
        streams={"train": train},
        num_steps=num_steps,
        rng=jax.random.PRNGKey(cfg.run.seed),
        out_dir=out,
        extra_args=() if lora_run is None else lora_run.frozen,
        checkpoint_every=cfg.run.checkpoint_every,
        max_checkpoints=cfg.run.max_checkpoints,
        log_every=cfg.run.log_every,
        eval_fn=eval_fn,
        eval_every=cfg.run.eval_every,
        progress=cfg.run.progress,
        meta=settings,
        show=("loss", "grad_norm"),
    )
    wall = time.perf_counter() - t0
    divergence.check_run(result, out, cfg, params=result.params)  # a diverged run is not exported
    model_dir = out / "model"
    card = {"base_model": cfg.model_path, "method": "fine-tuning (ngdiff-jax)",
            "data": {"source": cfg.data.source or "TOFU", "split": cfg.data.split},
            "metrics": {"steps": result.step, **(result.last_metrics or {})}}
    with ownership.atomic_dir(model_dir) as tmp:  # written aside, swapped in whole
        if lora_run is not None:  # merged model in out/model, PEFT adapter in out/adapter
            with ownership.atomic_dir(out / "adapter") as tmp_adapter:
                _, adapter_dir = lora_run.export(result.params, out, tok, base_model=cfg.model_path,
                                                 model_dir=tmp, adapter_dir=tmp_adapter, card=card)  # fmt: skip
            adapter_dir = out / "adapter"
        else:
            model_io.save_model(model, result.params, tmp, tok, card=card)
        save_format(cfg.format, tmp, stage="finetune", split=cfg.data.split)
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
    jsonio.write_json(out / "summary.json", summary)
    return result, summary
