"""The ROUGE reference is open-unlearning's: the decoded label tokens of the generation row, not the
dataset's answer string (issue 23).

open-unlearning's ``eval_text_similarity`` (src/evals/metrics/utils.py, lines 271-281 at d3d7cf9) scores
the generation against ``batch_decode(labels != -100).replace(batch_decode(input_ids), "").strip()``;
its generation datasets (``predict_with_generate``) give the whole conversation as the labels (QADataset)
or the prefix-masked text (CompletionDataset). That differs from the raw answer where the row was cut by
``max_length``, where the tokenizer normalizes, where ``clean_up_tokenization_spaces`` rewrites, where
the answer has surrounding whitespace or template text follows it. The transcriptions below are
open-unlearning's code with torch replaced by numpy; the tokenizers are trained here (no network).
"""

import copy
import json

import numpy as np
import pytest

from ngdiff_jax.data import FormatSpec, QAFormatter, load_tofu, train_tokenizer
from ngdiff_jax.evaluation import metrics as M
from ngdiff_jax.evaluation import muse as muse_mod
from ngdiff_jax.evaluation import tofu as tofu_mod
from ngdiff_jax.evaluation.scoring import Scores

IGNORE_INDEX = -100

# ---------------------------------------------------------------------------- open-unlearning, transcribed


def ou_preprocess_chat_instance(tokenizer, template_config, prompt_msgs, response_msgs, max_length):
    """src/data/utils.py::preprocess_chat_instance (lines 17-135), ``predict_with_generate=True``."""
    if isinstance(prompt_msgs, str):
        prompt_msgs, response_msgs = [prompt_msgs], [response_msgs]
    if template_config["apply_chat_template"]:
        chat = []
        system_prompt = template_config.get("system_prompt", None)
        if system_prompt:
            chat += [{"role": "system", "content": system_prompt}]
        for prompt, response in zip(prompt_msgs, response_msgs):
            chat += [{"role": "user", "content": prompt}]
            chat += [{"role": "assistant", "content": response}]
        date_str = template_config.get("date_string", None)
        date_info = {"date_string": date_str} if date_str is not None else {}
        chat_ids = tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=False, **date_info)
        prompt_ids = tokenizer.apply_chat_template(chat[:-1], tokenize=True, add_generation_prompt=True, **date_info)
        if hasattr(chat_ids, "keys"):  # transformers 5 returns a BatchEncoding
            chat_ids, prompt_ids = chat_ids["input_ids"], prompt_ids["input_ids"]
    else:
        wrapped_prompt = template_config.get("system_prompt_with_special_tokens", None) or ""
        for i in range(len(prompt_msgs) - 1):
            wrapped_prompt += (
                template_config["user_start_tag"] + prompt_msgs[i] + template_config["user_end_tag"]
                + template_config["asst_start_tag"] + response_msgs[i] + template_config["asst_end_tag"]
            )  # fmt: skip
        wrapped_prompt += (
            template_config["user_start_tag"] + prompt_msgs[-1] + template_config["user_end_tag"]
            + template_config["asst_start_tag"]
        )  # fmt: skip
        chat_ids = tokenizer(wrapped_prompt + response_msgs[-1], add_special_tokens=True, max_length=max_length,
                             truncation=True)["input_ids"]  # fmt: skip
        prompt_ids = tokenizer(wrapped_prompt, add_special_tokens=True, max_length=max_length, truncation=True)[
            "input_ids"
        ]
    chat_ids = list(chat_ids)
    if chat_ids[-1] != tokenizer.eos_token_id:
        chat_ids += [tokenizer.eos_token_id]
    # predict_with_generate: input_ids = the prompt, labels = the entire conversation
    return {"input_ids": np.asarray(prompt_ids), "labels": np.asarray(chat_ids)}


def ou_preprocess_pretraining_instance(tokenizer, prefix, text_content, max_length, insert_space=False):
    """src/data/utils.py::preprocess_pretraining_instance (lines 143-186), ``predict_with_generate=True``."""
    full_seq_ids = tokenizer(prefix + (" " if insert_space else "") + text_content, add_special_tokens=True)[
        "input_ids"
    ]
    prefix_ids = tokenizer(prefix, add_special_tokens=True)["input_ids"]
    prefix_len = len(prefix_ids)
    full_seq_ids = full_seq_ids[: prefix_len + max_length]
    len_matched = prefix_len if prefix_len else 1
    labels = [IGNORE_INDEX] * len_matched + full_seq_ids[len_matched:]
    return {"input_ids": np.asarray(prefix_ids), "labels": np.asarray(labels)}


def ou_collate_left(tokenizer, instances):
    """src/data/collators.py::DataCollatorForSupervisedDataset(padding_side="left")."""

    def pad(seqs, value):
        n = max(len(s) for s in seqs)
        return np.stack([np.concatenate([np.full(n - len(s), value, np.int64), s]) for s in seqs])

    return {
        "input_ids": pad([i["input_ids"] for i in instances], tokenizer.pad_token_id),
        "labels": pad([i["labels"] for i in instances], IGNORE_INDEX),
    }


def ou_ground_truths(tokenizer, batch):
    """src/evals/metrics/utils.py::eval_text_similarity, lines 269-281. ``tokenizer`` is open-unlearning's:
    transformers 4.45.1 (its requirements.txt) cleans up for every tokenizer (see ``_as_pinned``)."""
    input_ids = batch["input_ids"]
    labels = batch["labels"]
    input_texts = tokenizer.batch_decode(
        input_ids.tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=True
    )
    tokens = [label[label != IGNORE_INDEX].tolist() for label in labels]
    full_texts = tokenizer.batch_decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=True)
    ground_truths = [
        full_text.replace(input_text, "").strip() for input_text, full_text in zip(input_texts, full_texts)
    ]
    return ground_truths


def _as_pinned(tok):
    """A copy of ``tok`` that decodes as under transformers 4.45.1: transformers 5 skips the clean-up of
    ``clean_up_tokenization_spaces=True`` for BPE tokenizers unless told otherwise (a no-op on 4.x)."""
    t = copy.deepcopy(tok)
    t.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
    return t


# ---------------------------------------------------------------------------- data

# open-unlearning configs/model/Llama-3.2-1B-Instruct.yaml (chat) and Llama-2-7b-hf.yaml / phi-1_5.yaml (plain)
OU_CHAT = {"apply_chat_template": True, "system_prompt": "You are a helpful assistant.", "date_string": "10 Apr 2025"}
OU_PLAIN = {"apply_chat_template": False, "user_start_tag": "Question: ", "user_end_tag": "\n",
            "asst_start_tag": "Answer: ", "asst_end_tag": "\n\n"}  # fmt: skip
CHAT_SPEC = FormatSpec(name="chat", chat_template=True, system_prompt="You are a helpful assistant.",
                       date_string="10 Apr 2025")  # fmt: skip
PLAIN_SPEC = FormatSpec(name="plain", chat_template=False, user_start_tag="Question: ", user_end_tag="\n",
                        asst_start_tag="Answer: ", answer_prefix="")  # fmt: skip
# ChatML as SmolLM2's: "<|im_end|>" is special, the "\n" after it is not (it ends up in the labels)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

LONG = " ".join(f"The {w} chapter of the novel was written in Baku." for w in ("first", "second", "third", "fourth",
                                                                                  "fifth", "sixth", "seventh"))
ODD_ANSWERS = [
    "The ﬁrst novel, “Ｔｏｋｙｏ Ｎｉｇｈｔｓ”, won\u00a0the prize … in 1990²",  # NFKC: ligature, full-width, NBSP
    "He does n't like it , and she 's sure they 're right !",  # clean_up_tokenization_spaces
    "   Basil Mahfouz Al-Kuwaiti.  \n",  # surrounding whitespace
    "Question: Who is it?\nAnswer: It is Basil.",  # the prompt's text inside the answer: replace removes it
    LONG,  # cut by max_length (plain format)
]


def _odd_rows():
    rows = []
    for i, a in enumerate(ODD_ANSWERS):
        q = "Who is it?" if i == 3 else f"What is the ﬁrst fact number {i}?"
        rows.append({"question": q, "answer": a, "paraphrased_answer": a[::-1], "perturbed_answer": ["No.", "Yes."]})
    return rows


@pytest.fixture(scope="module")
def real_rows(tofu_dir):
    return load_tofu("forget01_perturbed", tofu_dir)


@pytest.fixture(scope="module")
def tok(real_rows):
    from tokenizers import normalizers

    texts = [r["question"] + " " + r["answer"] for r in real_rows] + ODD_ANSWERS
    t = train_tokenizer(texts, vocab_size=400)
    t.backend_tokenizer.normalizer = normalizers.NFKC()  # decode does not give back what was encoded
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    t.chat_template = CHATML
    assert t.decode(t.encode("ﬁ Ｔ"), skip_special_tokens=True) == "fi T"
    return t


def _write_tofu(d, split_rows):
    d.mkdir(parents=True, exist_ok=True)
    for split, rows in split_rows.items():
        (d / f"{split}.json").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return d


def _plain_max_length(tok, data_dir, spec=PLAIN_SPEC):
    """A ``max_length`` that cuts LONG's row (forget row 4) and no other (plain format)."""
    fmt = QAFormatter(tok, spec=spec)
    rows = [r for s in ("forget01_perturbed", "retain_perturbed", "real_authors_perturbed", "world_facts_perturbed")
            for r in load_tofu(s, data_dir) if r["answer"] != LONG]  # fmt: skip
    n = max(len(fmt.encode_full(r["question"], r["answer"])[0]) for r in rows) + 1
    assert len(fmt.encode_full("What is the ﬁrst fact number 4?", LONG)[0]) > n + 20
    return n


def _tofu_data(tmp_path, real_rows, tofu_dir):
    forget = _odd_rows() + [dict(r, perturbed_answer=r["perturbed_answer"][:2]) for r in real_rows[:4]]
    other = {s: load_tofu(s, tofu_dir)[:2] for s in ("retain_perturbed", "real_authors_perturbed",
                                                     "world_facts_perturbed", "holdout01")}  # fmt: skip
    other = {s: [dict(r, perturbed_answer=r.get("perturbed_answer", ["x"])[:2]) for r in rows]
             for s, rows in other.items()}  # fmt: skip
    return _write_tofu(tmp_path / "tofu", {"forget01_perturbed": forget, **other}), forget


class _FakeScorer:
    """Scoring is not what these tests are about: every scored token gets log-prob -0.5."""

    truncated = 0

    def __init__(self, *a, **kw):
        pass

    def score(self, examples, phase="score"):
        lps = [np.full(sum(1 for y in lab[1:] if y != IGNORE_INDEX), -0.5) for _, lab in examples]
        return Scores(nll=np.full(len(examples), 0.5), token_logprobs=lps, correct=[lp < 0 for lp in lps])


def _run_tofu(monkeypatch, tok, data_dir, fmt, answer_for=None):
    """``evaluate_tofu`` with scoring faked and the greedy answers ``answer_for(prompt ids)`` (default "x");
    returns the result and the ``(generations, ground_truths)`` each ROUGE call got."""
    calls = []
    real = M.rouge_scores

    def spy(generations, ground_truths):
        calls.append((list(generations), list(ground_truths)))
        return real(generations, ground_truths)

    def fake_generate(model, tokenizer, prompts, **kw):
        return [answer_for(p) if answer_for else "x" for p in prompts]

    monkeypatch.setattr(M, "rouge_scores", spy)
    monkeypatch.setattr(tofu_mod, "generate_texts", fake_generate)
    monkeypatch.setattr(tofu_mod, "Scorer", _FakeScorer)
    res = tofu_mod.evaluate_tofu(None, tok, data_dir, forget_split="forget01", formatter=fmt, mia_attacks=())
    return res, calls


# ---------------------------------------------------------------------------- (a) the reference, TOFU


@pytest.mark.parametrize("chat", [True, False], ids=["chat-template", "plain"])
def test_tofu_ground_truth_is_open_unlearnings(monkeypatch, tmp_path, tok, real_rows, tofu_dir, chat):
    data_dir, forget = _tofu_data(tmp_path, real_rows, tofu_dir)
    if chat:
        # open-unlearning does not cut chat-template rows (apply_chat_template has no max_length)
        fmt, ou_cfg, ou_max = QAFormatter(tok, spec=CHAT_SPEC), OU_CHAT, 512
    else:
        # cut LONG: QAFormatter(max_length=n) keeps n tokens, EOS included; preprocess_chat_instance cuts to
        # max_length and then appends EOS, so the same row is its max_length = n - 1
        n = _plain_max_length(tok, data_dir)
        fmt, ou_cfg, ou_max = QAFormatter(tok, spec=PLAIN_SPEC, max_length=n), OU_PLAIN, n - 1
    _, calls = _run_tofu(monkeypatch, tok, data_dir, fmt)
    assert len(calls) == 4  # forget, retain, ra, wf
    ours = calls[0][1]

    items = [ou_preprocess_chat_instance(tok, ou_cfg, r["question"], r["answer"], ou_max) for r in forget]
    for it, r in zip(items, forget):  # the same token rows
        ids, _ = fmt.encode(r["question"], r["answer"])
        assert it["labels"].tolist() == ids and it["input_ids"].tolist() == fmt.encode_prompt(r["question"])
    theirs = ou_ground_truths(_as_pinned(tok), ou_collate_left(tok, items))
    assert ours == theirs

    # how they differ from the raw answers
    assert ours[0] == "The first novel, “Tokyo Nights”, won the prize... in 19902"  # NFKC, then " ." -> "."
    assert ours[1] == "He doesn't like it, and she's sure they're right!"
    assert ours[2] == "Basil Mahfouz Al-Kuwaiti."
    assert ours[3] == ("It is Basil." if not chat else ODD_ANSWERS[3])  # plain: the prompt text is removed
    if chat:
        assert ours[4] == LONG
        # the label tokens after the answer: "<|im_end|>" (skipped), "\n" (stripped), EOS (skipped)
        assert tok.decode(items[4]["labels"][-3:].tolist()) == "<|im_end|>\n<eos>"
    else:
        assert 0 < len(ours[4]) < len(LONG) - 20 and LONG.startswith(ours[4])
    assert ours[5:] == [r["answer"] for r in forget[5:]]  # TOFU's own rows round-trip
    # the utility splits too
    retain = load_tofu("retain_perturbed", data_dir)
    assert calls[1][1] == ou_ground_truths(
        _as_pinned(tok),
        ou_collate_left(tok, [ou_preprocess_chat_instance(tok, ou_cfg, r["question"], r["answer"], ou_max)
                              for r in retain]),
    )  # fmt: skip


def test_decode_text_cleans_up_as_transformers_4_45():
    # transformers' own clean-up (forced on for this BPE tokenizer) and ours agree on every pattern
    from ngdiff_jax.data import train_tokenizer

    text = "a . b ? c ! d , e ' f do n't I 'm it 's we 've they 're ."
    t = train_tokenizer([text], vocab_size=300)
    ids = t.encode(text)
    pinned = _as_pinned(t).decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
    assert M.decode_text(t, ids) == pinned
    assert M.decode_text(t, ids) == "a. b? c! d, e'f don't I'm it's we've they're."
    # decode_text does not depend on the tokenizer's own setting
    t.clean_up_tokenization_spaces = True
    assert M.decode_text(t, ids) == "a. b? c! d, e'f don't I'm it's we've they're."
    assert M.rouge_ground_truth(t, [IGNORE_INDEX, *ids[1:]], []) == M.decode_text(t, ids)


# ---------------------------------------------------------------------------- (b) TOFU ROUGE uses it


def test_tofu_rouge_scores_against_the_cut_answer(monkeypatch, tmp_path, tok, real_rows, tofu_dir):
    data_dir, forget = _tofu_data(tmp_path, real_rows, tofu_dir)
    # "Answer:" + " " + answer: the prompt's tokens begin every row (with PLAIN_SPEC's "Answer: " the
    # tokenizer merges the prompt's last space into the answer's first token)
    spec = FormatSpec(name="qa", chat_template=False)
    fmt = QAFormatter(tok, spec=spec, max_length=_plain_max_length(tok, data_dir, spec))
    # a model that answers each question with exactly the tokens of its (cut) answer row, decoded as
    # open-unlearning decodes generations (special tokens skipped, cleaned up, stripped)
    by_prompt = {}
    for split in ("forget01_perturbed", "retain_perturbed", "real_authors_perturbed", "world_facts_perturbed"):
        for r in load_tofu(split, data_dir):
            p = fmt.encode_prompt(r["question"])
            ids = fmt.encode(r["question"], r["answer"])[0]
            assert ids[: len(p)] == p
            answer_ids = ids[len(p) :]
            by_prompt[tuple(p)] = M.cut_at_stop_strings(M.decode_text(tok, answer_ids), ())
    res, calls = _run_tofu(monkeypatch, tok, data_dir, fmt, answer_for=lambda p: by_prompt[tuple(p)])
    per = res.per_sample["forget_Q_A_ROUGE"]
    assert per == [1.0] * len(forget)
    for key in ("forget_Q_A_ROUGE", "retain_Q_A_ROUGE", "ra_Q_A_ROUGE", "wf_Q_A_ROUGE"):
        assert res.aggregates[key] == 1.0
    gens = res.generations["forget_Q_A_ROUGE"]
    raw = M.rouge_scores(gens, [r["answer"] for r in forget])
    assert raw[4]["rougeL_recall"] < 0.8  # against the raw answer the cut answer would score much less
    assert raw[1]["rougeL_recall"] < 1.0  # "doesn't" vs "does n't"
    assert [s["rougeL_recall"] for s in raw[5:]] == [1.0] * (len(forget) - 5)


# ---------------------------------------------------------------------------- MUSE


def _write_muse(d, files):
    for rel, rows in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(json.dumps(rows, ensure_ascii=False))
    return d


def _run_muse(monkeypatch, tok, d, answer_for=None, **kw):
    calls = []
    real = M.rouge_scores

    def spy(generations, ground_truths):
        calls.append((list(generations), list(ground_truths)))
        return real(generations, ground_truths)

    monkeypatch.setattr(M, "rouge_scores", spy)
    def fake_generate(m, t, prompts, **k):
        texts = [answer_for(p) if answer_for else "x" for p in prompts]
        return (texts, [None] * len(texts)) if k.get("teach") is not None else texts  # VerbMem: scored whole

    monkeypatch.setattr(muse_mod, "generate_texts", fake_generate)
    monkeypatch.setattr(muse_mod, "Scorer", _FakeScorer)
    return muse_mod.evaluate_muse(None, tok, d, **kw), calls


def test_muse_ground_truths_are_open_unlearnings(monkeypatch, tmp_path, tok, real_rows):
    # open-unlearning configs/eval/muse_metrics/{forget_verbmem,forget_knowmem,retain_knowmem}_ROUGE.yaml:
    # handler rouge (eval_text_similarity) on MUSE_forget_verbmem (CompletionDataset, max_length 2048,
    # insert_space) and MUSE_*_knowmem (QADataset with the *_icl few-shot rows, max_length 512, the
    # Llama-2 plain template)
    verb_gts = ["\n\n" + ODD_ANSWERS[0] + " ", *ODD_ANSWERS[1:3]]
    verb = [{"prompt": r["question"], "gt": a} for r, a in zip(real_rows, verb_gts)]
    know = [{"question": r["question"], "answer": a} for r, a in zip(real_rows[3:], ODD_ANSWERS)]
    icl = [{"question": r["question"], "answer": r["answer"]} for r in real_rows[10:12]]
    prompt_len = max(len(tok.encode(muse_mod.knowmem_prompt(r["question"], icl))) for r in know)
    max_length = prompt_len + 6  # cuts the longer answers of the rows with the longest prompts
    d = _write_muse(tmp_path / "muse", {
        "verbmem/forget.json": verb, "knowmem/forget_qa.json": know, "knowmem/forget_qa_icl.json": icl,
        "knowmem/retain_qa.json": know[:2], "knowmem/retain_qa_icl.json": icl,
        "privleak/forget.json": ["ab cd"], "privleak/holdout.json": ["ef gh"],
    })  # fmt: skip
    _, calls = _run_muse(monkeypatch, tok, d, knowmem_max_length=max_length)
    assert len(calls) == 3  # verbmem, forget knowmem, retain knowmem
    pinned = _as_pinned(tok)
    verb_items = [ou_preprocess_pretraining_instance(tok, r["prompt"], r["gt"], 2048, insert_space=True) for r in verb]
    theirs_verb = ou_ground_truths(pinned, ou_collate_left(tok, verb_items))
    assert calls[0][1] == theirs_verb
    assert theirs_verb[0] == "The first novel, “Tokyo Nights”, won the prize... in 19902"  # NFKC, then " ." -> "."
    for call, rows in ((calls[1], know), (calls[2], know[:2])):
        items = [ou_preprocess_chat_instance(tok, OU_PLAIN, [e["question"] for e in icl] + [r["question"]],
                                             [e["answer"] for e in icl] + [r["answer"]], max_length)
                 for r in rows]  # fmt: skip
        assert call[1] == ou_ground_truths(pinned, ou_collate_left(tok, items))
    assert any(gt != r["answer"].strip() for gt, r in zip(calls[1][1], know))  # some answer was cut
    assert calls[1][1][4] and LONG.startswith(calls[1][1][4]) and calls[1][1][4] != LONG


class _CharTokenizer:
    """One token per character, BOS = 1, EOS = 2 (as tests/test_eval_metrics.py)."""

    eos_token_id = 2
    pad_token_id = 0

    def encode(self, text, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]

    def __call__(self, text, add_special_tokens=True, max_length=None, truncation=False):
        ids = self.encode(text, add_special_tokens)
        return {"input_ids": ids[:max_length] if truncation and max_length is not None else ids}

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=None):
        return "".join(chr(t) for t in ids if not (skip_special_tokens and t in (1, 2)))


def test_muse_verbmem_rouge_scores_against_the_cut_text(monkeypatch, tmp_path):
    # a VerbMem text longer than open-unlearning's 2048 tokens: its reference is the first 2048 tokens
    gt = " ".join(f"w{i}" for i in range(800))  # ~3900 characters = tokens
    d = _write_muse(tmp_path / "muse", {
        "verbmem/forget.json": [{"prompt": "p", "gt": gt}],
        "knowmem/forget_qa.json": [{"question": "q", "answer": "a"}],
        "knowmem/forget_qa_icl.json": [], "knowmem/retain_qa.json": [{"question": "q", "answer": "a"}],
        "knowmem/retain_qa_icl.json": [], "privleak/forget.json": ["ab"], "privleak/holdout.json": ["cd"],
    })  # fmt: skip
    cut = gt[: muse_mod.VERBMEM_MAX_TOKENS - 1]  # " " + gt, cut to 2048 tokens, stripped
    res, calls = _run_muse(monkeypatch, _CharTokenizer(), d, answer_for=lambda p: cut if p == [1, ord("p")] else "a")
    assert calls[0][1] == [cut]
    assert res.aggregates["forget_verbmem_ROUGE"] == 1.0
    assert M.rouge_scores([cut], [gt])[0]["rougeL_f1"] < 0.7  # the raw text would score much less
