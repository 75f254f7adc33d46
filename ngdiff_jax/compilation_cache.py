"""jax's persistent compilation cache for ``ngdiff`` runs: the next ``ngdiff eval`` of a model of
the same architecture loads its compiled programs from disk instead of compiling them again
(TOFU forget01 on SmolLM2: 15.6 s of compile -> 6.0 s, the rest being tracing and lowering, which
no cache skips). On the CPU the unlearning step's entry loads no faster than it compiles.

``NGDIFF_COMPILATION_CACHE`` picks where: unset or ``1`` / ``on`` -> ``$XDG_CACHE_HOME/ngdiff-jax/xla``
(``~/.cache/ngdiff-jax/xla``); an absolute (or ``~``) path -> that folder; ``0`` / ``off`` -> no
cache; anything else is an error (`enable` raises ``ValueError``). A cache dir set
through jax itself (``JAX_COMPILATION_CACHE_DIR``) is left as it is. Entries are keyed by jax on
the program, the compile options, the backend and the jax/jaxlib versions, so a stale entry is
never used; the folder is capped at `MAX_BYTES` (least recently used entries go first). Only
the console script turns it on: library callers and the tests compile as before.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "NGDIFF_COMPILATION_CACHE"
#: the cache folder's size cap (jax's ``jax_compilation_cache_max_size``)
MAX_BYTES = 4 << 30
_OFF = ("0", "off", "false", "no")


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ngdiff-jax" / "xla"


def enable(environ=None) -> Path | None:
    """Turn jax's persistent compilation cache on as ``NGDIFF_COMPILATION_CACHE`` says; the
    folder in use, or None when off. A folder that cannot be created is reported on stderr and
    the run goes on uncached (the cache only saves time)."""
    import jax

    env = os.environ if environ is None else environ
    setting = env.get(ENV, "").strip()
    if setting.lower() in _OFF:
        return None
    current = jax.config.jax_compilation_cache_dir
    if current:
        return Path(current)
    if setting.lower() in ("", "1", "on", "true", "yes"):
        path = default_dir()
    else:
        path = Path(setting).expanduser()
        if not path.is_absolute():  # a typo ("flase") must not become a folder in the working dir
            raise ValueError(f"{ENV}={setting!r} is neither 0/off, 1/on nor an absolute path; "
                             f"set {ENV}=0 to turn the cache off or {ENV}=/abs/dir to move it")  # fmt: skip
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"warning: compilation cache {path} unusable ({e.strerror or e}); compiling without it "
              f"(set {ENV}=0 to silence, or {ENV}=<writable dir>)", file=sys.stderr)  # fmt: skip
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return path
