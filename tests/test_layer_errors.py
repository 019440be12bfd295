"""Every bad input to the layer and the op gets a clear error that names the argument."""

import pytest
import torch
from torch import nn

from muscle_kernels import MuScleLoRALinear, muscle_lora_linear
from muscle_kernels.ops.lowrank_linear import make_scales


def _args(in_f=8, out_f=6, nr=4, dtype=torch.float32):
    torch.manual_seed(0)
    return dict(
        x=torch.randn(3, in_f, dtype=dtype),
        weight=torch.randn(out_f, in_f, dtype=dtype),
        bias=torch.randn(out_f, dtype=dtype),
        lora_L=torch.randn(nr, in_f, dtype=dtype),
        lora_R=torch.randn(out_f, nr, dtype=dtype),
        scales=make_scales((1, 2), 2, 4.0),
    )


def _call(**over):
    a = _args()
    a.update(over)
    kw = {k: a.pop(k) for k in list(a) if k in ("dropout_p", "training", "backend")}
    return muscle_lora_linear(a["x"], a["weight"], a["bias"], a["lora_L"], a["lora_R"], a["scales"], **kw)


@pytest.mark.parametrize(
    "over,exc,match",
    [
        (dict(x=torch.randn(3, 9)), ValueError, r"x: expected last dimension 8"),
        (dict(x=torch.tensor(1.0)), ValueError, r"x: expected at least one dimension"),
        (dict(x=torch.randint(0, 3, (3, 8))), TypeError, r"x: expected a floating-point"),
        (dict(weight=torch.randn(6, 8, 1)), ValueError, r"weight: expected 2-D"),
        (dict(bias=torch.randn(5)), ValueError, r"bias: expected shape \(6,\)"),
        (dict(lora_L=torch.randn(4, 7)), ValueError, r"lora_L: expected shape \[n\*r, 8\]"),
        (dict(lora_L=torch.randn(0, 8)), ValueError, r"lora_L: expected at least one row"),
        (dict(lora_R=torch.randn(6, 3)), ValueError, r"lora_R: expected shape \(6, 4\)"),
        (dict(scales=torch.ones(3)), ValueError, r"scales: expected shape \(4,\)"),
        (dict(scales=torch.ones(4, requires_grad=True)), ValueError, r"scales: expected a constant"),
        (dict(lora_R=torch.randn(6, 4, dtype=torch.float64)), TypeError, r"lora_R: expected dtype torch.float32"),
        (dict(weight=torch.randn(6, 8, dtype=torch.bfloat16)), TypeError, r"weight: expected dtype torch.float32"),
        (dict(lora_L=torch.randn(4, 8, device="meta")), ValueError, r"lora_L: expected device cpu"),
        (dict(x=[1.0] * 8), TypeError, r"x: expected a torch.Tensor"),
        (dict(dropout_p=1.0), ValueError, r"dropout_p: expected a probability in \[0, 1\)"),
        (dict(dropout_p=-0.1), ValueError, r"dropout_p"),
        (dict(backend="cuda"), ValueError, r"backend: expected one of"),
    ],
)
def test_op_errors(over, exc, match):
    with pytest.raises(exc, match=match):
        _call(**over)


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend='triton' is not available"):
        _call(backend="triton")


def test_env_backend_override(monkeypatch):
    from muscle_kernels.ops.lowrank_linear import function

    monkeypatch.setenv("MUSCLE_KERNELS_BACKEND", "reference")
    assert function.resolve_backend("auto", torch.device("cpu")) == "reference"
    calls = []
    real = function.lowrank_linear_reference
    monkeypatch.setattr(function, "lowrank_linear_reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    _call()
    assert calls, "MUSCLE_KERNELS_BACKEND=reference must route 'auto' to the reference"
    monkeypatch.setenv("MUSCLE_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="MUSCLE_KERNELS_BACKEND: expected one of"):
        _call()


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(freq_band=()), r"freq_band: expected a non-empty sequence of positive numbers"),
        (dict(freq_band=(1, 0)), r"freq_band: expected a non-empty sequence of positive numbers"),
        (dict(freq_band=(1, -2)), r"freq_band: expected a non-empty sequence of positive numbers"),
        (dict(freq_band=3), r"freq_band: expected a non-empty sequence of positive numbers"),
        (dict(freq_band="1234"), r"freq_band: expected a non-empty sequence of positive numbers"),
        (dict(inner_rank=0), r"inner_rank: expected an integer >= 1"),
        (dict(inner_rank=1.5), r"inner_rank: expected an integer >= 1"),
        (dict(alpha=0), r"alpha: expected a positive number"),
        (dict(dropout=1.0), r"dropout: expected a probability"),
        (dict(dropout=-0.5), r"dropout: expected a probability"),
        (dict(init="zeros"), r"init: expected one of"),
        (dict(backend="fast"), r"backend: expected one of"),
    ],
)
def test_layer_config_errors(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MuScleLoRALinear(8, 4, **kw)
    with pytest.raises((ValueError, TypeError), match=match):
        MuScleLoRALinear.from_linear(nn.Linear(8, 4), **kw)


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(freq_band=(1e300,)), "freq_band"),
        (dict(alpha=1e300), "alpha"),
        (dict(freq_band=(1, 1e38), alpha=8.0), "freq_band"),
    ],
)
def test_layer_scales_must_be_finite(kw, name):
    from muscle_kernels import MuScleLoRALinear

    with pytest.raises(
        ValueError,
        match=rf"^{name}: expected values whose scales k \* alpha / inner_rank stay "
        "finite in float32",
    ):
        MuScleLoRALinear(8, 4, **kw)


@pytest.mark.parametrize("name", ["in_features", "out_features"])
def test_layer_size_errors(name):
    kw = dict(in_features=8, out_features=4)
    kw[name] = 0
    with pytest.raises(ValueError, match=name):
        MuScleLoRALinear(**kw)


def test_layer_wrong_input_dim():
    layer = MuScleLoRALinear(8, 4)
    with pytest.raises(ValueError, match=r"x: expected last dimension 8"):
        layer(torch.randn(2, 7))
