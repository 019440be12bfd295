"""Build and load the csrc/ extension (the `muscle_kernels::grad_align_*` ops) with torch.utils.cpp_extension.

The extension is compiled with ninja on first use into torch's extension cache (`TORCH_EXTENSIONS_DIR`, default
~/.cache/torch_extensions/<python>_<torch>); later processes find it there and load it in well under a second.
`python -m muscle_kernels.build` does the same ahead of time (for production images).

What gets built:
- always the CPU kernels (csrc/grad_align.cpp, with -O3, OpenMP and the CPU architecture flags below);
- the CUDA kernels too (csrc/grad_align_cuda.cu, sm_80 and sm_90 unless TORCH_CUDA_ARCH_LIST says otherwise) when
  torch is a CUDA build, nvcc is found (CUDA_HOME) and either a GPU is visible or TORCH_CUDA_ARCH_LIST is set
  (torch's build helper needs one or the other to pick architectures). MUSCLE_KERNELS_BUILD_CUDA=0/1 forces the choice.
  The two flavours have different build names, so a CPU-only build never shadows a CUDA one.

CPU architecture: `-march=native` by default (x86; `-mcpu=native` on ARM), because a JIT build runs on the machine
that uses it and the fused reduction is bandwidth-bound only once it is vectorised with the widest SIMD the machine
has. A production image built on one machine and run on another should set MUSCLE_KERNELS_CPU_ARCH to a portable
value (e.g. `x86-64-v3`, or `none` for the compiler's default); the value is part of the build hash.

Failure never propagates: without a compiler, without ninja, or when compilation fails, `load_extension()` emits one
RuntimeWarning naming the reason and returns None, and the ops fall back to torch._foreach (reference.py).
MUSCLE_KERNELS_NO_EXTENSION=1 skips the build silently; MUSCLE_KERNELS_VERBOSE_BUILD=1 shows the compiler output.
"""
from __future__ import annotations

import contextlib
import functools
import glob
import os
import platform
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

__all__ = ["load_extension", "extension_info", "source_dir", "want_cuda", "has_kernel", "ExtensionInfo", "OPS"]

OPS = ("grad_align_reduce", "grad_align_apply", "grad_align_fused")
_BASE_NAME = "muscle_kernels_grad_align"
_DEFAULT_ARCH_LIST = "8.0;9.0"


@dataclass
class ExtensionInfo:
    """What load_extension() did: loaded or not, from where, with which kernels, and why not."""

    loaded: bool = False
    name: str = ""
    path: str = ""
    cuda: bool = False
    seconds: float = 0.0
    error: str = ""
    sources: List[str] = field(default_factory=list)


_info = ExtensionInfo()
_lock = threading.Lock()


def _env_flag(name: str) -> Optional[bool]:
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return None


def source_dir() -> Optional[Path]:
    """Where the C++/CUDA sources are: the top-level csrc/ of a source checkout (editable install), else the copy
    that the wheel carries as muscle_kernels/csrc/ (setup.py puts it there)."""
    package = Path(__file__).resolve().parents[2]  # .../muscle_kernels
    checkout = package.parent
    candidates = []
    if (checkout / "pyproject.toml").exists():
        candidates.append(checkout / "csrc")
    candidates.append(package / "csrc")
    for folder in candidates:
        if (folder / "grad_align.cpp").is_file():
            return folder
    return None


def _usable_cuda_home(path: Optional[str]) -> bool:
    if not path:
        return False
    has_nvcc = os.path.exists(os.path.join(path, "bin", "nvcc"))
    has_cudart = any(glob.glob(os.path.join(path, lib, "libcudart.so*")) for lib in ("lib64", "lib"))
    return has_nvcc and has_cudart


def _cuda_home() -> Optional[str]:
    """The CUDA toolkit to build with: torch's guess when it has both nvcc and libcudart, else /usr/local/cuda.

    torch derives CUDA_HOME from `which nvcc` when the variable is unset; with a wrapper script such as
    /usr/local/bin/nvcc that gives /usr/local, where the link step then cannot find libcudart."""
    from torch.utils import cpp_extension

    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME,
                      "/usr/local/cuda"):
        if _usable_cuda_home(candidate):
            return candidate
    return None


def want_cuda() -> bool:
    """Whether the CUDA kernels should be built in this environment (see the module docstring)."""
    forced = _env_flag("MUSCLE_KERNELS_BUILD_CUDA")
    possible = torch.version.cuda is not None and _cuda_home() is not None
    if forced is not None:
        return forced and possible
    return possible and (torch.cuda.is_available() or bool(os.environ.get("TORCH_CUDA_ARCH_LIST")))


def _cpu_arch_flags() -> List[str]:
    arch = os.environ.get("MUSCLE_KERNELS_CPU_ARCH", "native").strip()
    if arch in ("", "none"):
        return []
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i686"):
        return [f"-march={arch}"]
    if machine in ("aarch64", "arm64"):
        return [f"-mcpu={arch}"]
    return []


def _nvidia_include_dirs() -> List[str]:
    """Headers of the pip CUDA packages (cuBLAS, cuSPARSE, ...): ATen's CUDA headers include them, and a toolkit
    installed without those libraries lacks them."""
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return []
    dirs = []
    for root in getattr(nvidia, "__path__", []):
        dirs += sorted(d for d in glob.glob(os.path.join(root, "*", "include")) if os.path.isdir(d))
    return dirs


def _arch_list() -> str:
    """sm_80 and sm_90 by default, plus the visible GPU's architecture when it is neither (e.g. 8.9, 10.0)."""
    archs = _DEFAULT_ARCH_LIST.split(";")
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        local = f"{major}.{minor}"
        if local not in archs and major not in (8,):  # sm_80 code runs on every 8.x GPU
            archs.append(local)
    return ";".join(archs)


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _restore(cpp_extension, home):
    try:
        yield
    finally:
        cpp_extension.CUDA_HOME = home


def build_name(cuda: bool) -> str:
    return f"{_BASE_NAME}_{'cuda' if cuda else 'cpu'}"


def _build(cuda: bool, verbose: bool) -> str:
    from torch.utils import cpp_extension

    src = source_dir()
    if src is None:
        raise FileNotFoundError("the csrc/ sources are neither in the checkout nor in the installed package")
    sources = [str(src / "grad_align.cpp")]
    if cuda:
        sources.append(str(src / "grad_align_cuda.cu"))
    _info.sources = sources
    cflags = ["-O3", "-fopenmp", *_cpu_arch_flags()]  # the C++ standard is torch's own default
    arch_env = os.environ.get("TORCH_CUDA_ARCH_LIST") or (_arch_list() if cuda else None)
    saved_home = cpp_extension.CUDA_HOME
    if cuda:
        cpp_extension.CUDA_HOME = _cuda_home()  # read by cpp_extension at build time (see _cuda_home)
    with _env(TORCH_CUDA_ARCH_LIST=arch_env if cuda else None), _restore(cpp_extension, saved_home):
        return cpp_extension.load(
            name=build_name(cuda),
            sources=sources,
            extra_cflags=cflags,
            extra_cuda_cflags=["-O3", "-lineinfo"],
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(src)] + (_nvidia_include_dirs() if cuda else []),
            with_cuda=cuda,
            is_python_module=False,
            verbose=verbose,
        )


def _register_fakes() -> None:
    """Shape-only kernels so that torch.compile / FakeTensor tracing sees through the ops."""

    @torch.library.register_fake("muscle_kernels::grad_align_reduce")
    def _reduce_fake(grads, refs):
        device = grads[0].device if len(grads) else torch.device("cpu")
        return torch.empty(len(grads), 3, dtype=torch.float32, device=device)

    @torch.library.register_fake("muscle_kernels::grad_align_apply")
    def _apply_fake(grads, refs, coeffs):
        return None

    @torch.library.register_fake("muscle_kernels::grad_align_fused")
    def _fused_fake(grads, refs, raw_ratio):
        device = grads[0].device if len(grads) else torch.device("cpu")
        return torch.empty(len(grads), 3, dtype=torch.float32, device=device)


def _dispatcher_has(op: str, key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"muscle_kernels::{op}", key)
    except RuntimeError:  # the operator is not defined at all
        return False


def _already_registered() -> bool:
    return _dispatcher_has("grad_align_reduce", "CPU")


def load_extension(*, cuda: Optional[bool] = None, verbose: Optional[bool] = None) -> Optional[ExtensionInfo]:
    """Build (first time) and load the extension; returns its ExtensionInfo, or None after one warning on failure.

    Idempotent and thread-safe: the first call decides, later calls return the same answer. `cuda=None` follows
    `want_cuda()`.
    """
    with _lock:
        if _info.loaded:
            return _info
        if _info.error:
            return None
        if _env_flag("MUSCLE_KERNELS_NO_EXTENSION"):
            _info.error = "disabled by MUSCLE_KERNELS_NO_EXTENSION=1"
            return None
        cuda = want_cuda() if cuda is None else cuda
        if verbose is None:
            verbose = bool(_env_flag("MUSCLE_KERNELS_VERBOSE_BUILD"))
        _info.cuda, _info.name = cuda, build_name(cuda)
        start = time.perf_counter()
        try:
            if _already_registered():
                # Another copy (e.g. loaded by hand) already defined the ops; loading a second would clash.
                _info.path = "<already registered>"
            else:
                _info.path = str(_build(cuda, verbose))
                _register_fakes()
        except Exception as exc:  # a missing compiler, ninja or header, a compile error: fall back, never raise
            first_line = (str(exc).strip().splitlines() or [""])[0][:300]
            _info.error = f"{type(exc).__name__}: {first_line}"
            warnings.warn(
                f"muscle_kernels: could not build the gradient-alignment extension ({_info.error}); using the slower "
                "torch._foreach fallback. Set MUSCLE_KERNELS_VERBOSE_BUILD=1 to see the compiler output, or "
                "MUSCLE_KERNELS_NO_EXTENSION=1 to skip the build.",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        _info.seconds = time.perf_counter() - start
        _info.loaded = True
        return _info


def extension_info() -> ExtensionInfo:
    """The state of the extension in this process (does not trigger a build)."""
    return _info


@functools.lru_cache(maxsize=None)
def _has_kernel_cached(op: str, key: str) -> bool:
    return _dispatcher_has(op, key)


def has_kernel(op: str, device_type: str) -> bool:
    """Whether `muscle_kernels::<op>` has a kernel for device_type ("cpu"/"cuda") -- asks the dispatcher."""
    if not _info.loaded:
        return False
    return _has_kernel_cached(op, device_type.upper())
