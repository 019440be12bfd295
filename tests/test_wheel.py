"""The wheels: a binary wheel built once from this checkout (CPU kernels, and CUDA kernels when a toolkit is here),
installed into clean virtual environments and used there from outside the source tree; an ABI audit of the shipped
libraries; the sdist building a working wheel. Catches missing package data (csrc sources, the demo corpus),
undeclared dependencies, and kernels that would only load into the torch they were built with.

Cost on 2 cores: the binary wheel (CPU + CUDA for sm_80/sm_90) ~45 s, the clean venv with torch 2.13 ~60 s, the
sdist's CPU-only wheel ~20 s, the full-dependency venv ~1-2 min.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
OTHER_TORCH = "2.13.0"  # a torch release other than the build's (CPU-only on the index here)
MAX_WHEEL_BYTES = 10 * 2**20

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

# Run in an environment with the wheel installed: the first align call, checked against the fp64 oracle.
ALIGN = r"""
import json, time
t0 = time.perf_counter()
import torch, muscle_kernels as mk
from muscle_kernels.ops.grad_align import paper_align_reference
t1 = time.perf_counter()
gen = torch.Generator().manual_seed(3)
g = [torch.randn(257, 9, generator=gen), torch.randn(70001, generator=gen).bfloat16(), torch.randn(5, generator=gen).double()]
r = [(0.4 * x.double() + 0.01 * torch.randn(x.shape, generator=gen, dtype=torch.float64)).to(x.dtype) for x in g]
want, want_stats = paper_align_reference(g, r, 0.2)
t2 = time.perf_counter()
stats = mk.align_gradients_(g, r, raw_ratio=0.2)
t3 = time.perf_counter()
for i, (w, x, tol) in enumerate(zip(want, g, (1e-5, 5e-2, 1e-6))):
    m = max(1.0, w.abs().max().item())
    assert torch.allclose(x.double() / m, w / m, atol=tol), f"grads[{i}] differs from the oracle"
assert torch.allclose(stats.double(), want_stats, rtol=1e-5, atol=1e-5), "stats differ from the oracle"
import sys
print("RESULT " + json.dumps(dict(info=mk.extension_info(), torch=torch.__version__, file=mk.__file__,
                                  import_s=t1 - t0, first_call_s=t3 - t2,
                                  cpp_extension="torch.utils.cpp_extension" in sys.modules)))
"""


def _result(proc) -> dict:
    assert proc.returncode == 0, f"failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(line[len("RESULT ") :])


def _build(args, outdir: Path, **env_extra) -> Path:
    env = dict(os.environ, **env_extra)
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(outdir), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, f"build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return outdir


def _cuda_toolkit() -> bool:
    from muscle_kernels.ops.grad_align import extension

    return torch.version.cuda is not None and extension.cuda_home() is not None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The binary wheel, built once per test session."""
    pytest.importorskip("build", reason="the 'build' package is not installed (pip install -e '.[test]' brings it)")
    out = _build(["--wheel", str(ROOT)], tmp_path_factory.mktemp("dist"))
    wheels = list(out.glob("muscle_kernels-*.whl"))
    assert len(wheels) == 1, f"expected one wheel, got {wheels}"
    return wheels[0]


@pytest.fixture(scope="module")
def unpacked(wheel, tmp_path_factory):
    folder = tmp_path_factory.mktemp("unpacked")
    zipfile.ZipFile(wheel).extractall(folder)
    return folder


def _libraries(names):
    return sorted(n for n in names if re.fullmatch(r"muscle_kernels/_grad_align_(cpu|cuda)\.abi3\.so", n))


def test_wheel_carries_kernels_sources_and_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert re.fullmatch(r"muscle_kernels-[\w.]+-cp310-abi3-linux_\w+\.whl", wheel.name), wheel.name
    libs = _libraries(names)
    want = ["muscle_kernels/_grad_align_cpu.abi3.so"] + (
        ["muscle_kernels/_grad_align_cuda.abi3.so"] if _cuda_toolkit() else []
    )
    assert libs == sorted(want), f"shipped libraries {libs}, expected {want}"
    csrc = [n for n in names if n.startswith("muscle_kernels/csrc/")]
    assert any(n.endswith(".cpp") for n in csrc), f"no C++ sources in the wheel: {csrc}"
    assert any(n.endswith(".cu") for n in csrc), f"no CUDA sources in the wheel: {csrc}"
    assert "muscle_kernels/defense/data/reviews.csv" in names
    assert not any(n.startswith("tests/") or n.startswith("benchmarks/") for n in names)
    assert any(n.endswith("entry_points.txt") for n in names), "no console script entry point"
    size = wheel.stat().st_size
    assert size < MAX_WHEEL_BYTES, f"the wheel is {size / 2**20:.1f} MB (goal: under 10 MB)"


# What a stable-ABI library may link against: libtorch's C shims live in these; no Python.
_ALLOWED_NEEDED = re.compile(r"lib(c10|torch|torch_cpu|torch_cuda|cudart|stdc\+\+|gcc_s|c|m|pthread|dl|rt)\.so[.\d]*")


def test_shipped_libraries_use_only_the_stable_abi(wheel, unpacked):
    if shutil.which("nm") is None or shutil.which("readelf") is None:
        pytest.skip("binutils (nm, readelf) are not installed")
    libs = _libraries(zipfile.ZipFile(wheel).namelist())
    for lib in libs:
        path = unpacked / lib
        dynamic = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=True).stdout
        needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic)
        assert needed and all(_ALLOWED_NEEDED.fullmatch(n) for n in needed), f"{lib} needs {needed}"
        assert "libtorch_python" not in dynamic and "libpython" not in dynamic, f"{lib} links Python"
        if lib.endswith("_cpu.abi3.so"):
            assert not any("cuda" in n for n in needed), f"the CPU library must load without CUDA: {needed}"
        symbols = {}
        for flag in ("-D", "-DC"):  # raw and demangled names, same order
            out = subprocess.run(
                ["nm", flag, "--undefined-only", str(path)], capture_output=True, text=True, check=True
            ).stdout
            symbols[flag] = [line.split(maxsplit=1)[1] for line in out.splitlines() if line.strip()]
        unstable = [d for d in symbols["-DC"] if re.search(r"\b(c10|at|torch|caffe2)::", d)]
        assert not unstable, f"{lib} references C++ symbols of libtorch (not the stable ABI): {unstable[:20]}"
        shims = [s for s in symbols["-D"] if s.startswith(("aoti_torch_", "torch_"))]
        assert shims, f"{lib} uses no stable-ABI entry point at all?"


def test_torch_abi_audit_says_stable(unpacked):
    """The audit tool made for this (torch-abi-audit, in the test extra): the libraries are stable-ABI only and need
    torch 2.11 at least."""
    exe = shutil.which("torch-abi-audit") or str(Path(sys.executable).parent / "torch-abi-audit")
    if not os.path.exists(exe):
        pytest.skip("torch-abi-audit is not installed (pip install -e '.[test]' brings it)")
    proc = subprocess.run(
        [exe, "--json", "--check", "torch", str(unpacked / "muscle_kernels")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    libs = {Path(lib["path"]).name: lib["torch"] for lib in report["bundled_libs"] + report["extensions"]}
    assert "_grad_align_cpu.abi3.so" in libs, report
    for name, verdict in libs.items():
        assert verdict["uses_torch"] and verdict["stable"] and not verdict["unstable_symbols"], (name, verdict)
        assert tuple(int(x) for x in verdict["min_torch_version"].split(".")[:2]) <= (2, 11), (name, verdict)


def test_wheel_loads_into_another_torch_without_a_compiler(wheel, tmp_path):
    """Clean venv, torch 2.13 (the wheel was built with this interpreter's torch), PATH without a compiler, an empty
    JIT cache: the packaged kernel is used (not a JIT build, not the fallback) and matches the fp64 oracle."""
    if torch.__version__.startswith(OTHER_TORCH):
        pytest.skip(f"the build torch already is {torch.__version__}")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    py = env_dir / "bin" / "python"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("MUSCLE_KERNELS_")
    }
    proc = subprocess.run(
        [str(py), "-m", "pip", "install", "--quiet", "--only-binary=:all:", f"torch=={OTHER_TORCH}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=900,
    )
    if proc.returncode != 0:
        pytest.skip(f"torch=={OTHER_TORCH} is not installable here: {proc.stderr.strip().splitlines()[-1:]}")
    proc = subprocess.run(
        [str(py), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    bare = {
        "HOME": str(tmp_path),
        "PATH": str(env_dir / "bin"),
        "LANG": "C.UTF-8",
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "empty-cache"),
        "CUDA_HOME": str(tmp_path / "no-cuda"),
    }
    assert shutil.which("c++", path=bare["PATH"]) is None and shutil.which("g++", path=bare["PATH"]) is None
    result = _result(
        subprocess.run(
            [str(py), "-W", "error::RuntimeWarning", "-c", ALIGN],
            capture_output=True,
            text=True,
            env=bare,
            cwd=tmp_path,
            timeout=300,
        )
    )
    info = result["info"]
    assert result["torch"].startswith(OTHER_TORCH), result
    assert info["origin"] == "wheel" and info["kernels"][0] == "cpu" and not info["built"], info
    assert info["libraries"]["cpu"].endswith("_grad_align_cpu.abi3.so"), info
    if "+cpu" in result["torch"]:
        assert "CPU-only" in info["cuda_reason"], info
    assert not (tmp_path / "empty-cache").exists(), "nothing may be built or cached"
    assert not result["cpp_extension"], "loading the packaged kernels must not import torch's build machinery"
    print(
        f"torch {result['torch']}: import {result['import_s']:.2f} s, first align call {result['first_call_s']:.3f} s"
    )


@pytest.mark.skipif(torch.version.cuda is None, reason="torch is a CPU-only build: the CUDA library cannot load")
def test_cuda_library_links_and_registers_cuda_kernels(wheel, unpacked):
    """Without a GPU: the shipped CUDA library loads into a CUDA torch after the CPU one and registers CUDA kernels
    for all three ops (a missing symbol or a schema mismatch fails here)."""
    if "muscle_kernels/_grad_align_cuda.abi3.so" not in zipfile.ZipFile(wheel).namelist():
        pytest.skip("no CUDA toolkit at build time: the wheel has no CUDA library")
    code = (
        "import sys, torch\n"
        f"torch.ops.load_library({str(unpacked / 'muscle_kernels/_grad_align_cpu.abi3.so')!r})\n"
        f"torch.ops.load_library({str(unpacked / 'muscle_kernels/_grad_align_cuda.abi3.so')!r})\n"
        "ops = ('grad_align_reduce', 'grad_align_apply', 'grad_align_fused')\n"
        "has = [torch._C._dispatch_has_kernel_for_dispatch_key('muscle_kernels::' + op, key) for op in ops "
        "for key in ('CPU', 'CUDA')]\n"
        "print('RESULT', all(has))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=unpacked)
    assert proc.returncode == 0 and "RESULT True" in proc.stdout, proc.stdout + proc.stderr[-3000:]


def test_wheel_installs_and_imports_in_a_clean_venv(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    py = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # Dependencies are resolved from the package index as a user's would be (torch comes from pip's cache or disk).
    proc = subprocess.run(
        [str(py), "-m", "pip", "install", "--quiet", str(wheel)], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, f"pip install of the wheel failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    proc = subprocess.run([str(py), "-c", SMOKE], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, f"import from the installed wheel failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert proc.stdout.startswith("ok"), proc.stdout
    exe = env_dir / "bin" / "muscle-lora"
    assert exe.exists(), "console script muscle-lora was not installed"


def test_sdist_carries_sources_and_builds_a_working_wheel(tmp_path):
    pytest.importorskip("build", reason="the 'build' package is not installed (pip install -e '.[test]' brings it)")
    _build(["--sdist", str(ROOT)], tmp_path)
    (sdist,) = tmp_path.glob("muscle_kernels-*.tar.gz")
    names = tarfile.open(sdist).getnames()
    for needed in (
        "csrc/grad_align.cpp",
        "csrc/grad_align_cuda.cu",
        "csrc/grad_align_checks.h",
        "pyproject.toml",
        "setup.py",
        "README.md",
        "muscle_kernels/_env.py",
        "tools/build_backend.py",
    ):
        assert any(n.endswith(needed) for n in names), f"{needed} is missing from the sdist"
    # The wheel from the sdist (CPU kernels only, to keep it cheap: the CUDA part is the same code as above).
    out = tmp_path / "from-sdist"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-build-isolation",
            "--no-deps",
            "--quiet",
            "-w",
            str(out),
            str(sdist),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=dict(os.environ, MUSCLE_KERNELS_BUILD_CUDA="0"),
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (built,) = out.glob("muscle_kernels-*.whl")
    assert _libraries(zipfile.ZipFile(built).namelist()) == ["muscle_kernels/_grad_align_cpu.abi3.so"], built
    site = tmp_path / "site"
    zipfile.ZipFile(built).extractall(site)
    env = dict(os.environ, PYTHONPATH=str(site), TORCH_EXTENSIONS_DIR=str(tmp_path / "empty-cache"))
    result = _result(
        subprocess.run(
            [sys.executable, "-c", ALIGN], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
        )
    )
    assert result["file"].startswith(str(site)), result
    assert result["info"]["origin"] == "wheel" and not result["info"]["built"], result["info"]


def test_editable_build_compiles_nothing(tmp_path):
    """`pip install -e .` keeps the source-install behaviour: a pure editable wheel, JIT on first use."""
    code = f"import sys; from setuptools import build_meta as b; print('WHEEL', b.build_editable({str(tmp_path)!r}))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    name = [x for x in proc.stdout.splitlines() if x.startswith("WHEEL ")][0].split()[1]
    names = zipfile.ZipFile(tmp_path / name).namelist()
    assert not [n for n in names if n.endswith(".so")], names
    assert "pure-Python wheel: an editable install" in proc.stderr, proc.stderr[-2000:]


def test_build_backend_needs_torch_only_for_a_binary_wheel():
    """An isolated `pip wheel .` / `python -m build` installs torch for the compile; editable installs and the sdist
    do not (CI's `pip install -e .` stays light); MUSCLE_KERNELS_BINARY=0 asks for no torch at all."""
    code = (
        "import sys; sys.path.insert(0, 'tools'); import build_backend as b; "
        "print('RESULT', b.get_requires_for_build_wheel(), b.get_requires_for_build_editable(), "
        "b.get_requires_for_build_sdist())"
    )
    for binary, wheel_requires in ((None, "['torch>=2.11']"), ("0", "[]")):
        env = {k: v for k, v in os.environ.items() if k != "MUSCLE_KERNELS_BINARY"}
        if binary is not None:
            env["MUSCLE_KERNELS_BINARY"] = binary
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        assert line == f"RESULT {wheel_requires} [] []", line
