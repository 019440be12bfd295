"""A plain LoRA (freq_band=(1,), inner_rank=r, alpha=lora_alpha) is PEFT's LoRA layer: same output, same gradients."""

import copy

import pytest
import torch
from torch import nn

from muscle_kernels import MuScleLoRALinear

from .utils import assert_close

peft = pytest.importorskip("peft", reason="peft is the baseline this test compares against")


class Tiny(nn.Module):
    def __init__(self, in_f, out_f, bias):
        super().__init__()
        self.proj = nn.Linear(in_f, out_f, bias=bias)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize(
    "rank,alpha,in_f,out_f,bias", [(1, 1, 7, 5, True), (8, 32, 33, 20, False), (4, 6, 64, 130, True)]
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_plain_lora_matches_peft(rank, alpha, in_f, out_f, bias, dtype):
    torch.manual_seed(rank * 100 + in_f)
    base = Tiny(in_f, out_f, bias).to(dtype)
    ours = MuScleLoRALinear.from_linear(copy.deepcopy(base.proj), freq_band=(1,), inner_rank=rank, alpha=alpha)
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0)
    model = peft.get_peft_model(copy.deepcopy(base), cfg)
    layer = model.base_model.model.proj
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        B.normal_()  # PEFT inits B to zero: make the adapter non-trivial
        ours.lora_L.copy_(A)
        ours.lora_R.copy_(B)
    x = torch.randn(3, 11, in_f, dtype=dtype)
    dy = torch.randn(3, 11, out_f, dtype=dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_peft, y_ours = model(x1), ours(x2)
    g_peft = torch.autograd.grad(y_peft, [x1, A, B], dy)
    g_ours = torch.autograd.grad(y_ours, [x2, ours.lora_L, ours.lora_R], dy)
    assert_close("y", y_peft, y_ours)
    for name, a, b in zip(("dx", "dL=dA", "dR=dB"), g_peft, g_ours):
        assert_close(name, a, b)
