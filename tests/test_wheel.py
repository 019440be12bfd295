"""The wheel: built from this checkout, installed with its declared dependencies into a clean virtual environment,
and used there from outside the source tree. Catches missing package data (csrc sources, the demo corpus) and
undeclared dependencies, which an editable install hides.
"""
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

SMOKE = r"""
import os, sys
import torch, muscle_kernels as mk
from pathlib import Path
assert "site-packages" in mk.__file__, mk.__file__
csrc = Path(mk.__file__).parent / "csrc"
assert sorted(p.suffix for p in csrc.iterdir() if p.suffix in (".cpp", ".cu")), "no csrc sources in the wheel"
layer = mk.MuScleLoRALinear(16, 8, init="seed")
y = layer(torch.randn(3, 16))
y.sum().backward()
assert layer.lora_L.grad is not None
print("ok", mk.__version__, torch.__version__)
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    try:
        import build  # noqa: F401
    except ImportError:
        pytest.skip("the 'build' package is not installed (pip install -e '.[test]' brings it)")
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(ROOT)],
                   check=True, capture_output=True, text=True, cwd=ROOT)
    wheels = list(out.glob("muscle_kernels-*.whl"))
    assert len(wheels) == 1, f"expected one wheel, got {wheels}"
    return wheels[0]


def test_wheel_carries_sources_and_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    csrc = [n for n in names if n.startswith("muscle_kernels/csrc/")]
    assert any(n.endswith(".cpp") for n in csrc), f"no C++ sources in the wheel: {csrc}"
    assert any(n.endswith(".cu") for n in csrc), f"no CUDA sources in the wheel: {csrc}"
    assert not any(n.startswith("tests/") or n.startswith("benchmarks/") for n in names)
    entry = [n for n in names if n.endswith("entry_points.txt")]
    assert entry, "no console script entry point"


def test_wheel_installs_and_imports_in_a_clean_venv(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    py = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # Dependencies are resolved from the package index as a user's would be (torch comes from pip's cache or disk).
    proc = subprocess.run([str(py), "-m", "pip", "install", "--quiet", str(wheel)], capture_output=True, text=True,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, f"pip install of the wheel failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    proc = subprocess.run([str(py), "-c", SMOKE], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, f"import from the installed wheel failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert proc.stdout.startswith("ok"), proc.stdout
    exe = env_dir / "bin" / "muscle-lora"
    assert exe.exists(), "console script muscle-lora was not installed"


def test_sdist_carries_sources(tmp_path):
    pytest.importorskip("build", reason="the 'build' package is not installed (pip install -e '.[test]' brings it)")
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, text=True, cwd=ROOT)
    import tarfile

    (sdist,) = tmp_path.glob("muscle_kernels-*.tar.gz")
    names = tarfile.open(sdist).getnames()
    for needed in ("csrc/grad_align.cpp", "csrc/grad_align_cuda.cu", "pyproject.toml", "setup.py", "README.md"):
        assert any(n.endswith(needed) for n in names), f"{needed} is missing from the sdist"
