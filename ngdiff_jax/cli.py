"""The ``ngdiff`` console script.

Each subcommand lives in its own module ``ngdiff_jax.commands.<name>`` that
defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported lazily so ``ngdiff --help`` stays fast and a command's
heavy imports (torch, matplotlib) are paid only by that command.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

# name -> module under ngdiff_jax.commands
COMMANDS = {
    "demo": "demo",
    "study": "study",
    "sweep": "sweep",
    "convert": "convert",
    "books": "books",
    "finetune": "finetune",
    "unlearn": "unlearn",
    "eval": "evaluate",
    "report": "report",
    "bench": "bench",
    "device-check": "device_check",
    "toy": "toy",
    "plan": "plan",
    "readme": "readme",
}


#: commands whose process never uses torch. transformers imports torch, when it is installed,
#: for its configuration classes alone (``configuration_utils`` -> ``modeling_rope_utils``):
#: ~1.2 s and ~250 MB of resident memory that an evaluation or a training step would carry.
TORCH_FREE_COMMANDS = frozenset({"demo", "study", "sweep", "finetune", "unlearn", "eval", "report", "toy", "plan",
                                 "readme", "books"})  # fmt: skip


def _command(argv: list[str]) -> str | None:
    """The subcommand named on a command line (its first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def hide_torch(argv: list[str]) -> bool:
    """For a command in `TORCH_FREE_COMMANDS`, keep torch out of this process: transformers and
    datasets are told it is absent (transformers' cached ``is_torch_available()`` is settled
    while torch is hidden from ``importlib``; datasets reads ``USE_TORCH=0``), so neither imports
    it. Nothing changes when torch is imported already or with ``NGDIFF_IMPORT_TORCH=1``. Only the
    console script calls it: a Python caller of `main` keeps its torch. Returns whether torch
    was kept out."""
    if (_command(argv) not in TORCH_FREE_COMMANDS or "torch" in sys.modules
            or os.environ.get("NGDIFF_IMPORT_TORCH", "") not in ("", "0")):  # fmt: skip
        return False
    advisory = os.environ.get("TRANSFORMERS_NO_ADVISORY_WARNINGS")
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"  # its one-time "PyTorch was not found" advice
    sys.modules["torch"] = None  # find_spec("torch") is None, `import torch` fails
    try:
        from transformers.utils import import_utils

        import_utils.is_torch_available()  # cached: False for the rest of the process
    finally:
        del sys.modules["torch"]  # a None entry would break libraries that look torch up there (scipy)
        if advisory is None:
            os.environ.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS", None)
        else:
            os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = advisory
    os.environ.setdefault("USE_TORCH", "0")  # datasets
    return True


def console(argv: list[str] | None = None) -> int:
    """The ``ngdiff`` console script (and ``python -m ngdiff_jax.cli``, ``train/*.py``, ``eval/*.py``):
    `main` in a process without torch where the command does not need it (`hide_torch`), with
    jax's persistent compilation cache on (`ngdiff_jax.compilation_cache`;
    ``NGDIFF_COMPILATION_CACHE=0`` turns it off)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    hide_torch(argv)
    if _command(argv) in COMMANDS:
        from ngdiff_jax import compilation_cache

        try:
            compilation_cache.enable()
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    from ngdiff_jax import accelerator_check

    if _command(argv) in accelerator_check.COMPUTE_COMMANDS:
        line = accelerator_check.unused_accelerator_warning()  # starts no JAX backend
        if line:
            print(line, file=sys.stderr)
    return main(argv)


def _load(name: str):
    return importlib.import_module(f"ngdiff_jax.commands.{COMMANDS[name]}")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ngdiff",
        description="Machine unlearning for causal LMs in JAX: NGDiff + GeN, TOFU and MUSE.",
        epilog="--debug (anywhere): print the traceback of an error.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    wanted = _command(argv) if argv else None
    for name in COMMANDS:
        if wanted is not None and wanted in COMMANDS and name != wanted:
            # Only import the module of the command being run.
            sub.add_parser(name)
            continue
        try:
            mod = _load(name)
        except ModuleNotFoundError as e:  # command not built in this checkout
            if e.name and e.name.startswith("ngdiff_jax.commands"):
                continue
            raise
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. The error boundary: every expected failure (``ngdiff_jax.errors.describe``)
    is one ``error:`` line and exit code 1 or 2; other exceptions are bugs, shown with a traceback
    only with ``--debug`` (anywhere on the command line) or ``NGDIFF_DEBUG=1``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("NGDIFF_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the error boundary
        from ngdiff_jax.errors import describe

        if debug:
            traceback.print_exc()
        known = describe(e)
        if known is not None:
            code, msg = known
            print(f"error: {msg}", file=sys.stderr)
            return code
        if not debug:
            print(f"internal error (a bug in ngdiff): {type(e).__name__}: {e}".splitlines()[0][:800], file=sys.stderr)
            print("rerun with --debug for the traceback, and please report it.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(console())
