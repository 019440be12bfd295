"""The torch-ops backend of gradient alignment, used where the compiled kernels are not available (no compiler, a
device without a kernel, or MUSCLE_KERNELS_GRAD_ALIGN_BACKEND=foreach).

It follows the kernels' conventions (stats layout, the coefficient rule of coeffs.py, kept tensors untouched, modes
that do not read what they skip) and is as accurate: <g, r>, ||g||^2 and ||r||^2 are accumulated in float64, and the
update is computed in fp32 (fp64 for fp64 tensors) and rounded once. Its extra memory is O(CHUNK) whatever the
tensor sizes: the lists are cut into buckets of at most CHUNK elements (a big tensor into several, small tensors
grouped), and the temporaries (products, fp32 copies of fp16/bf16 data) exist for one bucket at a time. The update
is written in place.

Cost: a few torch calls per bucket, plus one host sync per apply on CUDA (the coefficients are read on the host to
pick each tensor's mode).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch

from .coeffs import grad_align_coeffs

__all__ = ["grad_align_reduce_foreach", "grad_align_apply_foreach", "align_gradients_foreach", "CHUNK"]

CHUNK = 1 << 20  # elements per bucket: 8 MiB per float64 copy
_NATIVE = (torch.float32, torch.float64)  # updated in their own dtype; fp16/bf16 through an fp32 copy

Piece = tuple[int, torch.Tensor, torch.Tensor]  # (tensor index, flat slice of g, the same slice of r)


def _groups(grads: Sequence[torch.Tensor], idx: Sequence[int]) -> dict[torch.dtype, list[int]]:
    groups: dict[torch.dtype, list[int]] = defaultdict(list)
    for i in idx:
        if grads[i].numel():
            groups[grads[i].dtype].append(i)
    return groups


def _buckets(grads: Sequence[torch.Tensor], refs: Sequence[torch.Tensor], idx: Sequence[int]) -> Iterator[list[Piece]]:
    """Buckets of at most CHUNK elements in all; a tensor appears at most once per bucket."""
    bucket: list[Piece] = []
    size = 0
    for i in idx:
        g, r = grads[i].view(-1), refs[i].view(-1)
        n = g.numel()
        for start in range(0, n, CHUNK):
            stop = min(n, start + CHUNK)
            if bucket and size + stop - start > CHUNK:
                yield bucket
                bucket, size = [], 0
            bucket.append((i, g[start:stop], r[start:stop]))
            size += stop - start
    if bucket:
        yield bucket


def _acc(pieces: list[torch.Tensor]) -> list[torch.Tensor]:
    """The pieces in the update's dtype: themselves for fp32/fp64, fp32 copies (one bucket at most) for fp16/bf16."""
    return pieces if pieces[0].dtype in _NATIVE else [t.float() for t in pieces]


def grad_align_reduce_foreach(grads: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> torch.Tensor:
    """stats [n, 3] fp32 = (<g, r>, ||g||^2, ||r||^2) per pair, accumulated in float64, in buckets of CHUNK.

    Per bucket: both norms by one _foreach_norm each with float64 accumulation (no copy of fp32 data), and the dots
    as float64 sums of the fp32 (fp64 for fp64) products g * r.
    """
    n = len(grads)
    device = grads[0].device if n else torch.device("cpu")
    sums = torch.zeros(n, 3, dtype=torch.float64, device=device)
    for _, idx in _groups(grads, range(n)).items():
        for bucket in _buckets(grads, refs, idx):
            g = _acc([p[1] for p in bucket])
            r = _acc([p[2] for p in bucket])
            gg = torch._foreach_norm(g, 2, dtype=torch.float64)
            rr = torch._foreach_norm(r, 2, dtype=torch.float64)
            dots = [prod.sum(dtype=torch.float64) for prod in torch._foreach_mul(g, r)]
            rows = torch.stack([torch.stack(dots), torch.stack(gg).square(), torch.stack(rr).square()], dim=1)
            # each tensor once per bucket, so index_add_ adds every slot once: deterministic
            sums.index_add_(0, torch.tensor([p[0] for p in bucket], device=device), rows)
    return sums.float()


def grad_align_apply_foreach(grads: Sequence[torch.Tensor], refs: Sequence[torch.Tensor], coeffs: torch.Tensor) -> None:
    """g <- a * r + b * g in place with (a, b) = coeffs[i], with the kernels' modes: (0, 1) leaves g untouched,
    b == 0 writes a * r without reading g, a == 0 writes b * g without reading r."""
    a_all, b_all = (c.tolist() for c in coeffs.detach().float().cpu().unbind(1))  # the fallback's one host sync
    active = [i for i in range(len(grads)) if not (a_all[i] == 0.0 and b_all[i] == 1.0)]
    for dtype, idx in _groups(grads, active).items():
        for bucket in _buckets(grads, refs, idx):
            _apply_bucket(bucket, a_all, b_all, dtype in _NATIVE)


def _apply_bucket(bucket: list[Piece], a_all: list[float], b_all: list[float], native: bool) -> None:
    replace = [p for p in bucket if b_all[p[0]] == 0.0]
    scale = [p for p in bucket if a_all[p[0]] == 0.0 and b_all[p[0]] != 0.0]
    blend = [p for p in bucket if a_all[p[0]] != 0.0 and b_all[p[0]] != 0.0]
    acc = _acc
    dst: list[torch.Tensor] = []
    out: list[torch.Tensor] = []
    if replace:
        dst += [p[1] for p in replace]
        out += torch._foreach_mul(acc([p[2] for p in replace]), [a_all[p[0]] for p in replace])
    if scale:
        g = acc([p[1] for p in scale])
        torch._foreach_mul_(g, [b_all[p[0]] for p in scale])
        if not native:
            dst += [p[1] for p in scale]
            out += g
    if blend:
        g = acc([p[1] for p in blend])
        mixed = torch._foreach_mul(acc([p[2] for p in blend]), [a_all[p[0]] for p in blend])
        torch._foreach_mul_(g, [b_all[p[0]] for p in blend])
        torch._foreach_add_(g, mixed)
        if not native:
            dst += [p[1] for p in blend]
            out += g
    if dst:
        torch._foreach_copy_(dst, out)  # rounds fp32 results to fp16/bf16 once


def align_gradients_foreach(
    grads: Sequence[torch.Tensor], refs: Sequence[torch.Tensor], raw_ratio: float = 0.0
) -> torch.Tensor:
    stats = grad_align_reduce_foreach(grads, refs)
    grad_align_apply_foreach(grads, refs, grad_align_coeffs(stats, raw_ratio))
    return stats
