"""TOFU (Task of Fictitious Unlearning) splits from a local folder or the Hugging Face hub."""

from __future__ import annotations

from pathlib import Path

from ngdiff_jax.data.jsonio import read_records

TOFU_HUB_ID = "locuslab/TOFU"

#: Every split of ``locuslab/TOFU`` (hub config name == local file stem).
TOFU_SPLITS = (
    "full",
    "forget01", "forget05", "forget10",
    "retain99", "retain95", "retain90",
    "forget01_perturbed", "forget05_perturbed", "forget10_perturbed",
    "retain_perturbed",
    "real_authors", "real_authors_perturbed",
    "world_facts", "world_facts_perturbed",
    "holdout01", "holdout05", "holdout10",
)  # fmt: skip

#: The retain split that pairs with each forget split (``forget10`` -> ``retain90``).
RETAIN_FOR_FORGET = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}

#: The holdout split (same size as the forget split) used by the MIA metrics.
HOLDOUT_FOR_FORGET = {"forget01": "holdout01", "forget05": "holdout05", "forget10": "holdout10"}


def load_tofu(split: str, source: str | Path = TOFU_HUB_ID) -> list[dict]:
    """The rows of one TOFU split, as a list of dicts (fields exactly as in the files).

    Args:
      split: a split name such as ``"forget10"``, ``"retain90"``, ``"forget10_perturbed"``
        (see ``TOFU_SPLITS``).
      source: a local directory holding ``<split>.json`` files (JSON-lines, the layout of
        ``../shared/data/tofu`` and of ``synthetic.write_benchmark``), or a hub dataset id
        (``"locuslab/TOFU"``) read through ``datasets`` with config ``split`` and split ``"train"``.
    """
    path = Path(source)
    if path.is_dir():
        return _load_local(split, path)
    if _looks_like_hub_id(str(source)):
        return _load_hub(split, str(source))
    raise FileNotFoundError(
        f"TOFU source {str(source)!r} is neither an existing directory nor a hub id like "
        f"{TOFU_HUB_ID!r}; pass the folder that holds the <split>.json files."
    )


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not source.startswith((".", "/", "~"))
        and not Path(source).exists()
    )


def _local_splits(directory: Path) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.json") if p.is_file())


def _load_local(split: str, directory: Path) -> list[dict]:
    for name in (f"{split}.json", f"{split}.jsonl"):
        file = directory / name
        if file.is_file():
            return read_records(file)
    raise FileNotFoundError(
        f"TOFU split {split!r} not found: looked for {directory / (split + '.json')}. "
        f"Splits available there: {', '.join(_local_splits(directory)) or 'none'}."
    )


def _load_hub(split: str, hub_id: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(hub_id, split, split="train")
    except ValueError as e:
        raise KeyError(
            f"TOFU split {split!r} could not be loaded from the hub dataset {hub_id!r} ({e}). "
            f"Known TOFU splits: {', '.join(TOFU_SPLITS)}."
        ) from e
    return [dict(row) for row in ds]
