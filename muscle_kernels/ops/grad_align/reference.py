"""Gradient alignment without the extension: the float64 oracle and the torch._foreach fallback.

- `paper_align_reference(grads, refs, raw_ratio)`: SPEC section 3 as the paper writes it, one tensor at a time, in
  float64. It is the test oracle; it returns new tensors (fp64) and never modifies its inputs.
- `grad_align_reduce_foreach` / `grad_align_apply_foreach` / `align_gradients_foreach`: the same op as the C++/CUDA
  kernels built from `torch._foreach_*` calls, used when the extension cannot be built. It follows the kernels'
  conventions exactly (stats layout, coefficient rule, kept tensors untouched) but reads the coefficients on the host
  once per call (one device sync on CUDA) and makes fp32 copies of fp16/bf16 tensors.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Sequence, Tuple

import torch

__all__ = [
    "paper_align_reference",
    "grad_align_coeffs",
    "grad_align_reduce_foreach",
    "grad_align_apply_foreach",
    "align_gradients_foreach",
]


def paper_align_reference(grads: Sequence[torch.Tensor], refs: Sequence[torch.Tensor], raw_ratio: float = 0.0
                          ) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """SPEC section 3 in float64, tensor by tensor. Returns (aligned grads in fp64, stats [n, 3] fp64).

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


def _groups(grads: Sequence[torch.Tensor]) -> Dict[Tuple[torch.device, torch.dtype], List[int]]:
    groups: Dict[Tuple[torch.device, torch.dtype], List[int]] = defaultdict(list)
    for i, g in enumerate(grads):
        if g.numel():
            groups[(g.device, g.dtype)].append(i)
    return groups


def _acc(t: torch.Tensor) -> torch.Tensor:
    """A flat view in the accumulation dtype (a copy for fp16/bf16)."""
    return t.reshape(-1) if t.dtype in (torch.float32, torch.float64) else t.reshape(-1).float()


def grad_align_reduce_foreach(grads: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> torch.Tensor:
    """stats [n, 3] fp32 = (<g, r>, ||g||^2, ||r||^2) per pair, accumulated in fp32 (fp64 for fp64 tensors)."""
    n = len(grads)
    device = grads[0].device if n else torch.device("cpu")
    stats = torch.zeros(n, 3, dtype=torch.float64, device=device)
    for (_, _), idx in _groups(grads).items():
        g = [_acc(grads[i]) for i in idx]
        r = [_acc(refs[i]) for i in idx]
        g_norm = torch._foreach_norm(g, 2)
        r_norm = torch._foreach_norm(r, 2)
        # torch has no _foreach_dot; one BLAS dot per tensor (fp32 accumulation) is the cheapest exact form.
        dots = [torch.dot(a, b) for a, b in zip(g, r)]
        rows = torch.stack([torch.stack(dots).double(), torch.stack(g_norm).double() ** 2,
                            torch.stack(r_norm).double() ** 2], dim=1)
        stats[torch.tensor(idx, device=device)] = rows
    return stats.float()


def grad_align_apply_foreach(grads: Sequence[torch.Tensor], refs: Sequence[torch.Tensor],
                             coeffs: torch.Tensor) -> None:
    """g <- a * r + b * g in place with (a, b) = coeffs[i], with the kernels' modes: (0, 1) leaves g untouched,
    b == 0 writes a * r without reading g, a == 0 writes b * g without reading r."""
    a_all, b_all = (c.tolist() for c in coeffs.detach().float().cpu().unbind(1))  # the fallback's one host sync
    for _, idx in _groups(grads).items():
        replace = [i for i in idx if b_all[i] == 0.0]
        scale = [i for i in idx if a_all[i] == 0.0 and b_all[i] not in (0.0, 1.0)]
        blend = [i for i in idx if a_all[i] != 0.0 and b_all[i] != 0.0]
        dst, out = [], []
        if replace:
            dst += replace
            out += torch._foreach_mul([_acc(refs[i]) for i in replace], [a_all[i] for i in replace])
        if scale:
            dst += scale
            out += torch._foreach_mul([_acc(grads[i]) for i in scale], [b_all[i] for i in scale])
        if blend:
            dst += blend
            mixed = torch._foreach_mul([_acc(refs[i]) for i in blend], [a_all[i] for i in blend])
            torch._foreach_add_(mixed, torch._foreach_mul([_acc(grads[i]) for i in blend], [b_all[i] for i in blend]))
            out += mixed
        if dst:
            torch._foreach_copy_([grads[i].view(-1) for i in dst], out)  # rounds fp32 results to fp16/bf16 once


def align_gradients_foreach(grads: Sequence[torch.Tensor], refs: Sequence[torch.Tensor],
                            raw_ratio: float = 0.0) -> torch.Tensor:
    stats = grad_align_reduce_foreach(grads, refs)
    grad_align_apply_foreach(grads, refs, grad_align_coeffs(stats, raw_ratio))
    return stats
