"""Find, build and load the csrc/ kernels (the `muscle_kernels::grad_align_*` ops).

The kernels are two shared libraries on the LibTorch stable ABI: the CPU one (it also defines the op schemas) and the
CUDA one, loaded only under a CUDA build of torch, so the CPU part works under a CPU-only torch. For each of them the
first call that needs the ops tries, in this order:

1. "wheel": the library packaged inside the installed wheel (muscle_kernels/_grad_align_{cpu,cuda}.abi3.so);
2. "jit", cached: a library that an earlier process built into the extension cache (`TORCH_EXTENSIONS_DIR`, default
   torch's ~/.cache/torch_extensions/<python>_<cuda>), loaded without taking any lock, so a read-only cache works;
3. "jit", fresh: a build with torch.utils.cpp_extension (ninja and a C++ compiler; nvcc for CUDA) under a file lock
   in the cache, so that concurrent processes (ranks, test workers) build once and the others wait, then load it;
4. "fallback": the torch._foreach backend (foreach.py), with one RuntimeWarning that says why.

The JIT build can never hang a later process: the lock is an fcntl lock, which the kernel drops when its holder dies
(a SIGKILLed build leaves a lock file that nobody holds); each build runs in its own temporary directory and the
finished library is renamed into place, so a half-written library is never seen; and a waiter gives up after
MUSCLE_KERNELS_BUILD_TIMEOUT seconds (default 1800) and falls back with a warning naming the lock.

What a JIT build compiles:
- always the CPU kernels (csrc/grad_align.cpp, -O3 and the CPU architecture flags below);
- the CUDA kernels (csrc/grad_align_cuda.cu, TORCH_CUDA_ARCH_LIST or sm_80 + sm_90) when torch is a CUDA build, nvcc
  is found (CUDA_HOME) and either a GPU is visible or TORCH_CUDA_ARCH_LIST is set. MUSCLE_KERNELS_BUILD_CUDA=0/1
  forces the choice.

CPU architecture of a JIT build: `-march=native` by default (x86; `-mcpu=native` on ARM), because a JIT build runs on
the machine that uses it. An image built on one machine and run on another sets MUSCLE_KERNELS_CPU_ARCH to a portable
value (e.g. `x86-64-v3`, or `none` for the compiler's default); the value is part of the cache key. A wheel is built
with the compiler's default unless MUSCLE_KERNELS_CPU_ARCH is set at build time (setup.py).

Switches: MUSCLE_KERNELS_NO_EXTENSION=1 uses the fallback silently; MUSCLE_KERNELS_VERBOSE_BUILD=1 shows the
compiler output. `python -m muscle_kernels.build` builds ahead of time; `python -m muscle_kernels.info` says what
is in use.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..._env import DEFAULT_CUDA_ARCHS, TARGET_VERSION_DEFINE, env_flag, env_seconds, find_cuda_home

__all__ = [
    "load_extension",
    "extension_info",
    "source_dir",
    "want_cuda",
    "has_kernel",
    "cuda_home",
    "cuda_arch_list",
    "cache_dir",
    "jit_library_path",
    "packaged_library",
    "ExtensionInfo",
    "OPS",
    "FLAVOURS",
]

OPS = ("grad_align_reduce", "grad_align_apply", "grad_align_fused")
FLAVOURS = ("cpu", "cuda")
_PACKAGE = Path(__file__).resolve().parents[2]  # .../muscle_kernels
_SOURCES = {"cpu": ["grad_align.cpp"], "cuda": ["grad_align_cuda.cu"]}
_DEFAULT_TIMEOUT = 1800.0


@dataclass
class ExtensionInfo:
    """What load_extension() did (see `extension_info()` for the fields)."""

    origin: str = ""  # "wheel" | "jit" | "fallback"; "" before the first call
    reason: str = ""  # why the fallback (origin "fallback")
    kernels: list[str] = field(default_factory=list)  # devices with a compiled kernel: "cpu", "cuda"
    origins: dict[str, str] = field(default_factory=dict)  # per library: "wheel" | "jit"
    libraries: dict[str, str] = field(default_factory=dict)  # per library: the file loaded
    built: list[str] = field(default_factory=list)  # libraries this process compiled
    cuda_reason: str = ""  # why there is no CUDA kernel (when "cuda" is not in kernels)
    cache: str = ""
    seconds: float = 0.0

    @property
    def loaded(self) -> bool:
        return self.origin in ("wheel", "jit")

    @property
    def error(self) -> str:
        return self.reason if self.origin == "fallback" else ""


_info = ExtensionInfo()
_lock = threading.Lock()


# ---- where things are ----
def source_dir() -> Path | None:
    """Where the C++/CUDA sources are: the top-level csrc/ of a source checkout (editable install), else the copy
    that the wheel carries as muscle_kernels/csrc/ (setup.py puts it there)."""
    checkout = _PACKAGE.parent
    candidates = []
    if (checkout / "pyproject.toml").exists():
        candidates.append(checkout / "csrc")
    candidates.append(_PACKAGE / "csrc")
    for folder in candidates:
        if (folder / "grad_align.cpp").is_file():
            return folder
    return None


def packaged_library(flavour: str) -> Path | None:
    """The library a binary wheel ships for `flavour` ("cpu"/"cuda"), if any."""
    found = sorted(_PACKAGE.glob(f"_grad_align_{flavour}*.so"))
    return found[0] if found else None


def cache_dir() -> Path:
    """The folder of the JIT-built libraries: <TORCH_EXTENSIONS_DIR or torch's default>/muscle_kernels."""
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return Path(root) / "muscle_kernels"


def cuda_home() -> str | None:
    """The CUDA toolkit to build with (see _env.find_cuda_home), or None."""
    from torch.utils import cpp_extension

    return find_cuda_home([cpp_extension.CUDA_HOME])


def want_cuda() -> bool:
    """Whether a JIT build should compile the CUDA kernels in this environment (see the module docstring)."""
    forced = env_flag("MUSCLE_KERNELS_BUILD_CUDA")
    possible = torch.version.cuda is not None and cuda_home() is not None
    if forced is not None:
        return forced and possible
    return possible and (torch.cuda.is_available() or bool(os.environ.get("TORCH_CUDA_ARCH_LIST")))


def cuda_arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST, else sm_80 and sm_90 plus the visible GPU's architecture when it is not 8.x or 9.0."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    archs = DEFAULT_CUDA_ARCHS.split(";")
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        local = f"{major}.{minor}"
        if local not in archs and major != 8:  # sm_80 code runs on every 8.x GPU
            archs.append(local)
    return ";".join(archs)


def cpu_arch_flags() -> list[str]:
    arch = os.environ.get("MUSCLE_KERNELS_CPU_ARCH", "native").strip()
    if arch in ("", "none"):
        return []
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i686"):
        return [f"-march={arch}"]
    if machine in ("aarch64", "arm64"):
        return [f"-mcpu={arch}"]
    return []


# ---- the JIT build ----
def _flags(flavour: str) -> dict[str, list[str]]:
    common = [TARGET_VERSION_DEFINE]
    if flavour == "cpu":
        return {"cflags": ["-O3", "-Wno-psabi", *common, *cpu_arch_flags()], "cuda_cflags": []}
    return {
        "cflags": ["-O3", *common, "-DUSE_CUDA"],
        "cuda_cflags": ["-O3", "-lineinfo", *common, "-DUSE_CUDA"],
        "archs": [cuda_arch_list()],
    }


def _cache_key(flavour: str, src: Path) -> str:
    """Sources, flags, torch and Python: anything that changes the library changes its file name."""
    digest = hashlib.sha256()
    for path in sorted(src.iterdir()):
        if path.is_file() and path.suffix in (".cpp", ".cu", ".h", ".cuh"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update(
        repr(
            (flavour, _flags(flavour), torch.__version__, torch.version.cuda, sys.version_info[:2], platform.machine())
        ).encode()
    )
    return digest.hexdigest()[:16]


def _jit_path(flavour: str, src: Path) -> Path:
    return cache_dir() / f"grad_align_{flavour}-{_cache_key(flavour, src)}.so"


def jit_library_path(flavour: str) -> Path | None:
    """Where a JIT build of `flavour` ("cpu"/"cuda") lives in the cache for this environment (its lock file is the
    same path with the suffix .lock); None without sources."""
    src = source_dir()
    return None if src is None else _jit_path(flavour, src)


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
def build_lock(path: Path, timeout: float):
    """An exclusive fcntl lock on `path` (created), waited for at most `timeout` seconds (TimeoutError after).

    The kernel releases the lock when the holder exits, however it exits, so a lock file left by a killed build is
    free at once. The file holds the holder's pid, for whoever looks at a waiting process.
    """
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        start = time.monotonic()
        said = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - start
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                if waited >= timeout:
                    raise TimeoutError(
                        f"waited {timeout:g} s for the build lock {path} (held by pid {holder}); "
                        "set MUSCLE_KERNELS_BUILD_TIMEOUT to wait longer"
                    ) from None
                if not said and waited >= 10:  # never wait silently
                    logging.getLogger("muscle_kernels").warning(
                        "muscle_kernels: waiting for another process (pid %s) to finish building the gradient-alignment"
                        " kernels (lock %s; gives up after %g s)",
                        holder,
                        path,
                        timeout,
                    )
                    said = True
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # drops the lock


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the process that started it dies (even by SIGKILL); Linux only."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _run_in_own_group(*popenargs, input=None, capture_output=False, timeout=None, check=False, **kwargs):
    """subprocess.run for the JIT build's ninja, in a session of its own and stopped as a whole.

    subprocess.run kills only its direct child when it is interrupted (Ctrl-C, a timeout, an exception): ninja dies
    and the compilers it started keep running. Here ninja gets SIGTERM instead, on which it stops its compile jobs
    (each in a process group it signals) and exits; its process group is killed if it has not within 10 s. And
    ninja gets SIGTERM too when this process dies, even by SIGKILL (PR_SET_PDEATHSIG)."""
    import signal
    import subprocess

    if capture_output:
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    kwargs["start_new_session"] = True  # its own process group (pgid = its pid), out of reach of our terminal's ^C
    if sys.platform.startswith("linux") and "preexec_fn" not in kwargs:
        kwargs["preexec_fn"] = _die_with_parent
    with subprocess.Popen(*popenargs, **kwargs) as process:
        try:
            stdout, stderr = process.communicate(input, timeout=timeout)
        except BaseException:
            _stop_group(process, signal)
            raise
        code = process.poll()
    if check and code:
        raise subprocess.CalledProcessError(code, process.args, output=stdout, stderr=stderr)
    return subprocess.CompletedProcess(process.args, code, stdout, stderr)


def _stop_group(process, signal) -> None:
    import subprocess

    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            process.wait(timeout=wait)
            # ninja has exited; what is left in its group (a child that ignored SIGTERM) goes too
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        except subprocess.TimeoutExpired:
            continue
        return


class _GroupedSubprocess:
    """The `subprocess` module as cpp_extension sees it during our build: the same, but `run` is _run_in_own_group."""

    run = staticmethod(_run_in_own_group)

    def __getattr__(self, name):
        import subprocess

        return getattr(subprocess, name)


def _compile(flavour: str, src: Path, target: Path, verbose: bool) -> None:
    """Compile `flavour` into a fresh temporary folder next to `target`, then rename the library into place."""
    from torch.utils import cpp_extension

    flags = _flags(flavour)
    cuda = flavour == "cuda"
    work = Path(tempfile.mkdtemp(prefix=target.stem + ".build-", dir=target.parent))
    saved_home, saved_subprocess = cpp_extension.CUDA_HOME, cpp_extension.subprocess
    try:
        cpp_extension.subprocess = _GroupedSubprocess()  # ninja runs in its own group, stopped as a whole
        if cuda:
            cpp_extension.CUDA_HOME = cuda_home()  # read by cpp_extension at build time (see cuda_home)
        with _env(TORCH_CUDA_ARCH_LIST=flags["archs"][0] if cuda else None):
            built = cpp_extension.load(
                name=f"muscle_kernels_grad_align_{flavour}",
                sources=[str(src / name) for name in _SOURCES[flavour]],
                extra_cflags=flags["cflags"],
                extra_cuda_cflags=flags["cuda_cflags"],
                extra_include_paths=[str(src)],
                build_directory=str(work),
                with_cuda=cuda,
                is_python_module=False,
                verbose=verbose,
            )  # also loads the library into this process
        os.replace(built, target)
    finally:
        cpp_extension.CUDA_HOME, cpp_extension.subprocess = saved_home, saved_subprocess
        shutil.rmtree(work, ignore_errors=True)


def _clean_stale_builds(target: Path) -> None:
    """Remove the temporary folders of builds of `target` that died (only called while holding its lock)."""
    for stale in target.parent.glob(target.stem + ".build-*"):
        shutil.rmtree(stale, ignore_errors=True)


# ---- loading ----
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


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"


def _load_flavour(flavour: str, allow_build: bool, verbose: bool) -> tuple:
    """(origin, path) of the library for `flavour` now loaded, or raise with the reason it could not be."""
    reasons = []
    packaged = packaged_library(flavour)
    if packaged is not None:
        try:
            torch.ops.load_library(str(packaged))
            return "wheel", str(packaged)
        except Exception as exc:  # e.g. the CUDA library of a cu13 wheel under a cu12 torch
            reasons.append(f"the packaged {packaged.name} did not load ({_first_line(exc)})")
    src = source_dir()
    if src is None:
        raise FileNotFoundError(
            "; ".join(reasons + ["the csrc/ sources are neither in the checkout nor in the installed package"])
        )
    target = _jit_path(flavour, src)  # (torch.utils.cpp_extension is imported from here on only)
    _info.cache = str(target.parent)
    if target.is_file():  # a complete build: the rename makes it appear whole, so no lock is needed
        torch.ops.load_library(str(target))
        return "jit", str(target)
    if not allow_build:
        raise LookupError("; ".join(reasons + ["not built yet"]))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock_path = target.with_suffix(".lock")
        with build_lock(lock_path, env_seconds("MUSCLE_KERNELS_BUILD_TIMEOUT", _DEFAULT_TIMEOUT)):
            if target.is_file():  # another process built it while this one waited
                torch.ops.load_library(str(target))
                return "jit", str(target)
            _clean_stale_builds(target)
            _compile(flavour, src, target, verbose)
            _info.built.append(flavour)
            return "jit", str(target)
    except PermissionError as exc:
        raise PermissionError(
            f"the extension cache {target.parent} is not writable ({exc.strerror}); set "
            "TORCH_EXTENSIONS_DIR to a writable folder, or prebuild with "
            "`python -m muscle_kernels.build`"
        ) from None


def _wanted_flavours(cuda: bool | None) -> list[str]:
    if cuda is False or torch.version.cuda is None:
        return ["cpu"]
    if cuda is True:
        return ["cpu", "cuda"]
    # A packaged CUDA library is always worth loading under a CUDA torch; a JIT build only when want_cuda().
    return ["cpu", "cuda"] if packaged_library("cuda") is not None or want_cuda() else ["cpu"]


def _no_cuda_reason() -> str:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if cuda_home() is None:
        return "no CUDA library in the wheel and no CUDA toolkit (nvcc) to build one: set CUDA_HOME"
    return "no CUDA library in the wheel, and no GPU visible and TORCH_CUDA_ARCH_LIST unset, so none was built"


def load_extension(
    *, cuda: bool | None = None, verbose: bool | None = None, allow_build: bool = True
) -> ExtensionInfo | None:
    """Load the kernels (building them the first time); returns the ExtensionInfo, or None after one warning.

    Idempotent and thread-safe: the first call decides, later calls return the same answer. `cuda=None` follows the
    packaged libraries and `want_cuda()`; `allow_build=False` only loads what exists (wheel or cache).
    """
    with _lock:
        if _info.loaded:
            return _info
        if _info.origin == "fallback":
            return None
        if env_flag("MUSCLE_KERNELS_NO_EXTENSION"):
            _info.origin, _info.reason = "fallback", "disabled by MUSCLE_KERNELS_NO_EXTENSION=1"
            return None
        if verbose is None:
            verbose = bool(env_flag("MUSCLE_KERNELS_VERBOSE_BUILD"))
        start = time.perf_counter()
        flavours = _wanted_flavours(cuda)
        if "cuda" not in flavours:
            _info.cuda_reason = _no_cuda_reason()
        for flavour in flavours:
            if flavour in _info.origins:  # loaded by an earlier call (allow_build=False)
                continue
            if flavour == "cpu" and _dispatcher_has("grad_align_reduce", "CPU"):
                # Another copy (loaded by hand) already defined the ops; loading a second would clash.
                _info.origins["cpu"], _info.libraries["cpu"] = "jit", "<already registered>"
                continue
            try:
                _info.origins[flavour], _info.libraries[flavour] = _load_flavour(flavour, allow_build, verbose)
            except LookupError:  # not built yet, and allow_build=False: undecided, a later call may build
                return None
            except Exception as exc:  # a missing compiler, ninja or header, a compile error, a timeout
                if flavour == "cpu":
                    _info.origin, _info.reason = "fallback", _first_line(exc)
                    warnings.warn(
                        f"muscle_kernels: could not build or load the gradient-alignment extension ({_info.reason}); "
                        "using the slower torch._foreach fallback. Set MUSCLE_KERNELS_VERBOSE_BUILD=1 to see the "
                        "compiler output, or MUSCLE_KERNELS_NO_EXTENSION=1 to skip the build.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    return None
                _info.cuda_reason = _first_line(exc)
                warnings.warn(
                    f"muscle_kernels: the CUDA kernels of the gradient-alignment extension are not "
                    f"available ({_info.cuda_reason}); CUDA tensors use the torch._foreach fallback.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            if flavour == "cpu" and _info.libraries["cpu"] != "<already registered>":
                _register_fakes()
        _info.kernels = [key for key in FLAVOURS if _dispatcher_has("grad_align_fused", key.upper())]
        _info.origin = _info.origins["cpu"]
        _info.seconds = time.perf_counter() - start
        return _info


_LOADS = ("build", "cached", "none")


def extension_info(load: str = "build") -> dict:
    """Which gradient-alignment kernels this process uses: the one accessor of the extension's state.

    load: "build" (default) loads them first, building them if needed, as the first op call would; "cached" loads
    only what exists (the wheel's or the JIT cache's libraries) and compiles nothing; "none" loads nothing and
    reports the state as it stands (origin "" before anything loaded them).

    Keys: origin ("wheel" | "jit" | "fallback"), reason (why the fallback, else ""), kernels (devices with a compiled
    kernel), origins and libraries (per library "cpu"/"cuda": where it came from, the file), built (libraries this
    process compiled), cuda_reason (why no CUDA kernel), cache (the JIT cache folder), seconds (time to load/build).
    """
    if load not in _LOADS:
        raise ValueError(f"load: expected one of {_LOADS}, got {load!r}")
    if load != "none":
        load_extension(allow_build=load == "build")
    return asdict(_info)


def has_kernel(op: str, device_type: str) -> bool:
    """Whether `muscle_kernels::<op>` has a compiled kernel for device_type ("cpu"/"cuda")."""
    return _info.loaded and device_type in _info.kernels and op in OPS
