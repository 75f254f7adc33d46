"""The ngdiff-jax side of the benchmark: model, batches, compiled unlearning steps, generation."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ngdiff_jax.bench.sizes import BenchSize
from ngdiff_jax.parallel.plan import cost_flops

#: The step variants: (method config name, overrides, GeN every or None).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # the PyTorch side's step: plain sum, Adam, a fixed rate, no clipping
    "gdiff": ("gdiff", {"rate": {"type": "constant"}, "max_grad_norm": None}),
    "ngdiff": ("ngdiff", {"rate": {"type": "constant"}}),
    "ngdiff_gen": ("ngdiff", {"rate": {"type": "gen", "probe": "retain"}}),
}


def make_batches(size: BenchSize, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A forget and a retain batch of random tokens, right-padded, prompts masked in ``labels``.

    Rows have different lengths (between 3/4 and all of ``seq_len``) and the first quarter of
    each row is the unscored "question", as in TOFU batches.
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(2):
        B, T, V = size.batch, size.seq_len, size.hf["vocab_size"]
        ids = rng.integers(1, V, size=(B, T), dtype=np.int32)
        lengths = rng.integers(max(2, 3 * T // 4), T + 1, size=B)
        lengths[0] = T
        mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int32)
        ids = np.where(mask == 1, ids, 0).astype(np.int32)
        labels = np.where(mask == 1, ids, -100).astype(np.int32)
        labels[:, : max(1, T // 4)] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out[0], out[1]


def build_model(size: BenchSize, dtype: str = "float32", seed: int = 0):
    """A randomly initialized ngdiff-jax ``CausalLM`` of ``size`` (float32 params, ``dtype`` compute)."""
    from flax import nnx

    from ngdiff_jax.models import from_config

    return from_config(size.hf_config(), rngs=nnx.Rngs(seed), dtype=jnp.dtype(dtype),
                       param_dtype=jnp.float32)


@dataclass
class CompiledStep:
    """An AOT-compiled, buffer-donating unlearning step and its XLA analyses."""

    variant: str
    compiled: Any
    opt_state: Any
    flops: float | None
    memory: dict[str, int]
    compile_s: float


def _memory_analysis(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "temp_size_in_bytes", "generated_code_size_in_bytes")
    return {f: int(getattr(m, f)) for f in fields if hasattr(m, f)}


def compile_step(apply_fn, params, forget_batch, retain_batch, variant: str, *, lr: float = 1e-5,
                 gen_every: int = 4) -> CompiledStep:
    """Builds the training package's step for ``variant`` (see :data:`VARIANTS`) and compiles it.

    ``params`` and ``opt_state`` are donated (``donate_argnums=(0, 1)``), as in a training loop.
    """
    from ngdiff_jax.training import OptimConfig, load_method, make_optimizer, make_unlearn_step

    name, overrides = VARIANTS[variant]
    method = load_method(name, **overrides)
    tx = make_optimizer(method, OptimConfig(lr=lr, gen_every=gen_every), total_steps=1_000_000)
    opt_state = tx.init(params)
    step = jax.jit(make_unlearn_step(apply_fn, method, tx), donate_argnums=(0, 1))
    t0 = time.perf_counter()
    compiled = step.lower(params, opt_state, forget_batch, retain_batch, jax.random.key(0)).compile()
    compile_s = time.perf_counter() - t0
    return CompiledStep(variant, compiled, opt_state, cost_flops(compiled), _memory_analysis(compiled),
                        compile_s)


def copy_tree(tree):
    """A fresh copy of every leaf (donated steps consume their inputs)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def device_batch(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v) for k, v in batch.items()}


class StepRunner:
    """Runs a compiled step on its own copy of the params, one timed call at a time."""

    def __init__(self, cstep: CompiledStep, params, forget_batch, retain_batch):
        self.cstep = cstep
        self.params = copy_tree(params)
        self.opt_state = copy_tree(cstep.opt_state)
        self.fb, self.rb = forget_batch, retain_batch
        self.key = jax.random.key(0)
        self.metrics = None

    def __call__(self) -> float:
        """One step; returns its wall time in seconds (blocking on the outputs)."""
        t0 = time.perf_counter()
        self.params, self.opt_state, self.metrics = self.cstep.compiled(
            self.params, self.opt_state, self.fb, self.rb, self.key)
        jax.block_until_ready((self.params, self.metrics))
        return time.perf_counter() - t0


def logits(apply_fn, params, batch) -> np.ndarray:
    return np.asarray(jax.jit(apply_fn)(params, jnp.asarray(batch["input_ids"]),
                                        jnp.asarray(batch["attention_mask"])))


def generation_prompts(size: BenchSize, batch: int, prompt_len: int, seed: int = 1):
    """Left-padded random prompts ``(input_ids, attention_mask)`` of lengths in [prompt_len/2, prompt_len]."""
    rng = np.random.default_rng(seed)
    V = size.hf["vocab_size"]
    lengths = rng.integers(prompt_len // 2, prompt_len + 1, size=batch)
    lengths[0] = prompt_len
    mask = (np.arange(prompt_len)[None, :] >= prompt_len - lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, rng.integers(1, V, size=(batch, prompt_len)), 0).astype(np.int32)
    return ids, mask


def generate_timed(model, ids, mask, new_tokens: int) -> tuple[float, np.ndarray]:
    """Greedy generation of exactly ``new_tokens`` per row (no EOS); ``(seconds, tokens)``."""
    from ngdiff_jax.models import generate

    t0 = time.perf_counter()
    out = generate(model, ids, mask, max_new_tokens=new_tokens, eos_token_id=[], pad_token_id=0)
    return time.perf_counter() - t0, out


def matmul_rate(n: int, dtype: str, repeats: int) -> float:
    """Measured square matmul rate in FLOP/s (median over ``repeats`` after a warm-up)."""
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(f(a, b))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, b))
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / float(np.median(times))
