"""Runs the benchmark sections side by side in one process and collects one result dict.

Every timed figure is a median over ``repeats`` after ``warmup`` untimed calls; the JAX and
PyTorch calls of a comparison alternate (JAX first on even repeats, PyTorch first on odd
ones) so load drift on a shared machine hits both alike.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ngdiff_jax.bench.sizes import SIZES, BenchSize

SECTIONS = ("step", "overhead", "generate", "memory")

#: name -> (comparison, threshold): the issue's targets for a 2-core CPU.
TARGETS = {
    "ratio": ("<=", 0.8),
    "ngdiff_overhead": ("<=", 0.03),
    "gen_overhead": ("<=", 0.15),
    "generate_speedup": (">=", 2.0),
}


@dataclass
class BenchOptions:
    """What to run. ``device`` is ``cpu`` or ``gpu`` (resolve ``auto`` before); ``dtype`` the
    compute dtype (parameters and optimizer state stay float32)."""

    sizes: tuple[str, ...] = ("6m", "30m")
    overhead_size: str = "6m"
    generate_size: str = "6m"
    memory_size: str = "6m"
    sections: tuple[str, ...] = SECTIONS
    repeats: int = 5
    warmup: int = 2
    gen_every: int = 4
    gen_batch: int = 8
    gen_prompt_len: int = 32
    gen_new_tokens: int = 64
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    matmul_n: int = 1024
    memory_steps: int = 3
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        for s in (*self.sizes, self.overhead_size, self.generate_size, self.memory_size):
            if s not in SIZES:
                raise ValueError(f"unknown benchmark size {s!r}; choose from {sorted(SIZES)}.")
        bad = [s for s in self.sections if s not in SECTIONS]
        if bad or not self.sections:
            raise ValueError(f"unknown section(s) {bad}; choose from {list(SECTIONS)}.")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError("repeats must be >= 1 and warmup >= 0.")
        if self.gen_every < 1:
            raise ValueError(f"gen_every must be >= 1, got {self.gen_every}.")
        if self.device not in ("cpu", "gpu"):
            raise ValueError(f"device must be cpu or gpu (resolve 'auto' first), got {self.device!r}.")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}.")


def _median_ms(times: list[float]) -> float:
    return 1000.0 * float(np.median(times))


def _alternate(a: Callable[[], float], b: Callable[[], float], repeats: int, warmup: int):
    for _ in range(warmup):
        a()
        b()
    ta, tb = [], []
    for r in range(repeats):
        if r % 2 == 0:
            ta.append(a())
            tb.append(b())
        else:
            tb.append(b())
            ta.append(a())
    return ta, tb


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(opts: BenchOptions, threads: int) -> dict[str, Any]:
    import flax
    import jax
    import optax
    import torch
    import transformers

    info = {
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": threads,
        "load_avg_start": _load(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "flax": flax.__version__,
        "optax": optax.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": opts.device,
        "dtype": opts.dtype,
    }
    if opts.device == "gpu" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


class _Pair:
    """The same model in both frameworks (the JAX weights written with ``save_pretrained`` and
    read by ``LlamaForCausalLM.from_pretrained``), with the step's batches."""

    def __init__(self, size: BenchSize, opts: BenchOptions, workdir: str):
        import torch

        from ngdiff_jax.bench import jax_side, torch_side
        from ngdiff_jax.models import functional, save_pretrained

        self.size = size
        self.torch_device = "cuda" if opts.device == "gpu" else "cpu"
        self.autocast = torch.bfloat16 if opts.dtype == "bfloat16" else None
        self.model = jax_side.build_model(size, opts.dtype)
        self.apply_fn, self.params = functional(self.model)
        path = os.path.join(workdir, size.name)
        save_pretrained(self.model, path)
        self.hf_model = torch_side.load_hf_model(path, self.torch_device, opts.dtype)
        self.np_forget, self.np_retain = jax_side.make_batches(size)
        self.forget = jax_side.device_batch(self.np_forget)
        self.retain = jax_side.device_batch(self.np_retain)
        self.t_forget = torch_side.torch_batch(self.np_forget, self.torch_device)
        self.t_retain = torch_side.torch_batch(self.np_retain, self.torch_device)

    def logits_max_abs_diff(self) -> float:
        from ngdiff_jax.bench import jax_side, torch_side

        a = jax_side.logits(self.apply_fn, self.params, self.np_retain)
        b = torch_side.logits(self.hf_model, self.t_retain)
        m = self.np_retain["attention_mask"].astype(bool)
        return float(np.abs(a - b)[m].max())


def bench_step(size: BenchSize, opts: BenchOptions, workdir: str, matmul_flops: float,
               log: Callable[[str], None]) -> dict[str, Any]:
    """``step``: the ngdiff (fixed-rate, Adam) unlearning step, JAX vs PyTorch."""
    from ngdiff_jax.bench import jax_side, torch_side

    pair = _Pair(size, opts, workdir)
    diff = pair.logits_max_abs_diff()
    cstep = jax_side.compile_step(pair.apply_fn, pair.params, pair.forget, pair.retain, "ngdiff")
    jax_run = jax_side.StepRunner(cstep, pair.params, pair.forget, pair.retain)
    torch_run = torch_side.TorchNGDiffStep(pair.hf_model, pair.t_forget, pair.t_retain,
                                           autocast_dtype=pair.autocast)
    log(f"step[{size.name}]: compiled in {cstep.compile_s:.1f} s; timing {opts.repeats} repeats")
    tj, tt = _alternate(jax_run, torch_run.timed, opts.repeats, opts.warmup)
    jax_ms, torch_ms = _median_ms(tj), _median_ms(tt)
    tokens = 2 * size.batch * size.seq_len  # forget + retain batch
    flops = size.step_flops()
    return {
        "size": size.name,
        "params": size.param_count(),
        "batch": size.batch,
        "seq_len": size.seq_len,
        "jax_step_ms": jax_ms,
        "torch_step_ms": torch_ms,
        "ratio": jax_ms / torch_ms,
        "jax_tokens_per_s": tokens / (jax_ms / 1000.0),
        "torch_tokens_per_s": tokens / (torch_ms / 1000.0),
        "step_flops": flops,
        "xla_cost_flops": cstep.flops,
        "jax_tflops": flops / (jax_ms / 1000.0) / 1e12,
        "torch_tflops": flops / (torch_ms / 1000.0) / 1e12,
        "jax_mfu": flops / (jax_ms / 1000.0) / matmul_flops,
        "torch_mfu": flops / (torch_ms / 1000.0) / matmul_flops,
        "jax_step_ms_all": [1000.0 * t for t in tj],
        "torch_step_ms_all": [1000.0 * t for t in tt],
        "logits_max_abs_diff": diff,
        "compile_s": cstep.compile_s,
    }


def bench_overhead(size: BenchSize, opts: BenchOptions, log: Callable[[str], None]) -> dict[str, Any]:
    """``overhead``: gdiff, ngdiff (fixed rate) and ngdiff + GeN, timed over whole GeN cycles.

    Each repeat runs ``every`` consecutive steps of each variant in turn, so every GeN cycle
    holds exactly one probing step; per-step figures are cycle medians / ``every``.
    """
    from ngdiff_jax.bench import jax_side
    from ngdiff_jax.models import functional

    every = opts.gen_every
    model = jax_side.build_model(size, opts.dtype)
    apply_fn, params = functional(model)
    fb, rb = (jax_side.device_batch(b) for b in jax_side.make_batches(size))
    runners = {}
    for variant in jax_side.VARIANTS:
        cstep = jax_side.compile_step(apply_fn, params, fb, rb, variant, gen_every=every)
        runners[variant] = jax_side.StepRunner(cstep, params, fb, rb)
    log(f"overhead[{size.name}]: compiled; timing {opts.repeats} cycles of {every} steps")
    counts = dict.fromkeys(runners, 0)
    cycles: dict[str, list[float]] = {v: [] for v in runners}
    probe, plain = [], []

    def cycle(variant: str) -> float:
        total = 0.0
        for _ in range(every):
            t = runners[variant]()
            if variant == "ngdiff_gen":
                (probe if counts[variant] % every == 0 else plain).append(t)
            counts[variant] += 1
            total += t
        return total

    for variant in runners:  # warm-up: one full cycle each
        for _ in range(max(1, opts.warmup)):
            cycle(variant)
    probe.clear()
    plain.clear()
    order = list(runners)
    for r in range(opts.repeats):
        for variant in (order if r % 2 == 0 else order[::-1]):
            cycles[variant].append(cycle(variant))
    ms = {v: _median_ms(c) / every for v, c in cycles.items()}
    return {
        "size": size.name,
        "every": every,
        "gdiff_step_ms": ms["gdiff"],
        "ngdiff_step_ms": ms["ngdiff"],
        "ngdiff_gen_step_ms": ms["ngdiff_gen"],
        "gen_probe_step_ms": _median_ms(probe),
        "gen_plain_step_ms": _median_ms(plain),
        "ngdiff_overhead": ms["ngdiff"] / ms["gdiff"] - 1.0,
        "gen_overhead": ms["ngdiff_gen"] / ms["ngdiff"] - 1.0,
        # XLA's own count of the compiled programs' work: a noise-free cross-check of the
        # timed overheads (the GeN step's count includes the probe branch of its lax.cond).
        "xla_flops": {v: r.cstep.flops for v, r in runners.items()},
        "cycle_ms_all": {v: [1000.0 * t for t in c] for v, c in cycles.items()},
        "final_learning_rate": float(runners["ngdiff_gen"].metrics["learning_rate"]),
    }


def bench_generate(size: BenchSize, opts: BenchOptions, workdir: str,
                   log: Callable[[str], None]) -> dict[str, Any]:
    """``generate``: batched greedy decoding with a KV cache, ngdiff-jax vs transformers."""
    from ngdiff_jax.bench import jax_side, torch_side

    pair = _Pair(size, opts, workdir)
    ids, mask = jax_side.generation_prompts(size, opts.gen_batch, opts.gen_prompt_len)
    n = opts.gen_new_tokens
    outs = {}

    def run_jax() -> float:
        t, outs["jax"] = jax_side.generate_timed(pair.model, ids, mask, n)
        return t

    def run_torch() -> float:
        t, outs["torch"] = torch_side.generate_timed(pair.hf_model, ids, mask, n, pair.torch_device,
                                                     pair.autocast)
        return t

    log(f"generate[{size.name}]: batch {opts.gen_batch}, prompt {opts.gen_prompt_len}, {n} new tokens")
    tj, tt = _alternate(run_jax, run_torch, opts.repeats, max(1, opts.warmup))
    jax_ms, torch_ms = _median_ms(tj), _median_ms(tt)
    tokens = opts.gen_batch * n
    return {
        "size": size.name,
        "batch": opts.gen_batch,
        "prompt_len": opts.gen_prompt_len,
        "new_tokens": n,
        "jax_ms": jax_ms,
        "torch_ms": torch_ms,
        "jax_tokens_per_s": tokens / (jax_ms / 1000.0),
        "torch_tokens_per_s": tokens / (torch_ms / 1000.0),
        "speedup": torch_ms / jax_ms,
        "tokens_match": float(np.mean(outs["jax"] == outs["torch"])),
    }


def bench_memory(size: BenchSize, opts: BenchOptions, threads: int,
                 log: Callable[[str], None]) -> dict[str, Any]:
    """``memory``: each method in its own training process (peak RSS: ``VmHWM``, else ``ru_maxrss``)."""
    runs = [("jax", "gdiff"), ("jax", "ngdiff"), ("jax", "ngdiff_gen"), ("torch", "ngdiff")]
    out = {}
    for framework, method in runs:
        log(f"memory[{size.name}]: {framework} {method}")
        cmd = [sys.executable, "-m", "ngdiff_jax.bench.memory_child", "--framework", framework,
               "--method", method, "--size", size.name, "--steps", str(opts.memory_steps),
               "--dtype", opts.dtype, "--device", opts.device, "--threads", str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(
                f"memory benchmark child failed ({' '.join(cmd)}), exit {proc.returncode}:\n"
                f"{proc.stderr[-4000:]}"
            )
        out[f"{framework}_{method}"] = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"size": size.name, "steps": opts.memory_steps, "runs": out}


def _targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []

    def add(name, key, value):
        op, thr = TARGETS[key]
        met = value <= thr if op == "<=" else value >= thr
        rows.append({"name": name, "value": value, "target": f"{op} {thr}", "met": bool(met)})

    for s in result.get("step", []):
        add(f"ratio[{s['size']}]", "ratio", s["ratio"])
    if "overhead" in result:
        add("ngdiff_overhead", "ngdiff_overhead", result["overhead"]["ngdiff_overhead"])
        add(f"gen_overhead[every={result['overhead']['every']}]", "gen_overhead",
            result["overhead"]["gen_overhead"])
    if "generate" in result:
        add("generate_speedup", "generate_speedup", result["generate"]["speedup"])
    return rows


def run_benchmark(opts: BenchOptions, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Runs the selected sections and returns the result dict (see docs/PERFORMANCE.md)."""
    import torch

    from ngdiff_jax.bench import jax_side, torch_side

    opts.validate()
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    threads = opts.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                               else os.cpu_count() or 1)
    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    result: dict[str, Any] = {"machine": machine_info(opts, threads), "options": asdict(opts)}

    n = opts.matmul_n
    torch_device = "cuda" if opts.device == "gpu" else "cpu"
    mm_jax = jax_side.matmul_rate(n, opts.dtype, max(3, opts.repeats))
    mm_torch = torch_side.matmul_rate(n, opts.dtype, max(3, opts.repeats), torch_device)
    result["matmul"] = {"n": n, "dtype": opts.dtype, "jax_tflops": mm_jax / 1e12,
                        "torch_tflops": mm_torch / 1e12, "peak_tflops": max(mm_jax, mm_torch) / 1e12}
    peak = max(mm_jax, mm_torch)
    log(f"matmul {n}x{n} {opts.dtype}: jax {mm_jax / 1e9:.1f} GFLOP/s, torch {mm_torch / 1e9:.1f} GFLOP/s")

    with tempfile.TemporaryDirectory(prefix="ngdiff-bench-") as workdir:
        if "step" in opts.sections:
            result["step"] = [bench_step(SIZES[s], opts, workdir, peak, log) for s in opts.sizes]
        if "overhead" in opts.sections:
            result["overhead"] = bench_overhead(SIZES[opts.overhead_size], opts, log)
        if "generate" in opts.sections:
            result["generate"] = bench_generate(SIZES[opts.generate_size], opts, workdir, log)
    if "memory" in opts.sections:
        result["memory"] = bench_memory(SIZES[opts.memory_size], opts, threads, log)
    result["targets"] = _targets(result)
    result["machine"]["load_avg_end"] = _load()
    result["wall_s"] = time.perf_counter() - t_start
    return result


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.{digits}f}"
    return str(v)


def _table(title: str, header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    out = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths)), line]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells[1:]]
    return "\n".join(out)


def format_report(result: dict[str, Any]) -> str:
    """The human-readable tables of a :func:`run_benchmark` result."""
    m = result["machine"]
    parts = [
        f"machine: {m['cpu']} ({m['usable_cores']} usable cores), threads={m['threads']}, "
        f"device={m['device']} ({m['jax_backend']}), dtype={m['dtype']}",
        f"versions: jax {m['jax']}, flax {m['flax']}, optax {m['optax']}, torch {m['torch']}, "
        f"transformers {m['transformers']}, python {m['python']}",
        f"load average (1/5/15 min): start {m['load_avg_start']}, end {m.get('load_avg_end')}",
    ]
    mm = result["matmul"]
    parts.append(f"matmul {mm['n']}x{mm['n']} {mm['dtype']}: jax {mm['jax_tflops'] * 1e3:.1f} GFLOP/s, "
                 f"torch {mm['torch_tflops'] * 1e3:.1f} GFLOP/s (MFU reference: the higher)")
    if "step" in result:
        rows = [[s["size"], f"{s['params'] / 1e6:.2f}M", f"{s['batch']}x{s['seq_len']}", s["jax_step_ms"],
                 s["torch_step_ms"], s["ratio"], s["jax_tokens_per_s"], s["torch_tokens_per_s"],
                 s["jax_mfu"], s["torch_mfu"], s["logits_max_abs_diff"]] for s in result["step"]]
        parts.append(_table("step: ngdiff (fixed rate) + Adam, forget+retain fwd/bwd (median ms)",
                            ["size", "params", "BxT", "jax_ms", "torch_ms", "ratio", "jax_tok/s",
                             "torch_tok/s", "jax_mfu", "torch_mfu", "logit_diff"], rows))
    if "overhead" in result:
        o = result["overhead"]
        parts.append(_table(
            f"overhead[{o['size']}]: ms per step, medians over GeN cycles of {o['every']} steps",
            ["gdiff", "ngdiff", "ngdiff+gen", "gen_probe_step", "gen_plain_step", "ngdiff_overhead",
             "gen_overhead"],
            [[o["gdiff_step_ms"], o["ngdiff_step_ms"], o["ngdiff_gen_step_ms"], o["gen_probe_step_ms"],
              o["gen_plain_step_ms"], o["ngdiff_overhead"], o["gen_overhead"]]]))
    if "generate" in result:
        g = result["generate"]
        parts.append(_table(
            f"generate[{g['size']}]: greedy, KV cache, batch {g['batch']}, prompt {g['prompt_len']}, "
            f"{g['new_tokens']} new tokens",
            ["jax_ms", "torch_ms", "jax_tok/s", "torch_tok/s", "speedup", "tokens_match"],
            [[g["jax_ms"], g["torch_ms"], g["jax_tokens_per_s"], g["torch_tokens_per_s"], g["speedup"],
              g["tokens_match"]]]))
    if "memory" in result:
        mem = result["memory"]
        rows = []
        for name, r in mem["runs"].items():
            c = r.get("compiled", {})
            rows.append([name, r["peak_rss_mb"], r["baseline_rss_mb"], r["peak_above_baseline_mb"],
                         c.get("argument_size_in_bytes", 0) / 2**20 if c else "-",
                         c.get("temp_size_in_bytes", 0) / 2**20 if c else "-",
                         c.get("alias_size_in_bytes", 0) / 2**20 if c else "-"])
        parts.append(_table(
            f"memory[{mem['size']}]: one process per method, {mem['steps']} steps (MiB)",
            ["run", "peak_rss", "after_imports", "peak-imports", "xla_args", "xla_temp", "xla_donated"],
            rows))
    if result.get("targets"):
        parts.append(_table("targets", ["target", "value", "wanted", "met"],
                            [[t["name"], t["value"], t["target"], t["met"]] for t in result["targets"]]))
    parts.append(f"total wall time {result.get('wall_s', 0):.0f} s")
    return "\n\n".join(parts)
