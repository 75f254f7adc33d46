"""One validation pass over a training config and its inputs, before any weights are loaded.

:func:`validate_run` checks, and reports every problem it finds as one line naming the
key or file, the bad value and the fix (raised together as one
:class:`~ngdiff_jax.errors.InputError`, exit code 2), without writing anything:

* the range and finiteness of every numeric key (a table below; a float key not listed
  must still be finite);
* that ``run.output_dir`` neither contains nor lies inside an input (model, tokenizer,
  data) directory (:func:`ngdiff_jax.training.ownership.check_output_dir`);
* the model: ``config.json`` readable by transformers and of a supported type, its
  weights finite (a streaming safetensors scan), a hub id only if it is in the local
  Hugging Face cache (nothing is downloaded at run time);
* the tokenizer loads and has no more tokens than the model's ``vocab_size``;
* ``data.max_length`` (and every bucket) fits the model's positions;
* every row of every split used has string ``question`` and ``answer`` fields.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ngdiff_jax.config_loader import to_dict
from ngdiff_jax.data.jsonio import read_json
from ngdiff_jax.errors import InputError
from ngdiff_jax.paths import hub_cached, looks_like_hub_id, not_local_message
from ngdiff_jax.training import ownership

__all__ = ["check_config_values", "hub_cached", "validate_run"]


def _pos(v):
    return v > 0


def _nonneg(v):
    return v >= 0


def _ge(n):
    return lambda v: v >= n


#: dotted key -> (test, what it must be, example of a good value). ``None`` values pass
#: (the key's "off"/"auto" setting) unless the key is in ``_NOT_NONE``.
RULES: dict[str, tuple[Callable[[Any], bool], str, str]] = {
    "optim.lr": (_pos, "> 0 (a negative rate climbs the loss, 0 never moves)", "1e-4"),
    "optim.weight_decay": (_nonneg, ">= 0", "0.01"),
    "optim.warmup_steps": (_nonneg, ">= 0", "0"),
    "optim.max_grad_norm": (_pos, "> 0, or null for no clipping", "1.0"),
    "optim.gen_every": (_ge(1), ">= 1", "4"),
    "optim.gen_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)", "0.9"),
    "optim.gen_clip_factor": (_ge(1), ">= 1", "2.0"),
    "optim.eps": (_pos, "> 0", "1e-12"),
    "run.micro_batches": (_ge(1), ">= 1", "1"),
    "optim.b1": (lambda v: 0 <= v < 1, "in [0, 1)", "0.9"),
    "optim.b2": (lambda v: 0 <= v < 1, "in [0, 1)", "0.999"),
    "optim.adam_eps": (_nonneg, ">= 0", "1e-8"),
    "optim.eps_root": (_nonneg, ">= 0 (> 0 for meta-gradients)", "1e-16"),
    "optim.clip_norm": (_pos, "> 0, or null for no per-task clipping", "1.0"),
    "data.batch_size": (_ge(1), ">= 1", "8"),
    "data.max_length": (_ge(2), ">= 2 (prompt + EOS)", "128"),
    "data.limit": (_ge(1), ">= 1, or null for all rows", "100"),
    "run.steps": (_ge(1), ">= 1, or null to use run.epochs", "50"),
    "run.epochs": (_pos, "> 0", "1"),
    "run.checkpoint_every": (_nonneg, ">= 0 (0 disables checkpoints)", "50"),
    "run.max_checkpoints": (_ge(1), ">= 1 (0 would delete every checkpoint, so resume would silently restart)",
                            "2"),  # fmt: skip
    "run.log_every": (_ge(1), ">= 1", "1"),
    "run.eval_every": (_nonneg, ">= 0 (0 disables the evaluation hook)", "10"),
    "run.max_skipped_fraction": (lambda v: 0 <= v <= 1, "in [0, 1]", "0.1"),
    "model.tokenizer_vocab_size": (_ge(2), ">= 2", "384"),
}
_NOT_NONE = {"run.max_checkpoints"}


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = d
    return out


def check_config_values(cfg) -> list[str]:
    """One line per numeric key out of range (or not finite), naming key, value and a fix."""
    flat = _flatten(to_dict(cfg))
    errors = []
    for key, value in flat.items():
        if isinstance(value, float) and not math.isfinite(value):
            errors.append(f"{key}={value}: must be a finite number; set e.g. {key}={RULES.get(key, (0, 0, '1'))[2]}.")
            continue
        rule = RULES.get(key)
        if rule is None:
            continue
        test, must, example = rule
        if value is None:
            if key in _NOT_NONE:
                errors.append(f"{key}=null: must be {must}; set e.g. {key}={example}.")
            continue
        if isinstance(value, (list, tuple)):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{key}={value!r}: must be a number {must}; set e.g. {key}={example}.")
        elif not test(value):
            errors.append(f"{key}={value}: must be {must}; set e.g. {key}={example}.")
    for i, b in enumerate(flat.get("data.buckets") or []):
        if not isinstance(b, int) or b < 2:
            errors.append(f"data.buckets[{i}]={b!r}: every bucket must be an integer >= 2; "
                          "e.g. data.buckets=[64, 128].")  # fmt: skip
    return errors


# -- inputs ----------------------------------------------------------------------------------


def _model_config(key: str, path: str, errors: list[str]):
    """The ``ModelConfig`` of a model dir (or cached hub id), or None with an error added."""
    from ngdiff_jax.models.config import ModelConfig

    p = Path(path).expanduser()
    if not p.exists():
        if not (looks_like_hub_id(path) and hub_cached(path)):
            errors.append(not_local_message(key, path, p, "model directory (with config.json)"))
            return None, None
        from huggingface_hub import snapshot_download

        p = Path(snapshot_download(path, local_files_only=True))
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        errors.append(f"{key}={path!r}: no config.json in {p.absolute()}; pass the directory written by "
                      "save_pretrained (e.g. <finetune output_dir>/model).")  # fmt: skip
        return None, None
    try:
        with open(cfg_file) as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        errors.append(f"{cfg_file}: not readable as JSON ({' '.join(str(e).split())}); "
                      "restore the model's config.json.")  # fmt: skip
        return None, None
    try:
        return ModelConfig.from_hf(raw), p
    except Exception as e:  # transformers config errors: ValueError, KeyError, TypeError, AttributeError
        errors.append(f"{cfg_file}: transformers cannot use this config ({type(e).__name__}: "
                      f"{' '.join(str(e).split())[:300]}); fix or replace config.json.")  # fmt: skip
        return None, None


def _model_section_errors(hf: dict, tokenizer_vocab_size: int | None) -> list[str]:
    """A ``model.hf`` section transformers accepts (e.g. heads that divide the hidden size)."""
    from ngdiff_jax.models.config import ModelConfig

    if "model_type" not in hf:
        return ["model.hf needs a `model_type` (e.g. llama) and the sizes of the model."]
    try:
        ModelConfig.from_hf({**hf, "vocab_size": hf.get("vocab_size") or tokenizer_vocab_size or 1024})
    except Exception as e:  # transformers' config validation raises its own error classes
        return [f"model.hf: transformers refuses this {hf['model_type']} config ({type(e).__name__}: "
                f"{' '.join(str(e).split())[:300]}); fix the sizes in model.hf."]  # fmt: skip
    return []


def check_model_files(model_dir: Path, vocab_size: int | None) -> list[str]:
    """A shard index whose shards are all there, and an embedding with ``vocab_size`` rows (config.json's),
    read from the safetensors headers only."""
    from safetensors import safe_open

    d, errors = Path(model_dir), []
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(read_json(index)["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            return [f"{index}: not a shard index ({' '.join(str(e).split())[:160]}); restore it or remove it."]
        absent = sorted(fn for fn in shards if not (d / fn).is_file())
        if absent:
            errors.append(f"{index} names shard(s) {', '.join(absent[:3])} that are not in {d}; copy the missing "
                          "shards or remove the stale index.")  # fmt: skip
    if vocab_size is None:
        return errors
    for f in sorted(d.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="numpy") as st:
                for name in st.keys():
                    if name.endswith(("embed_tokens.weight", "wte.weight", "embed_in.weight")):
                        rows = st.get_slice(name).get_shape()[0]
                        if rows != vocab_size:
                            errors.append(f"{d / 'config.json'}: vocab_size={vocab_size} but {f.name} tensor {name} "
                                          f"has {rows} rows; fix vocab_size to {rows} or use the config.json that "
                                          "came with these weights.")  # fmt: skip
        except Exception:  # a damaged file: check_weights_finite names it
            continue
    return errors


def check_weights_finite(model_dir: Path) -> list[str]:
    """Scan every ``*.safetensors`` tensor of a model dir for NaN/Inf (memory-mapped, one tensor at a time)."""
    import numpy as np
    from safetensors import safe_open

    errors = []
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="numpy") as st:
                for name in st.keys():
                    a = st.get_tensor(name)
                    if a.dtype.kind in "fc" and not np.isfinite(a).all():
                        bad = int(a.size - np.isfinite(a).sum())
                        errors.append(f"{f}: tensor {name} has {bad} non-finite values (NaN/Inf); these input "
                                      "weights are broken, use an intact model (e.g. an earlier export).")  # fmt: skip
                        break
        except Exception as e:  # safetensors raises its own error types on damaged files
            if isinstance(e, MemoryError):
                raise
            if "bfloat16" in str(e) or "dtype" in str(e).lower():
                continue  # numpy cannot hold this dtype: skipped (the load checks it)
            errors.append(f"{f}: cannot be read as safetensors ({' '.join(str(e).split())[:200]}); "
                          "the file is damaged, re-export the model.")  # fmt: skip
    return errors


def _tokenizer(key: str, path: str, errors: list[str]):
    p = Path(path).expanduser()
    if not p.exists() and not (looks_like_hub_id(path) and hub_cached(path)):
        errors.append(not_local_message(key, path, p, "tokenizer directory"))
        return None
    from ngdiff_jax.training import model_io

    try:
        return model_io.load_tokenizer(path)
    except Exception as e:
        errors.append(f"{key}={path!r}: the tokenizer does not load ({type(e).__name__}: "
                      f"{' '.join(str(e).split())[:300]}); pass a directory with tokenizer.json/"
                      "tokenizer_config.json.")  # fmt: skip
        return None


def _split_files(data, splits: list[str], errors: list[str]) -> dict[str, list]:
    """Every row of every split has string ``question``/``answer`` (the file and row are named);
    returns the rows of the splits that passed. ``data.kind: text``: each split's ``raw/<split>.json``
    is a list of texts."""
    from ngdiff_jax.paths import shared_data_dir

    if data.kind == "text":
        from ngdiff_jax.training.data_assembly import load_texts

        texts = {}
        for split in splits:
            try:
                texts[split] = load_texts(data, split)
            except (OSError, ValueError) as e:
                errors.append(" ".join(str(e).split()))
        return texts

    source = data.source
    if source is None:
        d = shared_data_dir() / "tofu"
        if not d.is_dir():
            errors.append(f"data.source is not set and the shared TOFU files are not at {d}; set data.source to a "
                          "folder of TOFU <split>.json files or set NGDIFF_SHARED_DATA.")  # fmt: skip
            return {}
    else:
        d = Path(source).expanduser()
        if not d.is_dir():
            if looks_like_hub_id(source) and hub_cached(source, "dataset"):
                return {}  # read through `datasets` from the local cache
            errors.append(not_local_message("data.source", source, d, "folder of TOFU <split>.json files", "dataset"))
            return {}
    from ngdiff_jax.data.jsonio import read_records

    good = {}
    for split in splits:
        f = next((d / n for n in (f"{split}.json", f"{split}.jsonl") if (d / n).is_file()), None)
        if f is None:
            have = ", ".join(sorted(p.stem for p in d.glob("*.json"))) or "none"
            errors.append(f"data split {split!r}: looked for {d / (split + '.json')} and found no file; "
                          f"splits there: {have}.")  # fmt: skip
            continue
        try:
            rows = read_records(f)
        except Exception as e:
            errors.append(f"{f}: cannot be read as JSON records ({' '.join(str(e).split())[:200]}); fix the file.")
            continue
        if data.limit is not None:
            rows = rows[: data.limit]
        if not rows:
            errors.append(f"{f}: split {split!r} has no rows; choose another split or fix the file.")
        good[split] = rows
        for i, r in enumerate(rows):
            for field in ("question", "answer"):
                if not isinstance(r, dict) or not isinstance(r.get(field), str):
                    has = sorted(r) if isinstance(r, dict) else type(r).__name__
                    errors.append(f"{f}: row {i} has no string {field!r} (it has {has}); fix that row or "
                                  "choose another split.")  # fmt: skip
                    break
            else:
                continue
            del good[split]
            break  # one bad row per file is enough to act on
    return good


def _row_errors(splits: dict[str, str], rows: dict[str, list]) -> list[str]:
    """A split whose every answer is empty (nothing to learn or unlearn), and forget rows that are
    also retain rows (the run would push the same question both ways)."""
    errors = []
    if any(isinstance(r, str) for got in rows.values() for r in got[:1]):  # data.kind=text
        forget, retain = rows.get(splits.get("data.forget_split")), rows.get(splits.get("data.retain_split"))
        shared = set(forget or ()) & set(retain or ())
        if shared and splits["data.forget_split"] != splits["data.retain_split"]:
            errors.append(f"data.forget_split={splits['data.forget_split']} and data.retain_split="
                          f"{splits['data.retain_split']} share {len(shared)} texts: they would be unlearned and "
                          "retained at once; choose disjoint splits.")  # fmt: skip
        return errors
    for key, split in splits.items():
        got = rows.get(split)
        if got and not any(str(r.get("answer", "")).strip() for r in got):
            errors.append(f"{key}={split}: every one of its {len(got)} answers is empty; there is nothing to "
                          "train on: fix the split's file or choose another split.")  # fmt: skip
    forget, retain = rows.get(splits.get("data.forget_split")), rows.get(splits.get("data.retain_split"))
    if forget and retain and splits["data.forget_split"] != splits["data.retain_split"]:
        kept = {(r["question"], r["answer"]) for r in retain}
        shared = [r["question"] for r in forget if (r["question"], r["answer"]) in kept]
        if shared:
            errors.append(f"data.forget_split={splits['data.forget_split']} and data.retain_split="
                          f"{splits['data.retain_split']} share {len(shared)} of {len(forget)} forget rows (e.g. "
                          f"{shared[0][:60]!r}): they would be unlearned and retained at once; pair the forget "
                          "split with its own retain split (forget01/retain99, forget05/retain95, forget10/retain90)"
                          " or leave data.retain_split null.")  # fmt: skip
    return errors


def _positions(mc) -> int:
    return int(mc.max_position_embeddings)


def validate_run(cfg, command: str) -> None:
    """Validate a ``FinetuneConfig`` / ``UnlearnConfig`` and its inputs; raise one :class:`InputError`
    listing every problem (one line each). Reads, never writes."""
    from ngdiff_jax.training import ownership

    errors = check_config_values(cfg)
    errors += ownership.check_output_dir(cfg)
    for key, value in _flatten(to_dict(cfg)).items():  # other input files (e.g. method.forget.idk_path)
        if key.endswith("_path") and key != "model_path" and isinstance(value, str) and value:
            if not Path(value).expanduser().exists():
                errors.append(f"{key}={value!r} not found: looked for {Path(value).expanduser().absolute()}; "
                              "pass an existing file or null for the default.")  # fmt: skip
    model_path = getattr(cfg, "model_path", None)
    mc = model_dir = None
    if model_path:
        mc, model_dir = _model_config("model_path", model_path, errors)
        if model_dir is not None:
            errors += check_model_files(model_dir, int(mc.vocab_size))
            errors += check_weights_finite(model_dir)
    if not model_path and getattr(cfg, "model", None) is not None:
        errors += _model_section_errors(dict(cfg.model.hf), cfg.model.tokenizer_vocab_size)
    positions = vocab = None
    if mc is not None:
        positions, vocab = _positions(mc), int(mc.vocab_size)
    elif getattr(cfg, "model", None) is not None:
        hf = dict(cfg.model.hf)
        positions = hf.get("max_position_embeddings", hf.get("n_positions"))
    tok_path = getattr(cfg, "tokenizer", None) or (model_path if mc is not None else None)
    tok = None
    if tok_path:
        tok = _tokenizer("tokenizer" if getattr(cfg, "tokenizer", None) else "model_path", tok_path, errors)
        if tok is not None and vocab is not None and len(tok) > vocab:
            errors.append(
                f"tokenizer {tok_path!r} has {len(tok)} tokens but the model's vocab_size is {vocab} "
                f"({model_dir / 'config.json'}): ids >= {vocab} have no embedding; use the tokenizer the model "
                "was trained with (tokenizer=null uses model_path's)."
            )
    if positions is not None:
        max_length = cfg.data.max_length
        if max_length > positions:
            errors.append(
                f"data.max_length={max_length} exceeds the model's {positions} positions "
                f"(max_position_embeddings); longer rows would run past them (NaN or garbage): "
                f"set data.max_length<={positions}."
            )
        for b in cfg.data.buckets or ():
            if b > positions:
                errors.append(f"data.buckets has {b} > the model's {positions} positions; use buckets <= {positions}.")
                break
    spec = getattr(cfg, "format", None)
    if command == "finetune":
        splits = {"data.split": cfg.data.split}
    else:
        from ngdiff_jax.training.data_assembly import resolve_format, resolve_retain_split

        splits = {"data.forget_split": cfg.data.forget_split}
        try:
            splits["data.retain_split"] = resolve_retain_split(cfg.data)
        except (ValueError, KeyError) as e:
            errors.append(str(e))
        if mc is not None:
            try:
                spec = resolve_format(spec, model_path, allow_change=getattr(cfg, "allow_format_change", False))
            except (ValueError, KeyError, OSError) as e:
                errors.append(" ".join(str(e).split()))
                tok = None
    if command != "finetune" and cfg.data.kind == "text" and getattr(cfg.method, "needs_alternate", False):
        errors.append(f"method.forget.type={cfg.method.forget.kind} pairs forget questions with refusal answers; "
                      "data.kind=text has no questions: choose a method without refusals (e.g. ngdiff, npo).")
    if command != "finetune" and splits.get("data.retain_split") == cfg.data.forget_split:
        errors.append(f"data.retain_split={cfg.data.forget_split!r} is the forget split: the run would unlearn and "
                      "retain the same rows; set data.retain_split to the rows to keep (e.g. retain90 for "
                      "forget10) or null for the paired TOFU split.")  # fmt: skip
    rows = _split_files(cfg.data, list(dict.fromkeys(splits.values())), errors)
    errors += _row_errors(splits, rows)
    if tok is not None and not errors:
        import warnings

        from ngdiff_jax.training import data_assembly

        # rows that cannot fit data.max_length (a prompt with no room for an answer token; every
        # overlong row with data.overlong=error), found before any weight is loaded
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # truncation warnings come once, from the run itself
            for key, split in splits.items():
                if split in rows:
                    try:
                        data_assembly.encode_split(rows[split], tok, cfg.data, spec, where=f"{key}={split}")
                    except ValueError as e:
                        msg = " ".join(str(e).split())
                        errors.append(msg if key in msg else f"{key}={split}: {msg}")
    if errors:
        raise InputError("\n".join(f"error: {e}" if i else e for i, e in enumerate(errors)))


# -- ngdiff eval / ngdiff report -------------------------------------------------------------------


def validate_eval(args, forget_split: str) -> None:
    """``ngdiff eval``'s inputs before anything is loaded or evaluated: the model directory, the
    benchmark data (every split the evaluation reads), a readable ``--retain-eval`` and an ``--out``
    that is not a directory. One :class:`InputError` listing every problem (exit code 2)."""
    from ngdiff_jax.paths import shared_data_dir

    errors = []
    model = str(args.model)
    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            errors.append(f"--model {model}: no config.json in {p.absolute()}; pass a saved model directory.")
        else:
            try:
                vocab = int(read_json(p / "config.json").get("vocab_size"))
            except (ValueError, TypeError, AttributeError):
                vocab = None  # reported when the model loads
            errors += check_model_files(p, vocab)
            errors += check_weights_finite(p)
    elif not (looks_like_hub_id(model) and hub_cached(model)):
        errors.append(not_local_message("--model", model, p, "model directory"))
    if args.tokenizer is not None:
        t = Path(args.tokenizer).expanduser()
        if not t.exists() and not (looks_like_hub_id(args.tokenizer) and hub_cached(args.tokenizer)):
            errors.append(not_local_message("--tokenizer", args.tokenizer, t, "tokenizer directory"))
    checks: tuple = ()
    if getattr(args, "robustness", None):
        from ngdiff_jax.evaluation.robustness import parse_checks

        if args.benchmark != "tofu":
            errors.append(f"--robustness applies to --benchmark tofu only (this is --benchmark {args.benchmark}).")
        try:
            checks = parse_checks(args.robustness)
        except ValueError as e:
            errors.append(str(e))
    for flag, key in (("--relearn-steps", "relearn_steps"), ("--relearn-lr", "relearn_lr")):
        if getattr(args, key, None) is not None and "relearn" not in checks:
            errors.append(f"{flag} sets the relearn check, which this evaluation does not run; add "
                          "--robustness relearn (or all), or drop the flag.")  # fmt: skip
    if getattr(args, "relearn_lr", None) is not None and not args.relearn_lr > 0:
        errors.append(f"--relearn-lr {args.relearn_lr}: must be > 0 (e.g. 1e-5).")
    if getattr(args, "num_fewshot", None) is not None and args.num_fewshot < 0:
        errors.append(f"--num-fewshot {args.num_fewshot}: must be >= 0 (or left out for each task's default).")
    if args.benchmark != "lm-eval":
        for flag, key in (("--tasks", "tasks"), ("--lm-eval-include", "lm_eval_include"),
                          ("--num-fewshot", "num_fewshot")):  # fmt: skip
            if getattr(args, key, None) is not None:
                errors.append(f"{flag} applies to --benchmark lm-eval only (this is --benchmark {args.benchmark}); "
                              f"drop {flag} or pass --benchmark lm-eval.")  # fmt: skip
    data = args.data
    if args.benchmark == "tofu":
        d = Path(data).expanduser() if data else shared_data_dir() / "tofu"
        if d.is_dir():
            from ngdiff_jax.evaluation.tofu import UTILITY_SPLITS, holdout_split_for

            try:
                needed = [f"{forget_split}_perturbed", holdout_split_for(forget_split)]
            except ValueError as e:
                errors.append(f"--forget-split {forget_split}: {e}")
                needed = []
            needed += [s for s, _, _ in UTILITY_SPLITS.values()]
            missing = [s for s in needed if not any((d / f"{s}{ext}").is_file() for ext in (".json", ".jsonl"))]
            if missing:
                errors.append(f"--data {d}: missing TOFU split file(s) {', '.join(s + '.json' for s in missing)}; "
                              "pass the folder that holds all TOFU splits (e.g. ../shared/data/tofu).")  # fmt: skip
        elif not (data and looks_like_hub_id(data) and hub_cached(data, "dataset")):
            errors.append(not_local_message("--data", str(data or d), d, "folder of TOFU <split>.json files",
                                            "dataset"))  # fmt: skip
    elif args.benchmark == "lm-eval":
        d = None
        if not getattr(args, "tasks", None):
            errors.append("--benchmark lm-eval needs --tasks (comma-separated lm-eval task or group names).")
        inc = getattr(args, "lm_eval_include", None)
        if inc is not None and not Path(inc).expanduser().is_dir():
            errors.append(f"--lm-eval-include {inc}: not a folder; pass the folder that holds the task YAMLs.")
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            errors.append("--benchmark lm-eval needs the package lm-eval: pip install 'ngdiff-jax[lm-eval]'.")
    else:
        d = Path(data).expanduser() if data else shared_data_dir() / "muse_news"
        if d.is_dir():
            missing = [s for s in ("knowmem", "verbmem", "privleak") if not (d / s).is_dir()]
            if missing:
                errors.append(f"--data {d}: no {', '.join(missing)} folder(s); pass the MUSE-News folder "
                              "(e.g. ../shared/data/muse_news).")  # fmt: skip
        elif not (data and (str(data).lower() in ("news", "books") or hub_cached(str(data), "dataset"))):
            errors.append(not_local_message("--data", str(data or d), d, "MUSE folder", "dataset"))
    if args.retain_eval is not None:
        errors += _retain_eval_errors(args.retain_eval)
    out = Path(args.out) if args.out else None
    if out is not None and out.is_dir():
        errors.append(f"--out {out} is a directory; pass the result file to write (e.g. {out / 'result.json'}).")
    elif out is not None:
        errors += _eval_out_errors(out, {"--model": p, "--tokenizer": args.tokenizer, "--data": d,
                                         "--retain-eval": args.retain_eval,
                                         "--reference-model": getattr(args, "reference_model", None)})  # fmt: skip
    if errors:
        raise InputError("\n".join(f"error: {e}" if i else e for i, e in enumerate(errors)))


def _eval_out_errors(out: Path, inputs: dict) -> list[str]:
    """``--out`` must not be one of the evaluation's inputs, nor lie inside an input folder (a
    model's config.json, a benchmark split): the result would overwrite what it was computed from."""
    from ngdiff_jax.training.ownership import resolve_path

    target = resolve_path(out)
    for flag, value in inputs.items():
        if value is None:
            continue
        inp = resolve_path(value)
        if not inp.exists():
            continue
        if target == inp or (inp.is_dir() and target.is_relative_to(inp)):
            where = "is" if target == inp else "is inside"
            return [f"--out {out} {where} the input {flag} {value}; writing the result there would overwrite "
                    "an input: pass a result file outside it (e.g. eval_results/<name>.json)."]  # fmt: skip
    return []


def _retain_eval_errors(path: str) -> list[str]:
    from ngdiff_jax.evaluation.results import reference_stats

    p = Path(path)
    if not p.is_file():
        return [f"--retain-eval {path} does not exist; evaluate the retain model first "
                "(ngdiff eval --model <retain model> --out <file>) and pass that file."]  # fmt: skip
    try:
        reference_stats(p)
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as e:
        return [f"--retain-eval {path} is not a usable retain-model evaluation ({type(e).__name__}: "  # fmt: skip
                f"{' '.join(str(e).split())[:200]}); pass the JSON that ngdiff eval wrote for the retain model."]
    return []


def validate_report(results: dict, trajectories: dict, out: str | Path) -> None:
    """``ngdiff report``'s inputs before anything is written: every result's aggregates a mapping of
    names to numbers (or null), and ``--out`` not an existing file."""
    errors = []
    out = Path(out)
    if out.exists() and not out.is_dir():
        errors.append(f"--out {out} is a file; pass a folder for report.json/report.md/tradeoff.png.")
    items = [(name, r) for name, r in results.items()]
    items += [(f"{m}@{step}", r) for m, rs in trajectories.items() for step, r in rs]
    for name, r in items:
        src = getattr(r, "path", None) or name
        agg = r.aggregates
        if not isinstance(agg, dict):
            errors.append(f"{src}: 'aggregates' is a {type(agg).__name__}, not a mapping; re-run ngdiff eval for it.")
            continue
        for k, v in agg.items():
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                errors.append(f"{src}: aggregates[{k!r}]={v!r} is not a number; fix or re-create that result "
                              "with ngdiff eval.")  # fmt: skip
                break
        if not isinstance(r.meta, dict):
            errors.append(f"{src}: 'meta' is a {type(r.meta).__name__}, not a mapping; re-run ngdiff eval for it.")
    if errors:
        raise InputError("\n".join(f"error: {e}" if i else e for i, e in enumerate(errors)))


def guarded(command: str, *, ignore: Sequence[str] = ()):
    """Decorator for a pipeline ``fn(cfg, ...)``: validate the config and inputs (nothing written
    on failure), then run ``fn`` owning ``cfg.run.output_dir`` (`ngdiff_jax.training.ownership.claim`)."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(cfg, *args, **kwargs):
            validate_run(cfg, command)
            with ownership.claim(cfg, command, ignore=ignore):
                return fn(cfg, *args, **kwargs)

        return wrapper

    return deco
