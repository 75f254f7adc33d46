"""Prompt formatting: question/answer pairs to token ids with the prompt masked out of the labels."""

from __future__ import annotations

from collections.abc import Sequence

IGNORE_INDEX = -100

DEFAULT_TEMPLATE = "Question: {question}\nAnswer: {answer}"


class QAFormatter:
    """Encode QA pairs for training/scoring and questions for generation, consistently.

    ``encode(q, a)`` returns ``prompt + answer + [EOS]`` where ``prompt == encode_prompt(q)``
    token for token, so a model generating from ``encode_prompt(q)`` sees exactly the
    prefix it was trained on. Labels are ``-100`` over the prompt.

    The prompt comes from the tokenizer's chat template when it has one (and
    ``use_chat_template`` is ``"auto"`` or ``True``; under ``"auto"`` an explicit
    ``template`` wins): the user turn (after an optional
    system prompt) with the generation prompt appended; the answer is what the
    template adds for the assistant turn, plus EOS if it does not already end with it
    (open-unlearning's rule). Otherwise a plain ``template`` with ``{question}`` and a
    final ``{answer}``: the prompt is the text before ``{answer}`` with trailing
    whitespace removed (``"Question: ...\\nAnswer:"``), the answer is that whitespace
    followed by the answer (``" Paris"``), tokenized separately and concatenated. A BOS
    token starts the prompt when the tokenizer adds one by itself (Llama-style).

    Args:
      tokenizer: a Hugging Face tokenizer (needs an EOS token).
      template: plain template, default ``"Question: {question}\\nAnswer: {answer}"``.
      use_chat_template: ``"auto"`` (chat template if the tokenizer has one), ``True`` or ``False``.
      max_length: if set, the answer is truncated so prompt + answer + EOS fits
        (EOS is kept); a prompt that leaves no room for one answer token is an error.
      system_prompt: optional system message for the chat template.
    """

    def __init__(
        self,
        tokenizer,
        template: str | None = None,
        use_chat_template: bool | str = "auto",
        *,
        max_length: int | None = None,
        system_prompt: str | None = None,
    ):
        self.tokenizer = tokenizer
        if tokenizer.eos_token_id is None:
            raise ValueError(
                "QAFormatter needs a tokenizer with an EOS token; set tokenizer.eos_token first."
            )
        self.eos_token_id = int(tokenizer.eos_token_id)
        if use_chat_template not in ("auto", True, False):
            raise ValueError(
                f"use_chat_template must be 'auto', True or False, got {use_chat_template!r}."
            )
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if use_chat_template is True and not has_chat:
            raise ValueError(
                "use_chat_template=True but the tokenizer has no chat_template; "
                "pass use_chat_template=False or 'auto' to use the plain template."
            )
        if template is not None and use_chat_template is True:
            raise ValueError("Pass either a plain template or use_chat_template=True, not both.")
        self.uses_chat_template = use_chat_template is True or (
            use_chat_template == "auto" and has_chat and template is None
        )
        self.template = DEFAULT_TEMPLATE if template is None else template
        self._prompt_template, self._answer_prefix = _split_template(self.template)
        self.system_prompt = system_prompt
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be at least 2 (prompt + EOS), got {max_length}.")
        self.max_length = max_length
        self.bos_token_id = added_bos_id(tokenizer)

    # -- public API -------------------------------------------------------------------------

    def encode_prompt(self, question: str) -> list[int]:
        """Token ids of the prompt for ``question``: the exact prefix of ``encode(question, ...)``."""
        if self.uses_chat_template:
            return _as_ids(
                self.tokenizer.apply_chat_template(
                    self._messages(question), tokenize=True, add_generation_prompt=True
                )
            )
        ids = self.tokenizer.encode(
            self._prompt_template.replace("{question}", question), add_special_tokens=False
        )
        return ([self.bos_token_id] if self.bos_token_id is not None else []) + list(ids)

    def encode(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` for a QA pair: prompt tokens labelled ``-100``, answer ends with EOS."""
        prompt = self.encode_prompt(question)
        answer_ids = self._answer_ids(question, answer, prompt)
        if self.max_length is not None:
            room = self.max_length - len(prompt) - 1
            if room < 1:
                raise ValueError(
                    f"The prompt alone is {len(prompt)} tokens, which leaves no room for an answer "
                    f"within max_length={self.max_length}; raise max_length or shorten the "
                    f"question: {question[:80]!r}."
                )
            if len(answer_ids) > room + 1:
                answer_ids = answer_ids[:room] + [self.eos_token_id]
        input_ids = prompt + answer_ids
        labels = [IGNORE_INDEX] * len(prompt) + answer_ids
        return input_ids, labels

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

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids, special tokens dropped and surrounding whitespace stripped."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    # -- helpers ----------------------------------------------------------------------------

    def _messages(self, question: str, answer: str | None = None) -> list[dict]:
        msgs = []
        if self.system_prompt:
            msgs.append({"role": "system", "content": self.system_prompt})
        msgs.append({"role": "user", "content": question})
        if answer is not None:
            msgs.append({"role": "assistant", "content": answer})
        return msgs

    def _answer_ids(self, question: str, answer: str, prompt: list[int]) -> list[int]:
        if self.uses_chat_template:
            full = _as_ids(
                self.tokenizer.apply_chat_template(
                    self._messages(question, answer), tokenize=True, add_generation_prompt=False
                )
            )
            if full[: len(prompt)] != prompt:
                raise ValueError(
                    "The tokenizer's chat template does not render the conversation as the "
                    "generation prompt followed by the answer, so prompt masking would be wrong; "
                    "use QAFormatter(..., use_chat_template=False) with a plain template."
                )
            ids = full[len(prompt) :]
        else:
            ids = list(
                self.tokenizer.encode(self._answer_prefix + answer, add_special_tokens=False)
            )
        if not ids or ids[-1] != self.eos_token_id:
            ids = ids + [self.eos_token_id]
        return ids


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
