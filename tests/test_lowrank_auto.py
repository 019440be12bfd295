"""backend="auto" on CUDA: the timed choice between the fused kernels and the cuBLAS-composed path, and that path.

The decision logic runs on the CPU with a fake timer; the composed path ("cublas", plain torch) is checked against the
reference on CPU tensors in fp32 / bf16 / fp16 at odd shapes, with and without dropout, outputs and all gradients.
"""

from __future__ import annotations

import pytest
import torch

from muscle_kernels.ops.lowrank_linear import autoselect, function, muscle_lora_linear
from muscle_kernels.ops.lowrank_linear.cpu import dropout_mask_torch
from muscle_kernels.ops.lowrank_linear.reference import lowrank_linear_reference

from .utils import assert_close

KEY = ("cuda:0", "bfloat16", 8192, 4096, 4096, 16, False, True)


@pytest.fixture(autouse=True)
def _fresh_choices(monkeypatch):
    monkeypatch.delenv("MUSCLE_KERNELS_BACKEND", raising=False)
    autoselect.clear_auto_choices()
    yield
    autoselect.clear_auto_choices()


class FakeTimer:
    """Runs each candidate once (so a broken runner fails) and answers a scripted time per call, in order."""

    def __init__(self, *times):
        self.times, self.calls = list(times), 0

    def __call__(self, run):
        run()
        self.calls += 1
        return self.times.pop(0)


def _runners(log):
    return {name: (lambda name=name: log.append(name)) for name in autoselect.CANDIDATES}


@pytest.mark.parametrize(
    "t_triton,t_cublas,expected",
    [(1.0, 2.0, "triton"), (2.0, 1.0, "cublas"), (1.0, 1.01, "cublas"), (1.0, 1.05, "triton")],
    ids=["triton-faster", "cublas-faster", "tie-goes-to-cublas", "5%-is-not-a-tie"],
)
def test_fake_timer_picks_the_faster(t_triton, t_cublas, expected):
    log, timer = [], FakeTimer(t_triton, t_cublas)
    assert autoselect.decide(KEY, _runners(log), timer) == expected
    assert log == ["triton", "cublas"], "each candidate must run (once) to be timed"
    # cached: the second call neither times nor runs anything
    assert autoselect.decide(KEY, _runners(log), FakeTimer()) == expected
    assert timer.calls == 2 and log == ["triton", "cublas"]
    (entry,) = autoselect.auto_choices()
    assert entry["choice"] == expected and entry["times_ms"] == {"triton": t_triton, "cublas": t_cublas}
    assert (entry["m_bucket"], entry["nr"], entry["dropout"], entry["backward"]) == (8192, 16, False, True)


def test_each_key_field_is_its_own_class():
    for i, key in enumerate(
        [KEY, KEY[:6] + (True, True), KEY[:7] + (False,), ("cuda:1",) + KEY[1:], KEY[:2] + (4096,) + KEY[3:]]
    ):
        autoselect.decide(key, _runners([]), FakeTimer(1.0, 2.0) if i % 2 else FakeTimer(2.0, 1.0))
    assert [c["choice"] for c in autoselect.auto_choices()] == ["cublas", "triton", "cublas", "triton", "cublas"]


def test_a_failing_candidate_is_out_of_the_race():
    def broken():
        raise RuntimeError("no kernel image for this GPU")

    runners = {"triton": broken, "cublas": lambda: None}
    assert autoselect.decide(KEY, runners, FakeTimer(0.5)) == "cublas"
    with pytest.raises(RuntimeError, match="every candidate failed"):
        autoselect.decide(KEY[:5] + (64,) + KEY[6:], {"triton": broken}, FakeTimer())


def test_nothing_is_timed_while_tracing_or_capturing():
    assert autoselect.decide(KEY, _runners([]), FakeTimer(), can_time=False) == "triton"
    assert autoselect.auto_choices() == [], "an untimed default must not be cached"
    assert autoselect.cached_choice(KEY) is None
    autoselect.decide(KEY, _runners([]), FakeTimer(2.0, 1.0))
    assert autoselect.cached_choice(KEY) == "cublas"
    assert autoselect.decide(KEY, _runners([]), FakeTimer(), can_time=False) == "cublas", "a decided key is kept"


def test_m_bucket():
    assert [autoselect._m_bucket(m) for m in (1, 16, 17, 4113, 8192, 10**6)] == [16, 16, 32, 8192, 8192, 16384]


def test_verbose_prints_the_decision(monkeypatch, capsys):
    monkeypatch.setenv("MUSCLE_KERNELS_AUTO_VERBOSE", "1")
    autoselect.decide(KEY, _runners([]), FakeTimer(1.0, 3.0))
    err = capsys.readouterr().err
    assert "-> triton" in err and "cublas 3.000 ms" in err


def test_resolve_backend_on_cuda(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setitem(function._TRITON, "tried", True)
    monkeypatch.setitem(function._TRITON, "module", object())
    assert function.resolve_backend("auto", cuda) == "auto"
    for forced in ("cublas", "triton", "torch", "reference"):
        monkeypatch.setenv("MUSCLE_KERNELS_BACKEND", forced)
        assert function.resolve_backend("auto", cuda) == forced
    monkeypatch.delenv("MUSCLE_KERNELS_BACKEND")
    monkeypatch.setitem(function._TRITON, "module", None)  # no Triton: cuBLAS, with no timing at all
    assert function.resolve_backend("auto", cuda) == "cublas"
    assert function.resolve_backend("auto", torch.device("cpu")) == "torch"
    assert "cublas" in function.available_backends("cpu")


@pytest.mark.skipif("triton" not in function.available_backends("cpu"), reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("times,expected", [((1.0, 2.0), "triton"), ((2.0, 1.0), "cublas")])
def test_the_op_times_both_paths_on_first_use(monkeypatch, times, expected):
    """muscle_lora_linear with "auto" resolved as on CUDA (here: CPU tensors under the interpreter)."""
    monkeypatch.setattr(function, "resolve_backend", lambda backend, device: "auto")
    timer = FakeTimer(*times, *times)
    monkeypatch.setattr(autoselect, "cuda_timer", timer)
    x, w, b, lo, ro, s, dy = _problem(torch.float32, 37, 24, 40, 8)
    x.requires_grad_(), lo.requires_grad_()
    y = muscle_lora_linear(x, w, b, lo, ro, s)
    y.backward(dy)
    (entry,) = autoselect.auto_choices()
    assert entry["choice"] == expected and entry["backward"] and not entry["dropout"]
    assert (entry["out_features"], entry["in_features"], entry["nr"]) == (40, 24, 8)
    ref = _reference(x.detach(), w, b, lo.detach(), ro, s, dy, None, 0.0)
    assert_close("y", ref["y"], y)
    assert_close("dx", ref["dx"], x.grad)
    assert_close("dL", ref["dL"], lo.grad)
    muscle_lora_linear(x, w, b, lo, ro, s)  # same class: no new timing
    assert timer.calls == 2
    with torch.no_grad():  # forward only is another class
        muscle_lora_linear(x, w, b, lo, ro, s)
    assert [c["backward"] for c in autoselect.auto_choices()] == [True, False]


# The scripted time of each candidate: whichever races last is the fastest, so a variant that races is chosen.
_TIMES = {"triton": 2.0, "cublas": 3.0, "triton-fdy": 1.5, "triton-fdx": 1.0}


@pytest.mark.skipif("triton" not in function.available_backends("cpu"), reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize(
    "nr,p,x_grad,deterministic,extra",
    [
        (40, 0.0, True, False, ["triton-fdy", "triton-fdx"]),
        (8, 0.2, True, False, ["triton-fdy", "triton-fdx"]),
        (8, 0.0, True, False, ["triton-fdx"]),
        (40, 0.0, False, False, ["triton-fdy"]),
        (8, 0.0, False, False, []),
        (40, 0.0, True, True, []),
    ],
    ids=["wide", "dropout", "narrow", "wide-no-dx", "narrow-no-dx", "deterministic"],
)
def test_atomic_dr_variants_race_where_they_change_something(monkeypatch, nr, p, x_grad, deterministic, extra):
    """dR inside another pass over dy races as its own candidate where that pass exists: "triton-fdy" where the
    backward reads dy for G in a pass of its own (n*r > 32 or dropout), "triton-fdx" where it computes dx (the dx
    GEMM). Elsewhere they would run the same kernels as "triton", and in deterministic mode their atomics are off:
    they do not race."""
    monkeypatch.setattr(function, "resolve_backend", lambda backend, device: "auto")
    if deterministic:
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    names = ["triton", "cublas", *extra]
    timer = FakeTimer(*(_TIMES[n] for n in names))
    monkeypatch.setattr(autoselect, "cuda_timer", timer)
    x, w, b, lo, ro, s, dy = _problem(torch.float32, 37, 24, 40, nr)
    x.requires_grad_(x_grad), lo.requires_grad_(), ro.requires_grad_()
    torch.manual_seed(3)
    y = muscle_lora_linear(x, w, b, lo, ro, s, dropout_p=p, training=True)
    y.backward(dy)
    (entry,) = autoselect.auto_choices()
    assert timer.calls == len(names) and set(entry["times_ms"]) == set(names)
    assert entry["choice"] == (names[-1] if extra else "triton")
    mask = None
    if p > 0:
        torch.manual_seed(3)
        seed = int(torch.randint(0, 2**31 - 1, (1,), device=x.device).item())  # the Triton path's draw
        mask = triton_launch().dropout_mask_triton(x.shape, p, seed, x.device)
    ref = _reference(x.detach(), w, b, lo.detach(), ro.detach(), s, dy, mask, p)
    grads = [("dx", x.grad)] if x_grad else []
    for name, got in [("y", y), *grads, ("dL", lo.grad), ("dR", ro.grad)]:
        assert_close(name, ref[name], got)


def triton_launch():
    from muscle_kernels.ops.lowrank_linear import launch

    return launch


# ------------------------------------------------------------------------------------------------------------------
# The composed ("cublas") path against the reference, on CPU tensors.
# ------------------------------------------------------------------------------------------------------------------
def _problem(dtype, m, k, n, nr, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g, dtype=torch.float64)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) / k**0.5
    b = torch.randn(n, generator=g, dtype=torch.float64)
    lo = torch.randn(nr, k, generator=g, dtype=torch.float64) / k**0.5
    ro = torch.randn(n, nr, generator=g, dtype=torch.float64) / nr**0.5
    s = torch.rand(nr, generator=g, dtype=torch.float64) * 3 + 0.25
    dy = torch.randn(m, n, generator=g, dtype=torch.float64)
    return [v.to(dtype) for v in (x, w, b, lo, ro)] + [s.float(), dy.to(dtype)]


def _reference(x, w, b, lo, ro, s, dy, mask, p, dtype=torch.float64):
    xr, lr, rr = (v.detach().to(dtype).requires_grad_() for v in (x, lo, ro))
    y = lowrank_linear_reference(xr, w.to(dtype), b.to(dtype), lr, rr, s.to(dtype), mask, p)
    dx, dl, dr = torch.autograd.grad(y, [xr, lr, rr], dy.to(dtype))
    return dict(y=y.detach(), dx=dx, dL=dl, dR=dr)


@pytest.mark.parametrize("p", [0.0, 0.2], ids=["p0", "p0.2"])
@pytest.mark.parametrize("m,k,n,nr", [(1, 7, 5, 1), (37, 130, 72, 16), (130, 48, 33, 9)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cublas_backend_matches_reference(dtype, m, k, n, nr, p):
    x, w, b, lo, ro, s, dy = _problem(dtype, m, k, n, nr, seed=m + nr)
    xg, lg, rg = (v.clone().requires_grad_() for v in (x, lo, ro))
    torch.manual_seed(99)
    y = muscle_lora_linear(xg, w, b, lg, rg, s, dropout_p=p, training=True, backend="cublas")
    y.backward(dy)
    mask = None
    if p > 0:
        torch.manual_seed(99)
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # the op's draw
        mask = dropout_mask_torch(x.shape, p, seed, x.device)
        assert 0 < int(mask.sum()) < mask.numel()
    ref = _reference(x, w, b, lo, ro, s, dy, mask, p)
    base = None if dtype == torch.float32 else _reference(x, w, b, lo, ro, s, dy, mask, p, dtype=dtype)
    eps = {torch.float16: 2**-10, torch.bfloat16: 2**-7}.get(dtype)
    for name, got in (("y", y), ("dx", xg.grad), ("dL", lg.grad), ("dR", rg.grad)):
        assert got.dtype == dtype
        if base is None:
            assert_close(name, ref[name], got)
        else:
            assert_close(name, ref[name], got, base=base[name].float(), atol=4 * eps * ref[name].abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (real timing of both paths)")
def test_auto_on_cuda_times_both_and_is_correct():
    dev = torch.device("cuda")
    x, w, b, lo, ro, s, dy = (v.to(dev) for v in _problem(torch.bfloat16, 1000, 512, 768, 16))
    xg, lg, rg = (v.clone().requires_grad_() for v in (x, lo, ro))
    y = muscle_lora_linear(xg, w, b, lg, rg, s)
    y.backward(dy)
    (entry,) = autoselect.auto_choices()
    # n*r 16 in bf16 with dx and dR wanted: dR folded into the dx GEMM races too
    assert set(entry["times_ms"]) == {"triton", "cublas", "triton-fdx"}
    assert entry["choice"] in entry["times_ms"]
    assert all(t > 0 for t in entry["times_ms"].values())
    cpu = [v.cpu() for v in (x, w, b, lo, ro, s, dy)]
    ref = _reference(*cpu, None, 0.0)
    base = _reference(*cpu, None, 0.0, dtype=torch.bfloat16)
    for name, got in (("y", y), ("dx", xg.grad), ("dL", lg.grad), ("dR", rg.grad)):
        assert_close(name, ref[name], got.cpu(), base=base[name].float(), atol=4 * 2**-7 * ref[name].abs().max().item())


class _FakeCudaDevice:
    """Stands in for torch.cuda.device: records the device made current while it is entered."""

    current = "cuda:0"
    entered = []

    def __init__(self, device):
        self.device = str(torch.device(device))

    def __enter__(self):
        self.prev, _FakeCudaDevice.current = _FakeCudaDevice.current, self.device
        _FakeCudaDevice.entered.append(self.device)

    def __exit__(self, *exc):
        _FakeCudaDevice.current = self.prev


def test_timing_runs_with_the_inputs_device_current(monkeypatch):
    """Tensors on cuda:1 while cuda:0 is current: CUDA events and synchronize act on the current device, so each
    candidate is timed with cuda:1 made current (and the caller's device is current again afterwards)."""
    monkeypatch.setattr(torch.cuda, "device", _FakeCudaDevice)
    monkeypatch.setattr(_FakeCudaDevice, "entered", [])
    seen = []

    def timer(run):
        run()
        seen.append(_FakeCudaDevice.current)
        return 1.0 + len(seen)

    key = ("cuda:1",) + KEY[1:]
    assert autoselect.decide(key, _runners([]), timer, device=torch.device("cuda", 1)) == "triton"
    assert seen == ["cuda:1", "cuda:1"] and _FakeCudaDevice.current == "cuda:0"
    # CPU inputs (the interpreter): no device to make current
    autoselect.clear_auto_choices()
    _FakeCudaDevice.entered.clear()
    autoselect.decide(("cpu",) + KEY[1:], _runners([]), FakeTimer(1.0, 2.0), device=torch.device("cpu"))
    assert _FakeCudaDevice.entered == []


@pytest.mark.skipif("triton" not in function.available_backends("cpu"), reason="needs TRITON_INTERPRET=1")
def test_the_op_times_on_its_inputs_device(monkeypatch):
    monkeypatch.setattr(function, "resolve_backend", lambda backend, device: "auto")
    got = {}
    real = autoselect.decide

    def spy(key, runners, timer=None, can_time=True, device=None):
        got["device"] = device
        return real(key, runners, FakeTimer(1.0, 2.0), can_time, device)

    monkeypatch.setattr(autoselect, "decide", spy)
    x, w, b, lo, ro, s, _ = _problem(torch.float32, 5, 24, 40, 8)
    muscle_lora_linear(x, w, b, lo, ro, s)
    assert got["device"] == x.device


@pytest.mark.parametrize(
    "fault",
    [
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        getattr(torch, "AcceleratorError", RuntimeError)("CUDA error: unspecified launch failure"),
    ],
    ids=["runtime-error", "accelerator-error"],
)
def test_a_device_fault_is_not_treated_as_a_lost_race(fault):
    """A compile error only takes its candidate out of the race; a CUDA error is a device fault that leaves the
    context unusable, so auto raises it (naming the candidate) instead of pretending the other path can run."""

    def broken():
        raise RuntimeError("triton: out of resources: shared memory")

    def faulty():
        raise fault

    ok = {"triton": broken, "cublas": lambda: None}
    assert autoselect.decide(KEY, ok, FakeTimer(1.0)) == "cublas"
    autoselect.clear_auto_choices()
    with pytest.raises(RuntimeError, match="'triton' hit a CUDA error.*poisons the CUDA context") as info:
        autoselect.decide(KEY, {"triton": faulty, "cublas": lambda: None}, FakeTimer(1.0, 1.0))
    assert info.value.__cause__ is fault
    assert autoselect.auto_choices() == [], "nothing may be cached after a device fault"
