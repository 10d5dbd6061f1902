"""The layering of ssr_jax (docs/DESIGN.md "Layers"), checked statically.

Every `import` / `from ... import` in every module of the package is read
with `ast` (function-level imports included: a lazy import still makes a
cycle, it only hides it until run time). The module graph must be
acyclic, and the two loops (`train`, `evaluate`) may only be imported by
the entry layer.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "ssr_jax"
# Modules allowed to import the loops: the command line and the embedded
# default (a mode that trains then evaluates).
ENTRY = {"ssr_jax.main", "ssr_jax.embedded"}
LOOPS = {"ssr_jax.train", "ssr_jax.evaluate"}


def _modules(root: str) -> dict[str, str]:
    """{dotted module name: file path} of the package under `root`."""
    out = {}
    base = os.path.join(root, PACKAGE)
    for d, _, files in os.walk(base):
        for f in files:
            if not f.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(d, f), root)[:-3]
            parts = rel.split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = os.path.join(d, f)
    return out


def _resolve(name: str, modules: dict[str, str]) -> str | None:
    """The longest prefix of `name` that is a module of the package."""
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in modules:
            return cand
        parts.pop()
    return None


def import_graph(root: str = ROOT) -> dict[str, set[str]]:
    """{module: modules of the package it imports} (any nesting level)."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        is_pkg = path.endswith("__init__.py")
        package = mod if is_pkg else mod.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    src = ".".join(base + ([node.module] if node.module
                                           else []))
                else:
                    src = node.module or ""
                # `from pkg import sub` imports the submodule `pkg.sub`.
                names = [f"{src}.{a.name}" for a in node.names] + [src]
            for n in names:
                if n.split(".")[0] != PACKAGE:
                    continue
                target = _resolve(n, modules)
                if target is not None and target != mod:
                    deps.add(target)
        graph[mod] = deps
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_graph_sees_function_level_imports(tmp_path):
    pkg = tmp_path / PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from ssr_jax import b\n")
    (pkg / "b.py").write_text(
        "def f():\n    from ssr_jax import a  # lazy\n    return a\n")
    (pkg / "c.py").write_text("from . import a\nimport ssr_jax.b as bb\n")
    graph = import_graph(str(tmp_path))
    # `from ssr_jax import b` runs the package's __init__ too.
    assert graph["ssr_jax.a"] == {"ssr_jax", "ssr_jax.b"}
    assert graph["ssr_jax.b"] == {"ssr_jax", "ssr_jax.a"}
    assert graph["ssr_jax.c"] == {"ssr_jax", "ssr_jax.a", "ssr_jax.b"}
    assert find_cycles(graph) == [["ssr_jax.a", "ssr_jax.b"]]


def test_no_import_cycles():
    # No allow-list: the last known cycle, data.voc <-> data.tfds_source
    # (the data.source dispatch), went with the dataset seam
    # (ssr_jax/data_sources.py sits above both).
    cycles = find_cycles(import_graph())
    assert not cycles, (
        "import cycles in ssr_jax (move the shared code below both, e.g. "
        f"into ssr_jax/build.py): {cycles}")


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_only_the_entry_layer_imports_the_loops(loop):
    graph = import_graph()
    importers = sorted(m for m, deps in graph.items()
                       if loop in deps and m not in ENTRY)
    assert not importers, (
        f"{importers} import {loop}; only {sorted(ENTRY)} may (shared "
        "builders live in ssr_jax/build.py)")
