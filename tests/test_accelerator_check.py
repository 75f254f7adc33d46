"""A visible accelerator without JAX's plugin for it: the console script warns with the fix (issue 24)."""

from ngdiff_jax import accelerator_check as ac
from ngdiff_jax.cli import console


def test_visible_accelerator_reads_device_files_and_nvidia_smi():
    none = lambda p: False  # noqa: E731
    assert ac.visible_accelerator(exists=none, which=lambda c: None) is None
    assert ac.visible_accelerator(exists=lambda p: p == "/dev/nvidia0", which=lambda c: None) == "gpu"
    assert ac.visible_accelerator(exists=none, which=lambda c: "/usr/bin/nvidia-smi") == "gpu"
    assert ac.visible_accelerator(exists=lambda p: p == "/dev/accel0", which=lambda c: None) == "tpu"


def test_warning_names_the_fix_and_only_when_jax_would_fall_back_to_cpu():
    gpu, tpu = (lambda: "gpu"), (lambda: "tpu")
    line = ac.unused_accelerator_warning({}, visible=gpu, installed=lambda k: False)
    assert line.startswith("warning: an NVIDIA GPU is visible") and "'.[cuda13]'" in line
    assert "JAX_PLATFORMS=cpu" in line and "\n" not in line
    assert "'.[tpu]'" in ac.unused_accelerator_warning({}, visible=tpu, installed=lambda k: False)
    assert ac.unused_accelerator_warning({}, visible=gpu, installed=lambda k: True) is None  # the plugin is there
    assert ac.unused_accelerator_warning({"JAX_PLATFORMS": "cpu"}, visible=gpu, installed=lambda k: False) is None
    assert ac.unused_accelerator_warning({}, visible=lambda: None, installed=lambda k: False) is None
    assert ac.plugin_installed("gpu") in (True, False)  # reads importlib specs, imports nothing


def test_console_prints_it_before_a_computing_command(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(ac, "unused_accelerator_warning", lambda: "warning: an NVIDIA GPU is visible ...")
    monkeypatch.setenv("NGDIFF_COMPILATION_CACHE", "0")
    rc = console(["eval", "--benchmark", "tofu", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("warning: an NVIDIA GPU is visible")
    console(["plan", "--method", "nope"])  # plan compiles on CPU on purpose: no warning
    assert "warning: an NVIDIA GPU" not in capsys.readouterr().err
