"""The added methods (IdkNLL, IdkDPO, WGA, SatImp, CE-U, UNDIAL, RMU, GDR/KLR variants):
the jitted-step wiring with references, alternate answers and hidden states, composition with
every combiner, and a two-step `ngdiff unlearn` run of each on a tiny model."""

import jax
import numpy as np
import pytest
from flax import nnx

from ngdiff_jax import losses, models
from ngdiff_jax.training import OptimConfig, load_method, make_optimizer, make_unlearn_step
from ngdiff_jax.training.data_assembly import PairedBatcher, alternate_rows, make_batcher
from ngdiff_jax.training.methods import load_idk_responses

NEW = ("idk_nll", "idk_dpo", "wga", "satimp", "ceu", "undial", "rmu", "ga_gdr", "ga_klr", "npo_gdr", "npo_klr")
V, T, B = 96, 96, 2


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A synthetic TOFU folder and a tiny 2-block Llama saved with its tokenizer."""
    from ngdiff_jax.data import synthetic, train_tokenizer

    d = tmp_path_factory.mktemp("methods_run")
    data = synthetic.write_benchmark(d / "tofu", n_authors=4, questions_per_author=4, seed=0)
    rows = [r for s in ("full",) for r in __import__("ngdiff_jax.data", fromlist=["load_tofu"]).load_tofu(s, data)]
    tok = train_tokenizer([r["question"] + " " + r["answer"] for r in rows] + load_idk_responses(), d / "tok",
                          vocab_size=300)  # fmt: skip
    hf = {"model_type": "llama", "vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
          "max_position_embeddings": 128}  # fmt: skip
    model = models.from_config(hf, rngs=nnx.Rngs(0))
    models.save_pretrained(model, d / "model", tokenizer=tok)
    return d, data


@pytest.fixture(scope="module")
def tiny(tiny_run):
    """The saved tiny model of `tiny_run`, functional; batches below have the runs' shapes
    (2 x 96 tokens), so eager op compiles are shared between the tests."""
    model = models.from_pretrained(tiny_run[0] / "model")
    assert model.config.vocab_size >= V
    return models.functional(model)


def _batch(seed, t=T):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, V, (B, t)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[-1, t // 2 :] = 0
    labels = np.where(mask == 1, ids, -100).astype(np.int32)
    labels[:, :40] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _forget(seed):
    fb = _batch(seed)
    alt = _batch(seed + 100)
    fb.update({f"alt_{k}": v for k, v in alt.items()})
    return fb


def _method(name, **kw):
    m = load_method(name, **kw)
    return m if not m.needs_hidden else load_method(name, forget={"layer": 0}, retain={"layer": 0}, **kw)


@pytest.mark.slow
def test_reference_methods_refuse_to_run_without_it(tiny):
    apply_fn, params = tiny
    needing = [n for n in NEW if _method(n).needs_reference]
    assert set(needing) == {"idk_dpo", "undial", "rmu", "ga_klr", "npo_gdr", "npo_klr"}
    for name in needing:
        method = _method(name)
        tx = make_optimizer(method, OptimConfig(lr=1e-3), total_steps=10, steps_per_epoch=2.0)
        with pytest.raises(ValueError, match="needs the reference model"):  # raised while tracing: nothing compiles
            jax.jit(make_unlearn_step(apply_fn, method, tx))(params, None, _forget(0), _batch(1), jax.random.PRNGKey(0))


@pytest.mark.slow
def test_losses_at_the_reference_match_hand_values(tiny):
    """At params == reference: DPO = 2/beta log 2, embed_diff = 0, KLR = 0; RMU = its MSE to the control vector."""
    apply_fn, params = tiny
    fb, rb = _forget(2), _batch(3)
    # jitted (one compile per method costs less than dispatching the step op by op under disable_jit)
    for name, check in [
        ("idk_dpo", lambda m, meth: float(m["forget_loss"]) == pytest.approx(2 / meth.forget.beta * np.log(2),
                                                                             rel=1e-5)),
        ("ga_klr", lambda m, meth: abs(float(m["retain_loss"])) < 1e-6),
        ("rmu", lambda m, meth: abs(float(m["retain_loss"])) < 1e-10),
    ]:
        meth = _method(name)
        tx = make_optimizer(meth, OptimConfig(lr=1e-3), total_steps=3, steps_per_epoch=2.0)
        _, _, m = jax.jit(make_unlearn_step(apply_fn, meth, tx))(params, tx.init(params), fb, rb,
                                                                 jax.random.PRNGKey(0), params)  # fmt: skip
        assert check(m, meth), (name, m)
        if name == "rmu":  # the forget loss: the MSE of layer 0's hidden states to the control vector
            h = apply_fn.hidden_state(params, fb["input_ids"], fb["attention_mask"], layer=0)
            u = losses.rmu_control_vector(jax.random.PRNGKey(meth.forget.seed), h.shape[-1],
                                          meth.forget.steering_coeff)  # fmt: skip
            lab = np.asarray(fb["labels"])
            sums = [np.sum(np.square(np.asarray(h[b]) - np.asarray(u)).mean(-1)[lab[b] != -100]) for b in range(B)]
            counts = [np.sum(lab[b] != -100) for b in range(B)]  # 56 and 8: open-unlearning's broadcast form
            assert float(m["forget_loss"]) == pytest.approx(np.mean(sums) * np.mean(1.0 / np.array(counts)), rel=1e-5)


def test_missing_alternate_answers_and_hidden_state_are_errors(tiny):
    apply_fn, params = tiny
    meth = _method("idk_nll")
    tx = make_optimizer(meth, OptimConfig(lr=1e-3), total_steps=3, steps_per_epoch=2.0)
    with jax.disable_jit(), pytest.raises(ValueError, match="alt_input_ids"):
        make_unlearn_step(apply_fn, meth, tx)(params, tx.init(params), _batch(0), _batch(1), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="hidden_state"):
        make_unlearn_step(lambda p, i, m: None, _method("rmu"), tx)
    with jax.disable_jit(), pytest.raises(ValueError, match="out of range"):
        meth = load_method("rmu")  # layer 7 of a 2-block model
        tx = make_optimizer(meth, OptimConfig(lr=1e-3), total_steps=3, steps_per_epoch=2.0)
        make_unlearn_step(apply_fn, meth, tx)(params, tx.init(params), _batch(0), _batch(1), jax.random.PRNGKey(0),
                                              params)  # fmt: skip


class _Tok:
    pad_token_id = 0


def test_paired_batcher_keeps_rows_aligned_and_resumes():
    from ngdiff_jax.training.config_schema import DataConfig

    rows = [{"question": f"q{i}", "answer": "a" * (i % 3 + 1)} for i in range(10)]
    refusals = ["I don't know.", "No idea."]
    alt = alternate_rows(rows, refusals, seed=3)
    assert [r["question"] for r in alt] == [r["question"] for r in rows]
    assert alt == alternate_rows(rows, refusals, seed=3) and {r["answer"] for r in alt} <= set(refusals)
    # examples whose first token identifies the row: main and alternate batches must agree row by row
    main_ex = [([i + 3, 50, 51], [-100, 50, 51]) for i in range(10)]
    alt_ex = [([i + 3, 60], [-100, 60]) for i in range(10)]
    data = DataConfig(batch_size=4, max_length=8)
    pb = PairedBatcher(make_batcher(main_ex, _Tok(), data, seed=5), make_batcher(alt_ex, _Tok(), data, seed=5))
    seen = []
    for _ in range(5):
        b = next(pb)
        real = b["attention_mask"].sum(-1) > 0
        np.testing.assert_array_equal(b["input_ids"][real, 0], b["alt_input_ids"][real, 0])
        seen.append(b)
    pb2 = PairedBatcher(make_batcher(main_ex, _Tok(), data, seed=5), make_batcher(alt_ex, _Tok(), data, seed=5))
    pb2.restore({"epoch": 1, "index": 1})  # = after 4 batches (3 per epoch)
    b = next(pb2)
    for k in seen[4]:
        np.testing.assert_array_equal(b[k], seen[4][k])
    with pytest.raises(ValueError, match="same seed"):
        PairedBatcher(make_batcher(main_ex, _Tok(), data, seed=5), make_batcher(alt_ex, _Tok(), data, seed=6))


def test_idk_responses_file(tmp_path):
    r = load_idk_responses()
    assert len(r) >= 20 and all(isinstance(x, str) and x for x in r)
    bad = tmp_path / "idk.jsonl"
    bad.write_text('"I don\'t know."\nnot json\n')
    with pytest.raises(ValueError, match=r"idk.jsonl:2: not JSON"):
        load_idk_responses(bad)
    with pytest.raises(FileNotFoundError, match="method.forget.idk_path"):
        load_idk_responses(tmp_path / "missing.jsonl")


GEN = {"combiner": "ngdiff", "rate": {"type": "gen", "probe": "retain"}, "retain": "nll"}  # GeN sets its own rate
#: every new method as configured, then any forget objective under every combiner: ngdiff with GeN, mgda, pcgrad
RUNS = [(n, {}) for n in NEW] + [("idk_dpo", GEN), ("rmu", GEN), ("undial", {"combiner": "mgda", "retain": "nll"}),
                                 ("satimp", {"combiner": "pcgrad"})]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name,extra", RUNS, ids=[f"{n}-{e.get('combiner', 'own')}" for n, e in RUNS])
def test_every_new_method_steps(tiny, name, extra):
    """Two jitted steps of each method (the step-level check; `test_one_method_runs_in_ngdiff_unlearn`
    is the pipeline): no step skipped, finite losses, both gradients where the method has both, a rate,
    and the parameters move."""
    apply_fn, params = tiny
    # rmu: its retain gradient is 0 while the weights equal the reference's, i.e. after a warm-up step at rate 0
    if name == "rmu":
        own = {"retain": {"type": "embed_diff", "layer": -1}, "rate": {"type": "linear", "warmup_epochs": 0.0}}
        method = load_method(name, **{**own, **extra, "forget": {"layer": -1}})
    else:
        method = _method(name, **extra)
    tx = make_optimizer(method, OptimConfig(lr=1e-3), total_steps=2, steps_per_epoch=2.0)
    step = jax.jit(make_unlearn_step(apply_fn, method, tx))
    ref = params if method.needs_reference else None
    p, state = params, tx.init(params)
    for i in range(2):
        p, state, m = step(p, state, _forget(2 * i), _batch(2 * i + 1), jax.random.PRNGKey(i), ref)
    last = {k: float(v) for k, v in m.items()}
    assert last["skipped"] == 0, (name, last)
    assert np.isfinite(last["forget_loss"]) and np.isfinite(last["retain_loss"]), (name, last)
    assert last["forget_grad_norm"] > 0 and last["learning_rate"] > 0, (name, last)
    assert (last["retain_grad_norm"] > 0) == (method.retain.kind != "none"), (name, last)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(params))), name


@pytest.mark.slow
def test_one_method_runs_in_ngdiff_unlearn(tiny_run):
    """The pipeline, once: IdkDPO under NGDiff + GeN needs the alternate (refusal) answers, the reference
    model and GeN's probes, and exports the model."""
    from ngdiff_jax.config_loader import load_config
    from ngdiff_jax.training import UnlearnConfig, run_unlearn

    d, data = tiny_run
    cfg = load_config(UnlearnConfig, None, [
        f"model_path={d / 'model'}", "method=idk_dpo", f"data.source={data}", "data.forget_split=forget10",
        "data.retain_split=retain90", "data.batch_size=2", "data.max_length=96", "data.buckets=[96]",
        "run.steps=2", "run.checkpoint_every=0", "run.progress=false", "optim.lr=1e-3",
        f"run.output_dir={d / 'idk_dpo_gen'}", *(f"method.{k}={v}" for k, v in GEN.items())])  # fmt: skip
    _, summary = run_unlearn(cfg)
    last = summary["last_metrics"]
    assert summary["steps"] == 2 and last["skipped"] == 0, summary
    assert np.isfinite(last["forget_loss"]) and np.isfinite(last["retain_loss"]), last
    assert last["forget_grad_norm"] > 0 and last["retain_grad_norm"] > 0 and last["learning_rate"] > 0, last
    assert (d / "idk_dpo_gen" / "model" / "config.json").exists()


@pytest.mark.slow
def test_unlearn_with_model_selection_exports_best_and_last(tiny_run):
    from ngdiff_jax.config_loader import load_config
    from ngdiff_jax.training import UnlearnConfig, run_unlearn

    d, data = tiny_run
    common = [f"model_path={d / 'model'}", f"data.source={data}", "data.forget_split=forget10",
              "data.retain_split=retain90", "data.batch_size=2", "data.max_length=96", "data.buckets=[96]",
              "run.checkpoint_every=0", "run.progress=false", "optim.lr=1e-2", "method=ga",
              "method.rate.warmup_epochs=0"]  # fmt: skip
    # GA lowers the forget probability every step: maximizing retain_prob subject to forget_prob below
    # its start picks the first step past the start, and patience 1 stops right after it
    cfg = load_config(UnlearnConfig, None, [
        *common, f"run.output_dir={d / 'sel'}", "run.steps=6", "selection.every=1", "selection.maximize=retain_prob",
        "selection.constraints=['forget_prob<1.0']", "selection.patience=1"])  # fmt: skip
    _, summary = run_unlearn(cfg)
    s = summary["selection"]
    evals = {e["step"]: e for e in summary["evals"]}
    assert s["best_step"] == max((st for st, e in evals.items() if e["forget_prob"] < 1.0),
                                 key=lambda st: (evals[st]["retain_prob"], -st))  # fmt: skip
    assert s["stopped_early_at"] == s["best_step"] + 1 and summary["steps"] == s["stopped_early_at"]
    assert (d / "sel" / "best_model" / "config.json").is_file() and (d / "sel" / "model" / "config.json").is_file()
    with pytest.raises(ValueError, match="selection.every"):
        load_config(UnlearnConfig, None, [*common, "run.output_dir=x", "run.eval_every=2", "selection.every=3",
                                          "selection.maximize=retain_prob"])  # fmt: skip


@pytest.mark.slow  # over 4 s on 2 cores: the full suite (pyproject's markers)
def test_model_selection_on_a_mesh(tiny_run):
    """The sharded path (an fsdp mesh over the process's 8 simulated devices): the hook evaluates the
    sharded params and the best model is exported gathered."""
    from ngdiff_jax.config_loader import load_config
    from ngdiff_jax.training import UnlearnConfig, run_unlearn

    d, data = tiny_run
    cfg = load_config(UnlearnConfig, None, [
        f"model_path={d / 'model'}", f"data.source={data}", "data.forget_split=forget10", "data.retain_split=retain90",
        "data.batch_size=8", "data.max_length=96", "data.buckets=[96]", "run.checkpoint_every=0", "run.progress=false",
        "optim.lr=1e-2", "method=ga", f"run.output_dir={d / 'sel_mesh'}", "run.steps=3", "mesh.preset=fsdp",
        "selection.every=1", "selection.minimize=forget_prob"])  # fmt: skip
    _, summary = run_unlearn(cfg)
    s = summary["selection"]
    probs = {e["step"]: e["forget_prob"] for e in summary["evals"]}
    assert s["best_step"] == min(probs, key=lambda st: (probs[st], st)) and s["evaluations"] == 4
    assert (d / "sel_mesh" / "best_model" / "config.json").is_file()
