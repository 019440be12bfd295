"""Frequency analysis of a model's outputs over its inputs (docs/frequency.md), without the N x N matrix.

For N samples with input representations x_i and outputs f_i, a Gaussian filter of width sigma is
K_ij = softmax_j(-||x_i - x_j|| / (2 sigma)) (each row sums to 1). K f is the low-frequency part of f, f - K f the
high-frequency part. The paper tracks ||f_low|| / ||f_high|| (or the share of the low part) during training, for clean
and poisoned subsets and for the labels, over a range of sigma.

The paper's code materialises K (N x N); here rows are processed in chunks, so memory is O(chunk * N) and every sigma
reuses the same distance chunk: N = 50,000 samples fit where the dense matrix (10 GB in fp32) would not.

Backends (the `backend=` switch of `low_frequency_part` and `frequency_ratios`):
- "torch": the chunked path above; any device.
- "triton": one fused kernel (frequency_triton.py), flash-attention style: no [chunk, N] block either, every sigma
  in one pass over the distance tiles. Needs CUDA tensors (or TRITON_INTERPRET=1, how CI tests it on the CPU).
- "auto": triton for CUDA tensors when Triton works, torch otherwise (with one warning when CUDA tensors have to
  fall back because Triton is missing or broken).
`frequency_ratios_dense` materialises the N x N filter in fp64 like the paper's code: the test oracle.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import torch

from .._lazy import lazy_import, triton_interpreting

__all__ = ["low_frequency_part", "frequency_ratios", "frequency_ratios_dense", "BACKENDS", "resolve_backend"]

BACKENDS = ("auto", "torch", "triton")
# The Triton module, imported on first use (importing Triton costs seconds; most users of the CPU path never need it)
_TRITON = {"module": None, "tried": False, "error": None, "warned": False}


def _triton_module():
    return lazy_import(_TRITON, ".frequency_triton", __package__)


def _interpreting() -> bool:
    return triton_interpreting()


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs for tensors on `device`: "torch" or "triton" (errors name the argument)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "torch":
        return "torch"
    usable = (device.type == "cuda" or _interpreting()) and _triton_module() is not None
    if backend == "triton":
        if not usable:
            why = _TRITON["error"] or (
                f"tensors are on {device.type}; Triton needs CUDA tensors "
                "(or TRITON_INTERPRET=1 for the CPU interpreter)"
            )
            raise RuntimeError(f"backend='triton' is not available: {why}")
        return "triton"
    if device.type == "cuda":
        if usable:
            return "triton"
        if not _TRITON["warned"]:
            _TRITON["warned"] = True
            warnings.warn(
                f"frequency analysis: the Triton kernel is unavailable ({_TRITON['error']}); "
                "using the chunked torch path",
                RuntimeWarning,
                stacklevel=3,
            )
    return "torch"


def _check(x: torch.Tensor, f: torch.Tensor):
    if x.dim() != 2:
        raise ValueError(f"x: expected [N, d] input representations, got shape {tuple(x.shape)}")
    if f.dim() not in (1, 2) or f.shape[0] != x.shape[0]:
        raise ValueError(f"f: expected [N] or [N, c] outputs with N = {x.shape[0]}, got shape {tuple(f.shape)}")


def _sigmas(sigmas) -> list:
    try:
        values = [float(s) for s in sigmas]
    except (TypeError, ValueError):
        values = []
    if not values or any(not 0 < s < float("inf") for s in values):  # NaN fails the compare too
        raise ValueError(f"sigmas: expected positive finite widths, got {list(sigmas) if values else sigmas!r}")
    return values


def low_frequency_part(
    x: torch.Tensor, f: torch.Tensor, sigmas: Sequence[float], *, chunk: int = 1024, backend: str = "auto"
) -> torch.Tensor:
    """K_sigma f for every sigma: a tensor [len(sigmas), N, c] (c = 1 for 1-D f).

    torch backend: fp64 for fp64 x, fp32 otherwise, computed `chunk` rows at a time. triton backend: fp32 (fp64
    inputs are computed in fp32 too), `chunk` unused, no gradients ("auto" takes the torch path when x or f needs
    one). Low-precision inputs are upcast; accumulation is fp32 or better.
    """
    _check(x, f)
    sigmas = _sigmas(sigmas)
    if chunk < 1:
        raise ValueError(f"chunk: expected a positive row count, got {chunk}")
    if f.device != x.device:
        raise ValueError(f"f: expected a tensor on {x.device} like x, got one on {f.device}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got dtype {x.dtype}")
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or f.requires_grad)
    chosen = resolve_backend(backend, x.device)
    if needs_grad and chosen == "triton":
        if backend == "triton":
            raise RuntimeError(
                "backend='triton' computes no gradients: call it under torch.no_grad() or detach "
                "x and f, or use backend='torch'"
            )
        chosen = "torch"  # auto: the torch path differentiates
    if chosen == "triton":
        f2 = f if f.dim() == 2 else f[:, None]
        return _triton_module().low_frequency_part_triton(x, f2 if f2.is_floating_point() else f2.float(), sigmas)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(acc)
    f2 = (f if f.dim() == 2 else f[:, None]).to(acc)
    out = torch.empty(len(sigmas), x.shape[0], f2.shape[1], dtype=acc, device=x.device)
    for start in range(0, x.shape[0], chunk):
        # the exact (non-matmul) distance: the matmul shortcut leaves d_ii != 0 and blurs narrow filters
        d = torch.cdist(x[start : start + chunk], x, compute_mode="donot_use_mm_for_euclid_dist")  # [chunk, N]
        for i, s in enumerate(sigmas):
            out[i, start : start + chunk] = torch.softmax(-d / (2.0 * s), dim=1) @ f2
    return out


def frequency_ratios(
    x: torch.Tensor, f: torch.Tensor, sigmas: Iterable[float], *, chunk: int = 1024, backend: str = "auto"
) -> dict[float, dict[str, float]]:
    """For each sigma: ||K f||, ||f - K f|| and their ratio low/high (Frobenius norms over all samples)."""
    sigmas = _sigmas(sigmas)
    low = low_frequency_part(x, f, sigmas, chunk=chunk, backend=backend)
    f2 = (f if f.dim() == 2 else f[:, None]).to(low.dtype)
    lo = low.flatten(1).norm(dim=1).tolist()  # one device-to-host copy for all sigmas
    hi = (f2[None] - low).flatten(1).norm(dim=1).tolist()
    return {
        s: {"low": lo[i], "high": hi[i], "ratio": lo[i] / hi[i] if hi[i] > 0 else float("inf")}
        for i, s in enumerate(sigmas)
    }


def frequency_ratios_dense(x: torch.Tensor, f: torch.Tensor, sigmas: Iterable[float]):
    """The paper's way (dense N x N filter), kept as the test oracle for small N."""
    _check(x, f)
    x64 = x.double()
    f2 = (f if f.dim() == 2 else f[:, None]).double()
    d = torch.cdist(x64, x64, compute_mode="donot_use_mm_for_euclid_dist")
    result = {}
    for s in sigmas:
        k = torch.exp(-d / (2.0 * float(s)))
        k = k / k.sum(dim=1, keepdim=True)
        low = k @ f2
        lo, hi = low.norm().item(), (f2 - low).norm().item()
        result[float(s)] = {"low": lo, "high": hi, "ratio": lo / hi if hi > 0 else float("inf")}
    return result
