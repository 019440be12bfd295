"""The package's public surface: every advertised name resolves, and importing the package stays light."""

import subprocess
import sys

import muscle_kernels


def test_every_public_name_resolves():
    for name in muscle_kernels.__all__:
        assert getattr(muscle_kernels, name) is not None, name
    assert set(muscle_kernels._LAZY) <= set(dir(muscle_kernels))


def test_import_is_light_and_builds_nothing():
    code = (
        "import sys, muscle_kernels; "
        "heavy = [m for m in ('transformers', 'peft', 'muscle_kernels.ops.grad_align.extension') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"import muscle_kernels pulled in {out}"


def test_version_is_pyproject_s():
    # One source: pyproject.toml's version, read back from the install's metadata (a stale editable install, made
    # before the version changed, fails here until it is reinstalled).
    import pathlib
    import re

    pyproject = (pathlib.Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    want = re.search(r'^version = "([^"]+)"$', pyproject, re.M).group(1)
    assert muscle_kernels.__version__ == want, "reinstall (pip install -e .) after changing the version"
