"""The library never imports the application: ops -> nn -> align -> integrations -> defense -> cli, arrows downward.
And no two modules of the package import each other, directly or through others (an import cycle).

Parsed with ast (every import statement, also those inside functions and under TYPE_CHECKING), not grepped. The
checks only read the source tree: the probes of the checkers themselves parse files written under tmp_path, so the
tests work on a read-only checkout and in parallel workers."""

import ast
import pathlib
from collections.abc import Iterator

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "muscle_kernels"
# layer -> the layers it may not import (everything above it)
FORBIDDEN = {
    "ops": {"nn", "align", "integrations", "defense", "cli"},
    "nn": {"align", "integrations", "defense", "cli"},
    "align": {"integrations", "defense", "cli"},
    "integrations": {"defense", "cli"},
    "analysis": {"defense", "cli"},
    "defense": {"cli"},
}
# Import cycles that are allowed, each with the reason it is harmless: {frozenset of module names: reason}.
ALLOWED_CYCLES: dict[frozenset, str] = {}


def _imported_names(path: pathlib.Path, pkg: pathlib.Path = PKG) -> Iterator[tuple[int, str]]:
    """(line, absolute dotted name) for every import in the file, relative imports resolved; `from a import b` gives
    "a.b", whether b is a submodule or a name defined in a (the graph below tells the two apart)."""
    rel = path.relative_to(pkg.parent).with_suffix("")
    package = list(rel.parts[:-1])  # the package a relative import starts from (also for __init__.py)
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                yield node.lineno, f"{mod}.{a.name}"


def _imported_layers(path: pathlib.Path, pkg: pathlib.Path = PKG) -> Iterator[tuple[int, str]]:
    """(line, top-level muscle_kernels subpackage) for every import in the file, relative imports resolved."""
    seen = set()
    for line, name in _imported_names(path, pkg):
        parts = name.split(".")
        if parts[0] == pkg.name and len(parts) > 1 and (line, parts[1]) not in seen:
            seen.add((line, parts[1]))
            yield line, parts[1]


def _files(layer):
    target = PKG / layer
    return sorted(target.rglob("*.py")) if target.is_dir() else [PKG / f"{layer}.py"]


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_upward_imports(layer):
    bad = [
        f"{f.relative_to(PKG.parent)}:{line} imports muscle_kernels.{target}"
        for f in _files(layer)
        for line, target in _imported_layers(f)
        if target in FORBIDDEN[layer]
    ]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_relative_and_nested_imports(tmp_path):
    # the parser resolves `from ..defense import x` inside a function of muscle_kernels/integrations/foo.py
    pkg = tmp_path / "muscle_kernels"
    (pkg / "integrations").mkdir(parents=True)
    fake = pkg / "integrations" / "_layering_probe.py"
    fake.write_text("def f():\n    from ..defense.train import run_methods\n    from . import config\n")
    found = list(_imported_layers(fake, pkg))
    assert (2, "defense") in found and (3, "integrations") in found


# -- import cycles ---------------------------------------------------------------------------------------------------
def _module_name(path: pathlib.Path, pkg: pathlib.Path) -> str:
    parts = list(path.relative_to(pkg.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(pkg: pathlib.Path = PKG) -> dict[str, dict[str, int]]:
    """{module: {imported package module: line of the first such import}} over every .py file under `pkg`.

    An imported name resolves to the longest dotted prefix that is a module of the package (`from . import gate`
    -> the submodule gate; `from .gate import GateConfig` -> gate; `from .. import x` with x not a module -> the
    parent package's __init__). The parent packages that Python initialises on the way are not edges: an __init__
    that imports its submodules would otherwise close a cycle with every submodule."""
    files = {_module_name(f, pkg): f for f in sorted(pkg.rglob("*.py")) if "csrc" not in f.parts}
    graph: dict[str, dict[str, int]] = {}
    for mod, path in files.items():
        edges = graph.setdefault(mod, {})
        for line, name in _imported_names(path, pkg):
            parts = name.split(".")
            while parts and ".".join(parts) not in files:
                parts.pop()
            target = ".".join(parts)
            if target and target != mod:
                edges.setdefault(target, line)
    return graph


def import_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted: every one holds a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
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


def test_no_import_cycles():
    graph = import_graph()
    assert "muscle_kernels.align.aligner" in graph and graph["muscle_kernels.align.step"], "the graph is empty"
    bad = []
    for comp in import_cycles(graph):
        if frozenset(comp) in ALLOWED_CYCLES:
            continue
        edges = [f"  {a} -> {b} (line {graph[a][b]})" for a in comp for b in sorted(graph[a]) if b in comp]
        bad.append("import cycle among " + ", ".join(comp) + ":\n" + "\n".join(edges))
    assert not bad, "\n".join(bad) + "\n(break it, or add it to ALLOWED_CYCLES with the reason it is harmless)"


def test_the_cycle_checker_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "muscle_kernels"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import a\n")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import a\n    return a\n")
    (pkg / "c.py").write_text("import muscle_kernels.a\n")
    graph = import_graph(pkg)
    assert graph["muscle_kernels.sub.b"] == {"muscle_kernels.a": 2}
    assert graph["muscle_kernels.c"] == {"muscle_kernels.a": 1}
    assert import_cycles(graph) == [["muscle_kernels.a", "muscle_kernels.sub.b"]]
