"""The Triton backend behind the torch.library ops: opcheck and torch.compile tracing (interpreter or GPU)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from muscle_kernels import MuScleLoRALinear
from muscle_kernels.ops.lowrank_linear import available_backends, make_scales
from muscle_kernels.ops.lowrank_linear.reference import lowrank_linear_reference

from .utils import DEVICE, assert_close

if "triton" not in available_backends(DEVICE):
    pytest.skip("Triton backend not usable here (no CUDA and no TRITON_INTERPRET=1)", allow_module_level=True)

from muscle_kernels.ops.lowrank_linear import launch  # noqa: E402


def test_opcheck_triton_ops():
    torch.manual_seed(0)
    x = torch.randn(7, 24, device=DEVICE)
    W, b = torch.randn(10, 24, device=DEVICE), torch.randn(10, device=DEVICE)
    L = torch.randn(4, 24, device=DEVICE, requires_grad=True)
    R = torch.randn(10, 4, device=DEVICE, requires_grad=True)
    s = make_scales((1, 2), 2, 4.0, device=DEVICE)
    torch.library.opcheck(torch.ops.muscle_kernels.lowrank_linear_fwd.default, (x, W, b, L, R, s, 0.0, None, "triton"))
    t = (x @ L.detach().t()).float()
    dy = torch.randn(7, 10, device=DEVICE)
    no_bits = torch.empty(0, dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(
        torch.ops.muscle_kernels.lowrank_linear_bwd.default,
        (dy, x, W, L.detach(), R.detach(), s, t, no_bits, 0.0, None, "triton", True, True, True),
    )
    # With dropout the forward's third output is the packed mask, which backward takes back.
    seed = torch.tensor([7])
    fwd_args = (x, W, b, L, R, s, 0.3, seed, "triton")
    torch.library.opcheck(torch.ops.muscle_kernels.lowrank_linear_fwd.default, fwd_args)
    _, t, bits = (v.detach() for v in torch.ops.muscle_kernels.lowrank_linear_fwd.default(*fwd_args))
    assert bits.shape == (7, 1) and bits.dtype == torch.int32
    torch.library.opcheck(
        torch.ops.muscle_kernels.lowrank_linear_bwd.default,
        (dy, x, W, L.detach(), R.detach(), s, t, bits, 0.3, seed, "triton", True, True, True),
    )


def test_compiled_layer_with_triton_backend_matches_eager():
    torch.manual_seed(1)
    layer = MuScleLoRALinear(20, 12, freq_band=(1, 2, 3), inner_rank=2, init="seed", backend="triton").to(DEVICE)
    x = torch.randn(2, 5, 20, device=DEVICE, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    dx, dL = torch.autograd.grad(y.sum(), [x, layer.lora_L])
    x2 = x.detach().requires_grad_()
    y2 = layer(x2)
    dx2, dL2 = torch.autograd.grad(y2.sum(), [x2, layer.lora_L])
    for name, a, b in (("y", y2, y), ("dx", dx2, dx), ("dL", dL2, dL)):
        assert_close(name, a.double(), b)


_COMPILE_FIRST = """
import torch
from muscle_kernels import MuScleLoRALinear
from torch._dynamo.utils import counters

torch.manual_seed(0)
layer = MuScleLoRALinear(40, 24, freq_band=(1, 2, 3), inner_rank=2, init="seed", backend="triton")
x = torch.randn(2, 5, 40, requires_grad=True)
y = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)  # the first call that needs Triton
assert not counters["graph_break"], dict(counters["graph_break"])
x2 = x.detach().requires_grad_()
y2 = layer(x2)
torch.testing.assert_close(y, y2)
torch.testing.assert_close(*(torch.autograd.grad(v.sum(), [w])[0] for v, w in ((y, x), (y2, x2))))
print("ok")
"""


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the subprocess runs the interpreter; CUDA runs it in-process")
def test_compile_before_any_eager_call_imports_triton_at_trace_time():
    """The package imports Triton on first use. When that first use is inside torch.compile (a model compiled before
    any eager step), the import runs at trace time instead of breaking the graph. A fresh process, because this
    one imported Triton long ago."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_FIRST],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_compiled_triton_layer_with_dropout_uses_one_mask():
    """Dropout 0.3 under torch.compile (aot_eager, fullgraph) on the Triton backend: the seed is drawn in the graph
    from the global generator as in eager, so replaying the draw gives the mask; y, dx, dL and dR must all match the
    reference with it (the forward saved it packed, the backward read it back)."""
    torch.manual_seed(1)
    layer = (
        MuScleLoRALinear(40, 24, freq_band=(1, 2, 3), inner_rank=2, init="seed", backend="triton", dropout=0.3)
        .to(DEVICE)
        .train()
    )
    x = torch.randn(2, 5, 40, device=DEVICE, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.manual_seed(77)
    y = compiled(x)
    torch.manual_seed(77)
    seed = int(torch.randint(0, 2**31 - 1, (1,), device=DEVICE).item())  # the Triton path draws on x's device
    mask = launch.dropout_mask_triton(x.shape, 0.3, seed, DEVICE)
    assert 0.5 < mask.float().mean().item() < 0.9
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, layer.lora_L, layer.lora_R], dy)
    f64 = [v.detach().double().requires_grad_() for v in (x, layer.lora_L, layer.lora_R)]
    ref_y = lowrank_linear_reference(
        f64[0], layer.weight.double(), layer.bias.double(), f64[1], f64[2], layer.scales.double(), mask, 0.3
    )
    ref = (ref_y, *torch.autograd.grad(ref_y, f64, dy.double()))
    for name, r, g in zip(("y", "dx", "dL", "dR"), ref, (y, *got)):
        assert_close(name, r, g)
