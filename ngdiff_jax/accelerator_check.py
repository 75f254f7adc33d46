"""An accelerator the machine has but JAX cannot use: one warning line that names the fix.

``pip install ngdiff-jax`` installs the CPU jaxlib; on a GPU or TPU machine a run would then train
on the CPU, slowly. The ``ngdiff`` console script calls :func:`unused_accelerator_warning` before
the commands that compute (:data:`COMPUTE_COMMANDS`) and prints the line on stderr. It reads
device files and installed packages only: JAX's backends are not started (a multi-process run
must call ``jax.distributed.initialize`` first, and some commands choose the platform
themselves). ``JAX_PLATFORMS=cpu`` says the CPU is meant and silences it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping

__all__ = ["COMPUTE_COMMANDS", "plugin_installed", "unused_accelerator_warning", "visible_accelerator"]

#: the ``ngdiff`` commands that train or evaluate on JAX's default backend (``plan`` compiles on
#: simulated CPU devices on purpose; the others do no JAX work)
COMPUTE_COMMANDS = frozenset({"demo", "study", "sweep", "finetune", "unlearn", "eval", "bench", "device-check"})

#: device files whose presence means an accelerator is attached
NVIDIA_FILES = ("/dev/nvidiactl", "/dev/nvidia0")
TPU_FILES = ("/dev/accel0", "/dev/vfio/0")

#: the modules of JAX's accelerator plugins (``jax[cuda12]``, ``jax[cuda13]``, ``jax[tpu]``)
PLUGINS = {"gpu": ("jax_cuda12_plugin", "jax_cuda13_plugin"), "tpu": ("libtpu",)}

#: the install that gives JAX the accelerator (the project's extras, pyproject.toml)
FIXES = {
    "gpu": "pip install -e '.[cuda13]' (or '.[cuda12]' for a CUDA 12 driver)",
    "tpu": "pip install -e '.[tpu]'",
}


def visible_accelerator(exists: Callable[[str], bool] = os.path.exists,
                        which: Callable[[str], str | None] = shutil.which) -> str | None:  # fmt: skip
    """``"gpu"`` when an NVIDIA device file or ``nvidia-smi`` is there, ``"tpu"`` for a TPU's
    device file, else None."""
    if any(exists(p) for p in NVIDIA_FILES) or which("nvidia-smi"):
        return "gpu"
    if any(exists(p) for p in TPU_FILES):
        return "tpu"
    return None


def plugin_installed(kind: str) -> bool:
    """Whether a JAX plugin for ``kind`` (``gpu`` / ``tpu``) is importable (not imported)."""
    import importlib.util

    return any(importlib.util.find_spec(m) is not None for m in PLUGINS[kind])


def unused_accelerator_warning(environ: Mapping[str, str] | None = None,
                               visible: Callable[[], str | None] = visible_accelerator,
                               installed: Callable[[str], bool] = plugin_installed) -> str | None:  # fmt: skip
    """The warning line when an accelerator is visible, no JAX plugin for it is installed (so JAX
    would run on the CPU) and the CPU was not chosen with ``JAX_PLATFORMS=cpu``; None otherwise."""
    env = os.environ if environ is None else environ
    if env.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return None
    kind = visible()
    if kind is None or installed(kind):
        return None
    name = "an NVIDIA GPU" if kind == "gpu" else "a TPU"
    return (f"warning: {name} is visible but JAX has no {kind.upper()} plugin and would run on the CPU: "
            f"{FIXES[kind]}, or set JAX_PLATFORMS=cpu to use the CPU on purpose.")  # fmt: skip
