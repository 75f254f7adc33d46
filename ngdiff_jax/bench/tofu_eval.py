"""How long a full TOFU evaluation takes, split into compilation and running.

Evaluates a small Llama-architecture model on the real TOFU files (forget10 with its
holdout, retain_perturbed, real authors, world facts: every metric, 200 greedy tokens per
answer) and prints the evaluation's own timings. The model is randomly initialized, so it
rarely emits EOS: every generation runs the full 200 tokens, the slowest case.

    python -m ngdiff_jax.bench.tofu_eval [--data ../shared/data/tofu] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="TOFU folder (default: ../shared/data/tofu)")
    parser.add_argument("--forget-split", default="forget10")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args(argv)

    import jax.numpy as jnp
    from flax import nnx

    from ngdiff_jax import models
    from ngdiff_jax.data import load_tofu, train_tokenizer
    from ngdiff_jax.evaluation import evaluate_tofu
    from ngdiff_jax.paths import shared_data_dir

    data = args.data or shared_data_dir() / "tofu"
    texts = [r["question"] + " " + r["answer"] for r in load_tofu("full", data)]
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer(texts, tmp, vocab_size=1024)
    cfg = {
        "model_type": "llama",
        "vocab_size": len(tok),
        "hidden_size": args.hidden,
        "intermediate_size": args.hidden * 11 // 4,
        "num_hidden_layers": args.layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    model = models.from_config(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32)
    t0 = time.perf_counter()
    result = evaluate_tofu(
        model,
        tok,
        data,
        forget_split=args.forget_split,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        name="random_llama",
    )
    wall = time.perf_counter() - t0
    timings = result.timings
    summary = {k: v for k, v in timings.items() if k != "shapes"}
    summary["compiled_shapes"] = {k: len(v) for k, v in timings.get("shapes", {}).items()}
    print(json.dumps({"wall_s": round(wall, 2), **summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
