"""TOFU loading (real files) and the synthetic benchmark's layout, schema and content."""

import json

import pytest

from ngdiff_jax.data import TOFU_SPLITS, load_tofu, read_records, synthetic


def _schema(rows):
    """Field name -> type name (list types with their length) of the first row, plus row keys order."""
    return {
        k: (type(v).__name__, len(v) if isinstance(v, list) else None) for k, v in rows[0].items()
    }


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    return synthetic.write_benchmark(tmp_path_factory.mktemp("synth"), n_authors=20, seed=0)


def test_load_tofu_real_splits(tofu_dir):
    assert len(load_tofu("forget10", tofu_dir)) == 400
    assert len(load_tofu("retain_perturbed", tofu_dir)) == 400
    holdout = load_tofu("holdout01", tofu_dir)
    assert set(holdout[0]) == {"question", "answer"}


def test_load_tofu_missing_split_names_file_and_lists_splits(tofu_dir):
    with pytest.raises(FileNotFoundError) as e:
        load_tofu("forget20", tofu_dir)
    msg = str(e.value)
    assert "forget20.json" in msg and "forget10" in msg and "world_facts_perturbed" in msg


def test_load_tofu_bad_source():
    with pytest.raises(FileNotFoundError, match="neither an existing directory"):
        load_tofu("full", "./no/such/dir")


def test_synthetic_writes_every_tofu_split(synth_dir, tofu_dir):
    real = sorted(p.stem for p in tofu_dir.glob("*.json"))
    assert sorted(p.stem for p in synth_dir.glob("*.json")) == real == sorted(TOFU_SPLITS)


def test_synthetic_schema_equals_real(synth_dir, tofu_dir):
    for split in TOFU_SPLITS:
        real, synth = load_tofu(split, tofu_dir), load_tofu(split, synth_dir)
        assert list(synth[0]) == list(real[0]), split  # same fields, same order
        real_schema = _schema(real)
        for row in synth:
            assert {k: (type(v).__name__, len(v) if isinstance(v, list) else None)
                    for k, v in row.items()} == real_schema, split  # fmt: skip


def test_synthetic_splits_are_cut_like_tofu(synth_dir):
    full = load_tofu("full", synth_dir)
    assert len(full) == 20 * 10
    for pct, retain, n_authors in (
        ("01", "retain99", 1),
        ("05", "retain95", 1),
        ("10", "retain90", 2),
    ):
        forget = load_tofu(f"forget{pct}", synth_dir)
        assert forget == full[-n_authors * 10 :]
        assert load_tofu(retain, synth_dir) == full[: -n_authors * 10]
        pert = load_tofu(f"forget{pct}_perturbed", synth_dir)
        assert [{"question": r["question"], "answer": r["answer"]} for r in pert] == forget
        assert len(load_tofu(f"holdout{pct}", synth_dir)) == len(forget)
    retain_pert = load_tofu("retain_perturbed", synth_dir)
    assert [{"question": r["question"], "answer": r["answer"]} for r in retain_pert] == full[:20]
    holdout = load_tofu("holdout10", synth_dir)
    assert load_tofu("holdout01", synth_dir) == holdout[:10]
    assert not {r["question"] for r in holdout} & {r["question"] for r in full}
    for split in ("world_facts", "real_authors"):
        rows = load_tofu(split, synth_dir)
        assert all(r["answer"] in [r[f"option{i}"] for i in range(1, 5)] for r in rows)


def test_synthetic_answers_short_and_perturbations_wrong(synth_dir):
    for row in load_tofu("forget10_perturbed", synth_dir) + load_tofu(
        "retain_perturbed", synth_dir
    ):
        for text in [row["answer"], row["paraphrased_answer"], *row["perturbed_answer"]]:
            assert 6 <= len(text.split()) <= 22, text
        assert len(set(row["perturbed_answer"])) == 5
        assert row["paraphrased_answer"] not in row["perturbed_answer"]
        assert row["paraphrased_question"] != row["question"]


def test_synthetic_is_seeded(tmp_path):
    a = synthetic.generate_benchmark(n_authors=10, questions_per_author=4, seed=3)
    b = synthetic.generate_benchmark(n_authors=10, questions_per_author=4, seed=3)
    c = synthetic.generate_benchmark(n_authors=10, questions_per_author=4, seed=4)
    assert a == b and a["full"] != c["full"]
    synthetic.write_benchmark(tmp_path, n_authors=10, questions_per_author=4, seed=3)
    assert read_records(tmp_path / "forget10_perturbed.json") == a["forget10_perturbed"]
    # JSON-lines, one object per line, like TOFU
    first = (tmp_path / "full.json").read_text().splitlines()[0]
    assert json.loads(first) == a["full"][0]


def test_synthetic_smallest_benchmark():
    b = synthetic.generate_benchmark(n_authors=2, questions_per_author=12)
    assert len(b["full"]) == 24 and b["forget10"] == b["full"][12:] == b["forget01"]
    assert b["retain_perturbed"][0]["question"] == b["full"][0]["question"]


def test_synthetic_rejects_bad_sizes():
    with pytest.raises(ValueError, match="questions_per_author"):
        synthetic.generate_benchmark(questions_per_author=synthetic.MAX_QUESTIONS_PER_AUTHOR + 1)
    with pytest.raises(ValueError, match="n_holdout_authors"):
        synthetic.generate_benchmark(n_authors=40, n_holdout_authors=1)
    with pytest.raises(ValueError, match="n_authors"):
        synthetic.generate_benchmark(n_authors=1)


def test_prepare_gives_tofu_dir_and_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    tofu, tok = synthetic.prepare(tmp_path, n_authors=6, questions_per_author=3, vocab_size=512)
    assert load_tofu("forget10", tofu)
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    text = load_tofu("full", tofu)[0]["answer"]
    assert loaded.encode(text) == tok.encode(text)


def test_hub_ids_go_through_datasets(monkeypatch):
    import datasets

    from ngdiff_jax.data import MUSE_SUBSETS, load_muse

    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        if path == "locuslab/TOFU":
            if name not in TOFU_SPLITS:
                raise ValueError(f"BuilderConfig {name} not found.")
            return [{"question": "q", "answer": "a"}]
        if (
            split not in MUSE_SUBSETS[name]
        ):  # the hub says retain_qa where local copies say retain2_qa
            raise ValueError(f"Unknown split {split}.")
        return [{"text": "t"}] if name == "privleak" else [{"question": "q", "answer": split}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_tofu("forget10", "locuslab/TOFU") == [{"question": "q", "answer": "a"}]
    assert calls[-1] == ("locuslab/TOFU", "forget10", "train")
    with pytest.raises(KeyError, match="forget20.*Known TOFU splits"):
        load_tofu("forget20", "locuslab/TOFU")
    assert load_muse("news", "privleak", "forget") == ["t"]
    assert calls[-1] == ("muse-bench/MUSE-News", "privleak", "forget")
    rows = load_muse("muse-bench/MUSE-Books", "knowmem", "retain2_qa")
    assert rows == [{"question": "q", "answer": "retain_qa"}]
    assert calls[-1] == ("muse-bench/MUSE-Books", "knowmem", "retain_qa")
    with pytest.raises(KeyError, match="verbmem/holdout"):
        load_muse("news", "verbmem", "holdout")
