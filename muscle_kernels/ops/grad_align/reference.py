"""The float64 test oracle of gradient alignment: docs/alignment.md as the paper writes it, one tensor at a time.

It is for tests and benchmarks (it makes fp64 copies of every tensor); the production backends are the compiled
kernels (csrc/, loaded by extension.py) and the torch._foreach fallback (foreach.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["paper_align_reference"]


def paper_align_reference(
    grads: Sequence[torch.Tensor], refs: Sequence[torch.Tensor], raw_ratio: float = 0.0
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """docs/alignment.md in float64, tensor by tensor. Returns (aligned grads in fp64, stats [n, 3] fp64).

    stats rows are (<g, r>, ||g||^2, ||r||^2) of the inputs. A tensor with zero g or r, or with a non-finite value in
    g or r, is returned unchanged (the kernels' convention for the latter; the paper does not define it).
    """
    out, rows = [], []
    for g, r in zip(grads, refs):
        g64, r64 = g.detach().double().reshape(-1), r.detach().double().reshape(-1)
        dot, gg, rr = torch.dot(g64, r64), torch.dot(g64, g64), torch.dot(r64, r64)
        rows.append(torch.stack([dot, gg, rr]) if g64.numel() else torch.zeros(3, dtype=torch.float64))
        finite = bool(torch.isfinite(g64).all()) and bool(torch.isfinite(r64).all())
        if g64.numel() == 0 or not finite or gg == 0 or rr == 0:
            out.append(g.detach().double().clone())
            continue
        coef = dot.abs() / rr
        aligned = coef * r64
        new = (1.0 - raw_ratio) * aligned + raw_ratio * g64
        out.append(new.reshape(g.shape))
    stats = torch.stack(rows) if rows else torch.zeros(0, 3, dtype=torch.float64)
    return out, stats
