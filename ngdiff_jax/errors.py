"""Expected failures and the one place that turns them into a one-line message and an exit code.

The CLI (``ngdiff_jax.cli.main``) catches every exception a command raises and calls
:func:`describe`: an expected failure (bad config or input, a missing or unreadable
file, a full disk, a run that diverged, an output directory in use) becomes
``error: <one line naming the key or file, the value and the fix>`` and exit code 2
(bad input) or 1 (a failed run); anything else is a bug and gets a short line pointing
to ``--debug`` (which prints the traceback).
"""

from __future__ import annotations

import errno
import re

__all__ = ["DivergedError", "InputError", "NgdiffError", "OutputDirBusy", "describe", "require_counts"]


class NgdiffError(Exception):
    """An expected failure with a message for the user; ``exit_code`` 1 (failed run) or 2 (bad input)."""

    exit_code = 1


class InputError(NgdiffError, ValueError):
    """A config value or input file that cannot work; found before any work is done (exit code 2)."""

    exit_code = 2


class OutputDirBusy(NgdiffError):
    """The output directory is owned by another live run (exit code 1)."""


class DivergedError(NgdiffError):
    """The run diverged (skipped steps, non-finite losses or weights); its export was refused (exit code 1)."""


def require_counts(**counts) -> None:
    """Each named value is None or an integer >= 1; else an :class:`InputError` naming it
    (``limit=-1`` would drop the last row, ``batch_size=0`` divide by zero)."""
    for name, v in counts.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise InputError(f"{name}={v!r} is not allowed: give a whole number >= 1 (or leave it unset).")


_DISK_FULL = {errno.ENOSPC: "no space left on the device", errno.EFBIG: "file size limit reached",
              errno.EDQUOT: "disk quota exceeded"}  # fmt: skip
_DISK_FULL_TEXT = re.compile(r"No space left on device|File too large|Disk quota exceeded|ENOSPC|EFBIG", re.I)


#: JAX's runtime error: ``JaxRuntimeError`` since JAX 0.4.36 (``XlaRuntimeError`` before), matched by
#: name so that neither import is needed here.
_RUNTIME_ERRORS = ("JaxRuntimeError", "XlaRuntimeError")
_OOM_TEXT = re.compile(r"RESOURCE_EXHAUSTED|Out of memory|out of memory", re.I)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return one_line(text[0] if text else type(e).__name__, 300)


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def one_line(text: str, limit: int = 800) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _os_message(e: OSError) -> str:
    where = e.filename if e.filename is not None else "a file"
    if e.errno in _DISK_FULL:
        return (f"cannot write {where}: {_DISK_FULL[e.errno]} ({e.strerror}); free some space or set "
                "run.output_dir/--out on another disk, then run the same command again (it resumes).")  # fmt: skip
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot access {where}: {e.strerror}; fix its permissions or choose another path."
    if isinstance(e, FileNotFoundError) and e.filename is None and e.args:
        return one_line(e.args[0])
    if e.filename is not None:
        return f"{where}: {e.strerror or e}; check the path."
    return one_line(str(e))


def describe(exc: BaseException) -> tuple[int, str] | None:
    """``(exit_code, one-line message)`` for an expected failure, None for a bug."""
    import yaml

    from ngdiff_jax.config_loader import ConfigError

    if isinstance(exc, NgdiffError):
        return exc.exit_code, one_line(str(exc), 4000) if "\n" not in str(exc) else str(exc)
    if isinstance(exc, ConfigError):
        return 2, one_line(str(exc))
    if isinstance(exc, yaml.YAMLError):
        return 2, one_line(f"invalid YAML: {exc}; fix the syntax.")
    # a full disk often surfaces wrapped (orbax/tensorstore, safetensors): look through the chain
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return 1, _os_message(e)
    for e in _chain(exc):
        if _DISK_FULL_TEXT.search(str(e)):
            return 1, one_line(
                f"a write failed because the disk is full or a file size limit was hit ({type(e).__name__}: {e}); "
                "free some space or use an output directory on another disk, then run the command again (it resumes)."
            )
    if isinstance(exc, OSError):
        return 1, _os_message(exc)
    if isinstance(exc, MemoryError):
        return 1, "out of host memory; use a smaller data.batch_size / data.max_length or a smaller model."
    for e in _chain(exc):
        if type(e).__name__ in _RUNTIME_ERRORS and _OOM_TEXT.search(str(e)):
            return 1, one_line(f"out of device memory ({_first_line(e)}); lower data.batch_size or data.max_length, "
                               "set run.remat=full or data.micro_batches, or use a mesh.")  # fmt: skip
    if isinstance(exc, (ValueError, KeyError)):  # raised on purpose with a message (model/data/config checks)
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        return 1, one_line(str(msg))
    return None
