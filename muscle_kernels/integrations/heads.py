"""The paper's small classification head for decoder LLMs, and the conversion of GPT-2's Conv1D to nn.Linear.

The paper replaces an LLM's `score` Linear (hidden -> labels) by two bias-free layers hidden -> 16 -> labels with
dropout in between, and puts the multi-scale branches on the first one. Without a nonlinearity the two layers are
one linear map in eval mode, `out_proj.weight @ dense.weight`, which is what lets merge_and_unload and export_peft
collapse the head back into a plain `score` Linear that any transformers / PEFT code can load.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ScoreHead", "linear_from_conv1d", "conv1d_from_linear", "is_conv1d"]


class ScoreHead(nn.Module):
    """hidden -> inner -> labels, no bias, dropout between the layers (the paper's LLMCLassificationHead)."""

    def __init__(
        self, hidden_size: int, num_labels: int, inner: int = 16, dropout: float = 0.1, *, device=None, dtype=None
    ):
        super().__init__()
        self.dense = nn.Linear(hidden_size, inner, bias=False, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(inner, num_labels, bias=False, device=device, dtype=dtype)

    @property
    def in_features(self) -> int:
        return self.dense.in_features

    @property
    def out_features(self) -> int:
        return self.out_proj.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(self.dense(x)))

    @torch.no_grad()
    def collapsed_weight(self) -> torch.Tensor:
        """[labels, hidden] weight of the single Linear equal to this head in eval mode (fp32 product)."""
        dense = self.dense
        # An unmerged MSLR layer on dense: fold its adapter in, in fp32, without touching the module.
        w = dense.weight.float()
        if hasattr(dense, "delta_weight") and not getattr(dense, "merged", False):
            w = w + dense.delta_weight().float()
        return self.out_proj.weight.float() @ w


def is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but keep this module importable without it
        return False
    return isinstance(module, Conv1D)


def linear_from_conv1d(conv: nn.Module) -> nn.Linear:
    """nn.Linear computing the same map as GPT-2's Conv1D (which stores its weight as [in, out]).

    The weight is copied transposed (a view would leave a non-contiguous [out, in] Parameter); the bias Parameter is
    reused.
    """
    in_features, out_features = conv.weight.shape
    linear = nn.Linear(in_features, out_features, bias=conv.bias is not None, device="meta")
    linear.weight = nn.Parameter(conv.weight.detach().t().contiguous(), requires_grad=conv.weight.requires_grad)
    if conv.bias is not None:
        linear.bias = conv.bias
    return linear


def conv1d_from_linear(weight: torch.Tensor, bias) -> nn.Module:
    """GPT-2 Conv1D with `weight` [out, in] (transposed back to Conv1D's [in, out]) and the given bias Parameter."""
    from transformers.pytorch_utils import Conv1D

    out_features, in_features = weight.shape
    if bias is None:  # Conv1D's forward is an addmm with its bias: it has no bias-free form
        raise ValueError("conv1d_from_linear: GPT-2's Conv1D needs a bias; this layer has none")
    with torch.device("meta"):  # skip allocating and initialising a weight that is replaced at once
        conv = Conv1D(out_features, in_features)
    conv.weight = nn.Parameter(weight.detach().t().contiguous(), requires_grad=False)
    conv.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
    return conv
