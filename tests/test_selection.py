"""Model selection during training (training/selection.py): the criterion, tie-breaking, export of
the best point, resume keeping the best so far, early stopping in the loop."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ngdiff_jax.training.selection import Criterion, SelectionSection, Selector


def test_criterion_constraints_objective_and_weights():
    c = Criterion(maximize="model_utility", constraints=["forget_quality>=0.05"])
    assert c.score({"model_utility": 0.6, "forget_quality": 0.05}) == 0.6
    assert c.score({"model_utility": 0.9, "forget_quality": 0.01}) is None  # infeasible
    assert c.score({"model_utility": 0.9, "forget_quality": None}) is None  # not computable: infeasible
    assert Criterion(minimize="forget_prob").score({"forget_prob": 0.25}) == -0.25
    w = Criterion(weights={"model_utility": 1.0, "forget_quality": 2.0}, constraints=["retain_prob>0.5"])
    assert w.score({"model_utility": 0.5, "forget_quality": 0.1, "retain_prob": 0.6}) == pytest.approx(0.7)
    assert w.score({"model_utility": 0.5, "forget_quality": 0.1, "retain_prob": 0.5}) is None
    assert "ties keep the earlier step" in w.describe()
    with pytest.raises(KeyError, match="forget_quality"):
        c.score({"model_utility": 0.5})
    with pytest.raises(ValueError, match="exactly one criterion"):
        Criterion(maximize="a", minimize="b")
    with pytest.raises(ValueError, match="metric>=value"):
        Criterion(maximize="a", constraints=["forget_quality => 3"])


def test_selection_section_is_checked():
    with pytest.raises(ValueError, match="selection.every=0"):
        SelectionSection(maximize="retain_prob")
    with pytest.raises(ValueError, match="exactly one criterion"):
        SelectionSection(every=2)
    assert SelectionSection(every=2, maximize="retain_prob", patience=1).enabled


def _points(tmp_path, values, *, patience=0, resume_from=None):
    exported = []
    sel = Selector(Criterion(maximize="u", constraints=["fq>=0.1"]),
                   lambda step, params: values[step], tmp_path,
                   export=lambda params, d: (d.mkdir(parents=True), (d / "p.json").write_text(json.dumps(params)),
                                             exported.append(params)),
                   patience=patience)  # fmt: skip
    return sel, exported


def test_best_point_tie_breaking_and_export(tmp_path):
    values = {0: {"u": 0.9, "fq": 0.0}, 1: {"u": 0.5, "fq": 0.2}, 2: {"u": 0.7, "fq": 0.2},
              3: {"u": 0.7, "fq": 0.5}, 4: {"u": 0.6, "fq": 0.9}}  # fmt: skip
    sel, exported = _points(tmp_path, values)
    for step in range(5):
        out = sel(step, {"step": step})
        assert out["u"] == values[step]["u"] and "selection_score" in out
    # step 0 infeasible; 2 and 3 tie at 0.7: the earlier (2) is kept
    assert sel.best["step"] == 2 and sel.best["score"] == 0.7
    assert exported == [{"step": 1}, {"step": 2}]
    assert json.loads((tmp_path / "best_model" / "p.json").read_text()) == {"step": 2}
    assert not (tmp_path / "best_model.tmp").exists() and not (tmp_path / "best_model.old").exists()
    state = json.loads((tmp_path / "selection.json").read_text())
    assert [h["step"] for h in state["history"]] == [0, 1, 2, 3, 4] and state["since_best"] == 2
    assert sel.summary()["best_step"] == 2 and sel.summary()["stopped_early_at"] is None


def test_resume_keeps_the_best_so_far_and_patience_stops(tmp_path):
    values = {0: {"u": 0.1, "fq": 0.5}, 1: {"u": 0.8, "fq": 0.5}, 2: {"u": 0.3, "fq": 0.5},
              3: {"u": 0.2, "fq": 0.5}, 4: {"u": 0.9, "fq": 0.5}}  # fmt: skip
    sel, exported = _points(tmp_path, values, patience=2)
    for step in (0, 1, 2):
        sel(step, {"step": step})
    assert sel.best["step"] == 1 and not sel.should_stop
    # a killed run resumes from its checkpoint at step 1: a new selector reads the state back
    sel2, exported2 = _points(tmp_path, values, patience=2)
    assert sel2.best["step"] == 1 and sel2.best["score"] == 0.8
    sel2(2, {"step": 2})  # re-evaluated point: same score, the best stays
    assert sel2.best["step"] == 1 and exported2 == []
    sel2(3, {"step": 3})  # second evaluation without a better point -> stop
    assert sel2.should_stop and sel2.summary()["stopped_early_at"] == 3
    assert json.loads((tmp_path / "best_model" / "p.json").read_text()) == {"step": 1}
    # a third start after the stop does not run on
    sel3, _ = _points(tmp_path, values, patience=2)
    assert sel3.should_stop
    with pytest.raises(ValueError, match="criterion"):
        Selector(Criterion(minimize="u"), lambda s, p: {}, tmp_path)


class _Stream:
    def __init__(self):
        self.i = 0

    def __next__(self):
        self.i += 1
        return {"x": np.ones((1,), np.float32)}

    def state(self):
        return {"i": self.i}

    def restore(self, d):
        self.i = d["i"]


def test_loop_stops_early_and_resume_does_not_run_on(tmp_path):
    from ngdiff_jax.training.loop import run_loop

    def step(params, opt_state, batches, rng):
        return params + batches[0]["x"], opt_state, {"loss": jnp.sum(params)}

    # the evaluation peaks at step 2 (params = 2), patience 2 -> stop at step 4 of 10
    evaluate = lambda s, p: {"u": -abs(float(np.asarray(p)[0]) - 2.0)}
    kw = dict(num_steps=10, rng=jax.random.PRNGKey(0), out_dir=tmp_path, checkpoint_every=3, eval_every=1,
              progress=False)  # fmt: skip
    sel = Selector(Criterion(maximize="u"), evaluate, tmp_path, patience=2)
    r = run_loop(step, jnp.zeros((1,)), jnp.zeros(()), streams={"s": _Stream()}, eval_fn=sel, **kw)
    assert r.step == 4 and float(r.params[0]) == 4.0 and sel.best["step"] == 2
    assert [e["step"] for e in r.evals] == [0, 1, 2, 3, 4]
    sel2 = Selector(Criterion(maximize="u"), evaluate, tmp_path, patience=2)
    r2 = run_loop(step, jnp.zeros((1,)), jnp.zeros(()), streams={"s": _Stream()}, eval_fn=sel2, **kw)
    assert r2.resumed_from == 4 and r2.step == 4 and float(r2.params[0]) == 4.0


def test_forget_quality_criterion_needs_the_retain_evaluation():
    with pytest.raises(ValueError, match="retain_eval"):
        SelectionSection(every=5, maximize="model_utility", constraints=("forget_quality>=0.05",))
    with pytest.raises(ValueError, match="retain_eval"):
        SelectionSection(every=5, maximize="forget_quality", tofu=True)
    SelectionSection(every=5, maximize="forget_quality", tofu=True, retain_eval="r.json")
