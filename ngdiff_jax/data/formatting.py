"""Prompt formatting: question/answer pairs to token ids with the prompt masked out of the labels.

One declared thing, :class:`FormatSpec` (the ``format:`` config section, presets in
``configs/formats``), drives training, unlearning and evaluation alike. Its fields are
open-unlearning's ``template_args`` (``configs/model/*.yaml`` there, used by
``src/data/utils.py::preprocess_chat_instance``) plus two of ours: ``chat_template: auto``
and ``answer_prefix``. Encoding follows ``preprocess_chat_instance`` exactly: the whole
conversation (prompt + answer) is tokenized **together**, the prompt alone is tokenized
too, and the labels are ``-100`` over the first ``len(prompt_ids)`` tokens; EOS is
appended when the conversation does not already end with it.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100

DEFAULT_TEMPLATE = "Question: {question}\nAnswer: {answer}"

#: The file written beside every exported model (read back by ``ngdiff eval``).
FORMAT_FILE = "ngdiff_format.json"

OVERLONG_POLICIES = ("truncate", "drop", "error")


@dataclass(frozen=True)
class FormatSpec:
    """How a QA pair becomes a prompt and an answer (open-unlearning's ``template_args``).

    ``chat_template``: ``True`` renders ``[system?, user, assistant]`` with the tokenizer's
    chat template (``system_prompt`` as the system message when not null, ``date_string``
    passed to the template as in open-unlearning); ``False`` builds the plain text
    ``system_prompt_with_special_tokens + user_start_tag + question + user_end_tag +
    asst_start_tag`` followed by ``answer_prefix + answer``; ``"auto"`` is ``True`` when
    the tokenizer has a chat template. ``system_prompt: ""`` sends an empty system
    message (so a template's built-in default, such as SmolLM2's, is not used);
    ``null`` sends none.
    """

    name: str = "default"
    chat_template: bool | str = "auto"
    system_prompt: str | None = None
    system_prompt_with_special_tokens: str | None = None
    user_start_tag: str = "Question: "
    user_end_tag: str = "\n"
    asst_start_tag: str = "Answer:"
    answer_prefix: str = " "
    date_string: str | None = None

    def __post_init__(self):
        if self.chat_template not in ("auto", True, False):
            raise ValueError(
                f"format.chat_template must be auto, true or false, got {self.chat_template!r}."
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str = "format") -> FormatSpec:
        if not isinstance(d, Mapping):
            raise ValueError(f"{where} is {d!r} ({type(d).__name__}); it must be a mapping of format keys "
                             f"({', '.join(f.name for f in dataclasses.fields(cls))}) or a preset name.")  # fmt: skip
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(
                f"{where}: unknown key(s) {unknown}; valid keys are "
                f"{sorted(f.name for f in dataclasses.fields(cls))}."
            )
        return cls(**dict(d))

    @classmethod
    def from_template(cls, template: str, **kw) -> FormatSpec:
        """A plain ``"Q: {question}\\nA: {answer}"`` template as a spec (trailing whitespace of the
        prompt part becomes ``answer_prefix``)."""
        prompt, prefix = _split_template(template)
        before, after = prompt.split("{question}", 1)
        return cls(
            name="template", chat_template=False, user_start_tag=before, user_end_tag=after,
            asst_start_tag="", answer_prefix=prefix, **kw,
        )  # fmt: skip

    def differences(self, other: FormatSpec) -> dict[str, tuple]:
        """Fields (``name`` aside) whose values differ: ``{field: (self's, other's)}``."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if k != "name" and a[k] != b[k]}


def load_format(name_or_path) -> FormatSpec:
    """A preset from ``configs/formats`` by name (``open-unlearning``, ``llama2-chat``, ...) or a YAML path."""
    from ngdiff_jax.config_loader import load_yaml, resolve_config_path

    try:
        path = resolve_config_path(name_or_path, "formats")
    except FileNotFoundError:
        raise ValueError(
            f"format {name_or_path!r} is not a preset; choose one of {available_formats()} "
            "or pass a YAML file of format fields."
        ) from None
    return FormatSpec.from_dict(load_yaml(path), where=str(path))


def available_formats() -> list[str]:
    from ngdiff_jax.paths import CONFIG_DIR

    return sorted(p.stem for p in (CONFIG_DIR / "formats").glob("*.yaml"))


def save_format(spec: FormatSpec, model_dir, **extra) -> None:
    """Write ``ngdiff_format.json`` (the spec, plus e.g. the TOFU split) beside an exported model."""
    import json
    from pathlib import Path

    d = {"format": spec.to_dict(), **extra}
    (Path(model_dir) / FORMAT_FILE).write_text(json.dumps(d, indent=2) + "\n")


def read_format(model_dir) -> dict | None:
    """The ``ngdiff_format.json`` beside a model (``{"format": {...}, ...}``), or None if absent."""
    from pathlib import Path

    p = Path(model_dir) / FORMAT_FILE
    if not p.is_file():
        return None
    from ngdiff_jax.data.jsonio import read_json

    d = read_json(p)
    if not isinstance(d, dict) or "format" not in d:
        raise ValueError(f"{p} has no 'format' mapping; remove it or re-export the model (ngdiff writes it).")
    d["format"] = FormatSpec.from_dict(d["format"], where=f"{p}: format")
    return d


class QAFormatter:
    """Encode QA pairs for training/scoring and questions for generation, as a :class:`FormatSpec` says.

    ``encode(q, a)`` returns ``(input_ids, labels)``: the conversation tokenized in one go,
    labels ``-100`` over the first ``len(encode_prompt(q))`` tokens, EOS appended unless the
    conversation ends with it (open-unlearning's ``preprocess_chat_instance``). With most
    tokenizers ``encode_prompt(q)`` is a prefix of the input ids; where the tokenizer merges
    across the boundary (e.g. a prompt ending in a space) it is not, and, as in
    open-unlearning, generation starts from ``encode_prompt(q)`` while the first answer
    token(s) are not scored.

    Args:
      tokenizer: a Hugging Face tokenizer (needs an EOS token).
      template: a plain template (``"Question: {question}\\nAnswer: {answer}"``), an
        alternative to ``spec`` (implies no chat template).
      use_chat_template: ``"auto"``, ``True`` or ``False``; overrides ``spec.chat_template``.
      max_length: if set, the answer is truncated so the row fits (EOS kept); a prompt that
        leaves no room for one answer token is an error.
      system_prompt: system message for the chat template (overrides ``spec.system_prompt``).
      spec: the :class:`FormatSpec` (default: the ``default`` preset's values).
    """

    def __init__(
        self,
        tokenizer,
        template: str | None = None,
        use_chat_template: bool | str | None = None,
        *,
        max_length: int | None = None,
        system_prompt: str | None = None,
        spec: FormatSpec | None = None,
    ):
        self.tokenizer = tokenizer
        if tokenizer.eos_token_id is None:
            raise ValueError(
                "QAFormatter needs a tokenizer with an EOS token; set tokenizer.eos_token first."
            )
        self.eos_token_id = int(tokenizer.eos_token_id)
        if template is not None:
            if use_chat_template is True:
                raise ValueError("Pass either a plain template or use_chat_template=True, not both.")
            if spec is not None:
                raise ValueError("Pass either a plain template or a FormatSpec, not both.")
            spec = FormatSpec.from_template(template)
        spec = spec or FormatSpec()
        if use_chat_template is not None:
            if use_chat_template not in ("auto", True, False):
                raise ValueError(
                    f"use_chat_template must be 'auto', True or False, got {use_chat_template!r}."
                )
            spec = dataclasses.replace(spec, chat_template=use_chat_template)
        if system_prompt is not None:
            spec = dataclasses.replace(spec, system_prompt=system_prompt)
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if spec.chat_template is True and not has_chat:
            raise ValueError(
                f"format {spec.name!r} asks for the chat template (chat_template=true / "
                "use_chat_template=True) but the tokenizer has no chat_template; set "
                "format.chat_template=false (or 'auto') to use the plain tags."
            )
        self.spec = spec
        self.uses_chat_template = spec.chat_template is True or (
            spec.chat_template == "auto" and has_chat
        )
        self.system_prompt = spec.system_prompt
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be at least 2 (prompt + EOS), got {max_length}.")
        self.max_length = max_length
        self.bos_token_id = added_bos_id(tokenizer)

    # -- public API -------------------------------------------------------------------------

    def encode_prompt(self, question: str) -> list[int]:
        """Token ids of the generation prompt for ``question``."""
        if self.uses_chat_template:
            return self._chat_ids(self._messages(question), add_generation_prompt=True)
        return self._plain_ids(self._plain_prompt(question))

    def encode_full(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` without any length limit."""
        prompt = self.encode_prompt(question)
        if self.uses_chat_template:
            ids = self._chat_ids(self._messages(question, answer), add_generation_prompt=False)
            if ids[: len(prompt)] != prompt:
                raise ValueError(
                    "The tokenizer's chat template does not render the conversation as the "
                    "generation prompt followed by the answer, so prompt masking would be wrong; "
                    "use format.chat_template=false (use_chat_template=False) with plain tags."
                )
        else:
            ids = self._plain_ids(self._plain_prompt(question) + self.spec.answer_prefix + answer)
        if not ids or ids[-1] != self.eos_token_id:
            ids = ids + [self.eos_token_id]
        n = len(prompt)
        if len(ids) <= n:
            raise ValueError(
                f"format {self.spec.name!r}: the conversation for question {question[:60]!r} is no longer "
                "than its prompt, so no answer token would be scored; check the format's tags."
            )
        return ids, [IGNORE_INDEX] * n + ids[n:]

    def encode(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` for a QA pair: prompt tokens labelled ``-100``, answer ends with EOS."""
        ids, labels = self.encode_full(question, answer)
        if self.max_length is not None and len(ids) > self.max_length:
            n = sum(1 for t in labels if t == IGNORE_INDEX)
            room = self.max_length - n - 1
            if room < 1:
                raise ValueError(
                    f"The prompt alone is {n} tokens, which leaves no room for an answer "
                    f"within max_length={self.max_length}; raise max_length or shorten the "
                    f"question: {question[:80]!r}."
                )
            ids = ids[: n + room] + [self.eos_token_id]
            labels = labels[: n + room] + [self.eos_token_id]
        return ids, labels

    def encode_many(
        self, questions: Sequence[str], answers: Sequence[str]
    ) -> list[tuple[list[int], list[int]]]:
        """``encode`` over paired lists."""
        if len(questions) != len(answers):
            raise ValueError(
                f"encode_many got {len(questions)} questions and {len(answers)} answers; "
                "pass lists of equal length."
            )
        return [self.encode(q, a) for q, a in zip(questions, answers)]

    def encode_rows(
        self,
        rows: Sequence[Mapping[str, str]],
        *,
        overlong: str = "truncate",
        where: str = "data",
    ) -> list[tuple[list[int], list[int]]]:
        """Encode ``question``/``answer`` rows; rows longer than ``max_length`` are truncated (with a
        warning giving their count), dropped (warning) or an error, as ``overlong`` says."""
        if overlong not in OVERLONG_POLICIES:
            raise ValueError(
                f"overlong={overlong!r} is not one of {', '.join(OVERLONG_POLICIES)}."
            )
        out, long_rows = [], []
        for i, r in enumerate(rows):
            full = self.encode_full(r["question"], r["answer"])
            if self.max_length is not None and len(full[0]) > self.max_length:
                long_rows.append((i, len(full[0])))
                if overlong == "drop":
                    continue
                if overlong == "error":
                    continue
                out.append(self.encode(r["question"], r["answer"]))
            else:
                out.append(full)
        if long_rows:
            worst = max(n for _, n in long_rows)
            msg = (
                f"{where}: {len(long_rows)} of {len(rows)} rows are longer than max_length="
                f"{self.max_length} tokens (longest {worst}, first at row {long_rows[0][0]})"
            )
            if overlong == "error":
                raise ValueError(
                    msg + "; raise data.max_length, or set data.overlong=truncate or drop."
                )
            what = "dropped" if overlong == "drop" else "answers truncated (EOS kept)"
            warnings.warn(f"{msg}: {what}.", stacklevel=2)
            if not out:
                raise ValueError(msg + "; all rows dropped, raise data.max_length.")
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids, special tokens dropped and surrounding whitespace stripped."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    # -- helpers ----------------------------------------------------------------------------

    def _messages(self, question: str, answer: str | None = None) -> list[dict]:
        msgs = []
        if self.spec.system_prompt is not None:
            msgs.append({"role": "system", "content": self.spec.system_prompt})
        msgs.append({"role": "user", "content": question})
        if answer is not None:
            msgs.append({"role": "assistant", "content": answer})
        return msgs

    def _chat_ids(self, messages, *, add_generation_prompt: bool) -> list[int]:
        kw = {} if self.spec.date_string is None else {"date_string": self.spec.date_string}
        return _as_ids(
            self.tokenizer.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=add_generation_prompt, **kw
            )
        )

    def _plain_prompt(self, question: str) -> str:
        s = self.spec
        return (
            (s.system_prompt_with_special_tokens or "")
            + s.user_start_tag
            + question
            + s.user_end_tag
            + s.asst_start_tag
        )

    def _plain_ids(self, text: str) -> list[int]:
        # open-unlearning: tokenizer(text, add_special_tokens=True) (BOS where the tokenizer adds one)
        return [int(i) for i in self.tokenizer(text, add_special_tokens=True)["input_ids"]]


def _split_template(template: str) -> tuple[str, str]:
    """``"Q: {question}\\nA: {answer}"`` -> (``"Q: {question}\\nA:"``, ``" "``)."""
    if "{question}" not in template or not template.endswith("{answer}"):
        raise ValueError(
            f"A plain template needs '{{question}}' and must end with '{{answer}}', got {template!r}."
        )
    head = template[: -len("{answer}")]
    if "{answer}" in head:
        raise ValueError(
            f"'{{answer}}' must appear once, at the end of the template: {template!r}."
        )
    prompt = head.rstrip()
    return prompt, head[len(prompt) :]


def added_bos_id(tokenizer) -> int | None:
    """The BOS id if the tokenizer prepends it by itself when adding special tokens."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer.encode("a", add_special_tokens=True)
    return int(bos) if ids and ids[0] == bos else None


def _as_ids(out) -> list[int]:
    """``apply_chat_template(tokenize=True)`` output (list or BatchEncoding) as a flat list."""
    if hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    out = list(out)
    if out and isinstance(out[0], (list, tuple)):
        out = list(out[0])
    return [int(i) for i in out]
