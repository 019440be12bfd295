"""Packaging glue: the compiled kernels of a binary wheel, and the csrc/ sources every wheel carries.

Binary wheel (`pip wheel . --no-build-isolation`, `python -m build --wheel --no-isolation`, an sdist built the same
way, or an isolated build, for which tools/build_backend.py installs torch): when torch and a C++ compiler are
present at build time, the wheel gets
- muscle_kernels/_grad_align_cpu.abi3.so: the op schemas and the CPU kernels, always;
- muscle_kernels/_grad_align_cuda.abi3.so: the CUDA kernels, when torch is a CUDA build and a CUDA toolkit is found
  (CUDA_HOME; architectures from TORCH_CUDA_ARCH_LIST, default sm_80 + sm_90).
Both use only the LibTorch stable ABI (targeting torch 2.11) and no Python at all, so the wheel is tagged
cp310-abi3-<platform>: one wheel per platform and CUDA major version for every torch >= 2.11 and Python >= 3.10.

Pure wheel (`pip install -e .`, or a build without torch or a compiler, or MUSCLE_KERNELS_BINARY=0): nothing is
compiled here; the kernels are JIT-built from the carried sources on first use (muscle_kernels/ops/grad_align/
extension.py), or the torch._foreach fallback is used.

Switches at build time: MUSCLE_KERNELS_BINARY=0/1 (1: a failed compile fails the build; default: it warns and
leaves the JIT path), MUSCLE_KERNELS_BUILD_CUDA=0/1, TORCH_CUDA_ARCH_LIST, MUSCLE_KERNELS_CPU_ARCH (default: the
compiler's portable default). Everything else lives in pyproject.toml.
"""

import importlib.util
import os
import shutil
import sys
import warnings
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def _load_env():
    """muscle_kernels/_env.py on its own (importing the package would import torch)."""
    spec = importlib.util.spec_from_file_location("_muscle_kernels_env", ROOT / "muscle_kernels" / "_env.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ENV = _load_env()


class build_py_with_csrc(build_py):
    def run(self):
        super().run()
        dst = Path(self.build_lib) / "muscle_kernels" / "csrc"
        dst.mkdir(parents=True, exist_ok=True)
        for src in sorted(CSRC.glob("*")):
            if src.is_file():
                shutil.copy2(src, dst / src.name)


def _say(message):
    print(f"muscle_kernels setup: {message}", file=sys.stderr)


def _cpu_arch_flags():
    arch = os.environ.get("MUSCLE_KERNELS_CPU_ARCH", "none").strip()
    return [] if arch in ("", "none") else [f"-march={arch}"]


def binary_extensions():
    """The Extension objects of a binary wheel, or [] (and why) for a pure one."""
    forced = ENV.env_flag("MUSCLE_KERNELS_BINARY")
    if forced is False:
        return [], "MUSCLE_KERNELS_BINARY=0"
    if any(cmd in sys.argv for cmd in ("editable_wheel", "develop", "sdist")):
        return [], "an editable install or an sdist (the kernels are JIT-built on first use)"
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        if forced:
            raise
        return [], "torch is not importable at build time (build with --no-build-isolation to use the installed one)"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        if forced:
            raise RuntimeError("MUSCLE_KERNELS_BINARY=1 but no C++ compiler was found")
        return [], "no C++ compiler"
    common = ["-O3", ENV.TARGET_VERSION_DEFINE]
    exts = [
        cpp_extension.CppExtension(
            "muscle_kernels._grad_align_cpu",
            ["csrc/grad_align.cpp"],
            include_dirs=[str(CSRC)],
            extra_compile_args={"cxx": [*common, "-Wno-psabi", *_cpu_arch_flags()]},
            py_limited_api=True,
        )
    ]
    want_cuda = ENV.env_flag("MUSCLE_KERNELS_BUILD_CUDA")
    home = ENV.find_cuda_home([cpp_extension.CUDA_HOME]) if torch.version.cuda else None
    if want_cuda is not False and home is not None:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", ENV.DEFAULT_CUDA_ARCHS)
        cpp_extension.CUDA_HOME = home
        exts.append(
            cpp_extension.CUDAExtension(
                "muscle_kernels._grad_align_cuda",
                ["csrc/grad_align_cuda.cu"],
                include_dirs=[str(CSRC)],
                extra_compile_args={"cxx": [*common, "-DUSE_CUDA"], "nvcc": [*common, "-DUSE_CUDA", "-lineinfo"]},
                py_limited_api=True,
            )
        )
        _say(f"CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']} with {home}")
    elif want_cuda:
        raise RuntimeError(
            f"MUSCLE_KERNELS_BUILD_CUDA=1 but torch {torch.__version__} is "
            f"{'a CUDA build' if torch.version.cuda else 'CPU-only'} and CUDA_HOME={home}"
        )
    else:
        _say(
            "CPU kernels only ("
            + (
                "MUSCLE_KERNELS_BUILD_CUDA=0"
                if want_cuda is False
                else "torch is CPU-only"
                if not torch.version.cuda
                else "no CUDA toolkit"
            )
            + ")"
        )
    return exts, ""


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    strict = ENV.env_flag("MUSCLE_KERNELS_BINARY") is True

    class build_ext_optional(BuildExtension):
        """A library that fails to compile is left out with a warning (the JIT path remains), unless
        MUSCLE_KERNELS_BINARY=1."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                if strict:
                    raise
                warnings.warn(
                    f"muscle_kernels: {ext.name} did not compile ({exc}); the wheel will JIT-build it", stacklevel=2
                )

    return build_ext_optional


extensions, why_pure = binary_extensions()
cmdclass = {"build_py": build_py_with_csrc}
options = {}
if extensions:
    cmdclass["build_ext"] = build_ext_class()
    options["bdist_wheel"] = {"py_limited_api": "cp310"}
else:
    _say(f"pure-Python wheel: {why_pure}")

setup(cmdclass=cmdclass, ext_modules=extensions, options=options)
