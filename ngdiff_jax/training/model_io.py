"""Model and tokenizer I/O for the pipelines: local-or-hub checks, loading, export."""

from __future__ import annotations

from pathlib import Path


def pad_id(tokenizer) -> int:
    """The padding id: the pad token, else EOS."""
    pid = tokenizer.pad_token_id
    if pid is None:
        pid = tokenizer.eos_token_id
    if pid is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token.")
    return int(pid)


def _check_local_or_hub(path: str, what: str) -> str:
    p = Path(path).expanduser()
    if p.exists():
        if p.is_dir() and not (p / "config.json").is_file() and what == "model_path":
            raise FileNotFoundError(
                f"{what} {path!r}: looked for {p.absolute() / 'config.json'} and found none; "
                "pass the directory written by save_pretrained (e.g. <finetune output_dir>/model)."
            )
        return str(p)
    from ngdiff_jax.paths import hub_cached, looks_like_hub_id, not_local_message

    if looks_like_hub_id(path) and hub_cached(path):
        return path  # a hub id in the local cache (nothing is downloaded at run time)
    raise FileNotFoundError(not_local_message(what, path, p, "directory"))


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_check_local_or_hub(path, "tokenizer"))
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def model_dir(path: str) -> str:
    """``model_path`` checked: an existing model directory (with config.json) or a hub id."""
    return _check_local_or_hub(path, "model_path")


def load_model(path: str):
    from ngdiff_jax import models

    return models.from_pretrained(model_dir(path))


def save_model(model, params, path: Path, tokenizer, card: dict | None = None) -> Path:
    """Export ``params`` in ``model``'s architecture with ``save_pretrained`` (tokenizer included;
    ``card``: the model card's base model, method, data, metrics)."""
    from ngdiff_jax import models

    path = Path(path)
    models.save_pretrained(models.with_params(model, params), path, tokenizer=tokenizer, card=card)
    return path


def export_run(out: Path, model, params, tokenizer, *, lora_run, card: dict, dtype, main: bool, write_format):
    """Export a finished run: the model in ``out/model`` (with LoRA: the merged model there and the
    PEFT adapter in ``out/adapter``), each written aside and swapped in whole
    (:func:`ngdiff_jax.training.ownership.atomic_dir`); ``write_format(dir)`` adds the format file.
    Returns ``(model_dir, adapter_dir or None)``."""
    model_dir = out / "model"
    try:
        return _export(out, model, params, tokenizer, lora_run, card, dtype, main, write_format)
    except OSError as e:
        if e.filename is None and e.errno is not None:  # safetensors/transformers name no file
            raise OSError(e.errno, e.strerror, str(model_dir)) from e
        raise


def _export(out: Path, model, params, tokenizer, lora_run, card, dtype, main, write_format):
    from ngdiff_jax import parallel as par
    from ngdiff_jax.training import ownership

    model_dir, adapter_dir = out / "model", None
    with ownership.atomic_dir(model_dir, write=main) as tmp:
        if lora_run is not None:
            with ownership.atomic_dir(out / "adapter", write=main) as tmp_adapter:
                lora_run.export(params, out, tokenizer, base_model=card["base_model"], model_dir=tmp,
                                adapter_dir=tmp_adapter, card=card, dtype=dtype)  # fmt: skip
            adapter_dir = out / "adapter"
        else:
            par.save_pretrained_gathered(model, params, tmp, tokenizer=tokenizer, dtype=dtype, card=card)
        if main:
            write_format(tmp)
    return model_dir, adapter_dir
