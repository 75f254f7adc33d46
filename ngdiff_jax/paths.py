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
