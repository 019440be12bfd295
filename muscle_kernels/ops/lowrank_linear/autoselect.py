"""What backend="auto" runs on CUDA: the faster of the fused Triton kernels and the cuBLAS-composed GEMMs.

Neither path wins everywhere: the fused kernels save the adapter's extra passes over x and dy, cuBLAS is the best
GEMM on most GPUs and shapes. So, like Triton's autotune, the first call of each problem class times both on the real
inputs (forward, plus backward when gradients are wanted) and remembers the faster one for the rest of the process.
Where the Triton backward reads dy in a pass of its own for G (n*r > 32 or dropout), a third candidate,
"triton-fdy", also computes dR in that pass (with atomics); where it computes dx (fp16/bf16, n*r up to 64), a fourth,
"triton-fdx", computes dR inside the dx GEMM (with atomics), so that no pass over dy is left for dR. Whether either
beats a separate read of dy is a property of the GPU, so they are timed like the others (never in deterministic
mode, where their atomics are off).

A problem class (the cache key) is (device, dtype, M bucket (next power of two), out, in, n*r, dropout on/off,
backward wanted). The choice is visible and can be forced:

- `auto_choices()` lists every decision made so far (key, time of each candidate, choice);
- MUSCLE_KERNELS_AUTO_VERBOSE=1 prints each decision to stderr when it is made;
- MUSCLE_KERNELS_BACKEND=cublas|triton|torch|reference forces what "auto" runs (function.py).

Under torch.compile tracing or CUDA-graph capture nothing can be timed: a class already decided keeps its choice, an
undecided one runs Triton (the choice made before this module existed), and is not cached.

Timing runs on the inputs' device (made current for it): CUDA events and synchronize act on the current device, so
with tensors on cuda:1 and cuda:0 current both candidates would otherwise be timed on the wrong device's stream.

A candidate that raises a Python exception (a Triton compile error, a launch refused for its resources) is out of the
race and the other one runs. A device-side fault (an illegal address, a trap) cannot be recovered from this way: it is
sticky, the process's CUDA context is unusable afterwards and every later CUDA call fails. So a CUDA error raised while
timing is not treated as "that candidate lost": it is raised, with the candidate's name.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
from collections.abc import Callable

import torch

__all__ = ["CANDIDATES", "auto_choices", "cached_choice", "clear_auto_choices", "choice_key", "decide", "cuda_timer"]

CANDIDATES = ("triton", "cublas")
# Ties within this fraction go to cuBLAS: the simpler path, with no compile or autotune cost in new processes.
_TIE = 0.02
_CHOICES: dict[tuple, str] = {}
_TIMES: dict[tuple, dict[str, float]] = {}
_KEY_FIELDS = ("device", "dtype", "m_bucket", "out_features", "in_features", "nr", "dropout", "backward")


def _m_bucket(m: int) -> int:
    b = 16
    while b < m and b < 16384:
        b *= 2
    return b


def choice_key(x2: torch.Tensor, weight: torch.Tensor, nr: int, dropout_p: float, backward: bool) -> tuple:
    return (
        str(x2.device),
        str(x2.dtype).replace("torch.", ""),
        _m_bucket(x2.shape[0]),
        int(weight.shape[0]),
        int(weight.shape[1]),
        int(nr),
        bool(dropout_p > 0.0),
        bool(backward),
    )


def cuda_timer(fn: Callable[[], object], reps: int = 10) -> float:
    """Median milliseconds of `fn` on the current CUDA stream, after one untimed call (compile and autotune)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _is_device_fault(exc: BaseException) -> bool:
    # torch >= 2.8 raises torch.AcceleratorError for CUDA runtime errors; older versions a RuntimeError naming it.
    accel = getattr(torch, "AcceleratorError", None)
    return (accel is not None and isinstance(exc, accel)) or "CUDA error" in str(exc)


def _on_device(device) -> contextlib.AbstractContextManager:
    """`device` made current while timing (events, synchronize and the launches all use the current device)."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.device(torch.device(device))
    return contextlib.nullcontext()


def decide(
    key: tuple,
    runners: dict[str, Callable[[], object]],
    timer: Callable[[Callable], float] | None = None,
    can_time: bool = True,
    device=None,
) -> str:
    """The cached choice for `key`, timing each of `runners` (name -> callable) with `timer` (default: cuda_timer)
    on first use, with `device` (the inputs' device) current.

    `runners` is only called when the key is new; a candidate that raises is out of the race (and named on stderr
    when verbose), except for a CUDA error: a device fault leaves the context unusable, so it is raised (module
    docstring). When nothing can be timed (`can_time` False) an undecided key gets "triton", uncached."""
    if key in _CHOICES:
        return _CHOICES[key]
    if not can_time:
        return "triton" if "triton" in runners else next(iter(runners))
    timer = timer or cuda_timer
    times: dict[str, float] = {}
    for name, run in runners.items():
        try:
            with _on_device(device):
                times[name] = float(timer(run))
        except Exception as exc:  # e.g. a Triton compile failure on an unusual GPU: the other path still runs
            if _is_device_fault(exc):
                raise RuntimeError(
                    f"backend='auto': candidate {name!r} hit a CUDA error while being timed on "
                    f"{dict(zip(_KEY_FIELDS, key))}; a device fault poisons the CUDA context, so no "
                    "other candidate can run in this process (MUSCLE_KERNELS_BACKEND=cublas rules "
                    "the Triton kernels out)"
                ) from exc
            _say(f"muscle_kernels auto: {name} failed on {key}: {type(exc).__name__}: {exc}")
    if not times:
        raise RuntimeError(f"backend='auto': every candidate failed for {dict(zip(_KEY_FIELDS, key))}")
    best = min(times.values())
    if "cublas" in times and times["cublas"] <= best * (1.0 + _TIE):
        choice = "cublas"
    else:
        choice = min(times, key=times.get)
    _CHOICES[key], _TIMES[key] = choice, times
    _say(
        f"muscle_kernels auto: {dict(zip(_KEY_FIELDS, key))} -> {choice} "
        f"({', '.join(f'{n} {t:.3f} ms' for n, t in times.items())})"
    )
    return choice


def _say(text: str) -> None:
    if os.environ.get("MUSCLE_KERNELS_AUTO_VERBOSE", "") not in ("", "0"):
        print(text, file=sys.stderr)


def cached_choice(key: tuple) -> str | None:
    """The choice made for `key` in this process, None while it is undecided (the next `decide` would time it)."""
    return _CHOICES.get(key)


def auto_choices() -> list[dict]:
    """Every decision of backend="auto" in this process: the key's fields, each candidate's ms and the choice."""
    return [
        dict(zip(_KEY_FIELDS, key), times_ms=dict(_TIMES.get(key, {})), choice=choice)
        for key, choice in _CHOICES.items()
    ]


def clear_auto_choices() -> None:
    """Forget every decision (the next call of each class times again)."""
    _CHOICES.clear()
    _TIMES.clear()


def runners_for(
    impls: dict[str, tuple[Callable, Callable]], args: tuple, backward: bool, needs: tuple[bool, bool, bool]
) -> dict[str, Callable[[], object]]:
    """One callable per candidate that runs its forward (and backward) on the real inputs `args`
    (x2, weight, bias, lora_L, lora_R, scales, dropout_p, seed)."""
    x2, weight, bias, lora_L, lora_R, scales, p, seed = args
    dy = None
    if backward:  # a private generator: timing must not move the user's random stream
        gen = torch.Generator(device=x2.device).manual_seed(0)
        dy = torch.randn(x2.shape[0], weight.shape[0], device=x2.device, generator=gen).to(x2.dtype)

    def make(fwd, bwd):
        def run():
            y, t, bits = fwd(x2, weight, bias, lora_L, lora_R, scales, p, seed)
            if backward:
                bwd(dy, x2, weight, lora_L, lora_R, scales, t, p, seed, *needs, bits)
            return y

        return run

    return {name: make(*fb) for name, fb in impls.items()}
