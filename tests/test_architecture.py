"""The package's import structure, counted and held (issue 25: a pure core under an application
layer, arrows only down). Each number below may only go down: a change that adds an import cycle,
an import of another module's private name or a function-local import fails here, with what it
added. The targets are 0 cycles and 0 private-name imports; function-local imports stay only for
deliberate lazy loading. Uses grimp (import-linter's import graph)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

grimp = pytest.importorskip("grimp")

PACKAGE = Path(__file__).resolve().parents[1] / "ngdiff_jax"

#: the import cycles that remain (each a strongly connected set of modules): none. The last one,
#: models.{lora, modeling, stacked}, went when LoRA became a submodule the model never imports by name
ALLOWED_CYCLES: list[set[str]] = []
MAX_PRIVATE_IMPORTS = 0
MAX_LOCAL_IMPORTS = 458


def _cycles(graph) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    mods = sorted(m for m in graph.modules if m.startswith("ngdiff_jax"))
    edges = {m: sorted(set(graph.find_modules_directly_imported_by(m)) & set(mods)) for m in mods}
    index, low, on, stack, out, counter = {}, {}, set(), [], [], 0
    for root in mods:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = counter
                counter += 1
                stack.append(v)
                on.add(v)
            if i < len(edges[v]):
                work.append((v, i + 1))
                w = edges[v][i]
                if w not in index:
                    work.append((w, 0))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(comp)
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
    return out


def _imports():
    """``(private-name imports, function-local imports)`` of the package, as ``file:line`` lists."""
    private, local = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        rel = path.relative_to(PACKAGE.parent)
        here = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        inside = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inside.update(id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ngdiff_jax") \
                    and node.module != here:  # fmt: skip
                private += [f"{rel}:{node.lineno} {node.module}.{a.name}" for a in node.names
                            if a.name.startswith("_") and not a.name.startswith("__")]  # fmt: skip
            if id(node) in inside:
                local.append(f"{rel}:{node.lineno}")
    return private, local


def test_no_new_import_cycles():
    cycles = _cycles(grimp.build_graph("ngdiff_jax", include_external_packages=False))
    new = [sorted(c) for c in cycles if not any(c <= allowed for allowed in ALLOWED_CYCLES)]
    assert not new, f"import cycles among {new}: make the arrows point one way (a lower module for what both need)"


def test_private_and_local_imports_only_go_down():
    private, local = _imports()
    assert len(private) <= MAX_PRIVATE_IMPORTS, (
        f"{len(private)} imports of another module's private names (at most {MAX_PRIVATE_IMPORTS}): {private}; "
        "make the name public where it is shared, or move it")
    assert len(local) <= MAX_LOCAL_IMPORTS, (
        f"{len(local)} function-local imports (at most {MAX_LOCAL_IMPORTS}): import at the top of the module "
        "unless the import is a deliberate lazy load")


def test_the_core_never_imports_the_application_layer():
    """import-linter's contract in pyproject.toml ([tool.importlinter]): no module of the core (models,
    optim, data, losses, evaluation, backends, population, the training step and loop, ...) imports,
    directly or through others, the application layer (CLI, commands, demo, sweep, bench, the run
    pipelines with their validation, ownership and model I/O). Run as its console command does (its
    report goes to a terminal console that pytest's capture would close)."""
    pytest.importorskip("importlinter")
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


def test_the_counter_finds_cycles():
    """The cycle finder itself, on a graph with a known cycle."""
    g = grimp.ImportGraph()
    for m in ("ngdiff_jax.a", "ngdiff_jax.b", "ngdiff_jax.c", "ngdiff_jax.d"):
        g.add_module(m)
    g.add_import(importer="ngdiff_jax.a", imported="ngdiff_jax.b")
    g.add_import(importer="ngdiff_jax.b", imported="ngdiff_jax.c")
    g.add_import(importer="ngdiff_jax.c", imported="ngdiff_jax.a")
    g.add_import(importer="ngdiff_jax.c", imported="ngdiff_jax.d")
    assert _cycles(g) == [{"ngdiff_jax.a", "ngdiff_jax.b", "ngdiff_jax.c"}]
