"""Memory plans: the unlearning step compiled ahead of time from abstract shapes.

:func:`plan_step` builds the NGDiff + GeN step (Adam) for a Hugging Face config without
allocating any weight (``nnx.eval_shape``, ``jax.eval_shape``, ``jax.ShapeDtypeStruct``),
jits it over a mesh of (possibly simulated) devices with the shardings of a run, compiles it
(``.lower(...).compile()``) and reads XLA's per-device ``memory_analysis()``, next to the
analytic estimate of :func:`ngdiff_jax.parallel.estimate_memory`. ``ngdiff plan`` prints a table
over precision x remat x LoRA x mesh.

Compiling a 32-layer 7B step on two CPU cores takes minutes per combination, so by default
(``layers="extrapolate"``) each combination is compiled with 2 and 4 decoder blocks and every
figure is extrapolated linearly to the model's depth (``m(L) = m(2) + (L - 2) (m(4) - m(2)) / 2``:
parameters, optimizer state and saved activations grow per block; the compiled program's other
temporaries do not). ``layers="full"`` compiles the real depth.

The model is built with the accelerator backend (``backends.for_platform("gpu")``: portable
kernels, the accelerator's LM-head chunk) and XLA's attention (cuDNN's fused kernel does not
compile on the planning machine; XLA's stores the ``[B, H, T, S]`` scores, so for a cuDNN run the
figures are an upper bound). The program is compiled for the host's CPU, whose buffer
assignment is not a GPU's or TPU's: treat the
figures as an estimate of the same program's footprint (docs/SCALING.md).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["MODEL_PRESETS", "PlanRow", "plan_step"]

#: Hugging Face configs of the paper's model sizes, written as data (nothing is downloaded).
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "llama2-7b": {
        "model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu",
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    },
    "llama3.1-8b": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192, "rope_theta": 500000.0},
    },
    "phi-1.5": {
        "model_type": "phi", "vocab_size": 51200, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "gelu_new",
        "max_position_embeddings": 2048, "layer_norm_eps": 1e-5, "partial_rotary_factor": 0.5,
        "tie_word_embeddings": False, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    },
    "llama3.2-1b": {  # meta-llama/Llama-3.2-1B-Instruct's config.json
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "head_dim": 64,
        "rope_parameters": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192, "rope_theta": 500000.0},
    },
    "smollm2-135m": {
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_act": "silu",
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "head_dim": 64,
        "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
    },
}  # fmt: skip

GIB = 2**30
#: the depths compiled to extrapolate (XLA's buffer assignment for 1 block differs from deeper stacks)
EXTRAPOLATE_FROM = (2, 4)


@dataclass
class PlanRow:
    """One combination: settings, XLA's per-device figures and the analytic estimate (bytes)."""

    model: str
    layers: int
    mesh: str
    devices: int
    batch: int
    seq: int
    params_dtype: str
    compute_dtype: str
    moments_dtype: str
    remat: str
    lora_rank: int
    micro_batches: int
    argument: int
    output: int
    alias: int
    temp: int
    estimate: int  # params + gradient trees + optimizer state (+ reference) per device
    flops: int  # XLA's count of one step's floating-point operations per device (cost_analysis)
    method: str  # the unlearning method compiled (configs/methods)
    how: str  # "compiled" or "extrapolated from 1 and 2 layers"
    compile_s: float

    @property
    def peak(self) -> int:
        return self.argument + self.output - self.alias + self.temp

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "peak": self.peak}


def _dtype(name: str):
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def _compile_once(hf: dict, *, layers: int, batch: int, seq: int, params_dtype: str, compute_dtype: str,
                  moments_dtype: str, remat: str, lora_rank: int, mesh_preset: str, devices: int,
                  micro_batches: int, method: str = "ngdiff") -> tuple[dict[str, int], int]:  # fmt: skip
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ngdiff_jax import backends, models
    from ngdiff_jax import parallel as par
    from ngdiff_jax.models.config import ModelConfig
    from ngdiff_jax.training import OptimConfig, load_method, make_optimizer, make_unlearn_step
    from ngdiff_jax.training.precision import with_moment_dtype

    hf = {**hf, "num_hidden_layers": int(layers)}
    cfg = ModelConfig.from_hf(hf)
    pd, cd = _dtype(params_dtype), _dtype(compute_dtype)
    # the accelerator backend (its head chunk), with XLA's attention: cuDNN's kernel does not compile
    # here, and XLA's stores the scores, so the estimate is an upper bound for a cuDNN run
    accel = backends.for_platform("gpu")
    model = nnx.eval_shape(lambda: models.CausalLM(cfg, rngs=nnx.Rngs(0), dtype=cd, param_dtype=pd, backend=accel,
                                                   attention="xla"))  # fmt: skip
    models.set_remat(model, remat)
    devs = jax.devices()
    if devices > len(devs):
        raise ValueError(f"the plan asks for {devices} devices but JAX sees {len(devs)}; ngdiff plan simulates them "
                         "with XLA_FLAGS=--xla_force_host_platform_device_count.")  # fmt: skip
    if mesh_preset == "none":
        mesh_cfg = par.MeshConfig(data=1, fsdp=1, tensor=1, rules="fsdp")
    else:
        mesh_cfg = par.preset_config(mesh_preset)
    mesh = par.make_mesh(mesh_cfg, devices=devs[:devices])
    rules = mesh_cfg.rules
    method_name = method
    method = load_method(method_name)  # default ngdiff: GA + NLL, NGDiff, Adam, GeN probing the retain loss
    tx = make_optimizer(method, OptimConfig(), 100, steps_per_epoch=10.0, backend=accel)
    if moments_dtype != params_dtype:
        tx = with_moment_dtype(tx, _dtype(moments_dtype))

    def sds(tree, shardings):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

    if lora_rank:
        from ngdiff_jax.training.config_schema import LoraSection
        from ngdiff_jax.training.lora_run import LoraRun

        run = LoraRun(model, LoraSection(rank=int(lora_rank)), seed=0)
        adapters = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), run.adapters)
        base = sds(run.base, par.param_shardings(run.base, mesh, rules))
        params, frozen = adapters, (base,)
        shardings = jax.tree.map(lambda _: par.replicated(mesh), adapters)
        step = run.bind(lambda fn: make_unlearn_step(fn, method, tx, micro_batches=micro_batches, backend=accel))
    else:
        apply_fn, params = models.functional(model)
        frozen, shardings = (), None
        step = make_unlearn_step(apply_fn, method, tx, micro_batches=micro_batches, backend=accel,
                                 grad_sharding=par.param_shardings(params, mesh, rules))  # fmt: skip
    opt = jax.eval_shape(tx.init, params)
    sharded = par.shard_unlearn_step(step, mesh, rules, params, opt, frozen=frozen, shardings=shardings,
                                     backend=accel)
    b = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=sharded.batch_sharding)
    batch_sds = {"input_ids": b, "attention_mask": b, "labels": b}
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=par.replicated(mesh))
    args = (sds(params, sharded.param_shardings), sds(opt, sharded.opt_state_shardings), batch_sds, batch_sds, rng)
    args += frozen
    compiled = sharded.fn.lower(*args).compile()
    cm = par.compiled_memory(compiled)

    flops = cost_flops(compiled) or 0.0
    est = sharded.memory.total
    if lora_rank:  # the frozen base is resident too
        from ngdiff_jax.parallel.memory import tree_shard_bytes

        est += tree_shard_bytes(frozen[0], jax.tree.map(lambda x: x.sharding, frozen[0]))
    return {"argument": cm.argument, "output": cm.output, "alias": cm.alias, "temp": cm.temp,
            "flops": int(flops)}, est


def plan_step(
    model: str | dict,
    *,
    batch: int = 4,
    seq: int = 512,
    params_dtype: str = "bfloat16",
    compute_dtype: str | None = None,
    moments_dtype: str = "float32",
    remat: str = "full",
    lora_rank: int = 0,
    mesh_preset: str = "none",
    devices: int = 1,
    micro_batches: int = 1,
    layers: str | int = "extrapolate",
    method: str = "ngdiff",
) -> PlanRow:
    """Compile the unlearning step for ``model`` (a preset name or HF config dict) and return
    XLA's per-device memory figures (see the module doc for ``layers``)."""
    hf = MODEL_PRESETS[model] if isinstance(model, str) else dict(model)
    if isinstance(model, str) and model not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {model!r}; choose from {', '.join(MODEL_PRESETS)} or pass a config.")
    name = model if isinstance(model, str) else hf.get("model_type", "model")
    depth = int(hf["num_hidden_layers"])
    kw = dict(batch=batch, seq=seq, params_dtype=params_dtype, compute_dtype=compute_dtype or params_dtype,
              moments_dtype=moments_dtype, remat=remat, lora_rank=lora_rank, mesh_preset=mesh_preset,
              devices=devices, micro_batches=micro_batches, method=method)  # fmt: skip
    t0 = time.perf_counter()
    if layers == "extrapolate" and depth > EXTRAPOLATE_FROM[1]:
        lo, hi = EXTRAPOLATE_FROM
        m1, e1 = _compile_once(hf, layers=lo, **kw)
        m2, e2 = _compile_once(hf, layers=hi, **kw)
        f = (depth - lo) / (hi - lo)
        figs = {k: int(m1[k] + f * (m2[k] - m1[k])) for k in m1}
        est = int(e1 + f * (e2 - e1))
        how = f"extrapolated from {lo} and {hi} layers"
    else:
        n = depth if layers in ("full", "extrapolate") else int(layers)
        figs, est = _compile_once(hf, layers=n, **kw)
        how = "compiled" if n == depth else f"compiled with {n} of {depth} layers"
        depth = n
    return PlanRow(
        model=name, layers=depth, mesh=mesh_preset, devices=devices, batch=batch, seq=seq,
        params_dtype=params_dtype, compute_dtype=kw["compute_dtype"], moments_dtype=moments_dtype, remat=remat,
        lora_rank=lora_rank, micro_batches=micro_batches, estimate=est, method=method, how=how,
        compile_s=round(time.perf_counter() - t0, 1), **figs,
    )  # fmt: skip


def format_rows(rows: list[PlanRow]) -> str:
    """A plain-text table, GiB per device, with fit marks for 80 and 40 GB devices."""
    head = ("model", "mesh", "params", "compute", "moments", "remat", "lora", "mb", "batch",
            "args", "temp", "peak", "estimate", "80GB", "40GB", "TFLOP/step", "how")  # fmt: skip
    lines = [" | ".join(head)]
    for r in rows:
        mesh = "1 device" if r.mesh == "none" else f"{r.mesh}={r.devices}"
        peak = r.peak / GIB
        lines.append(" | ".join(str(x) for x in (
            r.model, mesh, r.params_dtype, r.compute_dtype, r.moments_dtype, r.remat, r.lora_rank or "-",
            r.micro_batches, f"{r.batch}x{r.seq}", f"{r.argument / GIB:.2f}", f"{r.temp / GIB:.2f}", f"{peak:.2f}",
            f"{r.estimate / GIB:.2f}", "yes" if r.peak <= 80 * GIB else "no", "yes" if r.peak <= 40 * GIB else "no",
            f"{r.flops / 1e12:.2f}", r.how)))  # fmt: skip
    return "\n".join(lines)


def cost_flops(compiled) -> float | None:
    """FLOPs of a compiled program from XLA's cost analysis, or None where the backend gives none."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend implements it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])
