"""Output ownership: one run owns its ``run.output_dir``, never overwrites inputs or foreign files.

* **Lock.** ``<out>/.ngdiff.lock`` is held with ``fcntl.flock`` for the whole run and holds
  the owner's PID, host, command and start time. A second run into the same directory
  stops at once (:class:`~ngdiff_jax.errors.OutputDirBusy`, naming that PID/host). The OS
  drops the lock when the owner dies (even by ``kill -9``), so a lock file nobody holds is
  *stale*: it is reported and taken over. The file is removed when the run ends.
* **Inputs.** ``run.output_dir`` may neither contain nor lie inside the model, tokenizer
  or data directory (resolved paths, so ``./x``, ``x`` and symlinks are the same).
* **Same run only.** ``<out>/.ngdiff-run.json`` records the command and the settings that
  must match for a resume (``checkpoint.resume_settings``). A directory written by another
  command or config is refused, naming every key that differs; a non-empty directory that
  ngdiff did not write is refused too.
* **Atomic export.** :func:`atomic_dir` writes an export into ``<out>/.model.tmp-<pid>``,
  lists its files in ``.ngdiff-export.json`` and swaps it in with one ``renameat2
  (RENAME_EXCHANGE)`` (two renames where that is missing; an interrupted swap is repaired
  by the next run). A kill at any point leaves the old export or the new one, never a
  mixture. An existing export holding files ngdiff did not write is refused, not deleted.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime
import fcntl
import json
import os
import shutil
import socket
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ngdiff_jax.errors import InputError, OutputDirBusy
from ngdiff_jax.processes import pid_alive
from ngdiff_jax.training.checkpoint import flat_settings, settings_diff

__all__ = ["OutputLock", "atomic_dir", "check_output_dir", "claim"]

LOCK_NAME = ".ngdiff.lock"
RUN_MANIFEST = ".ngdiff-run.json"
EXPORT_MARKER = ".ngdiff-export.json"
#: Files an ngdiff export (save_pretrained + tokenizer) writes; an export dir from before the
#: marker file existed may hold exactly these.
_EXPORT_NAMES = ("config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "vocab.json",
                 "merges.txt", "added_tokens.json", "tokenizer.model", "README.md", "ngdiff_format.json",
                 "adapter_config.json", "adapter_model.safetensors",
                 EXPORT_MARKER)  # fmt: skip
#: What ngdiff itself writes at the top of an output dir.
_RUN_NAMES = {"config.yaml", "summary.json", "log.jsonl", "eval.jsonl", "checkpoints", "checkpoints.damaged",
              "model", "adapter", "tokenizer", "diverged.json", LOCK_NAME, RUN_MANIFEST,
              "population.json", "chunks", "members"}  # fmt: skip


def resolve_path(p: str | Path) -> Path:
    """``p`` absolute, ``~`` expanded and symlinks resolved: ``./x``, ``x`` and a link to it compare equal."""
    return Path(os.path.abspath(os.path.expanduser(str(p)))).resolve()


def _inputs(cfg) -> list[tuple[str, Path]]:
    """Local input directories of a config: every ``*_path`` / ``tokenizer`` / ``data.source`` key that exists."""
    from ngdiff_jax.config_loader import to_dict

    found = []

    def walk(d: Any, prefix: str):
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(v, key + ".")
            elif isinstance(v, str) and (k.endswith("_path") or k in ("tokenizer", "source")):
                p = Path(v).expanduser()
                if p.exists():
                    found.append((key, resolve_path(p)))  # a file stays a file: a sibling output dir is fine

    walk(to_dict(cfg), "")
    return found


def check_output_dir(cfg) -> list[str]:
    """Errors (one line each) if ``run.output_dir`` contains or is inside an input directory."""
    out = resolve_path(cfg.run.output_dir)
    errors = []
    for key, inp in _inputs(cfg):
        if out == inp or inp.is_relative_to(out):
            rel = "is" if out == inp else "contains"
            errors.append(f"run.output_dir={cfg.run.output_dir!r} {rel} the input {key} ({inp}); the run would "
                          "overwrite its own input: choose another run.output_dir (e.g. runs/<name>).")  # fmt: skip
        elif out.is_relative_to(inp):
            errors.append(f"run.output_dir={cfg.run.output_dir!r} is inside the input {key} ({inp}); choose an "
                          "output directory outside it (e.g. runs/<name>).")  # fmt: skip
    return errors


# -- the lock --------------------------------------------------------------------------------


class OutputLock:
    """An exclusive ``flock`` on ``<directory>/.ngdiff.lock`` (see the module doc)."""

    def __init__(self, directory: str | Path, command: str = "run"):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.command = command
        self._fd: int | None = None
        self.stale: dict | None = None  # the previous owner's record when a stale lock was taken over

    def acquire(self) -> OutputLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd)
            os.close(fd)
            who = "another process"
            if owner:
                who = (f"`ngdiff {owner.get('command', '?')}` (PID {owner.get('pid', '?')} on host "
                       f"{owner.get('host', '?')}, started {owner.get('started', '?')})")  # fmt: skip
            raise OutputDirBusy(
                f"run.output_dir {self.directory} is in use by {who} (lock {self.path}); wait for it to finish, "
                "or choose another run.output_dir."
            ) from None
        prev = _read_owner(fd)
        if prev:
            self.stale = prev
            alive = prev.get("host") == socket.gethostname() and pid_alive(int(prev.get("pid", -1)))
            note = " (that PID is now another process)" if alive else ""
            print(f"note: stale lock {self.path} from PID {prev.get('pid')} on host {prev.get('host')} "
                  f"(started {prev.get('started')}; it ended without releasing it{note}); taking it over.",
                  file=sys.stderr)  # fmt: skip
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                  "started": datetime.datetime.now().isoformat(timespec="seconds")}  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still holding it: a waiting run then sees a fresh file
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read_owner(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0)
        return json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        return {"pid": "?", "host": "?"}


# -- same run only -----------------------------------------------------------------------------


def _has_results(out: Path) -> bool:
    """Whether a run dir holds anything worth keeping: an export, a summary, a checkpoint, a tokenizer."""
    if any((out / n).exists() for n in ("model", "adapter", "summary.json", "tokenizer", "diverged.json")):
        return True
    ck = out / "checkpoints"
    return ck.is_dir() and any(p.name.isdigit() for p in ck.iterdir())




def _check_same_run(out: Path, command: str, settings: dict) -> None:
    manifest = out / RUN_MANIFEST
    if manifest.is_file() and not _has_results(out):
        return  # a run that stopped before its first checkpoint: nothing to lose, the new run takes it
    if manifest.is_file():
        try:
            saved = json.loads(manifest.read_text())
        except ValueError:
            saved = None
        if saved is not None:
            if saved.get("command") != command:
                raise InputError(
                    f"run.output_dir {out} was written by `ngdiff {saved.get('command')}`, not `ngdiff {command}`; "
                    "choose another run.output_dir."
                )
            a, b = flat_settings(saved.get("settings", {})), flat_settings(json.loads(json.dumps(settings)))
            diff = settings_diff(a, b)
            if diff:
                shown = "; ".join(f"{k}={a.get(k)!r} there, {b.get(k)!r} now" for k in diff[:6])
                more = f" (and {len(diff) - 6} more)" if len(diff) > 6 else ""
                raise InputError(
                    f"run.output_dir {out} holds a run with other settings: {shown}{more}; use a new "
                    f"run.output_dir, or set {diff[0]}={a.get(diff[0])!r} to resume that run."
                )
            return
    present = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME)
    if manifest.exists() or any(n in _RUN_NAMES for n in present):
        # files with our names but no readable record of the run that wrote them: a user's own
        # config.yaml / log.jsonl / model, or a run whose .ngdiff-run.json was deleted or damaged
        shown = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
        state = "is damaged" if manifest.exists() else "is missing"
        raise InputError(
            f"run.output_dir {out} holds {shown} but its {RUN_MANIFEST} {state}, so ngdiff cannot tell whether "
            "they are its own: choose a new or empty run.output_dir (or move those files away)."
        )
    foreign = sorted(n for n in present if not n.startswith((".model.", ".adapter.")))
    if foreign:
        raise InputError(
            f"run.output_dir {out} already holds files ngdiff did not write ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}); choose a new or empty run.output_dir."
        )


def _foreign_export_files(model_dir: Path) -> list[str]:
    if not model_dir.is_dir():
        return []
    ours = set(_EXPORT_NAMES)
    marker = model_dir / EXPORT_MARKER
    if marker.is_file():
        with contextlib.suppress(ValueError):
            ours |= set(json.loads(marker.read_text()).get("files", []))
    def theirs(name: str) -> bool:
        return name not in ours and not (name.startswith("model") and name.endswith(".safetensors"))

    return sorted(p.name for p in model_dir.iterdir() if theirs(p.name))


# -- atomic export --------------------------------------------------------------------------------

_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def _fsync_tree(d: Path) -> None:
    for p in d.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def repair_exports(out: Path, name: str = "model") -> None:
    """Finish or undo an export swap a kill interrupted (see :func:`atomic_dir`)."""
    final = out / name
    for tmp in sorted(out.glob(f".{name}.tmp-*")):
        if not final.exists() and (tmp / EXPORT_MARKER).is_file():
            os.rename(tmp, final)  # a finished export whose swap was cut short
        else:
            shutil.rmtree(tmp, ignore_errors=True)  # an unfinished export
    for old in sorted(out.glob(f".{name}.old-*")):
        if not final.exists():
            os.rename(old, final)
        else:
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: str | Path, *, write: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of ``final`` to write into; on success swap it in atomically.

    With ``write=False`` (processes other than 0 of a multi-process export) the temporary
    path is yielded and nothing is created or swapped.
    """
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if not write:
        yield tmp
        return
    foreign = _foreign_export_files(final)
    if foreign:
        raise InputError(f"{final} holds files ngdiff did not write ({', '.join(foreign[:5])}); move them away "
                         "or choose another run.output_dir (the export replaces that directory).")  # fmt: skip
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    (tmp / EXPORT_MARKER).write_text(json.dumps({"files": files}, indent=1))
    _fsync_tree(tmp)
    if final.exists() and _exchange(tmp, final):
        shutil.rmtree(tmp)  # now holds the previous export
        return
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    if old.exists():
        shutil.rmtree(old)


# -- claim: everything before a run ---------------------------------------------------------------


@contextlib.contextmanager
def claim(cfg, command: str, *, ignore: Sequence[str] = ()) -> Iterator[OutputLock | None]:
    """Own ``cfg.run.output_dir`` for the duration: lock it, refuse another run's directory,
    record this run's settings, repair an interrupted export. Processes other than 0 of a
    multi-process run (``NGDIFF_PROCESS_ID``/``distributed.process_id`` > 0) only share it."""
    from ngdiff_jax.training.checkpoint import resume_settings

    out = Path(cfg.run.output_dir)
    if _process_id(cfg) > 0:
        yield None
        return
    lock = OutputLock(out, command).acquire()
    try:
        settings = resume_settings(cfg, ignore=ignore)
        _check_same_run(out, command, settings)
        for name in ("model", "adapter"):
            foreign = _foreign_export_files(out / name)
            if foreign:
                raise InputError(f"{out / name} holds files ngdiff did not write ({', '.join(foreign[:5])}); "
                                 "move them away or choose another run.output_dir.")  # fmt: skip
            repair_exports(out, name)
        (out / RUN_MANIFEST).write_text(json.dumps({"command": command, "settings": settings}, indent=1))
        yield lock
    finally:
        lock.release()


def _process_id(cfg) -> int:
    dist = getattr(cfg, "distributed", None)
    pid = getattr(dist, "process_id", None) if dist is not None else None
    if pid is None:
        pid = os.environ.get("NGDIFF_PROCESS_ID")
    try:
        return int(pid) if pid is not None else 0
    except ValueError:
        return 0
