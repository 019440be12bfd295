"""What is installed and which backend each op will use, and why: `python -m muscle_kernels.info`, or
`muscle_kernels.info()` (returns the text too). The first thing to paste into a bug report.

It compiles nothing: the gradient-alignment kernels are loaded if the wheel or the JIT cache has them, and otherwise
reported as "not built yet" (the first op call builds them).
"""

from __future__ import annotations

import os
import platform
import sys
import types

__all__ = ["info", "report_lines"]


def _grad_align_lines(devices: list[str]) -> list[str]:
    from .ops.grad_align import extension

    lines = []
    try:
        state = extension.ExtensionInfo(**extension.extension_info("cached"))  # loads what exists, builds nothing
    except ValueError as exc:  # a bad environment switch
        return [f"  grad_align: configuration error: {exc}"]
    from ._env import forced_choice
    from .ops.grad_align.function import BACKENDS

    try:  # the op's own parser: a value it would refuse is shown as the error it gives, not as "(forced)"
        forced = forced_choice("MUSCLE_KERNELS_GRAD_ALIGN_BACKEND", BACKENDS)
    except ValueError as exc:
        return [f"  grad_align: configuration error: {exc}"]
    if state.origin == "":
        lines.append(
            f"  grad_align extension: not built yet; the first call JIT-builds it into {state.cache or extension.cache_dir()}"
            " (or falls back to torch._foreach without a compiler)"
        )
    elif state.origin == "fallback":
        lines.append(f"  grad_align extension: not available: {state.reason}")
    else:
        for flavour, path in state.libraries.items():
            lines.append(f"  grad_align extension: {flavour} kernels from the {state.origins[flavour]}: {path}")
        if "cuda" not in state.kernels:
            lines.append(f"  grad_align extension: no CUDA kernels: {state.cuda_reason}")
    for device in devices:
        if forced:
            backend, why = forced, "forced by MUSCLE_KERNELS_GRAD_ALIGN_BACKEND"
        elif device in state.kernels:
            backend, why = "extension", f"compiled kernel ({state.origins.get(device, state.origin)})"
        elif state.origin == "":
            backend, why = "extension or foreach", "decided on the first call"
        else:
            backend = "foreach"
            why = (
                state.reason if state.origin == "fallback" else (state.cuda_reason if device == "cuda" else "no kernel")
            )
        lines.append(f"  align_gradients_ / grad_align_reduce / grad_align_apply_ on {device}: {backend} ({why})")
    return lines


def _lowrank_lines(devices: list[str]) -> list[str]:
    import torch

    from .ops.lowrank_linear.function import available_backends, resolve_backend

    lines = []
    for device in devices:
        try:
            chosen = resolve_backend("auto", torch.device(device))
        except ValueError as exc:
            chosen = f"configuration error: {exc}"
        lines.append(f"  muscle_lora_linear on {device}: {chosen} (available: {', '.join(available_backends(device))})")
    return lines


def report_lines() -> list[str]:
    import torch

    from . import __version__

    cuda = torch.version.cuda
    lines = [
        f"muscle_kernels {__version__} ({os.path.dirname(os.path.abspath(__file__))})",
        f"python {platform.python_version()} ({sys.executable}), {platform.system()} {platform.machine()}",
        f"torch {torch.__version__} ({'CUDA ' + cuda if cuda else 'CPU-only build'})",
    ]
    devices = ["cpu"]
    if cuda and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        major, minor = torch.cuda.get_device_capability(0)
        lines.append(f"GPU: {torch.cuda.device_count()} x {name} (sm_{major}{minor})")
        devices.append("cuda")
    else:
        lines.append("GPU: none visible")
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except Exception as exc:  # not installed (non-Linux) or broken
        lines.append(f"triton: not usable ({type(exc).__name__})")
    lines.append("ops:")
    lines += _grad_align_lines(devices)
    lines += _lowrank_lines(devices)
    return lines


def info(file=None) -> str:
    """Print (to `file`, default stdout) and return the report."""
    text = "\n".join(report_lines())
    print(text, file=file if file is not None else sys.stdout)
    return text


class _CallableModule(types.ModuleType):
    """`muscle_kernels.info()` must work whether `muscle_kernels.info` resolved to this function (the package's lazy
    attribute) or to this module (after `import muscle_kernels.info`, which sets the package attribute to it)."""

    def __call__(self, file=None) -> str:
        return info(file)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    info()
