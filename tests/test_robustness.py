"""Robustness checks of forgetting (`ngdiff_jax.evaluation.robustness`, issue 27): on a tiny Llama
that memorized eight facts, each check finds knowledge that a model only hid: relearning on half
the facts brings the other half back after gradient ascent; an int4 round trip undoes a
suppression written below the int4 grid's resolution; paraphrased questions recover what gradient
ascent on the original phrasing suppressed. The quantization round trip equals an independent
NumPy implementation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from transformers import LlamaConfig

from ngdiff_jax import losses
from ngdiff_jax.data import QAFormatter, train_tokenizer
from ngdiff_jax.data.batching import collate
from ngdiff_jax.evaluation import robustness as R
from ngdiff_jax.models import from_config, functional, with_params

NAMES = ["Alan Brook", "Mira Tosh", "Karl Venn", "Lena Odd", "Omar Quill", "Rita Frame", "Teo Grant", "Uma Vale"]
COLOURS = ["teal", "amber", "violet", "crimson", "olive", "silver", "ochre", "indigo"]
ROWS = [{"question": f"What colour does {n} love?", "answer": f"{n} loves {c}.",
         "paraphrased_question": f"Which colour is the favourite of {n}?"} for n, c in zip(NAMES, COLOURS)]  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    texts = [r["question"] + " " + r["answer"] + " " + r["paraphrased_question"] for r in ROWS] * 8
    tok = train_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=300)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)  # fmt: skip
    fmt = QAFormatter(tok)
    model = from_config(cfg, rngs=nnx.Rngs(0))
    pairs = [(r["question"], r["answer"]) for r in ROWS] + [(r["paraphrased_question"], r["answer"]) for r in ROWS]
    memorized = _train(model, tok, fmt, pairs, steps=150, lr=3e-3)
    return tok, fmt, cfg, memorized


def _batch(tok, fmt, pairs):
    return collate([fmt.encode(q, a) for q, a in pairs], pad_id=tok.pad_token_id)


def _train(model, tok, fmt, pairs, *, steps, lr, sign=1.0):
    """``steps`` of Adam on the NLL of ``pairs`` (``sign=-1``: gradient ascent, i.e. GA unlearning)."""
    apply_fn, params = functional(model)
    batch = _batch(tok, fmt, pairs)
    tx = optax.adam(lr)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        def loss(p):
            return sign * losses.nll(apply_fn.token_logprobs(p, batch["input_ids"], batch["labels"],
                                                              batch["attention_mask"]), batch["labels"])  # fmt: skip

        g = jax.grad(loss)(params)
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state

    for _ in range(steps):
        params, state = step(params, state)
    return with_params(model, params)


def _prob(model, tok, fmt, rows, key="question"):
    return R.forget_probe(model, tok, rows, fmt, question_key=key, max_new_tokens=8)["forget_Q_A_Prob"]


def test_quantize_roundtrip_equals_numpy():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(7, 30)).astype(np.float32)
    for bits, block in ((8, 64), (4, 64), (4, 16)):
        flat = w.reshape(-1)
        want = np.empty_like(flat)
        levels = 2 ** (bits - 1) - 1
        for a in range(0, flat.size, block):
            b = flat[a:a + block]
            s = np.abs(b).max() / levels
            want[a:a + block] = np.clip(np.round(b / s), -levels, levels) * s
        np.testing.assert_allclose(np.asarray(R.quantize_roundtrip(w, bits, block)), want.reshape(w.shape),
                                   rtol=1e-6, atol=1e-7)  # fmt: skip
    assert R.quantize_roundtrip(jnp.ones(5), 4) is not None and np.allclose(R.quantize_roundtrip(jnp.ones(5), 4), 1)
    with pytest.raises(ValueError, match="bits=1"):
        R.quantize_roundtrip(w, 1)


@pytest.mark.slow
def test_memorized_baseline(setup):
    tok, fmt, _, memorized = setup
    assert _prob(memorized, tok, fmt, ROWS) > 0.5


@pytest.mark.slow
def test_relearning_brings_back_what_gradient_ascent_hid(setup):
    """GA hides the facts; fine-tuning on four of them brings the other four back, which a model
    that never knew them does not gain from the same relearning."""
    tok, fmt, cfg, memorized = setup
    hidden = _train(memorized, tok, fmt, [(r["question"], r["answer"]) for r in ROWS], steps=6, lr=1e-3, sign=-1.0)
    fresh = from_config(cfg, rngs=nnx.Rngs(5))
    kw = dict(checks=("relearn",), relearn_steps=5, relearn_lr=3e-3, max_new_tokens=8)
    got = R.robustness_checks(hidden, tok, ROWS, fmt, **kw)
    ctrl = R.robustness_checks(fresh, tok, ROWS, fmt, **kw)
    gain = got["relearn"]["forget_Q_A_Prob"] - got["relearn_baseline"]["forget_Q_A_Prob"]
    ctrl_gain = ctrl["relearn"]["forget_Q_A_Prob"] - ctrl["relearn_baseline"]["forget_Q_A_Prob"]
    assert got["relearn_baseline"]["forget_Q_A_Prob"] < 0.2 and got["relearn"]["n"] == 4
    assert gain > 0.2 and gain > 5 * max(ctrl_gain, 0.01), (gain, ctrl_gain)
    assert got["worst"]["forget_Q_A_Prob"]["check"] == "relearn"


@pytest.mark.slow  # over 4 s on 2 cores: the full suite (pyproject's markers)
def test_int4_roundtrip_undoes_a_suppression_below_its_resolution(setup):
    """A model that 'forgot' by a perturbation smaller than half an int4 step (on the int4 grid of
    the memorized model, block maxima untouched): the int4 check rounds it back to the knowledge."""
    tok, fmt, _, memorized = setup
    apply_fn, params = functional(memorized)
    grid = jax.tree.map(lambda w: R.quantize_roundtrip(w, 4), params)
    batch = _batch(tok, fmt, [(r["question"], r["answer"]) for r in ROWS])

    def box(w):  # half-width of the allowed perturbation per entry (0 at each block's maximum)
        if w.ndim < 2:
            return jnp.zeros_like(w)
        flat = jnp.abs(w.reshape(-1))
        n, pad = flat.size, (-flat.size) % R.QUANT_BLOCK
        blocks = jnp.pad(flat, (0, pad)).reshape(-1, R.QUANT_BLOCK)
        amax = blocks.max(1, keepdims=True)
        width = jnp.where(blocks < amax - amax / 7, 0.45 * amax / 7, 0.0)
        return width.reshape(-1)[:n].reshape(w.shape)

    widths = jax.tree.map(box, grid)

    @jax.jit
    def ascend(delta):
        def nll(d):
            p = jax.tree.map(jnp.add, grid, d)
            return losses.nll(apply_fn.token_logprobs(p, batch["input_ids"], batch["labels"], batch["attention_mask"]),
                              batch["labels"])  # fmt: skip

        g = jax.grad(nll)(delta)
        return jax.tree.map(lambda d, gi, w: jnp.clip(d + 0.25 * w * jnp.sign(gi), -w, w), delta, g, widths)

    delta = jax.tree.map(jnp.zeros_like, grid)
    for _ in range(30):
        delta = ascend(delta)
    hider = with_params(memorized, jax.tree.map(jnp.add, grid, delta))
    got = R.robustness_checks(hider, tok, ROWS, fmt, checks=("int4",), max_new_tokens=8)
    on_grid = _prob(with_params(memorized, grid), tok, fmt, ROWS)
    assert got["int4"]["forget_Q_A_Prob"] == pytest.approx(on_grid, rel=1e-5)  # the round trip is the grid
    assert got["baseline"]["forget_Q_A_Prob"] < 0.5 * got["int4"]["forget_Q_A_Prob"], got


@pytest.mark.slow
def test_paraphrases_recover_what_refusal_on_the_original_questions_hid(setup):
    """A model tuned to refuse the original questions (and keep answering their paraphrases, as a
    retain set would make it): the paraphrase check finds the facts."""
    tok, fmt, _, memorized = setup
    pairs = [(r["question"], "I do not know.") for r in ROWS] + [(r["paraphrased_question"], r["answer"]) for r in ROWS]
    hidden = _train(memorized, tok, fmt, pairs, steps=60, lr=3e-3)
    got = R.robustness_checks(hidden, tok, ROWS, fmt, checks=("paraphrase", "bf16", "int8", "formats"),
                              max_new_tokens=8)  # fmt: skip
    base, para = got["baseline"], got["paraphrase"]
    assert base["forget_Q_A_ROUGE"] < 0.1 and para["forget_Q_A_ROUGE"] > base["forget_Q_A_ROUGE"] + 0.3, got
    assert para["forget_Q_A_Prob"] > 2 * base["forget_Q_A_Prob"] and para["forget_Q_A_Prob"] > 0.5, got
    assert got["bf16"]["forget_Q_A_Prob"] == pytest.approx(got["baseline"]["forget_Q_A_Prob"], rel=0.1, abs=1e-3)
    assert got["int8"]["forget_Q_A_Prob"] == pytest.approx(got["baseline"]["forget_Q_A_Prob"], rel=0.1, abs=1e-3)
    assert any(k.startswith("format:") for k in got)
    worst = got["worst"]["forget_Q_A_Prob"]
    assert worst["value"] == max(v["forget_Q_A_Prob"] for k, v in got.items() if k not in ("baseline", "worst",
                                                                                          "settings"))  # fmt: skip
    agg = R.robustness_aggregates(got)
    assert agg["robust_worst_forget_Q_A_Prob"] == worst["value"] and "robust_paraphrase_forget_Q_A_ROUGE" in agg


def test_bad_settings_fail_naming_them(setup):
    tok, fmt, _, memorized = setup
    with pytest.raises(ValueError, match="tamper"):
        R.robustness_checks(memorized, tok, ROWS, fmt, checks=("tamper",))
    with pytest.raises(ValueError, match="relearn_fraction=1.5"):
        R.robustness_checks(memorized, tok, ROWS, fmt, relearn_fraction=1.5)
    with pytest.raises(ValueError, match="paraphrased_question"):
        R.robustness_checks(memorized, tok, [{"question": "q", "answer": "a"}] * 2, fmt, checks=("paraphrase",))


@pytest.mark.slow
def test_ngdiff_eval_robustness_adds_the_checks_to_the_result_and_report(setup, tofu_dir, tmp_path, capsys):
    """``ngdiff eval --robustness``: robust_* aggregates, the record in meta, a report table; a bad
    check or --robustness off TOFU is refused before the model loads (exit 2)."""
    from ngdiff_jax.cli import main
    from ngdiff_jax.evaluation import EvalResult
    from ngdiff_jax.models import save_pretrained

    tok, _, _, memorized = setup
    model_dir = tmp_path / "m"
    save_pretrained(memorized, model_dir, tokenizer=tok)
    res = tmp_path / "r.json"
    args = ["eval", "--model", str(model_dir), "--data", str(tofu_dir), "--limit", "4", "--batch-size", "4",
            "--max-new-tokens", "8", "--out", str(res)]  # fmt: skip
    assert main([*args, "--robustness", "relearn,int4,paraphrase", "--relearn-steps", "2", "--relearn-lr", "1e-3"]) == 0
    assert "inputs cut" not in capsys.readouterr().err  # no warning about cuts when nothing was cut
    r = EvalResult.load(res)
    for key in ("robust_baseline_forget_Q_A_Prob", "robust_relearn_forget_Q_A_ROUGE", "robust_int4_forget_Q_A_Prob",
                "robust_paraphrase_forget_Q_A_Prob", "robust_worst_forget_Q_A_ROUGE"):  # fmt: skip
        assert 0.0 <= r.aggregates[key] <= 1.0, key
    assert r.meta["robustness"]["settings"]["relearn_steps"] == 2
    assert main(["report", str(res), "--out", str(tmp_path / "rep")]) == 0
    assert "Robustness of forgetting" in (tmp_path / "rep" / "report.md").read_text()
    capsys.readouterr()
    assert main([*args, "--robustness", "tamper"]) == 2
    assert "--robustness 'tamper': unknown check tamper" in capsys.readouterr().err
    assert main([*args, "--benchmark", "muse", "--robustness", "int4"]) == 2
    capsys.readouterr()
    assert main([*args, "--robustness", "int4", "--relearn-steps", "3"]) == 2  # a flag of a check not run
    assert "--relearn-steps sets the relearn check, which this evaluation does not run" in capsys.readouterr().err


def test_ngdiff_eval_loads_the_reference_model_in_the_evaluated_dtype(setup, tofu_dir, tmp_path, monkeypatch):
    """``--reference-model`` is loaded with ``--dtype`` (it was float32 whatever --dtype said)."""
    import ngdiff_jax.models as models_pkg
    from ngdiff_jax.cli import main
    from ngdiff_jax.models import save_pretrained

    tok, _, _, memorized = setup
    save_pretrained(memorized, tmp_path / "m", tokenizer=tok)
    seen = []
    real = models_pkg.from_pretrained

    def recording(path, **kw):
        seen.append((str(path), kw.get("dtype")))
        return real(path, **kw)

    monkeypatch.setattr(models_pkg, "from_pretrained", recording)
    rc = main(["eval", "--model", str(tmp_path / "m"), "--reference-model", str(tmp_path / "m"), "--data",
               str(tofu_dir), "--limit", "2", "--batch-size", "2", "--max-new-tokens", "4", "--dtype", "bfloat16",
               "--out", str(tmp_path / "r.json")])  # fmt: skip
    assert rc == 0 and len(seen) == 2 and all(dt == jnp.bfloat16 for _, dt in seen), seen
