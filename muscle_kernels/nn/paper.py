"""The paper's MultiScaleLowRankLinear, as a baseline to measure against (benchmarks) -- not for training.

It holds the same parameters as MuScleLoRALinear and computes the same function, but the way the paper's code does:
the dense [out, in] delta R (L * K) is rebuilt at every forward, then multiplied by alpha / r.
"""

from __future__ import annotations

from torch import nn

from ..ops.lowrank_linear.reference import paper_forward
from .linear import MuScleLoRALinear

__all__ = ["PaperMultiScaleLinear"]


class PaperMultiScaleLinear(nn.Module):
    def __init__(self, layer: MuScleLoRALinear):
        super().__init__()
        self.weight, self.bias = layer.weight, layer.bias  # shared frozen base
        self.lora_L = nn.Parameter(layer.lora_L.detach().clone())
        self.lora_R = nn.Parameter(layer.lora_R.detach().clone())
        self.band, self.rank, self.alpha = layer.freq_band, layer.inner_rank, layer.alpha

    def forward(self, x):
        return paper_forward(x, self.weight, self.bias, self.lora_L, self.lora_R, self.band, self.rank, self.alpha)
