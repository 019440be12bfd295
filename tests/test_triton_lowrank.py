"""The Triton kernels of the multi-scale low-rank linear op against the fp64 reference.

Without a GPU they run under TRITON_INTERPRET=1 (set by conftest.py) on small shapes; with one, on CUDA tensors.
Every output buffer is NaN-filled before the launch (launch.force_configs(fill_nan=True)) so an unwritten tile fails.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from muscle_kernels.ops.lowrank_linear import muscle_lora_linear
from muscle_kernels.ops.lowrank_linear.cpu import lowrank_linear_bwd_torch, lowrank_linear_fwd_torch
from muscle_kernels.ops.lowrank_linear.function import available_backends
from muscle_kernels.ops.lowrank_linear.reference import lowrank_linear_reference

from .utils import DEVICE, assert_close

if "triton" not in available_backends(DEVICE):
    pytest.skip(
        "the triton backend is not usable here (no Triton, or no CUDA and no interpreter)", allow_module_level=True
    )

import triton  # noqa: E402

from muscle_kernels.ops.lowrank_linear import configs, launch  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ON_GPU = DEVICE.type == "cuda"


# On a GPU every tiny shape below would be a new specialisation x 5 autotune configs: one moderate config instead
# (valid for every dtype) keeps the file to a few dozen compiles. The shipped configs are checked one by one at LLM
# shapes in test_triton_configs.py, the autotuned launch in test_triton_registration.py and the benchmark.
_GPU_TEST_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=3)


@pytest.fixture(autouse=True)
def _nan_outputs():
    with launch.force_configs(fill_nan=True, fused=_GPU_TEST_CONFIG if ON_GPU else None):
        yield


@pytest.fixture
def forced():
    """forced(**overrides): launch.force_configs for the rest of the test, inside _nan_outputs' block."""
    with contextlib.ExitStack() as stack:
        yield lambda **overrides: stack.enter_context(launch.force_configs(**overrides))


def _problem(m, k, n, nr, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g, dtype=torch.float64)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) / k**0.5
    b = torch.randn(n, generator=g, dtype=torch.float64) if bias else None
    lo = torch.randn(nr, k, generator=g, dtype=torch.float64) / k**0.5
    ro = torch.randn(n, nr, generator=g, dtype=torch.float64) / nr**0.5
    s = torch.rand(nr, generator=g, dtype=torch.float64) * 4 + 0.25
    dy = torch.randn(m, n, generator=g, dtype=torch.float64)
    return x, w, b, lo, ro, s, dy


def _reference(x, w, b, lo, ro, s, dy, mask, p):
    """fp64 y and gradients (dx, dL, dR) of the reference by autograd."""
    xr, lr, rr = (v.clone().requires_grad_() for v in (x, lo, ro))
    y = lowrank_linear_reference(xr, w, b, lr, rr, s, mask, p)
    y.backward(dy)
    return y.detach(), xr.grad, lr.grad, rr.grad


def _cast(dtype, *tensors):
    return [None if v is None else v.to(device=DEVICE, dtype=dtype) for v in tensors]


def _check_all(
    dtype,
    x,
    w,
    b,
    lo,
    ro,
    s,
    dy,
    p=0.0,
    seed=0,
    needs=(True, True, True),
    scales_dtype=torch.float32,
    dr_pass=None,
):
    mask = launch.dropout_mask_triton(x.shape, p, seed, DEVICE).cpu() if p > 0 else None
    ref_y, ref_dx, ref_dl, ref_dr = _reference(x, w, b, lo, ro, s, dy, mask, p)
    xc, wc, bc, lc, rc, dyc = _cast(dtype, x, w, b, lo, ro, dy)
    sc = s.to(device=DEVICE, dtype=scales_dtype)
    y, t, bits = launch.lowrank_linear_fwd_triton(xc, wc, bc, lc, rc, sc, p, seed)
    assert y.dtype == dtype and t.dtype == torch.float32
    dx, dl, dr = launch.lowrank_linear_bwd_triton(
        dyc, xc, wc, lc, rc, sc, t, p, seed, *needs, bits=bits, dr_pass=dr_pass
    )

    # Plain PyTorch in the same dtype (the torch path) sets the error budget for fp16/bf16.
    base = None
    if dtype != torch.float32 and p == 0.0:
        by, bt, _ = lowrank_linear_fwd_torch(
            *[v.cpu() if v is not None else None for v in (xc, wc, bc, lc, rc)], s.float(), 0.0, 0
        )
        bdx, bdl, bdr = lowrank_linear_bwd_torch(
            dyc.cpu(), xc.cpu(), wc.cpu(), lc.cpu(), rc.cpu(), s.float(), bt, 0.0, 0, True, True, True
        )
        base = dict(y=by, dx=bdx, dL=bdl, dR=bdr)

    def check(name, ref, got):
        if base is None:
            assert_close(name, ref, got.cpu())
        else:
            assert_close(name, ref, got.cpu(), base=base[name].float(), atol=_atol(dtype, ref))

    check("y", ref_y, y)
    # T from the inputs as the kernel saw them (rounded to dtype), so only the fp32 accumulation is judged.
    xd = xc.cpu().double() if mask is None else xc.cpu().double() * mask / (1 - p)
    assert_close("T", xd @ lc.cpu().double().t(), t.cpu())
    for name, ref, got, need in (
        ("dx", ref_dx, dx, needs[0]),
        ("dL", ref_dl, dl, needs[1]),
        ("dR", ref_dr, dr, needs[2]),
    ):
        if not need:
            assert got is None, f"{name}: expected None when not needed"
            continue
        assert got.dtype == dtype, f"{name}: dtype {got.dtype} != parameter dtype {dtype}"
        check(name, ref, got)


def _atol(dtype, ref):
    # Low-precision absolute slack, relative to the tensor's size: one rounding step of the output's magnitude.
    eps = {torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float32: 2**-20}[dtype]
    return 2 * eps * ref.abs().max().item()


SHAPES = [
    # (M, in, out, n*r, bias)
    pytest.param(1, 48, 72, 1, True, id="M1-nr1"),
    pytest.param(37, 48, 72, 16, False, id="M37-nr16-nobias"),
    pytest.param(130, 72, 48, 64, True, id="M130-nr64"),
    pytest.param(37, 130, 72, 4, True, id="M37-in130-nr4"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k,n,nr,bias", SHAPES)
def test_launchers_match_reference(dtype, m, k, n, nr, bias):
    _check_all(dtype, *_problem(m, k, n, nr, bias))


@pytest.mark.parametrize("fuse,split", [(True, 1), (False, 3)], ids=["T-in-loop", "shrink+split-reductions"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_both_launch_modes(forced, fuse, split, dtype):
    forced(fuse_t=fuse, split=split)
    _check_all(dtype, *_problem(130, 130, 72, 16, True, seed=1))


@pytest.mark.parametrize("nr", [128, 256] if ON_GPU else [256], ids=lambda v: f"nr{v}")
def test_large_rank(nr):
    _check_all(torch.float32 if not ON_GPU else torch.bfloat16, *_problem(37, 48, 72, nr, True, seed=2))


@pytest.mark.parametrize("split", [1, 3], ids=["split1", "split3"])
# K = 96 is a multiple of BLOCK_K (the EVEN_K variant); fp32 at K = 96 runs in test_k_a_multiple_of_block_k.
@pytest.mark.parametrize(
    "dtype,k",
    [(torch.float32, 72), (torch.float16, 72), (torch.bfloat16, 72), (torch.bfloat16, 96)],
    ids=["fp32-k72", "fp16-k72", "bf16-k72", "bf16-k96"],
)
def test_dropout_matches_reference_with_the_kernel_mask(forced, dtype, k, split):
    forced(split=split)
    x, w, b, lo, ro, s, dy = _problem(130, k, 48, 16, True, seed=3)
    # fp16/bf16 have no same-dtype PyTorch baseline with this mask: compare with dtype tolerances instead.
    mask = launch.dropout_mask_triton(x.shape, 0.25, 99, DEVICE).cpu()
    ref_y, ref_dx, ref_dl, ref_dr = _reference(x, w, b, lo, ro, s, dy, mask, 0.25)
    xc, wc, bc, lc, rc, dyc = _cast(dtype, x, w, b, lo, ro, dy)
    sc = s.float().to(DEVICE)
    y, t, bits = launch.lowrank_linear_fwd_triton(xc, wc, bc, lc, rc, sc, 0.25, 99)
    assert bits.dtype == torch.int32 and bits.shape == (130, 3), "bits: expected the packed mask [M, cdiv(in, 32)]"
    assert torch.equal(launch.unpack_bits(bits, k).cpu(), mask), "bits: the forward saved another mask"
    dx, dl, dr = launch.lowrank_linear_bwd_triton(dyc, xc, wc, lc, rc, sc, t, 0.25, 99, True, True, True, bits=bits)
    for name, ref, got in (("y", ref_y, y), ("dx", ref_dx, dx), ("dL", ref_dl, dl), ("dR", ref_dr, dr)):
        if dtype == torch.float32:
            assert_close(name, ref, got.cpu())
        else:
            assert_close(name, ref, got.cpu(), atol=4 * _atol(dtype, ref))
    # Without the saved mask, backward regenerates the same one from the seed.
    again = launch.lowrank_linear_bwd_triton(dyc, xc, wc, lc, rc, sc, t, 0.25, 99, True, True, True)
    for name, a, b in zip(("dx", "dL", "dR"), (dx, dl, dr), again):
        assert torch.equal(a, b), f"{name}: backward with a regenerated mask differs from the saved one"


def _philox_keep(seed, m, k, p):
    """The kernels' keep-mask from its definition, in numpy: x[m, c] is kept iff
    uniform(philox4x32-10(seed, (c // 4, m, 0, 0))[c % 4]) >= p (Salmon et al. 2011, Triton's constants)."""
    u32 = np.uint32
    rows, quads = np.meshgrid(np.arange(m, dtype=np.uint64), np.arange((k + 3) // 4, dtype=np.uint64), indexing="ij")
    c = [quads.astype(u32), rows.astype(u32), np.zeros_like(rows, u32), np.zeros_like(rows, u32)]
    k0, k1 = u32(seed & 0xFFFFFFFF), u32((seed >> 32) & 0xFFFFFFFF)
    with np.errstate(over="ignore"):
        for _ in range(10):
            p0 = np.uint64(0xD2511F53) * c[0].astype(np.uint64)
            p1 = np.uint64(0xCD9E8D57) * c[2].astype(np.uint64)
            c = [
                (p1 >> np.uint64(32)).astype(u32) ^ c[1] ^ k0,
                p1.astype(u32),
                (p0 >> np.uint64(32)).astype(u32) ^ c[3] ^ k1,
                p0.astype(u32),
            ]
            k0, k1 = u32(k0 + u32(0x9E3779B9)), u32(k1 + u32(0xBB67AE85))
    words = np.stack(c, axis=-1).reshape(m, -1)[:, :k]  # column c is output c % 4 of call c // 4
    # tl.uint_to_uniform_float: the uint32 as int32, folded to non-negative, times 2^-31.
    signed = words.view(np.int32).astype(np.int64)
    signed = np.where(signed < 0, -signed - 1, signed)
    return torch.from_numpy((signed.astype(np.float32) * np.float32(4.6566127342e-10)) >= np.float32(p))


@pytest.mark.parametrize("shape", [(5, 32), (37, 72), (3, 100)], ids=str)
def test_dropout_mask_follows_its_definition(shape):
    got = launch.dropout_mask_triton(shape, 0.3, 123456789, DEVICE).cpu()
    assert torch.equal(got, _philox_keep(123456789, *shape, 0.3)), "mask: differs from uniform(philox(...)) >= p"


def test_dropout_mask_is_a_dropout_mask():
    shape = (64, 96)
    a = launch.dropout_mask_triton(shape, 0.3, 5, DEVICE)
    b = launch.dropout_mask_triton(shape, 0.3, 5, DEVICE)
    c = launch.dropout_mask_triton(shape, 0.3, 6, DEVICE)
    assert a.dtype == torch.bool and a.shape == shape
    assert torch.equal(a, b), "mask: not a pure function of the seed"
    assert not torch.equal(a, c), "mask: a different seed gave the same mask"
    kept = a.float().mean().item()
    assert 0.65 < kept < 0.75, f"mask: kept fraction {kept:.3f}, expected about 0.7"
    # Rows and columns are independent streams: no two rows are identical.
    assert len({tuple(r.tolist()) for r in a.cpu()}) == shape[0], "mask: repeated rows"
    # The four outputs of one Philox call are four different columns, not copies.
    assert not torch.equal(a[:, 0::4], a[:, 1::4]), "mask: columns 4j and 4j+1 are equal"
    # Leading dimensions flatten into rows, exactly as the op flattens x.
    assert torch.equal(launch.dropout_mask_triton((4, 16, 96), 0.3, 5, DEVICE).reshape(shape), a)


@pytest.mark.parametrize(
    "needs",
    [(True, False, False), (False, True, False), (False, False, True), (False, True, True), (True, True, False)],
    ids=["dx", "dL", "dR", "dL+dR", "dx+dL"],
)
@pytest.mark.parametrize("p", [0.0, 0.2], ids=["p0", "p0.2"])
def test_partial_gradients(needs, p):
    _check_all(torch.float32, *_problem(37, 48, 72, 16, False, seed=4), p=p, seed=11, needs=needs)


@pytest.mark.parametrize("nr,p", [(16, 0.0), (64, 0.0), (16, 0.2)], ids=["in-loop", "shrink", "dropout"])
def test_k_a_multiple_of_block_k(nr, p):
    # K = 96 takes the EVEN_K specialisation (no K masks) of the fused GEMM and the shrink; the other tests' K do not.
    if not ON_GPU:
        assert 96 % configs.INTERPRETER_CONFIG.kwargs["BLOCK_K"] == 0
        assert 96 % configs.shrink_config(configs.block_r(nr), 4)[1] == 0
    _check_all(torch.float32, *_problem(37, 96, 72, nr, True, seed=12), p=p, seed=5)
    if p == 0.0:  # bf16 under dropout, with K = 96 too: test_dropout_matches_reference_with_the_kernel_mask
        _check_all(torch.bfloat16, *_problem(37, 96, 72, nr, True, seed=13))


def test_scales_of_any_float_dtype():
    _check_all(torch.float32, *_problem(37, 48, 72, 4, True, seed=5), scales_dtype=torch.float64)


def test_empty_batch():
    x, w, b, lo, ro, s, dy = _cast(torch.float32, *_problem(1, 48, 72, 4, True))
    y, t, _ = launch.lowrank_linear_fwd_triton(x[:0], w, b, lo, ro, s, 0.0, 0)
    assert y.shape == (0, 72) and t.shape == (0, 4)
    dx, dl, dr = launch.lowrank_linear_bwd_triton(dy[:0], x[:0], w, lo, ro, s, t, 0.0, 0, True, True, True)
    assert dx.shape == (0, 48)
    assert torch.equal(dl, torch.zeros_like(lo)), "dL: expected zeros for an empty batch"
    assert torch.equal(dr, torch.zeros_like(ro)), "dR: expected zeros for an empty batch"


@pytest.mark.parametrize("split", [None, 3], ids=["split-auto", "split3"])
@pytest.mark.parametrize(
    "needs", [(True, True, True), (False, True, True), (True, False, True)], ids=["all", "dL+dR", "dx+dR"]
)
@pytest.mark.parametrize("nr,p", [(40, 0.0), (64, 0.0), (16, 0.2)], ids=["nr40", "nr64", "dropout"])
def test_fused_dy_computes_dr_in_the_g_pass(monkeypatch, forced, nr, p, needs, split):
    forced(split=split)
    assert launch.uses_fused_dy(nr, p, torch.bfloat16) and launch.uses_fused_dy(nr, p, torch.float32)
    calls = []
    real = launch._launch_reduce
    monkeypatch.setattr(launch, "_launch_reduce", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    _check_all(torch.float32, *_problem(37, 48, 72, nr, True, seed=14), p=p, seed=3, needs=needs, dr_pass="g")
    # dR came from the G pass: the only reduction left is dL's over x ([37, 48]), none over dy ([37, 72]).
    assert (37, 72) not in calls, "dr_pass g: dR was still reduced in a pass of its own"
    if ON_GPU or split is None:
        _check_all(torch.bfloat16, *_problem(37, 48, 72, nr, True, seed=15), needs=needs, dr_pass="g")


@pytest.mark.parametrize("dr_pass", ["g", "dx"])
def test_atomic_dr_variants_are_off_in_deterministic_mode(monkeypatch, dr_pass):
    x, w, b, lo, ro, s, dy = _cast(torch.float32, *_problem(37, 48, 72, 64, True, seed=16))
    y, t, _ = launch.lowrank_linear_fwd_triton(x, w, b, lo, ro, s, 0.0, 0)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    plain = launch.lowrank_linear_bwd_triton(dy, x, w, lo, ro, s, t, 0.0, 0, True, True, True)
    calls = _reductions_over(monkeypatch)
    fused = launch.lowrank_linear_bwd_triton(dy, x, w, lo, ro, s, t, 0.0, 0, True, True, True, dr_pass=dr_pass)
    assert (37, 72) in calls, "deterministic mode: dR must come from its own (atomics-free) reduction over dy"
    for name, a, c in zip(("dx", "dL", "dR"), plain, fused):
        assert torch.equal(a, c), f"{name}: deterministic mode must run the atomics-free reduction"


def _reductions_over(monkeypatch):
    """The first operand's shape of every `_launch_reduce` from now on: (M, out) is dR's reduction over dy."""
    calls = []
    real = launch._launch_reduce
    monkeypatch.setattr(launch, "_launch_reduce", lambda *a, **k: calls.append(tuple(a[0].shape)) or real(*a, **k))
    return calls


# (M, in, out, n*r, p, a low precision): odd M over several row tiles (their atomics meet in dR), in over several
# column tiles (only the first may add into dR), out = the dx GEMM's K, with a ragged last K step (72) or none (96,
# EVEN_K); in != out, so that dL's reduction over x tells itself from dR's over dy.
FOLD_CASES = [
    pytest.param(130, 48, 72, 4, 0.0, torch.bfloat16, id="G-in-loop-nr4"),
    pytest.param(37, 130, 96, 16, 0.0, torch.float16, id="G-in-loop-nr16-evenK"),
    pytest.param(130, 48, 72, 40, 0.0, torch.float16, id="G-loaded-nr40"),
    pytest.param(37, 48, 72, 64, 0.0, torch.bfloat16, id="G-loaded-nr64"),
    pytest.param(130, 80, 72, 16, 0.2, None, id="dropout-nr16"),
]


@pytest.mark.parametrize("needs", [(True, True, True), (True, False, True)], ids=["all", "dx+dR"])
@pytest.mark.parametrize("m,k,n,nr,p,low", FOLD_CASES)
def test_fold_dx_computes_dr_in_the_dx_gemm(monkeypatch, m, k, n, nr, p, low, needs):
    assert launch.uses_fold_dx(nr, torch.bfloat16)
    calls = _reductions_over(monkeypatch)
    problem = _problem(m, k, n, nr, True, seed=30 + nr)
    _check_all(torch.float32, *problem, p=p, seed=7, needs=needs, dr_pass="dx")
    assert (m, n) not in calls, "dr_pass dx: dR was still reduced in a pass of its own over dy"
    assert ((m, k) in calls) == needs[1], "dL keeps its own reduction over x (when wanted)"
    if low is not None:  # under dropout: test_fold_dx_with_dropout_in_low_precision
        _check_all(low, *problem, needs=needs, dr_pass="dx")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fold_dx_with_dropout_in_low_precision(monkeypatch, dtype):
    # The same comparison as test_dropout_matches_reference_with_the_kernel_mask (no same-dtype baseline for this
    # mask): dtype tolerances against the fp64 reference.
    calls = _reductions_over(monkeypatch)
    x, w, b, lo, ro, s, dy = _problem(130, 80, 72, 16, True, seed=31)
    mask = launch.dropout_mask_triton(x.shape, 0.2, 9, DEVICE).cpu()
    ref = _reference(x, w, b, lo, ro, s, dy, mask, 0.2)[1:]
    xc, wc, bc, lc, rc, dyc = _cast(dtype, x, w, b, lo, ro, dy)
    sc = s.float().to(DEVICE)
    _, t, bits = launch.lowrank_linear_fwd_triton(xc, wc, bc, lc, rc, sc, 0.2, 9)
    got = launch.lowrank_linear_bwd_triton(dyc, xc, wc, lc, rc, sc, t, 0.2, 9, True, True, True, bits, "dx")
    assert calls == [(130, 80)], f"dr_pass dx: expected dL's reduction over x only, got reductions over {calls}"
    for name, r, g in zip(("dx", "dL", "dR"), ref, got):
        assert g.dtype == dtype, f"{name}: dtype {g.dtype}"
        assert_close(name, r, g.cpu(), atol=4 * _atol(dtype, r))


def test_fold_dx_falls_back_where_it_cannot_run(monkeypatch):
    """Without dx there is no GEMM to fold into; above FOLD_DX_MAX_R the (T s) tile does not fit: dR's own reduction
    runs, with the plain path's result. An unknown pass is refused."""
    calls = _reductions_over(monkeypatch)
    assert not launch.uses_fold_dx(configs.FOLD_DX_MAX_R + 1, torch.bfloat16)
    for m, nr, needs in ((37, 16, (False, True, True)), (38, configs.FOLD_DX_MAX_R + 1, (True, True, True))):
        x, w, b, lo, ro, s, dy = _cast(torch.float32, *_problem(m, 48, 72, nr, True, seed=32))
        _, t, _ = launch.lowrank_linear_fwd_triton(x, w, b, lo, ro, s, 0.0, 0)
        plain = launch.lowrank_linear_bwd_triton(dy, x, w, lo, ro, s, t, 0.0, 0, *needs)
        calls.clear()
        folded = launch.lowrank_linear_bwd_triton(dy, x, w, lo, ro, s, t, 0.0, 0, *needs, dr_pass="dx")
        assert (m, 72) in calls, f"M={m} n*r={nr} needs={needs}: dR must come from its own reduction"
        for name, a, c in zip(("dx", "dL", "dR"), plain, folded):
            assert (a is None and c is None) or torch.equal(a, c), f"{name}: differs from the plain path"
    with pytest.raises(ValueError, match="dr_pass: expected one of"):
        launch.lowrank_linear_bwd_triton(dy, x, w, lo, ro, s, t, 0.0, 0, True, True, True, dr_pass="dL")


def test_a_mask_of_the_wrong_shape_is_refused():
    x, w, b, lo, ro, s, dy = _cast(torch.float32, *_problem(37, 72, 48, 16, True, seed=9))
    y, t, bits = launch.lowrank_linear_fwd_triton(x, w, b, lo, ro, s, 0.3, 4)
    with pytest.raises(ValueError, match="bits:"):
        launch.lowrank_linear_bwd_triton(dy, x, w, lo, ro, s, t, 0.3, 4, True, True, True, bits=bits[:-1])
    with pytest.raises(ValueError, match="bits:"):
        launch.lowrank_linear_bwd_triton(dy, x, w, lo, ro, s, t, 0.3, 4, True, True, True, bits=bits.float())
    with pytest.raises(ValueError, match="bits:"):  # a column-strided view
        wide = torch.zeros(bits.shape[0], 2 * bits.shape[1], dtype=torch.int32, device=bits.device)
        launch.lowrank_linear_bwd_triton(dy, x, w, lo, ro, s, t, 0.3, 4, True, True, True, bits=wide[:, ::2])
    if ON_GPU:
        with pytest.raises(ValueError, match="bits:"):
            launch.lowrank_linear_bwd_triton(dy, x, w, lo, ro, s, t, 0.3, 4, True, True, True, bits=bits.cpu())


def test_bad_dtypes_name_the_argument():
    x, w, b, lo, ro, s, dy = _problem(4, 48, 72, 4, True)
    with pytest.raises(TypeError, match="x:"):
        launch.lowrank_linear_fwd_triton(*_cast(torch.float64, x, w, b, lo, ro), s, 0.0, 0)
    x32, w32, b32, l32, r32 = _cast(torch.float32, x, w, b, lo, ro)
    with pytest.raises(TypeError, match="lora_R:"):
        launch.lowrank_linear_fwd_triton(x32, w32, b32, l32, r32.half(), s.float(), 0.0, 0)


# ------------------------------------------------------------------------------------------------------------------
# Through the public op and the layer.
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_backend_triton_3d_noncontiguous(dtype):
    x, w, b, lo, ro, s, dy = _problem(2 * 3 * 7, 48, 72, 16, True, seed=6)
    x3 = x.reshape(2, 3, 7, 48).transpose(0, 1)  # non-contiguous on purpose
    dy3 = dy.reshape(2, 3, 7, 72).transpose(0, 1)
    ref_y, ref_dx, ref_dl, ref_dr = _reference(x3.reshape(-1, 48), w, b, lo, ro, s, dy3.reshape(-1, 72), None, 0.0)
    xc, wc, bc, lc, rc = _cast(dtype, x3, w, b, lo, ro)
    xc.requires_grad_(), lc.requires_grad_(), rc.requires_grad_()
    y = muscle_lora_linear(xc, wc, bc, lc, rc, s.float().to(DEVICE), backend="triton")
    assert y.shape == (3, 2, 7, 72)
    y.backward(dy3.to(device=DEVICE, dtype=dtype))
    tol = None if dtype == torch.float32 else 2 * _atol(dtype, ref_y)
    assert_close("y", ref_y, y.detach().reshape(-1, 72).cpu(), atol=tol)
    for name, ref, got in (("dx", ref_dx, xc.grad.reshape(-1, 48)), ("dL", ref_dl, lc.grad), ("dR", ref_dr, rc.grad)):
        assert_close(name, ref, got.cpu(), atol=None if dtype == torch.float32 else 2 * _atol(dtype, ref))


def test_op_dropout_seed_is_replayed_in_backward():
    x, w, b, lo, ro, s, dy = _problem(37, 48, 72, 16, True, seed=7)
    torch.manual_seed(1234)
    seed = int(torch.randint(0, 2**31 - 1, (1,), device=DEVICE).item())  # its first draw, on the inputs' device
    mask = launch.dropout_mask_triton(x.shape, 0.3, seed, DEVICE).cpu()
    ref_y, ref_dx, ref_dl, ref_dr = _reference(x, w, b, lo, ro, s, dy, mask, 0.3)
    xc, wc, bc, lc, rc = _cast(torch.float32, x, w, b, lo, ro)
    for v in (xc, lc, rc):
        v.requires_grad_()
    torch.manual_seed(1234)
    y = muscle_lora_linear(xc, wc, bc, lc, rc, s.float().to(DEVICE), dropout_p=0.3, training=True, backend="triton")
    y.backward(dy.float().to(DEVICE))
    for name, ref, got in (
        ("y", ref_y, y.detach()),
        ("dx", ref_dx, xc.grad),
        ("dL", ref_dl, lc.grad),
        ("dR", ref_dr, rc.grad),
    ):
        assert_close(name, ref, got.cpu())


def test_layer_with_triton_backend_matches_torch_backend():
    from muscle_kernels.nn.linear import MuScleLoRALinear

    torch.manual_seed(8)
    lay = MuScleLoRALinear(
        48, 72, freq_band=(1, 2, 3, 4), inner_rank=2, alpha=4.0, init="seed", backend="triton", device=DEVICE
    )
    twin = MuScleLoRALinear(
        48, 72, freq_band=(1, 2, 3, 4), inner_rank=2, alpha=4.0, init="seed", backend="torch", device=DEVICE
    )
    twin.load_state_dict(lay.state_dict())
    x = torch.randn(5, 9, 48, device=DEVICE)
    y1, y2 = lay(x), twin(x)
    assert_close("y", y2.double(), y1)
    g = torch.randn_like(y1)
    y1.backward(g), y2.backward(g)
    assert_close("dL", twin.lora_L.grad.double(), lay.lora_L.grad)
    assert_close("dR", twin.lora_R.grad.double(), lay.lora_R.grad)


def test_dropout_seed_comes_from_the_generator_state():
    """The Triton path's dropout seed is drawn by torch's generator of the inputs' device: the same generator state
    (torch.manual_seed) gives the same mask, consecutive calls give new ones."""
    x, w, b, lo, ro, s, _ = (v.float().to(DEVICE) for v in _problem(37, 48, 72, 16, True, seed=21))
    s = s.float().to(DEVICE)

    def adapter():  # y - (x W^T + b): the adapter's part, which is all that dropout changes
        y = muscle_lora_linear(x, w, b, lo, ro, s, dropout_p=0.5, training=True, backend="triton")
        return y - torch.nn.functional.linear(x, w, b)

    torch.manual_seed(31)
    first, second = adapter(), adapter()
    torch.manual_seed(31)
    again = adapter()
    assert torch.equal(first, again), "the same generator state gave another mask"
    assert not torch.allclose(first, second), "two consecutive calls used the same mask"
    # and the mask is the one of the seed that generator state draws on the inputs' device
    torch.manual_seed(31)
    seed = int(torch.randint(0, 2**31 - 1, (1,), device=DEVICE).item())
    mask = launch.dropout_mask_triton(x.shape, 0.5, seed, DEVICE)
    want = lowrank_linear_reference(x, w, None, lo, ro, s, mask, 0.5) - torch.nn.functional.linear(x, w)
    assert_close("adapter part", want, first)


@pytest.mark.parametrize("seed", [0, 1, 16, 1234, 2**31 - 2])
def test_a_seed_tensor_gives_the_mask_of_its_value(seed):
    """The kernel reads a tensor seed on the device (no host sync: CUDA-graph safe); the mask is the one of the same
    value passed as an int, so dropout_mask_triton (and the tests) can name it."""
    shape = (37, 70)
    by_int = launch.dropout_mask_triton(shape, 0.3, seed, DEVICE)
    by_tensor = launch.dropout_mask_triton(shape, 0.3, torch.tensor([seed], device=DEVICE), DEVICE)
    assert torch.equal(by_int, by_tensor)
    assert 0 < int(by_int.sum()) < by_int.numel()
    if seed:
        assert not torch.equal(by_int, launch.dropout_mask_triton(shape, 0.3, seed - 1, DEVICE))
    with pytest.raises(ValueError, match="seed: expected one integer"):
        launch.dropout_mask_triton(shape, 0.3, torch.tensor([1.5], device=DEVICE), DEVICE)


@pytest.mark.skipif(not ON_GPU, reason="CUDA-graph capture needs a CUDA device")
def test_dropout_under_cuda_graph_replay_draws_new_masks():
    """A captured forward with dropout: each replay must use a new mask (a host-integer seed would be frozen into
    the graph)."""
    torch.manual_seed(5)
    x, w, b, lo, ro, s, _ = (v.to(DEVICE, torch.bfloat16) for v in _problem(256, 128, 96, 16, True, seed=22))
    s = s.float()
    fn = lambda: muscle_lora_linear(x, w, b, lo, ro, s, dropout_p=0.5, training=True, backend="triton")  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    outs = []
    for _ in range(3):
        graph.replay()
        outs.append(out.clone())
    torch.cuda.synchronize()
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2]), "a replay reused its mask"
    for o in outs:  # each replay is a valid dropout of the adapter: not the plain layer, not NaN
        assert torch.isfinite(o).all()


def test_dropout_capture_refuses_the_host_seeded_path():
    """Under CUDA-graph capture only the Triton path's seed (read on the device) changes between replays: the
    composed path, seeded by a host integer, refuses instead of replaying one mask forever."""
    from muscle_kernels.ops.lowrank_linear import function

    x = torch.zeros(4, 8, device=DEVICE)
    with pytest.raises(RuntimeError, match="dropout under CUDA-graph capture: backend 'cublas'"):
        function._draw_seed(x, 0.5, "cublas", compiling=False, capturing=True)
    seed = function._draw_seed(x, 0.5, "triton", compiling=False, capturing=True)
    assert isinstance(seed, torch.Tensor) and seed.device == x.device and seed.dtype == torch.int64
    assert function._draw_seed(x, 0.0, "cublas", compiling=False, capturing=True) == 0  # no dropout: nothing drawn
    assert isinstance(function._draw_seed(x, 0.5, "cublas", compiling=False, capturing=False), int)
