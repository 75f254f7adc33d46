"""Where the project finds its configs and the shared benchmark data."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"


def shared_data_dir() -> Path:
    """The real benchmark files: ``$NGDIFF_SHARED_DATA`` or ``../shared/data`` beside the repo."""
    env = os.environ.get("NGDIFF_SHARED_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


# -- local or in the Hugging Face cache (never downloaded) ---------------------------------


def hub_cached(repo_id: str, repo_type: str = "model") -> bool:
    """Whether a hub repo is in the local Hugging Face cache (no network access)."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        return False
    folder = f"{repo_type}s--{repo_id.replace('/', '--')}"
    return (Path(constants.HF_HUB_CACHE) / folder / "snapshots").is_dir()


def looks_like_hub_id(text: str) -> bool:
    parts = str(text).split("/")
    return len(parts) == 2 and all(parts) and not str(text).startswith((".", "/", "~"))


def not_local_message(key: str, value: str, looked: Path, what: str, repo_type: str = "model") -> str:
    if looks_like_hub_id(value):
        flag = " --repo-type dataset" if repo_type == "dataset" else ""
        return (f"{key}={value!r} is not a local directory (looked for {looked.absolute()}) and not in the local "
                f"Hugging Face cache; ngdiff does not download at run time: fix the path, or fetch it first "
                f"(huggingface-cli download{flag} {value}).")  # fmt: skip
    return f"{key}={value!r} not found: looked for {looked.absolute()}; pass an existing {what}."
