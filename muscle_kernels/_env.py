"""Environment switches shared by the ops and the build (one parser, one error message), and the build defaults
that setup.py and the JIT build share. Imports nothing heavy: setup.py loads this file on its own, without torch.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Sequence

# The CUDA architectures a build targets unless TORCH_CUDA_ARCH_LIST says otherwise (the wheel, `python -m
# muscle_kernels.build --cuda`, and a JIT build without a visible GPU). sm_80 code runs on every 8.x GPU.
DEFAULT_CUDA_ARCHS = "8.0;9.0"

# The oldest torch whose stable ABI the compiled kernels target (TORCH_TARGET_VERSION): one binary loads into this
# release and every later one.
STABLE_ABI_TARGET = (2, 11)
# The compiler flag that says so (torch/csrc/stable/version.h: major << 56 | minor << 48).
TARGET_VERSION_DEFINE = f"-DTORCH_TARGET_VERSION=0x{STABLE_ABI_TARGET[0]:02x}{STABLE_ABI_TARGET[1]:02x}000000000000"

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def forced_choice(var: str, choices: Sequence[str]) -> str | None:
    """The value of environment variable `var` when it names one of `choices` other than "auto", else None.

    An unknown value is an error naming the variable: a typo must not silently fall back to the default.
    """
    forced = os.environ.get(var, "").strip()
    if not forced or forced == "auto":
        return None
    if forced not in choices:
        raise ValueError(f"{var}: expected one of {tuple(choices)}, got {forced!r}")
    return forced


def env_flag(var: str) -> bool | None:
    """A yes/no switch: True for 1/true/yes/on, False for 0/false/no/off, None when unset, empty or "auto".

    Anything else is an error naming the variable (MUSCLE_KERNELS_NO_EXTENSION=ture must not be ignored).
    """
    value = os.environ.get(var, "").strip().lower()
    if not value or value == "auto":
        return None
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{var}: expected 1/0 (or true/false, yes/no, on/off, auto), got {os.environ[var]!r}")


def env_seconds(var: str, default: float) -> float:
    """A non-negative number of seconds from `var` (default when unset); anything else is an error naming it."""
    value = os.environ.get(var, "").strip()
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise ValueError(f"{var}: expected a number of seconds >= 0, got {value!r}")
    return seconds


def usable_cuda_home(path: str | None) -> bool:
    """Whether `path` is a CUDA toolkit that can build and link: it has bin/nvcc and libcudart."""
    if not path:
        return False
    has_nvcc = os.path.exists(os.path.join(path, "bin", "nvcc"))
    has_cudart = any(glob.glob(os.path.join(path, lib, "libcudart.so*")) for lib in ("lib64", "lib"))
    return has_nvcc and has_cudart


def find_cuda_home(guesses: Iterable[str | None] = ()) -> str | None:
    """The first usable toolkit of CUDA_HOME, CUDA_PATH, `guesses` (e.g. torch's) and /usr/local/cuda.

    torch derives its CUDA_HOME from `which nvcc` when the variable is unset; with a wrapper such as
    /usr/local/bin/nvcc that gives /usr/local, where the link step then cannot find libcudart.
    """
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), *guesses, "/usr/local/cuda"):
        if usable_cuda_home(candidate):
            return candidate
    return None
