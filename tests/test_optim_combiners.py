"""Two-task combiners against independent NumPy float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ngdiff_jax.optim import CombinerState, TaskGrads, gdiff, inject_stats, mgda, ngdiff, pcgrad

SHAPES = {"a": (3, 4), "b": {"c": (5,), "d": ()}, "e": (2, 1, 3)}
NGDIFF_EPS = 1e-12


def _tree(rng, scale=1.0):
    return jax.tree.map(
        lambda s: (scale * rng.normal(size=s)).astype(np.float32),
        SHAPES,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def _flat(tree):
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


# ---- float64 references (on flat vectors) -------------------------------------------------


def ref_ngdiff(r, f):
    nr, nf = np.linalg.norm(r), np.linalg.norm(f)
    wr = 1.0 / (nr + NGDIFF_EPS) if nr > 0 else 0.0
    wf = 1.0 / (nf + NGDIFF_EPS) if nf > 0 else 0.0
    return wr, wf


def ref_gdiff(r, f, wr=1.0, wf=1.0):
    return wr, wf


def ref_mgda(r, f):
    # argmin_{gamma in [0,1]} |gamma r + (1-gamma) f|^2 from the float64 2x2 Gram matrix
    # (checked against a grid search in test_mgda_is_the_min_norm_point...).
    G = np.array([[r @ r, r @ f], [r @ f, f @ f]])
    den = G[0, 0] - 2 * G[0, 1] + G[1, 1]
    if den <= 0:
        return 0.5, 0.5
    gamma = np.clip((G[1, 1] - G[0, 1]) / den, 0.0, 1.0)
    wf = np.clip((G[0, 0] - G[0, 1]) / den, 0.0, 1.0)
    return gamma, wf


def ref_pcgrad(r, f):
    c = r @ f
    if c >= 0:
        return 1.0, 1.0
    # (r - c/|f|^2 f) + (f - c/|r|^2 r) = wr r + wf f
    return 1.0 - c / (r @ r), 1.0 - c / (f @ f)


REFS = {
    "ngdiff": (lambda: ngdiff(eps=NGDIFF_EPS), ref_ngdiff),
    "gdiff": (gdiff, ref_gdiff),
    "mgda": (mgda, ref_mgda),
    "pcgrad": (pcgrad, ref_pcgrad),
}


def _cases():
    rng = np.random.default_rng(0)
    cases = {}
    cases["random"] = (_tree(rng), _tree(rng))
    r = _tree(rng)
    cases["conflicting"] = (r, jax.tree.map(lambda x, n: -0.7 * x + 0.2 * n, r, _tree(rng)))
    r = _tree(rng, 1e-3)
    cases["1e6_apart_conflicting"] = (
        r,
        jax.tree.map(lambda x, n: (-2e8 * x + 1e3 * n).astype(np.float32), r, _tree(rng)),
    )
    cases["1e6_apart_small_forget"] = (_tree(rng, 1e3), _tree(rng, 1e-3))
    # norms 1e30 apart where plain float32 sums of squares underflow to 0 / overflow to inf
    for name, small, big in [("underflow", 1e-21, 1e9), ("overflow", 1e-9, 1e21)]:
        r = _tree(rng, small)
        cases[f"1e30_apart_naive_norm_{name}s"] = (
            r,
            jax.tree.map(
                lambda x, n, big=big, small=small: (
                    -(big / small) * x.astype(np.float64) + 0.1 * big * n
                ).astype(np.float32),
                r,
                _tree(rng),
            ),
        )
    cases["aligned"] = (r := _tree(rng), jax.tree.map(lambda x: 3 * x, r))
    return cases


CASES = _cases()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", sorted(REFS))
def test_combiner_matches_float64_reference(name, case):
    make, ref = REFS[name]
    g_r, g_f = CASES[case]
    tx = make()
    state = tx.init(g_r)
    d, state = tx.update(TaskGrads(retain=g_r, forget=g_f), state, None)
    r, f = _flat(g_r), _flat(g_f)
    wr, wf = ref(r, f)
    want = wr * r + wf * f
    got = _flat(d)
    assert jax.tree.structure(d) == jax.tree.structure(g_r)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(d))
    # direction: relative to its own size (terms may cancel but never beyond float32 input rounding)
    scale = max(abs(wr) * np.abs(r).max(), abs(wf) * np.abs(f).max())
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * scale)
    # each weight accurate on its own, including the tiny one
    np.testing.assert_allclose(float(state.weights["retain"]), wr, rtol=2e-5)
    np.testing.assert_allclose(float(state.weights["forget"]), wf, rtol=2e-5)
    np.testing.assert_allclose(float(state.norms["retain"]), np.linalg.norm(r), rtol=2e-6)
    np.testing.assert_allclose(float(state.norms["forget"]), np.linalg.norm(f), rtol=2e-6)
    assert int(state.skipped) == 0


def test_mgda_is_the_min_norm_point_and_small_weight_is_direct():
    g_r, g_f = CASES["1e6_apart_conflicting"]
    tx = mgda()
    d, s = tx.update(TaskGrads(retain=g_r, forget=g_f), tx.init(g_r))
    r, f = _flat(g_r), _flat(g_f)
    gammas = np.linspace(0, 1, 20001)
    grid = min(np.linalg.norm(g * r + (1 - g) * f) for g in gammas[-50:])
    assert np.linalg.norm(_flat(d)) <= grid * (1 + 1e-5)
    # forget weight ~1e-6..1e-8: as 1 - w_r it would be pure float32 rounding noise
    assert 0 < float(s.weights["forget"]) < 1e-5
    np.testing.assert_allclose(float(s.weights["forget"]), ref_mgda(r, f)[1], rtol=2e-5)


def test_pcgrad_projection_removes_conflict():
    g_r, g_f = CASES["conflicting"]
    d, _ = pcgrad().update(TaskGrads(retain=g_r, forget=g_f), pcgrad().init(g_r))
    r, f, dd = _flat(g_r), _flat(g_f), _flat(d)
    assert r @ f < 0
    # d = r' + f' with r' orthogonal to the original f and f' to the original r
    c = r @ f
    r2, f2 = r - c / (f @ f) * f, f - c / (r @ r) * r
    np.testing.assert_allclose(r2 @ f, 0, atol=1e-9 * np.linalg.norm(r) * np.linalg.norm(f))
    np.testing.assert_allclose(dd, r2 + f2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(REFS))
def test_nonfinite_input_gives_zero_and_counts(name):
    make, _ = REFS[name]
    g_r, g_f = CASES["random"]
    tx = make()
    state = tx.init(g_r)
    bad_r = jax.tree.map(lambda x: x, g_r)
    bad_r["a"] = bad_r["a"].copy()
    bad_r["a"][1, 2] = np.nan
    bad_f = jax.tree.map(lambda x: x, g_f)
    bad_f["b"]["c"] = bad_f["b"]["c"].copy()
    bad_f["b"]["c"][0] = -np.inf
    for rr, ff in [(bad_r, g_f), (g_r, bad_f)]:
        d, state = tx.update(TaskGrads(retain=rr, forget=ff), state)
        assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(d))
    assert int(state.skipped) == 2
    d, state = tx.update(TaskGrads(retain=g_r, forget=g_f), state)
    assert np.all(np.isfinite(_flat(d))) and np.abs(_flat(d)).max() > 0
    assert int(state.skipped) == 2


@pytest.mark.parametrize("name", sorted(REFS))
def test_zero_gradients_never_nan(name):
    make, ref = REFS[name]
    g_r, g_f = CASES["random"]
    zero = jax.tree.map(np.zeros_like, g_r)
    tx = make()
    for rr, ff in [(zero, g_f), (g_r, zero), (zero, zero)]:
        d, _s = tx.update(TaskGrads(retain=rr, forget=ff), tx.init(g_r))
        got = _flat(d)
        assert np.all(np.isfinite(got))
        wr, wf = ref(_flat(rr), _flat(ff))
        np.testing.assert_allclose(got, wr * _flat(rr) + wf * _flat(ff), rtol=1e-5, atol=1e-7)
    # ngdiff: the non-zero one alone, normalized
    if name == "ngdiff":
        d, _ = tx.update(TaskGrads(retain=zero, forget=g_f), tx.init(g_r))
        np.testing.assert_allclose(np.linalg.norm(_flat(d)), 1.0, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(REFS))
def test_jit_no_recompile_and_extra_args(name):
    make, ref = REFS[name]
    tx = make()
    traces = []

    @jax.jit
    def step(g_r, g_f, state):
        traces.append(1)  # Python side effect: runs once per trace
        return tx.update(TaskGrads(retain=g_r, forget=g_f), state, None, value_fn=None, unrelated=3)

    state = tx.init(CASES["random"][0])
    for case in ["random", "conflicting", "1e6_apart_conflicting", "random"]:
        g_r, g_f = CASES[case]
        _, state = step(g_r, g_f, state)
        wr, _wf = ref(_flat(g_r), _flat(g_f))
        np.testing.assert_allclose(float(state.weights["retain"]), wr, rtol=2e-5)
    bad = jax.tree.map(lambda x: np.full_like(x, np.nan), CASES["random"][0])
    _d, state = step(bad, CASES["random"][1], state)
    assert len(traces) == 1
    assert int(state.skipped) == 1
    assert isinstance(state, CombinerState)


def test_bfloat16_inputs_keep_dtype_and_accumulate_in_float32():
    g_r, g_f = CASES["conflicting"]
    r16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), g_r)
    f16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), g_f)
    d, s = ngdiff().update(TaskGrads(retain=r16, forget=f16), ngdiff().init(r16))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(d))
    assert s.norms["retain"].dtype == jnp.float32
    np.testing.assert_allclose(float(s.norms["retain"]), np.linalg.norm(_flat(r16)), rtol=1e-5)


def test_errors_are_clear():
    g_r, g_f = CASES["random"]
    tx = ngdiff()
    with pytest.raises(ValueError, match="expects the task gradients as one value, TaskGrads"):
        tx.update(g_r, tx.init(g_r))
    with pytest.raises(ValueError, match="task 'forget' has the tree structure"):
        tx.update(TaskGrads(retain=g_r, forget={"a": g_f["a"]}), tx.init(g_r))
    with pytest.raises(ValueError, match="task 'forget' has a leaf of shape"):
        tx.update(TaskGrads(retain=g_r, forget=jax.tree.map(lambda x: jnp.zeros(np.size(x) + 1), g_f)), tx.init(g_r))
    with pytest.raises(ValueError, match="at least two tasks"):
        TaskGrads(retain=g_r)
    with pytest.raises(ValueError, match="tasks must be a tuple of >= 2 distinct names"):
        ngdiff(tasks=("retain",))
    for make in (ngdiff, mgda, pcgrad):  # a bare string is not read as one task per character
        with pytest.raises(ValueError, match=r"tasks must be a tuple .*got 'retain'"):
            make(tasks="retain")
    assert ngdiff(tasks=iter(("books", "news", "retain"))).init(g_r).norms.keys() == {"books", "news", "retain"}
    with pytest.raises(ValueError, match=r"\['items'\] cannot name a task"):
        TaskGrads(retain=g_r, items=g_f)
    with pytest.raises(ValueError, match="gdiff: weights must map task names to weights"):
        gdiff(weights=(1.0, 0.5))
    import copy

    tg = copy.deepcopy(TaskGrads(retain=g_r, forget=g_f))  # no recursion through __getattr__
    assert tg.names == ("retain", "forget")
    with pytest.raises(ValueError, match="eps"):
        ngdiff(eps=-1.0)


def test_chained_in_front_of_sgd_descends_both_losses():
    rng = np.random.default_rng(1)
    A, B = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    loss_r = lambda p: jnp.sum((A @ p["w"] - 1.0) ** 2)
    loss_f = lambda p: jnp.sum((B @ p["w"] + 1.0) ** 2)
    params = {"w": jnp.asarray(rng.normal(size=4), jnp.float32)}
    for make in (ngdiff, mgda, pcgrad):
        tx = optax.chain(make(), optax.sgd(1e-4))
        u, _ = tx.update(
            TaskGrads(retain=jax.grad(loss_r)(params), forget=jax.grad(loss_f)(params)), tx.init(params), params)
        new = optax.apply_updates(params, u)
        assert loss_r(new) < loss_r(params) and loss_f(new) < loss_f(params)


@pytest.mark.xla_cpu
def test_a_logged_norm_and_the_combiner_read_each_bfloat16_leaf_once():
    """Inside `shared_reductions` (as `make_unlearn_step` runs its step), a gradient's norm taken
    for the log and the combiner's norms of the same gradients are one reduction per leaf, with
    the same values. Outside it, XLA:CPU materializes the float32 conversion of each bfloat16 leaf
    that two reductions read (here 2 x 2 MB of temporaries)."""
    import contextlib

    from ngdiff_jax.optim._base import shared_reductions, tree_scaled_norm

    tx = ngdiff()

    def step(shared):
        def f(r, g):
            with shared_reductions() if shared else contextlib.nullcontext():
                n = tree_scaled_norm(g)
                d, state = tx.update(TaskGrads(retain=r, forget=g), tx.init(None))
            return n, d, state.norms["forget"]

        return jax.jit(f)

    shape = jax.ShapeDtypeStruct((512, 1024), jnp.bfloat16)
    temps = {s: step(s).lower(shape, shape).compile().memory_analysis().temp_size_in_bytes for s in (False, True)}
    f32_leaf = 512 * 1024 * 4
    assert temps[False] >= f32_leaf and temps[True] < f32_leaf // 16, temps
    r, g = (jax.random.normal(jax.random.key(i), (512, 1024)).astype(jnp.bfloat16) for i in (0, 1))
    (n0, d0, s0), (n1, d1, s1) = step(False)(r, g), step(True)(r, g)
    exact = float(np.linalg.norm(np.asarray(g, np.float64)))
    for n in (n0, s0, n1, s1):  # float32 rounding: the one-pass sums reduce rows of 128 first
        assert abs(float(n) - exact) <= 1e-6 * exact
    np.testing.assert_allclose(np.asarray(d0, np.float32), np.asarray(d1, np.float32), rtol=1e-2, atol=1e-6)


def test_norm_of_a_tree_mixing_float32_and_bfloat16_leaves():
    """float32 leaves (rescaled two-pass norm) and bfloat16 leaves (Blue's one-pass sums) in one
    tree, across the float32 range: the norm equals float64's."""
    from ngdiff_jax.optim._base import tree_scaled_norm

    for big, small in [(1e20, 1e-25), (3.0, 2e-30), (1e-3, 1e18)]:
        tree = {"a": jnp.full((300,), big, jnp.float32), "b": jnp.full((257,), small, jnp.bfloat16)}
        exact = float(np.sqrt(sum(float(np.sum(np.asarray(x, np.float64) ** 2)) for x in tree.values())))
        got = float(jax.jit(tree_scaled_norm)(tree))
        assert abs(got - exact) <= 1e-6 * exact, (big, small, got, exact)


def _blue_reductions(absent_grads) -> int:
    """Blue's one-pass norm reductions (four float32 outputs) in the compiled bfloat16 GA + GeN
    step of a tiny model whose absent retain task's gradient is ``absent_grads(params)``."""
    import re

    from flax import nnx

    from ngdiff_jax import models
    from ngdiff_jax.models.config import ModelConfig
    from ngdiff_jax.models.testing import tiny_hf_config
    from ngdiff_jax.training import OptimConfig, load_method, make_optimizer, make_unlearn_step
    from ngdiff_jax.training import step as step_mod

    cfg = ModelConfig.from_hf(tiny_hf_config("llama", num_hidden_layers=1, vocab_size=2048, hidden_size=64))
    model = models.CausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, backend="cpu_fast")
    fn, params = models.functional(model)
    method = load_method("ga", rate={"type": "gen", "probe": "forget"})  # retain: none
    tx = make_optimizer(method, OptimConfig(), 10)
    sds = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)  # noqa: E731
    b = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    data = {"input_ids": b, "attention_mask": b, "labels": b}
    original = step_mod._absent_task_grads
    step_mod._absent_task_grads = absent_grads
    try:
        text = jax.jit(make_unlearn_step(fn, method, tx)).lower(
            sds(params), jax.eval_shape(tx.init, params), data, data, jax.ShapeDtypeStruct((2,), jnp.uint32)
        ).compile().as_text()
    finally:
        step_mod._absent_task_grads = original
    return len(re.findall(r"= \((?:f32\[\d+\]\{0\}(?:, )?){4}\) (?:reduce|fusion)\(", text))


@pytest.mark.xla_cpu
@pytest.mark.slow
def test_an_absent_tasks_gradient_is_not_constant_folded():
    """A method without a retain objective (GA) has a zero retain gradient; made as constants,
    XLA constant-folded the bfloat16 norms taken of it one element at a time (SmolLM2 in
    bfloat16, GA + GeN: the compile did not finish in 5 minutes; 6 s with the barrier)."""
    from ngdiff_jax.training.step import _absent_task_grads

    kept = _blue_reductions(_absent_task_grads)
    folded = _blue_reductions(lambda p: jax.tree.map(jnp.zeros_like, p))
    # the absent task's norms are computed at run time (equal counts: the barrier is gone, or
    # this XLA no longer folds such norms, which the plain zeros' count shows)
    assert kept > folded, (kept, folded)


# ------------------------------------------------------------------ k >= 2 tasks
def _pcgrad_ref(gs):
    """PCGrad in float64: each gradient projected in turn off every other original one it conflicts
    with (in task order), then summed."""
    out = np.zeros_like(gs[0])
    for i, g in enumerate(gs):
        g = g.copy()
        for j, h in enumerate(gs):
            if j != i and g @ h < 0:
                g -= (g @ h) / (h @ h) * h
        out += g
    return out


def _min_norm_ref(gs):
    """The min-norm point of conv{g_i} in float64, by enumerating the supports (KKT systems)."""
    import itertools

    m = np.stack(gs)
    k, best = m @ m.T, None
    for r in range(1, len(gs) + 1):
        for sup in map(list, itertools.combinations(range(len(gs)), r)):
            a = np.zeros((r + 1, r + 1))
            a[:r, :r], a[:r, r], a[r, :r] = k[np.ix_(sup, sup)], 1, 1
            try:
                sol = np.linalg.solve(a, np.eye(r + 1)[r])
            except np.linalg.LinAlgError:
                continue
            w = np.zeros(len(gs))
            w[sup] = sol[:r]
            if (w >= -1e-12).all() and (best is None or w @ k @ w < best[0]):
                best = (w @ k @ w, w)
    return best[1] @ m


K_CASES = {
    "three_random": [1.0, 1.0, 1.0],
    "four_scales_1e6_apart": [1.0, 1e3, 1e-3, 2.0],
    "five_shifted": None,  # five gradients sharing a component: an interior min-norm point
}


@pytest.mark.parametrize("case", sorted(K_CASES))
@pytest.mark.parametrize("name", ["ngdiff", "gdiff", "mgda", "pcgrad"])
def test_k_tasks_match_float64_references(name, case):
    rng = np.random.default_rng(7)
    if K_CASES[case] is None:
        gs = [rng.normal(size=9) + 3.0 for _ in range(5)]
    else:
        gs = [rng.normal(size=9) * s for s in K_CASES[case]]
    names = tuple(f"task{i}" for i in range(len(gs)))
    grads = TaskGrads(**{n: {"w": jnp.asarray(g[:4], jnp.float32), "b": jnp.asarray(g[4:], jnp.float32)}
                         for n, g in zip(names, gs)})  # fmt: skip
    weights = {n: 0.5 + i for i, n in enumerate(names)}
    tx = {"ngdiff": lambda: ngdiff(tasks=names), "gdiff": lambda: gdiff(weights=weights),
          "mgda": lambda: mgda(tasks=names), "pcgrad": lambda: pcgrad(tasks=names)}[name]()  # fmt: skip
    d, state = jax.jit(tx.update)(grads, tx.init(grads.grads[0]))
    want = {"ngdiff": lambda: sum(g / np.linalg.norm(g) for g in gs),
            "gdiff": lambda: sum(w * g for w, g in zip(weights.values(), gs)),
            "mgda": lambda: _min_norm_ref(gs), "pcgrad": lambda: _pcgrad_ref(gs)}[name]()  # fmt: skip
    got = np.concatenate([np.asarray(d["w"], np.float64), np.asarray(d["b"], np.float64)])
    # mgda at norms 1e6 apart: the min-norm point is 1e-6 of the largest gradient (float32 KKT solve)
    tol = 1e-4 if (name == "mgda" and case == "four_scales_1e6_apart") else 2e-5
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())
    np.testing.assert_allclose([float(state.norms[n]) for n in names], [np.linalg.norm(g) for g in gs], rtol=1e-5)
    assert int(state.skipped) == 0
    stats = inject_stats(state)
    assert {f"{n}_norm" for n in names} | {f"{n}_weight" for n in names} <= set(stats)


def test_two_tasks_through_the_k_task_formula_equal_the_closed_forms():
    """PCGrad's and MGDA's k-task solvers given two tasks agree with the two-task closed forms."""
    from ngdiff_jax.optim import mgda as mgda_mod  # noqa: F401

    g_r, g_f = CASES["conflicting"]
    two = TaskGrads(retain=g_r, forget=g_f)
    zero = jax.tree.map(jnp.zeros_like, g_r)
    for make in (mgda, pcgrad):
        ref, _ = make().update(two, make().init(g_r))
        # a third task that is zero: PCGrad projects nothing off it, MGDA puts all weight on it
        tx = make(tasks=("retain", "forget", "zero"))
        d, _ = tx.update(TaskGrads(retain=g_r, forget=g_f, zero=zero), tx.init(g_r))
        if make is pcgrad:
            np.testing.assert_allclose(_flat(d), _flat(ref), rtol=2e-5, atol=1e-7)
        else:
            assert not _flat(d).any()


def test_mgda_refuses_more_tasks_than_it_solves():
    with pytest.raises(ValueError, match="at most 12 tasks"):
        mgda(tasks=tuple(f"t{i}" for i in range(13)))
