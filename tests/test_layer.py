"""MuScleLoRALinear and muscle_lora_linear ("torch" backend) against the fp64 reference (docs/layer.md)."""

import math

import pytest
import torch
from torch import nn

from muscle_kernels import MuScleLoRALinear, muscle_lora_linear
from muscle_kernels.ops.lowrank_linear import lowrank_linear_reference, make_scales, paper_forward
from muscle_kernels.ops.lowrank_linear.cpu import dropout_mask_torch

from .utils import assert_close

CASES = [
    # (leading dims, in, out, freq_band, inner_rank, bias)
    ((7,), 13, 5, (1,), 1, True),
    ((2, 9), 33, 17, (1, 2, 3, 4), 1, False),
    ((3, 1, 5), 64, 48, (1, 4, 8, 12, 16, 20, 24, 28), 2, True),
    ((1,), 5, 130, tuple(range(1, 10)), 3, True),
    ((41,), 130, 7, (1, 2, 4, 8, 16), 4, False),
]
IDS = [f"lead{c[0]}-{c[1]}x{c[2]}-n{len(c[3])}r{c[4]}-{'bias' if c[5] else 'nobias'}" for c in CASES]


def _random_layer(in_f, out_f, band, rank, bias, dtype, alpha=6.0):
    layer = MuScleLoRALinear(
        in_f, out_f, bias=bias, freq_band=band, inner_rank=rank, alpha=alpha, init="seed", dtype=dtype
    )
    with torch.no_grad():  # seed init is random, but make the base and bias random too (never zeros)
        layer.weight.normal_(0, 1 / math.sqrt(in_f))
        if bias:
            layer.bias.normal_()
    return layer


def _grads(y, tensors, dy):
    return torch.autograd.grad(y, tensors, dy)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_forward_backward_matches_reference(case, dtype):
    lead, in_f, out_f, band, rank, bias = case
    torch.manual_seed(hash((lead, in_f, out_f)) % 2**31)
    layer64 = _random_layer(in_f, out_f, band, rank, bias, torch.float64)
    layer = _random_layer(in_f, out_f, band, rank, bias, dtype)
    layer.load_state_dict(
        {k: v.to(dtype) if v.is_floating_point() and k != "scales" else v for k, v in layer64.state_dict().items()}
    )
    x64 = torch.randn(*lead, in_f, dtype=torch.float64, requires_grad=True)
    x = x64.detach().to(dtype).requires_grad_()
    dy64 = torch.randn(*lead, out_f, dtype=torch.float64)

    # fp64 reference on the same (rounded) values, so only the computation's error is measured
    wl = [layer.weight, layer.lora_L, layer.lora_R]
    xr = x.detach().double().requires_grad_()
    Lr, Rr = (t.detach().double().requires_grad_() for t in wl[1:])
    y_ref = lowrank_linear_reference(
        xr, layer.weight.double(), None if layer.bias is None else layer.bias.double(), Lr, Rr, layer.scales.double()
    )
    ref = (y_ref, *_grads(y_ref, [xr, Lr, Rr], dy64))

    y = layer(x)
    got = (y, *_grads(y, [x, layer.lora_L, layer.lora_R], dy64.to(dtype)))

    # plain PyTorch in the same dtype, as the yardstick for low-precision error
    xb = x.detach().requires_grad_()
    Lb, Rb = (t.detach().requires_grad_() for t in wl[1:])
    y_b = lowrank_linear_reference(xb, layer.weight, layer.bias, Lb, Rb, layer.scales)
    base = (y_b, *_grads(y_b, [xb, Lb, Rb], dy64.to(dtype)))

    for name, r, g, b in zip(("y", "dx", "dL", "dR"), ref, got, base):
        assert g.dtype == dtype, f"{name}: dtype {g.dtype}, expected {dtype}"
        if dtype in (torch.float64, torch.float32):
            assert_close(name, r, g)
        else:
            assert_close(name, r, g, base=b, ratio=2.0, atol=1e-2 * r.abs().max().item() + 1e-3)


def test_backend_reference_and_torch_agree_and_paper_forward():
    torch.manual_seed(0)
    layer = _random_layer(24, 20, (1, 2, 3), 2, True, torch.float64, alpha=4)
    x = torch.randn(4, 6, 24, dtype=torch.float64)
    args = (layer.weight, layer.bias, layer.lora_L, layer.lora_R, layer.scales.double())
    y_t = muscle_lora_linear(x, *args, backend="torch")
    y_r = muscle_lora_linear(x, *args, backend="reference")
    y_p = paper_forward(x, layer.weight, layer.bias, layer.lora_L, layer.lora_R, (1, 2, 3), 2, 4.0)
    assert_close("y torch vs reference", y_r, y_t)
    assert_close("y paper vs reference", y_r, y_p)


def test_scales_are_branch_major():
    s = make_scales((1, 4, 8), 2, 6.0)
    assert s.tolist() == [3.0, 3.0, 12.0, 12.0, 24.0, 24.0]
    layer = MuScleLoRALinear(8, 8, freq_band=(1, 4, 8), inner_rank=2, alpha=6)
    assert torch.equal(layer.scales, s)
    assert layer.lora_L.shape == (6, 8) and layer.lora_R.shape == (8, 6)


def test_dropout_uses_mask_from_seed_and_only_on_adapter():
    torch.manual_seed(1)
    p = 0.3
    layer = _random_layer(16, 12, (1, 2), 2, True, torch.float64)
    layer.dropout = p
    layer.train()
    x = torch.randn(10, 16, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(10, 12, dtype=torch.float64)
    torch.manual_seed(123)
    y = layer(x)
    dx, dL, dR = torch.autograd.grad(y, [x, layer.lora_L, layer.lora_R], dy)
    # the seed the op drew: the first draw from the default generator after manual_seed(123)
    torch.manual_seed(123)
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    mask = dropout_mask_torch(x.shape, p, seed, x.device)
    assert 0 < mask.sum() < mask.numel()
    xr = x.detach().requires_grad_()
    Lr, Rr = (t.detach().requires_grad_() for t in (layer.lora_L, layer.lora_R))
    y_ref = lowrank_linear_reference(xr, layer.weight, layer.bias, Lr, Rr, layer.scales.double(), mask, p)
    ref = (y_ref, *torch.autograd.grad(y_ref, [xr, Lr, Rr], dy))
    for name, r, g in zip(("y", "dx", "dL", "dR"), ref, (y, dx, dL, dR)):
        assert_close(name, r, g)
    # base path is never dropped: with a zero adapter (R = 0) training output equals the base layer's
    with torch.no_grad():
        layer.lora_R.zero_()
    assert_close("y with R=0", nn.functional.linear(x, layer.weight, layer.bias), layer(x))
    # eval: no dropout at all
    layer.eval()
    with torch.no_grad():
        layer.lora_R.normal_()
    y_eval = layer(x)
    assert_close(
        "eval",
        lowrank_linear_reference(x, layer.weight, layer.bias, layer.lora_L, layer.lora_R, layer.scales.double()),
        y_eval,
    )


def test_init_modes():
    torch.manual_seed(0)
    lora = MuScleLoRALinear(32, 16)
    assert torch.count_nonzero(lora.lora_R) == 0 and torch.count_nonzero(lora.lora_L) > 0
    bound = 1 / math.sqrt(32)  # kaiming_uniform(a=sqrt(5)) on fan_in=32
    assert lora.lora_L.abs().max() <= bound + 1e-6
    x = torch.randn(5, 32)
    assert torch.equal(lora(x), nn.functional.linear(x, lora.weight, lora.bias)), "lora init must not change output"
    seed = MuScleLoRALinear(32, 16, init="seed")
    assert torch.count_nonzero(seed.lora_R) > 0
    assert seed.lora_R.abs().max() <= 1 / math.sqrt(seed.lora_R.shape[1]) + 1e-6


def test_from_linear_wraps_without_copy_and_freezes():
    base = nn.Linear(20, 10)
    layer = MuScleLoRALinear.from_linear(base, freq_band=(1, 2), inner_rank=3, alpha=6)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert layer.weight.data_ptr() == base.weight.data_ptr()
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_L.requires_grad and layer.lora_R.requires_grad
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_L", "lora_R"]
    nobias = MuScleLoRALinear.from_linear(nn.Linear(4, 3, bias=False))
    assert nobias.bias is None
    with pytest.raises(TypeError, match="linear"):
        MuScleLoRALinear.from_linear(nn.Conv1d(3, 3, 1))


def test_state_dict_names_are_stable():
    layer = MuScleLoRALinear(6, 4, freq_band=(1, 2))
    assert list(layer.state_dict()) == ["weight", "bias", "lora_L", "lora_R", "scales"]
    other = MuScleLoRALinear(6, 4, freq_band=(1, 2))
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.lora_L, layer.lora_L)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_merge_unmerge_round_trip(dtype):
    torch.manual_seed(3)
    layer = _random_layer(40, 24, (1, 2, 3, 4), 2, True, dtype)
    x = torch.randn(6, 40, dtype=dtype)
    y = layer(x)
    w0 = layer.weight.detach().clone()
    layer.merge()
    assert layer.merged and "merged=True" in repr(layer)
    y_merged = layer(x)
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 0.25}[dtype]
    assert (y_merged.double() - y.double()).abs().max() <= tol * y.double().abs().max()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert not layer.merged
    wtol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 0.1}[dtype]
    assert (layer.weight.double() - w0.double()).abs().max() <= wtol * w0.double().abs().max()
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_merged_state_dict_loads_into_a_fresh_layer():
    from muscle_kernels import MuScleLoRALinear

    torch.manual_seed(0)
    layer = MuScleLoRALinear(12, 10, freq_band=(1, 2, 3), inner_rank=2, alpha=4.0)
    with torch.no_grad():
        layer.lora_R.normal_()
    x = torch.randn(5, 12)
    want = layer(x)
    base = layer.weight.detach().clone()
    layer.merge()
    state = layer.state_dict()
    fresh = MuScleLoRALinear(12, 10, freq_band=(1, 2, 3), inner_rank=2, alpha=4.0)
    fresh.load_state_dict(state)  # strict
    assert fresh.merged
    torch.testing.assert_close(fresh(x), want)
    fresh.unmerge()
    torch.testing.assert_close(fresh.weight, base)
    torch.testing.assert_close(fresh(x), want)

    # an unmerged state dict keeps exactly its tensors, and loading it into a merged layer unmerges the flag
    assert list(fresh.state_dict()) == ["weight", "bias", "lora_L", "lora_R", "scales"]
    layer.load_state_dict(fresh.state_dict())
    assert not layer.merged
    torch.testing.assert_close(layer(x), want)


def test_extra_repr_is_readable():
    layer = MuScleLoRALinear(12, 6, bias=False, freq_band=(1, 4, 8), inner_rank=1, alpha=6, dropout=0.1)
    text = repr(layer)
    assert "in_features=12" in text and "freq_band=(1, 4, 8)" in text and "alpha=6" in text
    assert "dropout=0.1" in text and "bias=False" in text


def test_autocast_bf16_on_cpu():
    torch.manual_seed(4)
    layer = _random_layer(32, 16, (1, 2), 2, True, torch.float32)
    x = torch.randn(3, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_L.grad.dtype == torch.float32 and layer.lora_R.grad is not None
    ref = lowrank_linear_reference(
        x.double(),
        layer.weight.double(),
        layer.bias.double(),
        layer.lora_L.double(),
        layer.lora_R.double(),
        layer.scales.double(),
    )
    assert (y.double() - ref).abs().max() <= 0.05 * ref.abs().max()


def test_unfrozen_base_gets_gradients():
    """A user who unfreezes the base must get correct dW and db, not a silently missing gradient."""
    torch.manual_seed(5)
    layer = _random_layer(9, 7, (1, 2), 1, True, torch.float64)
    layer.weight.requires_grad_(True)
    layer.bias.requires_grad_(True)
    x = torch.randn(2, 3, 9, dtype=torch.float64)
    dy = torch.randn(2, 3, 7, dtype=torch.float64)
    dW, db = torch.autograd.grad(layer(x), [layer.weight, layer.bias], dy)
    W, b = (t.detach().requires_grad_() for t in (layer.weight, layer.bias))
    y_ref = lowrank_linear_reference(x, W, b, layer.lora_L, layer.lora_R, layer.scales.double())
    dW_r, db_r = torch.autograd.grad(y_ref, [W, b], dy)
    assert_close("dW", dW_r, dW)
    assert_close("db", db_r, db)


def test_non_contiguous_input_and_empty_batch():
    torch.manual_seed(6)
    layer = _random_layer(12, 5, (1, 3), 1, True, torch.float64)
    x = torch.randn(12, 8, dtype=torch.float64).t()  # [8, 12], non-contiguous
    assert not x.is_contiguous()
    ref = lowrank_linear_reference(x, layer.weight, layer.bias, layer.lora_L, layer.lora_R, layer.scales.double())
    assert_close("y non-contiguous", ref, layer(x))
    empty = layer(torch.randn(0, 12, dtype=torch.float64))
    assert empty.shape == (0, 5)


def test_torch_compile_traces_without_graph_breaks():
    torch.manual_seed(7)
    layer = _random_layer(16, 8, (1, 2), 2, True, torch.float32)
    x = torch.randn(4, 16)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    assert_close("compiled y", layer(x).double(), y)
    y.sum().backward()
    assert layer.lora_R.grad is not None


def test_opcheck_custom_ops():
    torch.manual_seed(8)
    x = torch.randn(5, 12)
    W, b = torch.randn(6, 12), torch.randn(6)
    L = torch.randn(4, 12, requires_grad=True)
    R = torch.randn(6, 4, requires_grad=True)
    s = make_scales((1, 2), 2, 4.0)
    torch.library.opcheck(torch.ops.muscle_kernels.lowrank_linear_fwd.default, (x, W, b, L, R, s, 0.0, None, "torch"))
    t = x @ L.detach().t()
    dy = torch.randn(5, 6)
    torch.library.opcheck(
        torch.ops.muscle_kernels.lowrank_linear_bwd.default,
        (
            dy,
            x,
            W,
            L.detach(),
            R.detach(),
            s,
            t,
            torch.empty(0, dtype=torch.int32),
            0.0,
            None,
            "torch",
            True,
            True,
            False,
        ),
    )


@pytest.mark.parametrize(
    "mode,fullgraph", [("aot_eager", True), ("inductor", False)], ids=["aot_eager-fullgraph", "default-mode"]
)
def test_torch_compile_with_dropout_has_no_graph_break(mode, fullgraph):
    """Dropout 0.1 under torch.compile, default mode (inductor, where a break would be silent: counted here) and
    fullgraph=True: the seed is a tensor drawn in the graph (no .item() in traced code).

    The compiled RNG differs from eager, so the mask is recovered from dx (dx - dy W is the adapter's part, zero
    exactly where x was dropped) and y, dL and dR are checked against the reference with that mask: forward and
    backward must have used one and the same mask."""
    torch._dynamo.reset()
    torch.manual_seed(11)
    p = 0.1
    layer = _random_layer(24, 16, (1, 2, 4), 2, True, torch.float64)
    layer.dropout = p
    layer.train()
    x = torch.randn(6, 24, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(6, 16, dtype=torch.float64)
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = torch.compile(layer, backend=mode, fullgraph=fullgraph)
    y = compiled(x)
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
    dx, dL, dR = torch.autograd.grad(y, [x, layer.lora_L, layer.lora_R], dy)
    adapter_dx = dx - dy @ layer.weight
    mask = adapter_dx.abs() > 1e-12
    dropped = 1 - mask.double().mean().item()
    assert 0.0 < dropped < 0.35, f"dropped fraction {dropped:.3f}, expected about {p}"
    xr = x.detach().requires_grad_()
    Lr, Rr = (t.detach().requires_grad_() for t in (layer.lora_L, layer.lora_R))
    y_ref = lowrank_linear_reference(xr, layer.weight, layer.bias, Lr, Rr, layer.scales.double(), mask, p)
    ref = (y_ref, *torch.autograd.grad(y_ref, [xr, Lr, Rr], dy))
    for name, r, g in zip(("y", "dx", "dL", "dR"), ref, (y, dx, dL, dR)):
        assert_close(f"compiled ({mode}) {name}", r, g)
    # a fresh seed per call, as in eager
    assert not torch.equal(compiled(x), y.detach()), "two training calls gave the same dropout mask"
