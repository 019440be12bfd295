"""Pure-PyTorch reference of the multi-scale low-rank linear layer (docs/layer.md).

Written for clarity, not speed: this is the oracle that every fast path (the CPU path, the Triton kernels) is tested
against. It computes in the dtype of its inputs; the tests pass float64 copies to get the exact answer. Gradients come
from autograd.

    y = x W^T + b + ((drop(x) L^T) * s) R^T          x: [..., in], y: [..., out]

with L = [L_1; ...; L_n] ([n*r, in], branch-major rows), R = [R_1 ... R_n] ([out, n*r]) and s_j = k_i * alpha / r for
every row j of branch i.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["make_scales", "lowrank_linear_reference", "paper_forward", "merged_delta"]


def make_scales(freq_band: Sequence[float], inner_rank: int, alpha: float, *, dtype=torch.float32, device=None):
    """The scale vector s [n*r]: s_j = k_i * alpha / r for the r rows of branch i (branch-major)."""
    k = torch.as_tensor([float(v) for v in freq_band], dtype=torch.float64)
    s = (k * (float(alpha) / int(inner_rank))).repeat_interleave(int(inner_rank))
    return s.to(dtype=dtype, device=device)


def lowrank_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_L: torch.Tensor,
    lora_R: torch.Tensor,
    scales: torch.Tensor,
    dropout_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """y = x W^T + b + ((drop(x) L^T) * s) R^T, computed in x's dtype.

    dropout_mask: optional boolean/0-1 tensor shaped like x; drop(x) = x * mask / (1 - dropout_p). Passing the mask
    (instead of drawing one) is what lets a fast path be compared with the reference under dropout.
    """
    y = x @ weight.t()
    if bias is not None:
        y = y + bias
    xd = x
    if dropout_mask is not None:
        xd = x * dropout_mask.to(x.dtype) / (1.0 - dropout_p)
    t = xd @ lora_L.t()
    return y + (t * scales.to(t.dtype)) @ lora_R.t()


def paper_forward(x, weight, bias, lora_L, lora_R, freq_band, inner_rank, alpha):
    """The paper's MultiScaleLowRankLinear forward: builds the dense R (L * K) delta at every call.

    Kept as the 'paper' baseline of the benchmarks; it computes the same function as the reference.
    """
    k = torch.as_tensor(list(freq_band), dtype=lora_L.dtype, device=lora_L.device).repeat_interleave(inner_rank)
    delta = lora_R @ (lora_L * k[:, None])  # [out, in], materialised every step
    y = torch.nn.functional.linear(x, weight, bias)
    return y + (alpha / inner_rank) * (x @ delta.t())


def merged_delta(lora_L: torch.Tensor, lora_R: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W' - W = R diag(s) L, accumulated in fp32 (or fp64) and returned in the weight's dtype by the caller."""
    acc = torch.float64 if lora_L.dtype == torch.float64 else torch.float32
    return (lora_R.to(acc) * scales.to(acc)) @ lora_L.to(acc)
