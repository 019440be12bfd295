"""Robustness of the Triton launchers: the CUDA device guard, the TF32 switch, and a second GPU when there is one."""

from __future__ import annotations

import contextlib

import pytest
import torch

from muscle_kernels.ops.lowrank_linear.function import available_backends

from .utils import DEVICE, assert_close

if "triton" not in available_backends(DEVICE):
    pytest.skip(
        "the triton backend is not usable here (no Triton, or no CUDA and no interpreter)", allow_module_level=True
    )

from muscle_kernels.ops.lowrank_linear import configs, launch, muscle_lora_linear  # noqa: E402


def _problem(device, m=9, k=24, n=20, nr=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    t = [
        torch.randn(*shape, generator=g, dtype=dtype).to(device)
        for shape in ((m, k), (n, k), (n,), (nr, k), (n, nr), (m, n))
    ]
    s = torch.rand(nr, generator=g).to(device) + 0.5
    return t[:5] + [s] + t[5:]


def test_guard_uses_torch_cuda_device_for_cuda_tensors(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def fake_device(dev):
        entered.append(torch.device(dev))
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    with launch._device_guard(torch.device("cuda", 1)):
        pass
    assert entered == [torch.device("cuda", 1)], f"guard entered {entered}, expected cuda:1"
    with launch._device_guard(torch.device("cpu")):
        pass
    assert len(entered) == 1, "a CPU tensor must not touch torch.cuda.device"


def test_guard_is_taken_from_the_tensors_device(monkeypatch):
    """Every public launcher launches inside a guard built from its input's device (recorded by a fake guard)."""
    seen, inside = [], {"depth": 0}
    real_guard = launch._device_guard

    @contextlib.contextmanager
    def recording_guard(dev):
        seen.append(dev)
        inside["depth"] += 1
        with real_guard(dev):
            yield
        inside["depth"] -= 1

    launched_outside = []
    real_fused = launch._launch_fused

    def checked_launch(*args, **kwargs):
        if inside["depth"] == 0:
            launched_outside.append("fused")
        return real_fused(*args, **kwargs)

    monkeypatch.setattr(launch, "_device_guard", recording_guard)
    monkeypatch.setattr(launch, "_launch_fused", checked_launch)
    x, w, b, lo, ro, s, dy = _problem(DEVICE)
    y, t, _ = launch.lowrank_linear_fwd_triton(x, w, b, lo, ro, s, 0.0, 0)
    launch.lowrank_linear_bwd_triton(dy, x, w, lo, ro, s, t, 0.0, 0, True, True, True)
    launch.dropout_mask_triton((4, 8), 0.5, 1, DEVICE)
    assert seen == [x.device] * 3, f"guards entered for {seen}, expected x's device three times"
    assert not launched_outside, "a kernel was launched outside the device guard"


@pytest.mark.parametrize(
    "new_api,legacy,expected",
    [
        ("tf32", False, True),
        ("ieee", True, False),
        ("none", True, True),
        ("none", False, False),
        (None, True, True),
        (None, False, False),
    ],
)
def test_tf32_read_through_the_new_api(monkeypatch, new_api, legacy, expected):
    class FakeMatmul:
        allow_tf32 = legacy

    fake = FakeMatmul()
    if new_api is not None:
        fake.fp32_precision = new_api
    monkeypatch.setattr(torch.backends.cuda, "matmul", fake)
    assert configs.tf32_allowed() is expected


def test_tf32_mixed_apis_do_not_raise(monkeypatch):
    class Refusing:
        fp32_precision = "none"

        @property
        def allow_tf32(self):
            raise RuntimeError("you have used mix of the legacy and new APIs")

    monkeypatch.setattr(torch.backends.cuda, "matmul", Refusing())
    assert configs.tf32_allowed() is False


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensors_on_the_second_gpu_launch_there():
    dev = torch.device("cuda", 1)
    x, w, b, lo, ro, s, dy = _problem(dev, m=70, k=48, n=72, nr=16)
    for v in (x, lo, ro):
        v.requires_grad_()
    torch.cuda.set_device(0)
    y = muscle_lora_linear(x, w, b, lo, ro, s, backend="triton")
    y.backward(dy)
    torch.cuda.synchronize(dev)
    xr, lr, rr = (v.detach().cpu().double().requires_grad_() for v in (x, lo, ro))
    from muscle_kernels.ops.lowrank_linear.reference import lowrank_linear_reference

    y_ref = lowrank_linear_reference(xr, w.cpu().double(), b.cpu().double(), lr, rr, s.cpu().double())
    y_ref.backward(dy.cpu().double())
    assert y.device == dev
    for name, ref, got in (
        ("y", y_ref, y),
        ("dx", xr.grad, x.grad),
        ("dL", lr.grad, lo.grad),
        ("dR", rr.grad, ro.grad),
    ):
        assert_close(name, ref, got.cpu())
