"""Reading and writing the JSON files benchmarks ship: JSON-lines or one JSON array."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def read_records(path: str | Path) -> list[Any]:
    """Rows of a JSON file that holds either one JSON value per line or a single JSON array.

    TOFU's files are JSON-lines (one object per line); MUSE's are one JSON array.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if not stripped:
        return []
    if stripped[0] == "[":
        rows = json.loads(stripped)
        if not isinstance(rows, list):
            raise ValueError(
                f"{path} starts with '[' but is not a JSON array; fix or re-export it."
            )
        return rows
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{lineno} is not valid JSON ({e.msg}); expected one JSON object per line."
                ) from e
    return rows


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> None:
    """Write ``rows`` as JSON-lines (one compact object per line, UTF-8), like TOFU's files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_json(path: str | Path, obj: Any) -> None:
    """Pretty-printed JSON (non-JSON values via ``str``), written aside and renamed into place: a
    reader (or a run killed while writing) sees the old file or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: str | Path) -> Any:
    """One JSON value from ``path``; a file that is not JSON is an error naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); remove or regenerate it.") from None
