"""The library never imports the application: ops -> nn -> align -> integrations -> defense -> cli, arrows downward.

Parsed with ast (every import statement, also those inside functions), not grepped."""
import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "muscle_kernels"
# layer -> the layers it may not import (everything above it)
FORBIDDEN = {
    "ops": {"nn", "align", "integrations", "defense", "cli"},
    "nn": {"align", "integrations", "defense", "cli"},
    "align": {"integrations", "defense", "cli"},
    "integrations": {"defense", "cli"},
    "analysis": {"defense", "cli"},
}


def _imported_layers(path: pathlib.Path):
    """(line, top-level muscle_kernels subpackage) for every import in the file, relative imports resolved."""
    rel = path.relative_to(PKG.parent).with_suffix("")
    package = list(rel.parts[:-1])  # the package a relative import starts from (also for __init__.py)
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
                names = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "muscle_kernels" and len(parts) > 1:
                yield node.lineno, parts[1]


def _files(layer):
    target = PKG / layer
    return sorted(target.rglob("*.py")) if target.is_dir() else [PKG / f"{layer}.py"]


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_upward_imports(layer):
    bad = [f"{f.relative_to(PKG.parent)}:{line} imports muscle_kernels.{target}"
           for f in _files(layer) for line, target in _imported_layers(f) if target in FORBIDDEN[layer]]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_relative_and_nested_imports(tmp_path):
    # the parser resolves `from ..defense import x` inside a function of muscle_kernels/integrations/foo.py
    fake = PKG / "integrations" / "_layering_probe.py"
    fake.write_text("def f():\n    from ..defense.train import run_methods\n    from . import config\n")
    try:
        found = list(_imported_layers(fake))
    finally:
        fake.unlink()
    assert (2, "defense") in found and (3, "integrations") in found
