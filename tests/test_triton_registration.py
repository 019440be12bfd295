"""The Triton backend behind the torch.library ops: opcheck and torch.compile tracing (interpreter or GPU)."""
import pytest
import torch

from muscle_kernels import MuScleLoRALinear
from muscle_kernels.ops.lowrank_linear import available_backends, make_scales

from .utils import DEVICE, assert_close

pytestmark = pytest.mark.skipif("triton" not in available_backends(DEVICE),
                                reason="Triton backend not usable here (no CUDA and no TRITON_INTERPRET=1)")


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
    torch.library.opcheck(torch.ops.muscle_kernels.lowrank_linear_bwd.default,
                          (dy, x, W, L.detach(), R.detach(), s, t, no_bits, 0.0, None, "triton", True, True, True))
    # With dropout the forward's third output is the packed mask, which backward takes back.
    seed = torch.tensor([7])
    fwd_args = (x, W, b, L, R, s, 0.3, seed, "triton")
    torch.library.opcheck(torch.ops.muscle_kernels.lowrank_linear_fwd.default, fwd_args)
    _, t, bits = (v.detach() for v in torch.ops.muscle_kernels.lowrank_linear_fwd.default(*fwd_args))
    assert bits.shape == (7, 1) and bits.dtype == torch.int32
    torch.library.opcheck(torch.ops.muscle_kernels.lowrank_linear_bwd.default,
                          (dy, x, W, L.detach(), R.detach(), s, t, bits, 0.3, seed, "triton", True, True, True))


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
