"""LoRA in training: the step trains only the adapters (optimizer state and NGDiff norms over
them), a bfloat16 base stays bit-identical, and `ngdiff unlearn` / `ngdiff finetune` with
``lora.*`` export a merged model and a PEFT adapter that agree; bad ``lora`` values fail at once."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ngdiff_jax import models as M
from ngdiff_jax.cli import main
from ngdiff_jax.config_loader import load_config
from ngdiff_jax.training import UnlearnConfig
from ngdiff_jax.training.config_schema import LoraSection, load_method
from ngdiff_jax.training.lora_run import LoraRun
from ngdiff_jax.training.methods import make_optimizer
from ngdiff_jax.training.step import make_unlearn_step


@pytest.fixture(scope="module")
def tiny(synthetic_model):
    """The synthetic benchmark + a tiny llama (and tokenizer) saved like a finetune export (conftest)."""
    return synthetic_model(1)


def _batch(seed, B=4, T=12, V=128):
    rs = np.random.RandomState(seed)
    ids = rs.randint(3, V, (B, T)).astype(np.int32)
    labels = ids.copy()
    labels[:, :4] = -100
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones_like(ids), "labels": jnp.asarray(labels)}


def _flat(tree):
    return {".".join(str(getattr(k, "key", k)) for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.slow
def test_step_trains_only_adapters_and_keeps_bf16_base_bit_identical(tmp_path):
    from ngdiff_jax.models.testing import tiny_hf_model

    tiny_hf_model("llama", tmp_path / "hf")
    model = M.from_pretrained(tmp_path / "hf", param_dtype=jnp.bfloat16)
    run = LoraRun(model, LoraSection(rank=2, alpha=4.0, targets=("all",)), seed=0)
    base_before = {k: np.asarray(v.astype(jnp.float32)) for k, v in _flat(run.base).items()}
    assert all(v.dtype == jnp.bfloat16 for v in _flat(run.base).values())
    assert all(v.dtype == jnp.float32 for v in _flat(run.adapters).values())

    method = load_method("ngdiff", rate="constant")
    tx = make_optimizer(method, load_config(UnlearnConfig, None, ["model_path=x", "optim.lr=1e-2"]).optim, 10)
    opt_state = tx.init(run.adapters)
    # the optimizer state holds only adapter-sized arrays (and scalars)
    n_adapter = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(run.adapters))
    n_state = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(opt_state))
    assert n_state < 3 * n_adapter + 100, (n_state, n_adapter)

    step = jax.jit(run.bind(lambda fn: make_unlearn_step(fn, method, tx)))
    fb, rb = _batch(0), _batch(1)
    adapters, state, metrics = step(run.adapters, opt_state, fb, rb, jax.random.PRNGKey(0), None, run.base)

    # NGDiff's norms are the adapters' gradient norms
    def nll(a, b):
        from ngdiff_jax import losses

        logits = run.apply_fn({"base": run.base, "lora": a}, b["input_ids"], b["attention_mask"])
        return losses.nll(logits, b["labels"])

    g_r = jax.grad(nll)(run.adapters, rb)
    np.testing.assert_allclose(metrics["retain_grad_norm"], optax.tree.norm(g_r), rtol=1e-5)
    zero = [k for k, v in _flat(g_r).items() if k.endswith("lora_b") and not float(jnp.abs(v).max()) > 0]
    assert not zero, zero  # the down projection (fused SwiGLU path) included
    for _ in range(2):
        adapters, state, metrics = step(adapters, state, fb, rb, jax.random.PRNGKey(0), None, run.base)
    changed = [k for k, v in _flat(adapters).items() if k.endswith("lora_b") and float(jnp.abs(v).max()) > 0]
    assert len(changed) == 2 * 7  # every target of both layers moved
    assert np.isfinite(float(metrics["forget_loss"]))
    for k, v in _flat(run.base).items():
        assert v.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(v.astype(jnp.float32)), base_before[k], err_msg=k)


def _safetensors(d):
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_unlearn_cli_with_lora_exports_merged_model_and_peft_adapter(tiny, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")

    out = tmp_path / "run"
    rc = main(["unlearn", "--config", "synthetic_ngdiff", f"data.source={tiny['bench']}", f"model_path={tiny['model']}",
               f"run.output_dir={out}", "run.progress=false", "run.steps=3", "run.checkpoint_every=0",
               "method=ngdiff_npo", "method.rate=constant", "optim.lr=5e-2", "run.eval_every=3",
               "lora.rank=4", "lora.alpha=8", "lora.targets=[q_proj,v,down]"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lora"]["targets"] == ["q", "v", "down"] and summary["lora"]["rank"] == 4
    assert summary["lora"]["trainable_params"] < 0.1 * summary["lora"]["base_params"]
    assert summary["evals"][-1]["forget_nll"] != summary["evals"][0]["forget_nll"]
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert sorted(cfg["target_modules"]) == ["down_proj", "q_proj", "v_proj"]

    base_t, merged_t = _safetensors(tiny["model"]), _safetensors(out / "model")
    assert base_t.keys() == merged_t.keys()
    for k in base_t:
        same = np.array_equal(base_t[k], merged_t[k])
        assert same == (not any(t in k for t in ("q_proj", "v_proj", "down_proj"))), k

    rs = np.random.RandomState(0)
    ids = rs.randint(3, 100, (2, 10))
    with torch.no_grad():
        merged = transformers.AutoModelForCausalLM.from_pretrained(out / "model").eval()
        ref = merged(torch.tensor(ids)).logits.numpy()
        pm = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tiny["model"]),
                                            out / "adapter").eval()
        via_peft = pm(torch.tensor(ids)).logits.numpy()
        plain = transformers.AutoModelForCausalLM.from_pretrained(tiny["model"]).eval()
        plain = plain(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(M.from_pretrained(out / "model")(ids))
    scale = np.abs(ref).max()
    assert np.abs(via_peft - ref).max() / scale < 1e-4
    assert np.abs(ours - ref).max() / scale < 1e-4
    assert np.abs(plain - ref).max() / scale > 1e-4  # the adapters were trained


def test_finetune_cli_with_lora(tiny, tmp_path, capsys):
    out = tmp_path / "ft"
    rc = main(["finetune", f"model_path={tiny['model']}", f"data.source={tiny['bench']}", "data.split=forget10",
               "data.batch_size=4", f"run.output_dir={out}", "run.progress=false", "run.steps=2",
               "run.checkpoint_every=0", "lora.rank=2", "lora.targets=all"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lora"]["targets"] == ["q", "k", "v", "o", "gate", "up", "down"]
    assert summary["lora"]["alpha"] == 2  # default alpha = rank
    assert (out / "model" / "config.json").is_file() and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert "LoRA rank 2, alpha 2 on q, k, v, o, gate, up, down, merged" in (out / "model" / "README.md").read_text()


@pytest.mark.parametrize("argv,message", [
    (["lora.rank=0"], "lora.rank=0: the rank must be a positive integer"),
    (["lora.rank=2.5"], "lora.rank=2.5 must be an integer"),
    (["lora.rank=4", "lora.alpha=0"], "lora.alpha=0.0: alpha must be a positive number"),
    (["lora.alpha=16"], "lora.rank is not"),
    (["lora.rank=4", "lora.targets=[]"], "lora.targets is empty"),
    (["lora.rank=4", "lora.targets=[q,qq]"], "'qq' is not a projection name of any supported family"),
    (["lora.rank=4", "mesh.preset=fsdp"], "LoRA runs on one device"),
])  # fmt: skip
def test_bad_lora_config_exits_2(argv, message, capsys):
    rc = main(["unlearn", "model_path=x", *argv])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_target_unknown_for_the_family_fails_before_training(tiny, tmp_path, capsys):
    out = tmp_path / "bad"
    rc = main(["unlearn", "--config", "synthetic_ngdiff", f"data.source={tiny['bench']}", f"model_path={tiny['model']}",
               f"run.output_dir={out}", "run.progress=false", "lora.rank=2", "lora.targets=[q,fc1]"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc != 0
    assert "'fc1' is not a projection of the llama model; valid targets: all, q, k, v, o, gate, up, down" in err
    assert not (out / "log.jsonl").exists()


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["run.scan_layers=true", "run.remat=full"]], ids=["unrolled", "scan"])
def test_lora_run_resumes_to_the_same_adapters(tiny, tmp_path, extra):
    import shutil

    from ngdiff_jax.training import run_unlearn

    out = tmp_path / "resume"
    cfg = load_config(UnlearnConfig, "synthetic_ngdiff", [
        f"data.source={tiny['bench']}", f"model_path={tiny['model']}", f"run.output_dir={out}",
        "run.progress=false", "run.steps=4", "run.checkpoint_every=2", "run.eval_every=0",
        "lora.rank=2", "lora.targets=[q,down]", *extra], subdir="experiments")  # fmt: skip
    _, first = run_unlearn(cfg)
    want = _safetensors(out / "adapter")
    shutil.rmtree(out / "checkpoints" / "4")
    _, again = run_unlearn(cfg)
    assert first["resumed_from"] is None and again["resumed_from"] == 2
    got = _safetensors(out / "adapter")
    assert want.keys() == got.keys()
    assert any(np.abs(v).max() > 0 for k, v in want.items() if "lora_B" in k)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parametrize("method,scan", [("rmu", False), ("pcgrad", False), ("rmu", True)])
def test_lora_with_hidden_state_and_projection_methods(tiny, tmp_path, method, scan, capsys):
    """RMU reads hidden states (``apply_fn.hidden_state`` through the adapters); PCGrad projects
    the adapters' gradients. Both train the adapters and leave the base weights alone."""
    out = tmp_path / method
    rc = main(["unlearn", "--config", "synthetic_ngdiff", f"data.source={tiny['bench']}", f"model_path={tiny['model']}",
               f"run.output_dir={out}", "run.progress=false", "run.steps=2", "run.checkpoint_every=0",
               "run.eval_every=0", f"method={method}", "lora.rank=2", "lora.targets=[v,up]",
               *(["method.forget.layer=0", "method.retain.layer=0"] if method == "rmu" else []),
               *(["run.scan_layers=true", "run.remat=full"] if scan else [])])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    adapter = _safetensors(out / "adapter")
    assert all(np.abs(v).max() > 0 for k, v in adapter.items() if "lora_B" in k), method
    base_t, merged_t = _safetensors(tiny["model"]), _safetensors(out / "model")
    for k in base_t:
        assert np.array_equal(base_t[k], merged_t[k]) == (not any(t in k for t in ("v_proj", "up_proj"))), k
