"""The examples in the public modules' docstrings run (``doctest``), so the documentation
cannot drift from the code. Kept to modules whose examples are fast (tiny arrays)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = (
    "ngdiff_jax",
    "ngdiff_jax.optim",
    "ngdiff_jax.optim.ngdiff",
    "ngdiff_jax.optim.gdiff",
    "ngdiff_jax.optim.mgda",
    "ngdiff_jax.optim.pcgrad",
    "ngdiff_jax.optim.gen",
    "ngdiff_jax.shifted",
    "ngdiff_jax.bits",
    "ngdiff_jax.optim.unlearning",
    "ngdiff_jax.optim.stats",
    "ngdiff_jax.backends.cpu.kernels",
    "ngdiff_jax.models.attention",
    "ngdiff_jax.backends",
    "ngdiff_jax.models.hf",
    "ngdiff_jax.models.stacked",
    "ngdiff_jax.models.pure",
    "ngdiff_jax.training.grad_accum",
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = finder.find(module, name)
    for t in tests:
        runner.run(t)
    failed, attempted = runner.summarize(verbose=False)
    assert failed == 0, f"{failed} of {attempted} doctest examples failed in {name} (run pytest -s to see them)"


def test_subpackages_are_attributes():
    import ngdiff_jax

    assert ngdiff_jax.training.make_unlearn_step is not None
    assert ngdiff_jax.parallel.__name__ == "ngdiff_jax.parallel"
    assert "models" in dir(ngdiff_jax)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ngdiff_jax.nope  # noqa: B018


def test_py_typed_is_shipped():
    from importlib.resources import files

    assert files("ngdiff_jax").joinpath("py.typed").is_file()


def test_docs_optim_examples():
    """docs/optim.md's examples (the composition rules) run as written."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "docs" / "optim.md"
    res = doctest.testfile(str(path), module_relative=False,
                           optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert res.failed == 0 and res.attempted > 20, res
