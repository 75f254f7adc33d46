"""``ngdiff convert IN.gguf OUT_DIR``: a GGUF model file -> a Hugging Face model directory."""

from __future__ import annotations

import argparse
import sys

HELP = "Convert a GGUF model (llama, qwen2; any quantization) into a float32 Hugging Face model directory."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("gguf", help="the .gguf file.")
    parser.add_argument("out", help="output directory (new or empty).")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory.")


def run(args: argparse.Namespace) -> int:
    from ngdiff_jax.models.gguf import convert_gguf

    try:
        out = convert_gguf(args.gguf, args.out, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
