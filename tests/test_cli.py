"""`ngdiff finetune` / `ngdiff unlearn`: config files, overrides and the errors users see."""

import pytest
import yaml

from ngdiff_jax.cli import main


def test_print_config_with_overrides(capsys):
    rc = main(["unlearn", "--config", "tofu_ngdiff", "--print-config",
               "method=npo", "run.steps=50", "optim.lr=1e-4"])  # fmt: skip
    assert rc == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["method"]["name"] == "npo" and cfg["method"]["forget"] == {"type": "npo", "beta": 0.1}
    assert cfg["run"]["steps"] == 50 and cfg["optim"]["lr"] == 1e-4
    assert cfg["data"]["forget_split"] == "forget10"


def test_config_file_by_path_and_base(tmp_path, capsys):
    f = tmp_path / "mine.yaml"
    f.write_text("_base: tofu_finetune_target.yaml\ndata:\n  split: retain95\n")
    assert main(["finetune", "--config", str(f), "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["data"]["split"] == "retain95" and cfg["model"]["hf"]["model_type"] == "llama"


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["unlearn", "--config", "tofu_ngdiff", "optim.lrr=1"],
            "unknown key 'optim.lrr' in OptimConfig; valid keys are:",
        ),
        (["unlearn", "--config", "tofu_ngdiff", "bogus=1"], "unknown key 'bogus'"),
        (["unlearn", "--config", "tofu_ngdiff", "method=nosuch"], "configs/methods/nosuch.yaml"),
        (["unlearn", "--config", "nosuch_experiment"], "config 'nosuch_experiment' not found"),
        (["unlearn", "--config", "tofu_ngdiff", "run.steps=abc"], "run.steps='abc' must be an integer"),
        (["unlearn", "--config", "tofu_ngdiff", "optim.lr"], "not of the form key=value"),
        (["finetune", "model=tiny_llama", "model_path=x"], "exactly one of `model`"),
    ],
)
def test_config_errors_exit_2_and_name_the_problem(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_missing_model_path_and_split_are_named(tmp_path, capsys):
    from ngdiff_jax.data.synthetic import write_benchmark

    bench = write_benchmark(tmp_path / "bench", n_authors=4, questions_per_author=2, seed=0)
    missing = tmp_path / "no_model_here"
    rc = main(["unlearn", "--config", "synthetic_ngdiff", f"model_path={missing}", f"data.source={bench}",
               f"run.output_dir={tmp_path / 'out'}"])  # fmt: skip
    assert rc == 2  # found by the validation before any work, which writes nothing
    err = capsys.readouterr().err
    assert "model_path" in err and str(missing) in err
    assert not (tmp_path / "out").exists()

    rc = main(["finetune", "--config", "synthetic_finetune", f"data.source={bench}", "data.split=forget42",
               f"run.output_dir={tmp_path / 'out2'}"])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "forget42" in err and "looked for" in err

    rc = main(["finetune", "--config", "synthetic_finetune", f"data.source={tmp_path / 'nodata'}",
               f"run.output_dir={tmp_path / 'out3'}"])  # fmt: skip
    assert rc == 2
    assert "nodata" in capsys.readouterr().err


@pytest.mark.slow
def test_console_runs_torch_free_commands_without_torch(tmp_path):
    """`ngdiff eval/unlearn/...` processes never import torch (transformers would, for its config
    classes: ~1.2 s and ~250 MB resident); loading a model and its config still works, without
    transformers' "PyTorch was not found" advice. `bench`, an importer of torch already, and
    NGDIFF_IMPORT_TORCH=1 keep torch."""
    import os
    import subprocess
    import sys

    pytest.importorskip("torch")
    from ngdiff_jax.models.testing import tiny_hf_model

    tiny_hf_model("llama", tmp_path / "hf")
    # each argument but the last: one command line for `hide_torch`, `NGDIFF_IMPORT_TORCH=1` set
    # before it when it starts with that; calls that keep torch return at once, changing nothing,
    # so one process checks two command lines (two processes in all, not four)
    child = (
        "import os, sys\n"
        "from ngdiff_jax.cli import hide_torch\n"
        "hidden = []\n"
        "for line in sys.argv[1:-1]:\n"
        "    argv = line.split()\n"
        "    if argv[0] == 'NGDIFF_IMPORT_TORCH=1':\n"
        "        os.environ['NGDIFF_IMPORT_TORCH'] = '1'\n"
        "        argv = argv[1:]\n"
        "    hidden.append(hide_torch(argv))\n"
        "from ngdiff_jax import models\n"
        "m = models.from_pretrained(sys.argv[-1])\n"
        "import transformers, datasets, scipy.stats\n"
        "transformers.AutoConfig.from_pretrained(sys.argv[-1])\n"
        "datasets.Dataset.from_dict({'a': [1, 2]}).with_format('numpy')[0]\n"
        "scipy.stats.ks_2samp([0.1, 0.5, 0.9], [0.2, 0.3])\n"
        "print(*hidden, sys.modules.get('torch') is not None, m.config.num_layers)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NGDIFF_IMPORT_TORCH"}

    def run(*lines):
        p = subprocess.run([sys.executable, "-c", child, *lines, str(tmp_path / "hf")], capture_output=True,
                           text=True, env=env, timeout=300)  # fmt: skip
        assert p.returncode == 0, p.stderr[-2000:]
        return p.stdout.split(), p.stderr

    out, err = run("eval --benchmark tofu", "--debug unlearn")
    assert out[:3] == ["True", "True", "False"] and "PyTorch was not found" not in err
    assert run("bench", "NGDIFF_IMPORT_TORCH=1 eval")[0][:3] == ["False", "False", "True"]


@pytest.mark.slow
def test_persistent_compilation_cache(tmp_path):
    """The console script turns jax's persistent compilation cache on (NGDIFF_COMPILATION_CACHE:
    a folder, or 0/off); compiled programs land there and a second process reuses them with the
    same result; an unusable folder is a warning, not a failure; JAX_COMPILATION_CACHE_DIR wins."""
    import os
    import subprocess
    import sys

    child = (
        "import sys\n"
        "from pathlib import Path\n"
        "from ngdiff_jax import compilation_cache as cc\n"
        "p = cc.enable()\n"
        "import jax\n"
        "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
        "y = float(jax.jit(lambda x: x * 2.0 + 1.0)(1.5))\n"
        "print(p, y, len([f for f in Path(p).iterdir()]) if p else -1)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("NGDIFF_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR")}

    def run(setting=None, **extra):
        e = dict(env, **extra)
        if setting is not None:
            e["NGDIFF_COMPILATION_CACHE"] = setting
        p = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=e, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        return p.stdout.split(), p.stderr

    cache = tmp_path / "xla"
    (path, y, n), _ = run(str(cache))
    assert path == str(cache) and y == "4.0" and int(n) >= 1
    (path, y, n2), _ = run(str(cache))
    assert y == "4.0" and int(n2) == int(n)  # a hit: nothing new written
    assert run("0")[0] == ["None", "4.0", "-1"]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out, err = run(str(blocker / "sub"))
    assert out[0] == "None" and "compilation cache" in err and "NGDIFF_COMPILATION_CACHE" in err
    # a value that is no switch and no absolute path is refused, nothing is created in the working dir
    p = subprocess.run([sys.executable, "-m", "ngdiff_jax.cli", "report", "--help"], capture_output=True, text=True,
                       env=dict(env, NGDIFF_COMPILATION_CACHE="flase"), cwd=tmp_path, timeout=120)  # fmt: skip
    assert p.returncode == 2 and "NGDIFF_COMPILATION_CACHE='flase'" in p.stderr and len(p.stderr.splitlines()) == 1
    assert not (tmp_path / "flase").exists()
    own = tmp_path / "jax-own"
    assert run(str(cache), JAX_COMPILATION_CACHE_DIR=str(own))[0][0] == str(own)
    # the console script itself: `ngdiff report --help` creates the default folder under XDG_CACHE_HOME
    p = subprocess.run([sys.executable, "-m", "ngdiff_jax.cli", "report", "--help"], capture_output=True, text=True,
                       env=dict(env, XDG_CACHE_HOME=str(tmp_path / "xdg")), timeout=120)  # fmt: skip
    assert p.returncode == 0 and (tmp_path / "xdg" / "ngdiff-jax" / "xla").is_dir()


@pytest.mark.slow
def test_thin_entry_points_run_as_the_console_script(tmp_path):
    """`python train/unlearn.py ...` is `ngdiff unlearn ...`: same config output, and the console
    script's checks (a bad NGDIFF_COMPILATION_CACHE is a one-line exit 2) apply to it too."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "train" / "unlearn.py"
    env = dict(os.environ, NGDIFF_COMPILATION_CACHE="0")
    p = subprocess.run([sys.executable, str(script), "--config", "tofu_ngdiff", "--print-config", "run.steps=7"],
                       capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    assert yaml.safe_load(p.stdout)["run"]["steps"] == 7
    bad = dict(env, NGDIFF_COMPILATION_CACHE="relative/dir")
    p = subprocess.run([sys.executable, str(script), "--config", "tofu_ngdiff", "--print-config"],
                       capture_output=True, text=True, env=bad, cwd=tmp_path, timeout=120)  # fmt: skip
    assert p.returncode == 2 and "NGDIFF_COMPILATION_CACHE='relative/dir'" in p.stderr
    assert not (tmp_path / "relative").exists()
