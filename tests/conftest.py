import os

# Tests run on CPU; keep XLA from grabbing every core for intra-op threads twice over.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests' models are tiny: compiling dominates and the compiled code's speed hardly matters. XLA's
# LLVM backend without its optimization passes and the loop emitters instead of the newer fusion
# emitters take about 3x less CPU per compile (the tests' real 135M-model runs are no slower). One
# LLVM module per program instead of XLA's 32 parallel pieces: the suite's two workers already use
# both cores, and splitting costs about a sixth of a step's backend compile. The HLO passes and the
# numerics are XLA's. Subprocesses inherit XLA_FLAGS. Not a compilation cache.
FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false "
                "--xla_cpu_parallel_codegen_split_count=1")
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE).strip()

# `ngdiff` subprocesses of the tests compile afresh and write nothing under ~/.cache
# (tests/test_cli.py turns the persistent compilation cache on in a temp dir).
os.environ.setdefault("NGDIFF_COMPILATION_CACHE", "0")

import gc  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# Python's cyclic collector: tracing allocates many short-lived objects in a process whose heap holds
# jax, transformers and torch, and at the default thresholds (700, 10, 10) its full collections took
# about 5% of a test process's CPU (test_population: 2.9 s of 53 s; 0.5 s with these). It still runs,
# less often; the tests that measure live memory call gc.collect() themselves.
gc.set_threshold(50_000, 20, 50)

# Eight simulated CPU devices in every test process (fixed when the backend starts), so the sharding
# tests run in-process. Runs that configure no mesh use one device (`mesh.preset: none`), and a jitted
# function without shardings runs on the first, so the other tests are unaffected. Not inherited by
# subprocesses (a config option, not an environment variable): those that need devices set XLA_FLAGS.
N_DEVICES = 8
if os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
    jax.config.update("jax_num_cpu_devices", N_DEVICES)

from ngdiff_jax.paths import shared_data_dir  # noqa: E402


@pytest.fixture(scope="session")
def shared_data():
    d = shared_data_dir()
    if not (d / "tofu" / "full.json").exists():
        raise FileNotFoundError(
            f"benchmark data not found at {d}: put the shared folder beside the repo "
            "(../shared/data) or set NGDIFF_SHARED_DATA"
        )
    return d


@pytest.fixture(scope="session")
def tofu_dir(shared_data):
    return shared_data / "tofu"


@pytest.fixture(scope="session")
def muse_news_dir(shared_data):
    return shared_data / "muse_news"


@pytest.fixture(scope="session")
def synthetic_model(tmp_path_factory):
    """``make(num_layers=1) -> {"bench", "model", "root"}``: the synthetic benchmark and a freshly
    initialized tiny llama (with its trained tokenizer) saved like a finetune export; built once per
    depth and session, read-only for the tests that share it."""
    made = {}

    def make(num_layers: int = 1):
        if num_layers not in made:
            from ngdiff_jax import models
            from ngdiff_jax.config_loader import load_config
            from ngdiff_jax.data.synthetic import write_benchmark
            from ngdiff_jax.training import FinetuneConfig, data_assembly, model_io
            from ngdiff_jax.training.finetune import build_model

            root = tmp_path_factory.mktemp(f"synthetic_model_{num_layers}")
            bench = write_benchmark(root / "bench", n_authors=10, questions_per_author=8, seed=0)
            cfg = load_config(FinetuneConfig, "synthetic_finetune",
                              [f"data.source={bench}", f"model.hf.num_hidden_layers={num_layers}"],
                              subdir="experiments")  # fmt: skip
            model, tok = build_model(cfg, data_assembly.load_split(cfg.data, cfg.data.split), root)
            _, params = models.functional(model)
            made[num_layers] = {"bench": bench, "model": model_io.save_model(model, params, root / "model", tok),
                                "root": root}  # fmt: skip
        return made[num_layers]

    return make


@pytest.fixture(scope="session")
def devices8():
    """The eight simulated CPU devices of this process (see N_DEVICES); skips on a machine whose
    backend gives fewer (e.g. the suite run on one GPU)."""
    devs = jax.devices()
    if len(devs) < 8:
        pytest.skip(f"needs 8 devices, {jax.default_backend()} has {len(devs)}")
    return devs[:8]


def pytest_collection_modifyitems(config, items):
    """``xla_cpu`` tests assert what XLA:CPU compiles (buffer sizes, HLO); on another backend they skip."""
    backend = jax.default_backend()
    if backend == "cpu":
        return
    skip = pytest.mark.skip(reason=f"asserts XLA:CPU's compiled buffers; this run's backend is {backend}")
    for item in items:
        if "xla_cpu" in item.keywords:
            item.add_marker(skip)
