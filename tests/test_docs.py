"""The documentation builds in strict mode: a broken page link, nav entry or API reference fails here (and in CI)."""

import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("mkdocs", reason="the docs need the `docs` extra (mkdocs, mkdocstrings[python])")
pytest.importorskip("mkdocstrings", reason="the docs need the `docs` extra (mkdocs, mkdocstrings[python])")

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow  # a whole mkdocs build
def test_docs_build_strictly(tmp_path):
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    for page in (
        "index.html",
        "layer/index.html",
        "alignment/index.html",
        "architecture/index.html",
        "api/alignment/index.html",
    ):
        assert (site / page).is_file(), f"{page} was not built"
    assert "GateConfig" in (site / "api/alignment/index.html").read_text(), "the API pages must render docstrings"


def test_docs_point_into_the_repository():
    """The package's docstrings and the README point at docs/, not at a file outside the repository."""
    import re

    sources = [ROOT / "README.md", *sorted((ROOT / "muscle_kernels").rglob("*.py")), *sorted((ROOT / "csrc").glob("*"))]
    offenders = [str(p.relative_to(ROOT)) for p in sources if re.search(r"\bSPEC\b", p.read_text())]
    assert not offenders, f"these still point at SPEC (outside the repository), not at docs/: {offenders}"
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in sorted((ROOT / "docs").rglob("*.md")):
        rel = page.relative_to(ROOT / "docs").as_posix()
        assert rel in nav, f"docs/{rel} is not in mkdocs.yml's nav"
