"""The per-tensor coefficient rule of gradient alignment (docs/alignment.md), in torch ops: the middle stage between
`grad_align_reduce` and `grad_align_apply_`, shared by every backend."""

from __future__ import annotations

import torch

__all__ = ["grad_align_coeffs"]


def grad_align_coeffs(stats: torch.Tensor, raw_ratio: float = 0.0) -> torch.Tensor:
    """The per-tensor coefficients [n, 2] fp32 (a, b) of `g <- a * r + b * g` for given stats [n, 3].

    a = (1 - raw_ratio) * |<g, r>| / ||r||^2 and b = raw_ratio; (a, b) = (0, 1) ("keep g") where ||g||^2 or ||r||^2
    is zero, where the stats row is not finite, or where a overflows fp32. Runs on stats' device without a sync; the
    arithmetic matches the C++/CUDA rule (csrc/grad_align_common.h) bit for bit.
    """
    if stats.dim() != 2 or stats.shape[1] != 3:
        raise ValueError(f"stats: expected shape [n_tensors, 3], got {tuple(stats.shape)}")
    s = stats.float().double()
    dot, gg, rr = s.unbind(1)
    keep = ~torch.isfinite(s).all(dim=1) | (gg == 0) | (rr == 0)
    a = ((1.0 - raw_ratio) * (dot.abs() / torch.where(keep, torch.ones_like(rr), rr))).float()
    keep = keep | ~torch.isfinite(a)
    a = torch.where(keep, torch.zeros_like(a), a)
    b = torch.where(keep, torch.ones_like(a), torch.full_like(a, float(raw_ratio)))
    return torch.stack([a, b], dim=1).contiguous()
