"""Building and loading the grad_align extension: sources found, no build at import, one warning and a correct
fallback when the compiler is broken, and (with a CUDA torch and nvcc) the CUDA part compiles, links and loads."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from muscle_kernels._env import DEFAULT_CUDA_ARCHS
from muscle_kernels.ops.grad_align import extension


def _run(code: str, env_extra: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_extra)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_sources_are_found():
    src = extension.source_dir()
    assert src is not None, "csrc/ not found next to the package or inside it"
    for name in ("grad_align.cpp", "grad_align_cuda.cu", "multi_tensor_apply.cuh", "grad_align_common.h"):
        assert (src / name).is_file(), f"{name} missing from {src}"


def test_extension_info_names_its_load_modes():
    with pytest.raises(ValueError, match=r"load: expected one of \('build', 'cached', 'none'\), got 'probe'"):
        extension.extension_info("probe")


def test_cpu_arch_flags(monkeypatch):
    monkeypatch.setenv("MUSCLE_KERNELS_CPU_ARCH", "none")
    assert extension.cpu_arch_flags() == []
    monkeypatch.setenv("MUSCLE_KERNELS_CPU_ARCH", "x86-64-v3")
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert extension.cpu_arch_flags() == ["-march=x86-64-v3"]


def test_broken_compiler_warns_once_and_falls_back(tmp_path):
    """Import never builds; the first call tries, warns once, and the fallback gives the right answer."""
    out = _run(
        """
        import warnings
        import torch
        import muscle_kernels
        from muscle_kernels.ops.grad_align import extension, paper_align_reference
        assert extension.extension_info("none")["origin"] == "", "loaded at import"
        assert extension.extension_info("cached")["origin"] == "", "nothing cached: undecided, and nothing compiled"
        g = [torch.randn(40, 3), torch.randn(17).bfloat16()]
        r = [torch.randn(40, 3), torch.randn(17).bfloat16()]
        want, _ = paper_align_reference(g, r, 0.1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            muscle_kernels.align_gradients_(g, r, raw_ratio=0.1)
            muscle_kernels.align_gradients_([x.clone() for x in g], r, raw_ratio=0.1)
        ours = [w for w in caught if "gradient-alignment extension" in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in caught]
        assert issubclass(ours[0].category, RuntimeWarning)
        assert "torch._foreach fallback" in str(ours[0].message)
        assert muscle_kernels.extension_info()["origin"] == "fallback"
        assert torch.allclose(g[0].double(), want[0], atol=1e-5), "fallback result is wrong"
        assert torch.allclose(g[1].double(), want[1], atol=5e-2), "fallback result is wrong (bf16)"
        print("OK")
    """,
        {
            "CXX": "/bin/false",
            "TORCH_EXTENSIONS_DIR": str(tmp_path),
            "MUSCLE_KERNELS_BUILD_CUDA": "0",
            "MUSCLE_KERNELS_NO_EXTENSION": "0",
            "MUSCLE_KERNELS_GRAD_ALIGN_BACKEND": "auto",
        },
    )
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr


def test_no_extension_env_skips_the_build_silently(tmp_path):
    out = _run(
        """
        import warnings
        warnings.simplefilter("error")
        import torch, muscle_kernels
        from muscle_kernels.ops.grad_align import extension
        muscle_kernels.align_gradients_([torch.randn(5)], [torch.randn(5)])
        info = extension.extension_info()
        assert info["origin"] == "fallback" and info["reason"].startswith("disabled"), info
        print("OK")
    """,
        {"MUSCLE_KERNELS_NO_EXTENSION": "1", "TORCH_EXTENSIONS_DIR": str(tmp_path)},
    )
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr
    assert not any(tmp_path.iterdir()), "nothing may be built when MUSCLE_KERNELS_NO_EXTENSION=1"


@pytest.mark.slow
@pytest.mark.skipif(torch.version.cuda is None, reason="torch is a CPU-only build: it cannot link a CUDA extension")
@pytest.mark.skipif(extension.cuda_home() is None, reason="no CUDA toolkit (nvcc) found: set CUDA_HOME")
def test_cuda_part_compiles_links_and_loads():
    """CI proof that csrc/grad_align_cuda.cu builds for sm_80 and sm_90, in a separate process and under its own
    build name (muscle_kernels_grad_align_cuda), so it neither clashes with the CPU-only build loaded here nor
    needs a GPU. Cached in TORCH_EXTENSIONS_DIR: about 90 s on 2 idle cores the first time, about 1 s after."""
    env = {
        "MUSCLE_KERNELS_BUILD_CUDA": "1",
        "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS),
        "CUDA_HOME": extension.cuda_home(),
    }
    out = subprocess.run(
        [sys.executable, "-m", "muscle_kernels.build", "--cuda"],
        env=dict(os.environ, **env),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "library: cuda: " in out.stdout and "kernels: cpu, cuda" in out.stdout, out.stdout


def test_multi_tensor_launch_layout(tmp_path):
    """The CUDA launcher's host logic, on the CPU: every (tensor, chunk) gets one block, launches respect the
    kernel-parameter limits, and block order gives each tensor a contiguous range of partial slots (the layout the
    reduce and finish kernels rely on). >64 tensors, hundreds of tiny ones, a 30M-element tensor split across
    launches, random mixes with empty tensors."""
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    root = Path(__file__).resolve().parents[1]
    exe = tmp_path / "mta_check"
    subprocess.run(
        [cxx, "-std=c++17", "-O1", f"-I{root / 'csrc'}", str(root / "tests" / "cpp" / "mta_check.cpp"), "-o", str(exe)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("OK"), out.stdout + out.stderr


def test_info_reports_versions_and_backends(tmp_path):
    """`muscle_kernels.info()` (and after `import muscle_kernels.info`, the same call) prints versions and, per op,
    the backend and why; it compiles nothing."""
    out = _run(
        """
        import io, muscle_kernels
        text = muscle_kernels.info(io.StringIO())
        import muscle_kernels.info
        again = muscle_kernels.info(io.StringIO())
        assert text == again
        print(text)
    """,
        {"TORCH_EXTENSIONS_DIR": str(tmp_path), "MUSCLE_KERNELS_BUILD_CUDA": "0"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"torch {torch.__version__}" in out.stdout and "muscle_kernels " in out.stdout, out.stdout
    assert "align_gradients_ / grad_align_reduce / grad_align_apply_ on cpu:" in out.stdout, out.stdout
    assert "not built yet" in out.stdout and "muscle_lora_linear on cpu:" in out.stdout, out.stdout
    assert not any(tmp_path.iterdir()), "info must not build anything"


def test_info_reports_a_bad_backend_switch(monkeypatch):
    from muscle_kernels.info import report_lines

    monkeypatch.setenv("MUSCLE_KERNELS_GRAD_ALIGN_BACKEND", "bogus")
    text = "\n".join(report_lines())
    assert "forced" not in text
    assert "grad_align: configuration error: MUSCLE_KERNELS_GRAD_ALIGN_BACKEND: expected one of" in text


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("MUSCLE_KERNELS_TORCH_211"),
    reason="set MUSCLE_KERNELS_TORCH_211 to a torch 2.11 wheel or package directory "
    "(pip download torch==2.11.0 --no-deps -d DIR, ~530 MB)",
)
def test_builds_against_torch_2_11_headers(tmp_path):
    """The GPU machine runs torch 2.11: the extension must compile against 2.11's own headers (not only against a
    newer torch with TORCH_TARGET_VERSION 2.11), link, and need no torch symbol that 2.11's libraries lack."""
    spec = os.environ["MUSCLE_KERNELS_TORCH_211"]
    cuda = shutil.which("nvcc") is not None or extension.cuda_home() is not None
    cmd = [
        sys.executable,
        str(Path(__file__).resolve().parents[1] / "tools" / "build_against_torch.py"),
        "--torch",
        spec,
        "--out",
        str(tmp_path),
    ] + (["--cuda"] if cuda else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("torch 2.11.")]
    assert len(lines) == (2 if cuda else 1), proc.stdout
    for line in lines:
        wanted = int(line.split("needs ")[1].split()[0])
        # the stable-ABI shims at least (a library that needed none would not have been built against torch at all)
        assert wanted > 20 and line.endswith("every one is exported by that torch"), line
