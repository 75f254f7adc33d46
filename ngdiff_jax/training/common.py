"""Shared plumbing of the finetune and unlearn pipelines: data, tokenizer, model I/O, eval hook."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ngdiff_jax.config import to_dict
from ngdiff_jax.training.configs import DataConfig

#: Run settings that may change between a run and its resume (display and bookkeeping only).
COSMETIC_RUN_KEYS = ("progress", "log_every", "eval_every", "max_checkpoints")


def resume_settings(cfg, *, ignore: Sequence[str] = ()) -> dict:
    """The config as a dict of what must match for a resume: everything but the cosmetic
    ``run`` keys and the top-level sections named in ``ignore``."""
    d = to_dict(cfg)
    for key in ignore:
        d.pop(key, None)
    d["run"] = {k: v for k, v in d["run"].items() if k not in COSMETIC_RUN_KEYS}
    return d

__all__ = [
    "encode_split",
    "load_model",
    "load_split",
    "load_tokenizer",
    "make_batcher",
    "model_dir",
    "pad_id",
    "qa_probability_eval",
    "resolve_source",
    "save_model",
    "write_json",
]


def resolve_source(source: str | None) -> str | Path:
    """``data.source`` -> what ``load_tofu`` takes: a directory, or a hub id.

    ``None`` is the shared TOFU files (``ngdiff_jax.paths.shared_data_dir() / "tofu"``).
    """
    from ngdiff_jax.paths import shared_data_dir

    if source is None:
        d = shared_data_dir() / "tofu"
        if not d.is_dir():
            raise FileNotFoundError(
                f"data.source is not set and the shared TOFU files are not at {d}; set data.source to a "
                "folder of TOFU <split>.json files (e.g. one made by ngdiff_jax.data.synthetic.write_benchmark) "
                "or to the hub id locuslab/TOFU, or set NGDIFF_SHARED_DATA."
            )
        return d
    p = Path(source).expanduser()
    if p.is_dir():
        return p
    parts = source.split("/")
    if len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~")):
        return source  # a hub id
    raise FileNotFoundError(
        f"data.source {source!r} not found: looked for the directory {p.absolute()}; pass a folder of "
        "TOFU <split>.json files or a hub id such as locuslab/TOFU."
    )


def load_split(data: DataConfig, split: str) -> list[dict]:
    """Rows (``question``, ``answer``) of a split, the first ``data.limit`` of them if set."""
    from ngdiff_jax.data import load_tofu

    rows = load_tofu(split, resolve_source(data.source))
    if data.limit is not None:
        rows = rows[: data.limit]
    if not rows:
        raise ValueError(f"split {split!r} of {data.source or 'the shared TOFU files'} has no rows.")
    for i, r in enumerate(rows[:1]):
        if "question" not in r or "answer" not in r:
            raise KeyError(f"split {split!r} row {i} lacks 'question'/'answer' fields (has {sorted(r)}).")
    return rows


def encode_split(rows: Sequence[Mapping[str, str]], tokenizer, data: DataConfig):
    """``(input_ids, labels)`` examples, answers truncated to ``data.max_length`` tokens in all."""
    from ngdiff_jax.data import QAFormatter

    fmt = QAFormatter(tokenizer, template=data.template, max_length=data.max_length)
    return fmt.encode_many([r["question"] for r in rows], [r["answer"] for r in rows])


def make_batcher(examples, tokenizer, data: DataConfig, *, seed: int, shuffle: bool = True):
    from ngdiff_jax.data import Batcher

    return Batcher(
        examples,
        data.batch_size,
        pad_id=pad_id(tokenizer),
        seed=seed,
        shuffle=shuffle,
        buckets=list(data.buckets) if data.buckets else None,
        max_length=data.max_length,
    )


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
    parts = path.split("/")
    if len(parts) == 2 and all(parts) and not path.startswith((".", "/", "~")):
        return path  # hub id
    raise FileNotFoundError(
        f"{what} {path!r} not found: looked for {p.absolute()}; pass an existing directory or a hub id."
    )


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


def save_model(model, params, path: Path, tokenizer) -> Path:
    """Export ``params`` in ``model``'s architecture with ``save_pretrained`` (tokenizer included)."""
    from ngdiff_jax import models

    path = Path(path)
    models.save_pretrained(models.with_params(model, params), path, tokenizer=tokenizer)
    return path


def qa_probability_eval(apply_fn, sets: Mapping[str, Sequence[Mapping[str, np.ndarray]]]):
    """An ``eval_fn(step, params)`` hook: mean answer probability ``exp(-mean token NLL)`` per set.

    ``sets`` maps a name (``forget``, ``retain``) to fixed batches; the hook returns
    ``{"<name>_prob": mean, "<name>_nll": mean}`` over the real (non-padding) rows.
    """
    from ngdiff_jax.models.logprobs import sequence_nll

    @jax.jit
    def nll(params, batch):
        return sequence_nll(apply_fn(params, batch["input_ids"], batch["attention_mask"]), batch["labels"])

    def per_sample(params, batches):
        vals = []
        for b in batches:
            real = np.asarray(b["attention_mask"]).sum(-1) > 0
            vals.append(np.asarray(nll(params, b))[real])
        return np.concatenate(vals)

    def eval_fn(step: int, params) -> dict[str, Any]:
        out = {}
        for name, batches in sets.items():
            v = per_sample(params, batches)
            out[f"{name}_prob"] = float(np.mean(np.exp(-v)))
            out[f"{name}_nll"] = float(np.mean(v))
        return out

    return eval_fn


def write_json(path: Path, obj) -> None:
    """Pretty-printed JSON (non-JSON values via ``str``)."""
    Path(path).write_text(json.dumps(obj, indent=2, default=str) + "\n")
