"""MIA attacks (LOSS, ZLib, Reference, Min-K%, Min-K%++, GradNorm): per-sample statistics against
transformers/torch computed as open-unlearning's attack classes do, scores and AUC by hand."""

import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ngdiff_jax import models as M  # noqa: E402
from ngdiff_jax.evaluation import mia  # noqa: E402
from ngdiff_jax.models.testing import tiny_hf_model  # noqa: E402


def test_scores_by_hand():
    assert mia.loss_score(1.25) == 1.25
    text = "Basil Mahfouz Al-Kuwaiti was born in Kuwait City."
    assert mia.zlib_score(2.0, text) == pytest.approx(2.0 / len(zlib.compress(text.encode("utf-8"))))
    assert mia.reference_score(2.5, 1.0) == 1.5
    lp, mu, sigma = [-1.0, -3.0, -0.5, -2.0], [-1.5, -1.0, -1.0, -1.0], [0.25, 4.0, 1e-9, 1.0]
    z = [(-1.0 + 1.5) / 0.5, (-3.0 + 1.0) / 2.0, (-0.5 + 1.0) / 1e-3, (-2.0 + 1.0) / 1.0]  # sigma floored at 1e-6
    # k=0.5: the lowest int(0.5*4)=2 of z = (-1, -1)
    assert mia.min_k_plus_plus_score(lp, mu, sigma, 0.5) == pytest.approx(1.0)
    assert mia.min_k_plus_plus_score(lp, mu, sigma, 0.1) == pytest.approx(-min(z))
    assert mia.min_k_plus_plus_score([], [], [], 0.4) == 0.0


def test_aggregate_auc_and_privleak_per_attack():
    scores = {"loss": {"forget": [0.1, 0.2], "holdout": [0.3, 0.4]},  # forget clearly member-like
              "zlib": {"forget": [1.0, 2.0], "holdout": [1.0, 2.0]},  # indistinguishable
              "gradnorm": {"forget": [3.0, 0.0], "holdout": [1.0, 2.0]}}  # fmt: skip
    agg = mia.aggregate(scores, {"mia_loss": 0.75})
    assert agg["mia_loss"] == 1.0 and agg["mia_zlib"] == 0.5 and agg["mia_gradnorm"] == 0.5
    # privleak = ((1-auc) - (1-ref)) / (1-ref) * 100
    assert agg["privleak_loss"] == pytest.approx((0.0 - 0.25) / 0.25 * 100)
    assert agg["privleak_zlib"] == pytest.approx(0.0, abs=1e-6)  # ref 0.5 without a retain AUC


def _torch_stats(tm, ids, labels, p):
    """open-unlearning's evaluate_probability / tokenwise(_vocab)_logprobs / GradNormAttack, row by row."""
    out = []
    for i in range(ids.shape[0]):
        x = torch.tensor(ids[i : i + 1], dtype=torch.long)
        y = torch.tensor(labels[i : i + 1], dtype=torch.long)
        tm.zero_grad()
        logits = tm(x).logits
        ce = torch.nn.functional.cross_entropy(logits[0, :-1], y[0, 1:], ignore_index=-100, reduction="sum")
        avg_loss = (ce / (y != -100).sum()).item()
        lsm = torch.log_softmax(logits, -1)[0, :-1]
        idx = (y[0] != -100).nonzero()[:, 0][:-1]  # EOS prediction left out
        pos = idx - 1
        lp = lsm[pos, x[0, idx]]
        mu = (lsm[pos].exp() * lsm[pos]).sum(-1)
        sigma = (lsm[pos].exp() * lsm[pos] ** 2).sum(-1) - mu**2
        (-lp.mean()).backward()
        gn = torch.stack([q.grad.norm(p=p) for q in tm.parameters() if q.grad is not None]).mean().item()
        out.append((avg_loss, lp.detach().numpy(), mu.detach().numpy(), sigma.detach().numpy(), gn))
    return out


@pytest.mark.parametrize("family", ["llama", "llama_tied"])
def test_model_statistics_match_torch(family, tmp_path):
    tm = tiny_hf_model(family, tmp_path / "hf")
    model = M.from_pretrained(tmp_path / "hf")
    rs = np.random.RandomState(0)
    examples = []
    for n, prompt in [(9, 3), (6, 2), (12, 5)]:
        ids = rs.randint(3, 128, n).tolist()
        examples.append((ids, [-100] * prompt + ids[prompt:]))
    ref = []
    for ids, lab in examples:
        ref += _torch_stats(tm.float(), np.array([ids]), np.array([lab]), 2)
    st = mia.model_statistics(model, examples, batch_size=2, gradnorm_p=2)  # one full, one padded batch
    for i, (avg, lp, mu, sigma, gn) in enumerate(ref):
        assert st["avg_loss"][i] == pytest.approx(avg, rel=1e-4)
        np.testing.assert_allclose(st["logp"][i], lp, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(st["mu"][i], mu, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(st["sigma"][i], sigma, rtol=1e-3, atol=1e-5)
        assert st["gradnorm"][i] == pytest.approx(gn, rel=1e-3)
    with pytest.raises(ValueError, match="gradnorm p"):
        mia.model_statistics(model, examples, gradnorm_p=3)


def test_run_attacks_reports_every_attack_and_skips_reference_without_model(tmp_path):
    tiny_hf_model("llama", tmp_path / "hf")
    model = M.from_pretrained(tmp_path / "hf")

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(str(i) for i in ids if not (skip_special_tokens and i == 2))

    rs = np.random.RandomState(1)
    ex = {s: [(ids := rs.randint(3, 128, 8).tolist(), [-100] * 3 + ids[3:]) for _ in range(3)]
          for s in ("forget", "holdout")}  # fmt: skip
    agg, per, skipped = mia.run_attacks(model, Tok(), ex, batch_size=4)
    assert set(skipped) == {"reference"} and "mia_reference" not in agg
    for a in ("loss", "zlib", "min_k", "min_k_plus_plus", "gradnorm"):
        assert 0.0 <= agg[f"mia_{a}"] <= 1.0 and np.isfinite(agg[f"privleak_{a}"]), a
        assert len(per[a]["forget"]) == 3 and len(per[a]["holdout"]) == 3
    agg, per, skipped = mia.run_attacks(model, Tok(), ex, attacks=["reference", "loss"], reference_model=model)
    assert not skipped and agg["mia_reference"] == 0.5  # the model against itself: every score is 0
    assert per["reference"]["forget"] == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="unknown MIA attacks"):
        mia.run_attacks(model, Tok(), ex, attacks=["recall"])


def test_small_split_is_not_padded_to_a_full_batch(tmp_path, monkeypatch):
    """3 rows with batch_size=16 run as one batch of 4 rows (a padding row costs a full forward,
    and for GradNorm a backward): the batch the compiled statistics see is recorded."""
    from ngdiff_jax.evaluation.batching import fitted_batch_size

    assert [fitted_batch_size(n, 16) for n in (1, 2, 3, 4, 5, 16, 17, 400)] == [1, 2, 4, 4, 8, 16, 16, 16]
    assert fitted_batch_size(3, 2) == 2
    with pytest.raises(ValueError, match="batch_size"):
        fitted_batch_size(3, 0)
    tiny_hf_model("llama", tmp_path / "hf")
    model = M.from_pretrained(tmp_path / "hf")
    seen = []
    real = mia._jitted

    def spy(kind, *rest):
        f = real(kind, *rest)

        def call(*args):
            seen.append((kind, args[2].shape[0]))
            return f(*args)

        return call

    monkeypatch.setattr(mia, "_jitted", spy)
    rs = np.random.RandomState(2)
    ex = [(ids := rs.randint(3, 128, 8).tolist(), [-100] * 3 + ids[3:]) for _ in range(3)]
    st = mia.model_statistics(model, ex, batch_size=16, gradnorm_p=2)
    assert seen == [("stats", 4), ("gradnorm", 4)]
    assert len(st["avg_loss"]) == 3 and np.isfinite(st["gradnorm"]).all()


def test_statistics_from_the_scorer_equal_their_own_pass(tmp_path, monkeypatch):
    """The evaluation's scoring pass (rows sharing a prompt scored from its KV cache, others whole)
    gives the attacks the numbers `model_statistics` computes; `run_attacks` given them runs no pass."""
    from ngdiff_jax.evaluation.scoring import Scorer

    tiny_hf_model("llama", tmp_path / "hf")
    model = M.from_pretrained(tmp_path / "hf")
    rs = np.random.RandomState(3)
    prompt = rs.randint(3, 128, 6).tolist()
    examples = [(prompt + (a := rs.randint(3, 128, n).tolist()), [-100] * 6 + a) for n in (4, 7, 5)]  # shared
    examples += [((ids := rs.randint(3, 128, n).tolist()), [-100] * 2 + ids[2:]) for n in (9, 12)]  # whole
    scores = Scorer(model, batch_size=4, distribution_stats=True).score(examples)
    rows = {"forget": [0, 1, 3], "holdout": [2, 4]}
    for split, idx in rows.items():
        got = mia.statistics_from_scores(scores, idx)
        want = mia.model_statistics(model, [examples[i] for i in idx], batch_size=4)
        np.testing.assert_allclose(got["avg_loss"], want["avg_loss"], rtol=1e-5, atol=1e-6)
        for key in ("logp", "mu", "sigma"):
            for g, w in zip(got[key], want[key]):
                # sigma = E[lsm^2] - mu^2 as open-unlearning: ~1e-5 of float32 cancellation either way
                np.testing.assert_allclose(g, w, rtol=1e-4, atol=5e-5 if key == "sigma" else 1e-5,
                                           err_msg=f"{split} {key}")

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    ex = {s: [examples[i] for i in idx] for s, idx in rows.items()}
    want = mia.run_attacks(model, Tok(), ex, attacks=["loss", "zlib", "min_k_plus_plus"])
    monkeypatch.setattr(mia, "model_statistics", lambda *a, **k: pytest.fail("a second pass ran"))
    got = mia.run_attacks(model, Tok(), ex, attacks=["loss", "zlib", "min_k_plus_plus"],
                          statistics={s: mia.statistics_from_scores(scores, idx) for s, idx in rows.items()})
    for key, v in want[0].items():
        assert got[0][key] == pytest.approx(v, abs=1e-6), key
    # without mu/sigma (a Scorer made without distribution_stats), Min-K%++ runs its own pass
    bare = {s: mia.statistics_from_scores(Scorer(model, batch_size=4).score(examples), idx) for s, idx in rows.items()}
    assert bare["forget"]["mu"] is None
    monkeypatch.undo()
    again = mia.run_attacks(model, Tok(), ex, attacks=["loss", "min_k_plus_plus"], statistics=bare)
    assert again[0]["mia_min_k_plus_plus"] == pytest.approx(want[0]["mia_min_k_plus_plus"], abs=1e-6)
