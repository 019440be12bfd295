"""The composed-GEMM path of the multi-scale low-rank linear op ("torch" on CPU, "cublas" on CUDA), no [M, out] temporary.

This is the path for CPU tensors, and on CUDA the cuBLAS side of backend="auto"'s choice. It is built to sit close to
the FLOP floor of the bare layer: the adapter adds four skinny GEMMs of [M, n*r] size and two in-place `addmm_`s, and
nothing of size [M, out] besides y and dx themselves (with dropout, backward adds one [M, in] product and its mask).
Operand layouts were picked by measurement on a CPU (benchmarks/RESULTS.md, "layout of the skinny GEMMs"); on CUDA
the copies they cost are [n*r, out] and [n*r, M], a rounding error next to the GEMMs.

Dropout on the adapter input is regenerated from a seed in backward instead of storing an [M, in] mask.
"""

from __future__ import annotations

import torch

__all__ = ["lowrank_linear_fwd_torch", "lowrank_linear_bwd_torch", "dropout_mask_torch"]


def dropout_mask_torch(shape, p: float, seed: int, device) -> torch.Tensor:
    """Keep-mask (bool) of the torch path, a pure function of (shape, p, seed, device)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return torch.rand(shape, generator=gen, device=device) >= p


def _dropped(x2: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    if p <= 0.0:
        return x2
    mask = dropout_mask_torch(x2.shape, p, seed, x2.device)
    return (x2 * mask).mul_(1.0 / (1.0 - p))  # one [M, in] temporary


def lowrank_linear_fwd_torch(
    x2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_L: torch.Tensor,
    lora_R: torch.Tensor,
    scales: torch.Tensor,
    dropout_p: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x2: [M, in] -> (y [M, out], T [M, n*r], bits) with T = drop(x) L^T (unscaled, saved for backward); `bits` is
    empty: this path regenerates its mask from the seed (the Triton path saves a packed one)."""
    y = torch.addmm(bias, x2, weight.t()) if bias is not None else torch.mm(x2, weight.t())
    # The skinny GEMMs' speed on MKL/oneDNN depends on the layout of the small operand: L as a transposed view
    # (column-major) was fastest or equal at every shape measured.
    t = torch.mm(_dropped(x2, dropout_p, seed), lora_L.t())
    # In place: the expansion never materialises a second [M, out] tensor.
    y.addmm_(t * scales.to(t.dtype), lora_R.t())
    return y, t, x2.new_empty(0, dtype=torch.int32)


def lowrank_linear_bwd_torch(
    dy2: torch.Tensor,
    x2: torch.Tensor,
    weight: torch.Tensor,
    lora_L: torch.Tensor,
    lora_R: torch.Tensor,
    scales: torch.Tensor,
    t: torch.Tensor,
    dropout_p: float,
    seed: int,
    needs_dx: bool,
    needs_dL: bool,
    needs_dR: bool,
    bits: torch.Tensor | None = None,
):
    """docs/layer.md gradients: dx = dy W + drop'((G s) L), dR = dy^T (T s), dL = (G s)^T drop(x), G = dy R."""
    s = scales.to(dy2.dtype)
    dx = dL = dR = None
    # R as a column-major view (a copy of n*r x out): faster for MKL's skinny GEMM than R as stored.
    gs = torch.mm(dy2, lora_R.t().contiguous().t()) * s if (needs_dx or needs_dL) else None
    if needs_dx:
        dx = torch.mm(dy2, weight)
        if dropout_p > 0.0:
            keep = dropout_mask_torch(x2.shape, dropout_p, seed, x2.device)
            dx.add_(torch.mm(gs, lora_L).mul_(keep), alpha=1.0 / (1.0 - dropout_p))
        else:
            dx.addmm_(gs, lora_L)
    if needs_dR:
        # dR^T = (T s)^T dy with the [n*r, M] operand contiguous: faster on MKL than dy^T (T s).
        dR = torch.mm((t * s).t().contiguous(), dy2).t().contiguous()
    if needs_dL:
        dL = torch.mm(gs.t().contiguous(), _dropped(x2, dropout_p, seed))
    return dx, dL, dR
