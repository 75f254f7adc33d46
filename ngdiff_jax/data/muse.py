"""MUSE (News, Books): the raw forget corpus as fixed-length token blocks for training,
and the knowmem / verbmem / privleak evaluation sets.

Local layout (``../shared/data/muse_news``): ``<subset>/<split>.json`` holding a JSON
array: strings for ``raw`` and ``privleak``, ``{question, answer}`` for ``knowmem``,
``{prompt, gt}`` for ``verbmem``. Hub ids (``muse-bench/MUSE-News``, ``muse-bench/MUSE-Books``)
are read with ``datasets.load_dataset(hub_id, subset, split=split)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ngdiff_jax.data.formatting import IGNORE_INDEX, added_bos_id
from ngdiff_jax.data.jsonio import read_records

MUSE_HUB_IDS = {"news": "muse-bench/MUSE-News", "books": "muse-bench/MUSE-Books"}

#: Splits of each subset as named on the hub; the local copies name the retain splits
#: ``retain2_qa`` / ``retain2`` (the MUSE repository's names). Either name works.
MUSE_SUBSETS = {
    "raw": ("forget", "retain1", "retain2", "holdout"),
    "knowmem": ("forget_qa", "retain_qa", "forget_qa_icl", "retain_qa_icl"),
    "verbmem": ("forget",),
    "privleak": ("forget", "retain", "holdout"),
}
_ALIASES = {
    ("knowmem", "retain_qa"): "retain2_qa",
    ("knowmem", "retain2_qa"): "retain_qa",
    ("knowmem", "retain_qa_icl"): "retain2_qa_icl",
    ("knowmem", "retain2_qa_icl"): "retain_qa_icl",
    ("privleak", "retain"): "retain2",
    ("privleak", "retain2"): "retain",
}
_TEXT_SUBSETS = ("raw", "privleak", "scal", "sust", "train")


def load_muse(source: str | Path, subset: str, split: str) -> list:
    """Rows of one MUSE split.

    Args:
      source: a local folder in the ``muse_news`` layout, a hub id, or ``"news"``/``"books"``.
      subset: ``"raw"``, ``"knowmem"``, ``"verbmem"``, ``"privleak"`` (or ``scal``/``sust``/``train``).
      split: e.g. ``"forget"``, ``"forget_qa"``, ``"retain_qa"`` (= local ``retain2_qa``), ``"holdout"``.

    Returns:
      ``list[str]`` for text subsets (raw, privleak, ...), ``list[dict]`` otherwise
      (``{question, answer}`` for knowmem, ``{prompt, gt}`` for verbmem).
    """
    source = MUSE_HUB_IDS.get(str(source).lower(), source)
    path = Path(source)
    if path.is_dir():
        rows = _load_local(path, subset, split)
    elif str(source).count("/") == 1 and not str(source).startswith((".", "/", "~")):
        rows = _load_hub(str(source), subset, split)
    else:
        raise FileNotFoundError(
            f"MUSE source {str(source)!r} is neither an existing directory nor a hub id "
            f"(e.g. {MUSE_HUB_IDS['news']!r}); pass the folder holding <subset>/<split>.json."
        )
    if subset in _TEXT_SUBSETS:
        rows = [r["text"] if isinstance(r, dict) else r for r in rows]
    return rows


def _load_local(directory: Path, subset: str, split: str) -> list:
    for name in (split, _ALIASES.get((subset, split))):
        if name and (directory / subset / f"{name}.json").is_file():
            return read_records(directory / subset / f"{name}.json")
    sub = directory / subset
    available = sorted(
        f"{p.parent.name}/{p.stem}" for p in directory.glob("*/*.json") if p.is_file()
    )
    raise FileNotFoundError(
        f"MUSE split {subset}/{split} not found: looked for {sub / (split + '.json')}. "
        f"Available there: {', '.join(available) or 'none'}."
    )


def _load_hub(hub_id: str, subset: str, split: str) -> list:
    import datasets

    try:
        ds = datasets.load_dataset(hub_id, subset, split=split)
    except ValueError:
        alias = _ALIASES.get((subset, split))
        if alias is None:
            raise KeyError(
                f"MUSE split {subset}/{split} could not be loaded from {hub_id!r}. "
                f"Known splits: {MUSE_SUBSETS}."
            ) from None
        ds = datasets.load_dataset(hub_id, subset, split=alias)
    return [dict(r) for r in ds]


def chunk_corpus(
    texts: Sequence[str],
    tokenizer,
    block_len: int,
    *,
    separator: str = "\n\n",
    drop_remainder: bool = False,
) -> list[tuple[list[int], list[int]]]:
    """Cut a corpus into fixed-length token blocks for pretraining-style unlearning.

    As open-unlearning's ``PretrainingDataset``: the texts are joined with ``separator``,
    tokenized once without special tokens and cut into consecutive blocks; each block
    starts with BOS when the tokenizer adds one, and its labels equal its input ids
    except the first position (``-100``, never scored, like open-unlearning's
    ``preprocess_pretraining_instance``). ``block_len`` counts every token of a block,
    BOS included. The last block is shorter unless ``drop_remainder``.

    Returns:
      ``(input_ids, labels)`` pairs, ready for ``Batcher``.
    """
    if not texts:
        raise ValueError("chunk_corpus got no texts; check the MUSE split that was loaded.")
    bos = added_bos_id(tokenizer)
    body = block_len - (1 if bos is not None else 0)
    if body < 1:
        raise ValueError(f"block_len={block_len} leaves no room for text tokens; use at least 2.")
    ids = list(tokenizer.encode(separator.join(texts), add_special_tokens=False))
    blocks = []
    for start in range(0, len(ids), body):
        chunk = ids[start : start + body]
        if drop_remainder and len(chunk) < body:
            break
        block = ([bos] if bos is not None else []) + chunk
        if len(block) < 2:
            continue  # a lone token has nothing to predict
        blocks.append((block, [IGNORE_INDEX] + block[1:]))
    return blocks
