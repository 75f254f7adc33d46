"""Batcher / make_batches / pad_prompts: determinism, buckets, padding rows, resume."""

import numpy as np
import pytest

from ngdiff_jax.data import (
    IGNORE_INDEX,
    Batcher,
    BatchPosition,
    bucket_lengths,
    collate,
    make_batches,
    pad_prompts,
)

PAD = 0


def _examples(n=11, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(3, 40))
        ids = list(rng.integers(3, 100, size=length))
        k = int(rng.integers(1, length))
        out.append((ids, [IGNORE_INDEX] * k + ids[k:]))
    return out


def _eq(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_bucket_lengths():
    assert bucket_lengths(200) == (16, 32, 64, 128, 200)
    assert bucket_lengths(64) == (16, 32, 64)
    assert bucket_lengths(10) == (10,)
    assert bucket_lengths(100, min_length=32) == (32, 64, 100)


def test_collate_right_pads_and_masks_fill_rows():
    exs = [([5, 6, 7], [IGNORE_INDEX, 6, 7]), ([8, 9], [IGNORE_INDEX, 9])]
    b = collate(exs, pad_id=PAD, batch_size=3, buckets=(4, 8))
    assert b["input_ids"].dtype == np.int32 and b["input_ids"].shape == (3, 4)
    np.testing.assert_array_equal(b["input_ids"], [[5, 6, 7, 0], [8, 9, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(b["attention_mask"], [[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(
        b["labels"], [[-100, 6, 7, -100], [-100, 9, -100, -100], [-100] * 4]
    )
    assert collate(exs, pad_id=PAD, buckets=32)["input_ids"].shape == (2, 32)
    with pytest.raises(ValueError, match="largest bucket"):
        collate(exs, pad_id=PAD, buckets=(2,))


def test_batches_cover_epoch_with_few_shapes():
    exs = _examples(11)
    b = Batcher(exs, 4, pad_id=PAD, seed=1)
    assert len(b) == 3
    batches = list(b.epoch())
    assert b.position == BatchPosition(1, 0)
    assert {x["input_ids"].shape[0] for x in batches} == {4}
    assert {x["input_ids"].shape[1] for x in batches} <= set(bucket_lengths(b.max_length))
    # every example appears once, with its tokens and labels intact
    seen = []
    for i, x in enumerate(batches):
        for row, j in enumerate(b.indices(0, i)):
            ids, labels = exs[j]
            n = len(ids)
            assert list(x["input_ids"][row, :n]) == ids and list(x["labels"][row, :n]) == labels
            assert (
                x["attention_mask"][row].sum() == n and (x["labels"][row, n:] == IGNORE_INDEX).all()
            )
            seen.append(j)
        for row in range(len(b.indices(0, i)), 4):  # fill rows of the last batch
            assert x["attention_mask"][row].sum() == 0 and (x["labels"][row] == IGNORE_INDEX).all()
    assert sorted(seen) == list(range(11))


def test_shuffle_deterministic_by_seed_and_epoch():
    exs = _examples(11)
    a, b, c = (Batcher(exs, 4, pad_id=PAD, seed=s) for s in (1, 1, 2))
    assert np.array_equal(a.order(0), b.order(0)) and not np.array_equal(a.order(0), c.order(0))
    assert not np.array_equal(a.order(0), a.order(1))
    assert all(_eq(x, y) for x, y in zip(a.epoch(), b.epoch()))
    assert np.array_equal(Batcher(exs, 4, pad_id=PAD, shuffle=False).order(3), np.arange(11))


def test_resume_gives_the_same_batches():
    exs = _examples(11)
    ref = Batcher(exs, 4, pad_id=PAD, seed=7)
    expected = [next(ref) for _ in range(8)]  # crosses two epoch boundaries
    run = Batcher(exs, 4, pad_id=PAD, seed=7)
    for _ in range(4):
        next(run)
    saved = run.state()
    assert saved == {"epoch": 1, "index": 1}
    resumed = Batcher(exs, 4, pad_id=PAD, seed=7, position=saved)
    assert all(_eq(next(resumed), e) for e in expected[4:])
    run.restore(BatchPosition(0, 2))
    assert _eq(next(run), expected[2])
    with pytest.raises(ValueError, match="invalid"):
        run.restore({"epoch": 0, "index": 9})


def test_drop_last():
    exs = _examples(11)
    b = Batcher(exs, 4, pad_id=PAD, drop_last=True, shuffle=False)
    assert len(b) == 2
    assert all(x["attention_mask"].sum(1).min() > 0 for x in b.epoch())
    with pytest.raises(ValueError, match="drop_last"):
        Batcher(exs, 20, pad_id=PAD, drop_last=True)


def test_make_batches_keeps_order_and_validates():
    exs = _examples(5)
    bs = make_batches(exs, 2, pad_id=PAD, buckets=16)
    assert len(bs) == 3 and all(x["input_ids"].shape[1] % 16 == 0 for x in bs)
    assert list(bs[0]["input_ids"][1, : len(exs[1][0])]) == exs[1][0]
    with pytest.raises(ValueError, match="max_length"):
        make_batches(exs, 2, pad_id=PAD, max_length=2)
    with pytest.raises(ValueError, match="equal length"):
        make_batches([([1, 2], [1])], 1, pad_id=PAD)


def test_pad_prompts_left_pads():
    ids, mask = pad_prompts([[5, 6, 7], [8]], PAD, 4, batch_size=3)
    np.testing.assert_array_equal(ids, [[0, 5, 6, 7], [0, 0, 0, 8], [0, 0, 0, 0]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]])
    assert pad_prompts([[1] * 5], PAD, (4, 8, 16))[0].shape == (1, 8)
    assert pad_prompts([[1] * 5], PAD)[0].shape == (1, 5)
    with pytest.raises(ValueError, match="empty prompt"):
        pad_prompts([[]], PAD)
