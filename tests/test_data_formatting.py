"""QAFormatter: masking, EOS/BOS, prompt prefix, truncation, chat templates; train_tokenizer."""

import copy
import time

import pytest

from ngdiff_jax.data import IGNORE_INDEX, QAFormatter, load_tofu, synthetic, train_tokenizer


@pytest.fixture(scope="module")
def rows():
    return synthetic.generate_benchmark(n_authors=6, questions_per_author=5, seed=1)["full"]


@pytest.fixture(scope="module")
def tok(rows, tmp_path_factory):
    texts = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows]
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=512)


def test_train_tokenizer_is_fast_and_loads_with_auto(tmp_path, rows):
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    train_tokenizer([r["answer"] for r in rows] * 20, tmp_path, vocab_size=1024)
    assert time.perf_counter() - t0 < 5
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert (loaded.pad_token, loaded.bos_token, loaded.eos_token) == ("<pad>", "<bos>", "<eos>")
    ids = loaded.encode("Zebra ünïcode 123")
    assert ids[0] == loaded.bos_token_id
    assert loaded.decode(ids, skip_special_tokens=True) == "Zebra ünïcode 123"


def test_train_tokenizer_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["a"], vocab_size=100)


def test_encode_masks_prompt_and_ends_with_eos(tok, rows):
    fmt = QAFormatter(tok)
    assert not fmt.uses_chat_template
    for r in rows:
        ids, labels = fmt.encode(r["question"], r["answer"])
        prompt = fmt.encode_prompt(r["question"])
        assert len(ids) == len(labels)
        assert ids[: len(prompt)] == prompt  # generation prompt == training prefix
        assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
        answer = labels[len(prompt) :]
        assert IGNORE_INDEX not in answer and answer == ids[len(prompt) :]
        assert answer[-1] == tok.eos_token_id and ids[0] == tok.bos_token_id
        assert tok.decode(answer) == " " + r["answer"] + "<eos>"
        assert tok.decode(prompt, skip_special_tokens=True) == f"Question: {r['question']}\nAnswer:"


def test_encode_real_tofu_rows(tok, tofu_dir):
    fmt = QAFormatter(tok)
    for r in load_tofu("forget01", tofu_dir)[:10]:
        _ids, labels = fmt.encode(r["question"], r["answer"])
        scored = [t for t in labels if t != IGNORE_INDEX]
        assert tok.decode(scored) == " " + r["answer"] + "<eos>"


def test_custom_template_and_no_bos(tok):
    no_bos = copy.deepcopy(tok)
    no_bos._tokenizer.post_processor = None  # a tokenizer that does not add BOS (GPT-2-like)
    fmt = QAFormatter(no_bos, template="Q: {question} A:{answer}")
    ids, _labels = fmt.encode("Who?", "Me.")
    prompt = fmt.encode_prompt("Who?")
    assert ids[0] != tok.bos_token_id
    assert no_bos.decode(prompt) == "Q: Who? A:"
    assert no_bos.decode(ids[len(prompt) :]) == "Me.<eos>"


@pytest.mark.parametrize(
    "template", ["{answer} {question}", "Q: {question}", "{question} {answer} {answer}"]
)
def test_bad_template(tok, template):
    with pytest.raises(ValueError, match="template"):
        QAFormatter(tok, template=template)


def test_truncates_answer_keeps_eos(tok, rows):
    r = rows[0]
    full_ids, _ = QAFormatter(tok).encode(r["question"], r["answer"])
    n_prompt = len(QAFormatter(tok).encode_prompt(r["question"]))
    max_len = n_prompt + 4
    ids, _labels = QAFormatter(tok, max_length=max_len).encode(r["question"], r["answer"])
    assert len(ids) == max_len and ids[-1] == tok.eos_token_id
    assert ids[:-1] == full_ids[: max_len - 1]
    assert (
        QAFormatter(tok, max_length=len(full_ids)).encode(r["question"], r["answer"])[0] == full_ids
    )
    with pytest.raises(ValueError, match="prompt alone"):
        QAFormatter(tok, max_length=n_prompt + 1).encode(r["question"], r["answer"])


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_chat_template(tok):
    chat = copy.deepcopy(tok)
    chat.chat_template = CHAT_TEMPLATE
    fmt = QAFormatter(chat, system_prompt="Be brief.")
    assert fmt.uses_chat_template
    ids, labels = fmt.encode("Who?", "Me.")
    prompt = fmt.encode_prompt("Who?")
    assert chat.decode(prompt) == "<bos><|system|>Be brief.<eos><|user|>Who?<eos><|assistant|>"
    assert ids[: len(prompt)] == prompt and labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert chat.decode(labels[len(prompt) :]) == "Me.<eos>"
    assert not QAFormatter(chat, use_chat_template=False).uses_chat_template
    with pytest.raises(ValueError, match="chat_template"):
        QAFormatter(tok, use_chat_template=True)


def test_chat_template_that_is_not_a_prefix_is_an_error(tok):
    chat = copy.deepcopy(tok)
    # the generation prompt differs from how the assistant turn is rendered
    chat.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    with pytest.raises(ValueError, match="use_chat_template=False"):
        QAFormatter(chat).encode("Who?", "Me.")
