"""MUSE loading (real MUSE-News files) and chunk_corpus."""

import copy

import pytest

from ngdiff_jax.data import IGNORE_INDEX, Batcher, chunk_corpus, load_muse, train_tokenizer


@pytest.fixture(scope="module")
def forget_texts(muse_news_dir):
    return load_muse(muse_news_dir, "raw", "forget")


@pytest.fixture(scope="module")
def tok(forget_texts):
    return train_tokenizer(forget_texts[:40], vocab_size=512)


def test_load_muse_subsets(muse_news_dir, forget_texts):
    assert len(forget_texts) == 889 and isinstance(forget_texts[0], str)
    qa = load_muse(muse_news_dir, "knowmem", "forget_qa")
    assert len(qa) == 100 and set(qa[0]) == {"question", "answer"}
    # hub name retain_qa == local retain2_qa
    assert load_muse(muse_news_dir, "knowmem", "retain_qa") == load_muse(
        muse_news_dir, "knowmem", "retain2_qa"
    )
    assert len(load_muse(muse_news_dir, "knowmem", "retain_qa_icl")) == 10
    verb = load_muse(muse_news_dir, "verbmem", "forget")
    assert set(verb[0]) == {"prompt", "gt"}
    for split in ("forget", "holdout", "retain"):
        texts = load_muse(muse_news_dir, "privleak", split)
        assert len(texts) == 100 and isinstance(texts[0], str)


def test_load_muse_missing_split(muse_news_dir):
    with pytest.raises(FileNotFoundError, match="raw/retain1.*Available there: .*raw/forget"):
        load_muse(muse_news_dir, "raw", "retain1")


def test_chunk_corpus_blocks(tok, forget_texts):
    texts = forget_texts[:5]
    blocks = chunk_corpus(texts, tok, 64)
    body = tok.encode("\n\n".join(texts), add_special_tokens=False)
    assert all(len(ids) == 64 for ids, _ in blocks[:-1]) and 2 <= len(blocks[-1][0]) <= 64
    rejoined = []
    for ids, labels in blocks:
        assert ids[0] == tok.bos_token_id
        assert labels[0] == IGNORE_INDEX and labels[1:] == ids[1:]
        rejoined += ids[1:]
    assert rejoined == body  # consecutive, nothing lost
    assert tok.decode(rejoined) == "\n\n".join(texts)
    full = chunk_corpus(texts, tok, 64, drop_remainder=True)
    assert len(full) == len(body) // 63 and all(len(ids) == 64 for ids, _ in full)
    batch = next(iter(Batcher(blocks, 4, pad_id=tok.pad_token_id, buckets=(64,))))
    assert batch["input_ids"].shape == (4, 64)


def test_chunk_corpus_without_bos(tok):
    no_bos = copy.deepcopy(tok)
    no_bos._tokenizer.post_processor = None
    blocks = chunk_corpus(["abc def ghi jkl"] * 3, no_bos, 4)
    assert blocks[0][0][0] != tok.bos_token_id and len(blocks[0][0]) == 4
    with pytest.raises(ValueError, match="block_len"):
        chunk_corpus(["abc"], tok, 1)
    with pytest.raises(ValueError, match="no texts"):
        chunk_corpus([], tok, 8)
