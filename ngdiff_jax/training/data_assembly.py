"""Data assembly for the pipelines: ``data.source`` -> rows -> encoded examples -> batcher."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from ngdiff_jax.training.config_schema import DataConfig
from ngdiff_jax.training.model_io import pad_id


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
    from ngdiff_jax.paths import hub_cached, looks_like_hub_id, not_local_message

    p = Path(source).expanduser()
    if p.is_dir():
        return p
    if looks_like_hub_id(source) and hub_cached(source, "dataset"):
        return source  # a hub id in the local cache (nothing is downloaded at run time)
    raise FileNotFoundError(not_local_message("data.source", source, p, "folder of TOFU <split>.json files", "dataset"))


def load_split(data: DataConfig, split: str) -> list:
    """Rows (``question``, ``answer``) of a split, the first ``data.limit`` of them if set; with
    ``data.kind: text`` the texts of ``raw/<split>.json`` (:func:`load_texts`)."""
    from ngdiff_jax.data import load_tofu

    if data.kind == "text":
        return load_texts(data, split)
    rows = load_tofu(split, resolve_source(data.source))
    if data.limit is not None:
        rows = rows[: data.limit]
    if not rows:
        raise ValueError(f"split {split!r} of {data.source or 'the shared TOFU files'} has no rows.")
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("question"), str) or not isinstance(r.get("answer"), str):
            raise ValueError(
                f"split {split!r} of {data.source or 'the shared TOFU files'}: row {i} lacks a string "
                f"'question'/'answer' (has {sorted(r) if isinstance(r, dict) else type(r).__name__}); fix that row."
            )
    return rows


def load_texts(data: DataConfig, split: str) -> list[str]:
    """``data.kind: text``: the texts of ``<data.source>/raw/<split>.json`` (the first ``data.limit``)."""
    from ngdiff_jax.data import load_muse

    if data.source is None or not Path(data.source).expanduser().is_dir():
        raise FileNotFoundError(f"data.kind=text needs data.source, a folder with raw/<split>.json text lists (e.g. "
                                f"made by `ngdiff books`); got {data.source!r}.")  # fmt: skip
    texts = load_muse(Path(data.source).expanduser(), "raw", split)
    if data.limit is not None:
        texts = texts[: data.limit]
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise ValueError(f"{data.source}/raw/{split}.json: item {bad} is not a string; data.kind=text reads lists of "
                         "texts: fix that item.")  # fmt: skip
    if not any(t.strip() for t in texts):
        raise ValueError(f"{data.source}/raw/{split}.json has no text; choose another split or fix the file.")
    return texts


def encode_split(rows: Sequence, tokenizer, data: DataConfig, spec=None, *, where="data"):
    """``(input_ids, labels)`` examples in format ``spec`` (default: the ``default`` preset); rows over
    ``data.max_length`` tokens are handled as ``data.overlong`` says (warning with their count).
    With ``data.kind: text`` the texts cut into ``data.max_length``-token blocks (``chunk_corpus``)."""
    from ngdiff_jax.data import QAFormatter

    if data.kind == "text":
        from ngdiff_jax.data import chunk_corpus

        return chunk_corpus(rows, tokenizer, data.max_length)
    fmt = QAFormatter(tokenizer, max_length=data.max_length, spec=spec)
    return fmt.encode_rows(rows, overlong=data.overlong, where=where)


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


def alternate_rows(rows: Sequence[Mapping[str, str]], responses: Sequence[str], *, seed: int) -> list[dict]:
    """Each row's question with a refusal answer drawn from ``responses``.

    open-unlearning's ``QAwithIdkDataset`` draws a fresh random refusal every time an item is
    read; here row ``i`` gets ``responses[rng([seed, i]).integers(len)]`` once, so batches stay a
    pure function of the seed (resume gives the same batches).
    """
    import numpy as np

    if not responses:
        raise ValueError("alternate_rows needs at least one refusal answer.")
    out = []
    for i, r in enumerate(rows):
        j = int(np.random.default_rng([int(seed), i]).integers(len(responses)))
        out.append({"question": r["question"], "answer": responses[j]})
    return out


class PairedBatcher:
    """Forget batches with each row's alternate answer: ``next()`` gives the batch of ``main``
    plus ``alt_input_ids``/``alt_attention_mask``/``alt_labels`` from ``alternate``.

    Both batchers hold the same number of examples with the same seed and batch size, so
    their row orders agree; the position (``state``/``restore``) is shared.
    """

    def __init__(self, main, alternate):
        if len(main.examples) != len(alternate.examples) or main.batch_size != alternate.batch_size:
            raise ValueError("PairedBatcher needs two batchers over the same rows with the same batch size.")
        if main.seed != alternate.seed or main.shuffle != alternate.shuffle:
            raise ValueError("PairedBatcher needs two batchers with the same seed and shuffle setting.")
        self.main, self.alternate = main, alternate

    def __len__(self) -> int:
        return len(self.main)

    def __iter__(self):
        return self

    def __next__(self):
        batch = dict(next(self.main))
        alt = next(self.alternate)
        batch.update({f"alt_{k}": v for k, v in alt.items()})
        return batch

    def state(self) -> dict[str, int]:
        return self.main.state()

    def restore(self, position) -> None:
        self.main.restore(position)
        self.alternate.restore(position)


def forget_stream(rows, examples, tokenizer, data: DataConfig, method, *, seed: int, spec=None):
    """The forget batch stream of ``method``: a plain batcher, or a :class:`PairedBatcher` with the
    refusal answers (``method.forget.idk_path``, in format ``spec`` as the forget rows) when the method
    needs them (``idk_nll``, ``dpo``)."""
    main = make_batcher(examples, tokenizer, data, seed=seed)
    if not getattr(method, "needs_alternate", False):
        return main
    if data.kind == "text":
        raise ValueError(f"method.forget.type={method.forget.kind} pairs forget questions with refusal answers; "
                         "data.kind=text has no questions: choose a method without refusals (e.g. ngdiff, npo).")
    from ngdiff_jax.training.methods import load_idk_responses

    alt = alternate_rows(rows, load_idk_responses(method.idk_path), seed=seed)
    alt_ex = encode_split(alt, tokenizer, data, spec, where="the refusal answers (method.forget.idk_path)")
    if len(alt_ex) != len(examples):
        raise ValueError(
            f"{len(examples)} forget examples but {len(alt_ex)} refusal examples (data.overlong dropped rows); "
            f"{method.forget.kind} pairs every forget row with a refusal: raise data.max_length or set "
            "data.overlong=truncate."
        )
    return PairedBatcher(main, make_batcher(alt_ex, tokenizer, data, seed=seed))


def resolve_retain_split(data) -> str:
    """``data.retain_split``, or the TOFU retain split paired with ``data.forget_split``."""
    from ngdiff_jax.data import RETAIN_FOR_FORGET

    if data.retain_split is not None:
        return data.retain_split
    if getattr(data, "kind", "qa") == "text":
        raise ValueError("data.kind=text: data.retain_split is not set; name the raw split to keep (e.g. retain1).")
    if data.forget_split not in RETAIN_FOR_FORGET:
        raise ValueError(
            f"data.retain_split is not set and data.forget_split={data.forget_split!r} has no paired TOFU "
            f"retain split (known: {RETAIN_FOR_FORGET}); set data.retain_split."
        )
    return RETAIN_FOR_FORGET[data.forget_split]


def resolve_format(spec, model_path: str, *, allow_change: bool = False, what: str = "format"):
    """The format to use with the model at ``model_path``: the one saved beside it
    (``ngdiff_format.json``) when ``spec`` is None (the ``default`` preset if none is saved);
    a ``spec`` that differs from the saved one is an error unless ``allow_change``."""
    from pathlib import Path

    from ngdiff_jax.data.formatting import load_format, read_format

    saved = read_format(model_path) if Path(model_path).is_dir() else None
    if spec is None:
        return saved["format"] if saved else load_format("default")
    if saved is not None and not allow_change:
        diff = spec.differences(saved["format"])
        if diff:
            shown = ", ".join(f"{k}: saved {a!r} vs given {b!r}" for k, (b, a) in diff.items())
            raise ValueError(
                f"{what} {spec.name!r} differs from the format the model at {model_path} was trained with "
                f"({saved['format'].name!r}; {shown}); drop the {what} setting to use the saved one, or "
                "allow the change explicitly (allow_format_change=true / --allow-format-change)."
            )
    return spec
