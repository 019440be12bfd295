"""Gradient alignment op (docs/alignment.md): the extension (CPU, and CUDA on a GPU) and the torch._foreach fallback
against the float64 paper loop; the two stages; non-finite isolation; argument errors; opcheck."""

from __future__ import annotations

import pytest
import torch

from muscle_kernels.ops.grad_align import (
    align_gradients_,
    extension,
    grad_align_apply_,
    grad_align_coeffs,
    grad_align_reduce,
    paper_align_reference,
)

from .utils import TOL, assert_close

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _ext_ready(device: str) -> bool:
    extension.load_extension()
    return extension.has_kernel("grad_align_fused", device)


def _backend_or_skip(backend: str, device: str) -> str:
    if backend == "extension" and not _ext_ready(device):
        info = extension.extension_info()
        pytest.skip(f"the grad_align extension has no {device} kernel here ({info['reason'] or info['cuda_reason']})")
    return backend


BACKENDS = ["extension", "foreach"]

# (shape, dtype, what): odd sizes on purpose; a tensor over one 64K chunk; empty tensors; zero g / zero r.
MIXED = [
    ((7, 13), torch.float32, "plain"),
    ((0,), torch.float32, "empty"),
    ((65536 + 1234,), torch.float32, "two chunks"),
    ((33, 17), torch.bfloat16, "plain"),
    ((129,), torch.float16, "plain"),
    ((4, 0, 3), torch.bfloat16, "empty"),
    ((8, 9), torch.float64, "plain"),
    ((31,), torch.float32, "zero g"),
    ((5, 5), torch.bfloat16, "zero r"),
    ((1,), torch.float32, "plain"),
    ((300, 257), torch.float16, "plain"),
    ((70001,), torch.bfloat16, "plain"),
]


def make_lists(device, seed, spec=MIXED):
    gen = torch.Generator().manual_seed(seed)
    grads, refs = [], []
    for shape, dtype, what in spec:
        g = torch.randn(shape, generator=gen) * (0.5 + torch.rand((), generator=gen))
        r = torch.randn(shape, generator=gen) * 1e-2 + 0.3 * g  # correlated, as real gradients are
        if what == "zero g":
            g.zero_()
        if what == "zero r":
            r.zero_()
        grads.append(g.to(device=device, dtype=dtype))
        refs.append(r.to(device=device, dtype=dtype))
    return grads, refs


def check_against_reference(grads_in, refs, grads_out, stats, raw_ratio, label):
    ref_out, ref_stats = paper_align_reference(grads_in, refs, raw_ratio)
    for i, (want, got, g0) in enumerate(zip(ref_out, grads_out, grads_in)):
        assert got.dtype == g0.dtype and got.shape == g0.shape, f"{label} grads[{i}] changed dtype/shape"
        if got.numel():
            # Low precision: the result is rounded once from fp32; allow the dtype's tolerance relative to max |g|.
            scale = max(1.0, want.abs().max().item())
            # fp64 tensors get fp32-accurate results: the stats and coefficients are fp32 (documented).
            cmp_dtype = torch.float32 if got.dtype == torch.float64 else got.dtype
            assert_close(
                f"{label} grads[{i}] {tuple(got.shape)} {got.dtype}", want / scale, (got.double() / scale).to(cmp_dtype)
            )
    # stats accumulate in fp32 at least, from the (rounded) low-precision inputs, so compare with fp32 tolerance
    # relative to the size of each sum.
    scale = ref_stats.abs().amax(dim=1, keepdim=True).clamp_min(1.0)
    assert stats.dtype == torch.float32 and stats.shape == (len(grads_in), 3), f"{label} stats dtype/shape"
    assert_close(f"{label} stats", ref_stats / scale, (stats.double().cpu() / scale).float(), atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("raw_ratio", [0.0, 0.05, 0.5, 1.0], ids=lambda r: f"rho{r}")
def test_matches_paper_loop(device, backend, raw_ratio):
    backend = _backend_or_skip(backend, device)
    grads, refs = make_lists(device, seed=int(raw_ratio * 100) + 1)
    grads_in = [g.clone() for g in grads]
    refs_in = [r.clone() for r in refs]
    stats = align_gradients_(grads, refs, raw_ratio=raw_ratio, backend=backend)
    check_against_reference(grads_in, refs_in, grads, stats, raw_ratio, f"{backend}/{device}")
    for i, (r0, r) in enumerate(zip(refs_in, refs)):
        assert torch.equal(r0, r), f"refs[{i}] was modified"
    for i, (_, _, what) in enumerate(MIXED):
        if what in ("zero g", "zero r", "empty"):
            assert torch.equal(grads[i], grads_in[i]), f"grads[{i}] ({what}) must be left unchanged"


@pytest.mark.parametrize("device", DEVICES)
def test_extension_and_fallback_agree(device):
    _backend_or_skip("extension", device)
    grads, refs = make_lists(device, seed=7)
    other = [g.clone() for g in grads]
    s_ext = align_gradients_(grads, refs, raw_ratio=0.1, backend="extension")
    s_fb = align_gradients_(other, refs, raw_ratio=0.1, backend="foreach")
    scale = s_fb.double().abs().amax(dim=1, keepdim=True).clamp_min(1.0)
    assert_close("stats extension vs foreach", s_fb.double() / scale, (s_ext.double() / scale).float())
    for i, (a, b) in enumerate(zip(other, grads)):
        if a.numel():
            scale = max(1.0, a.abs().max().item())
            assert_close(
                f"grads[{i}] extension vs foreach",
                a.double() / scale,
                (b.double() / scale).to(torch.float32 if b.dtype == torch.float64 else b.dtype),
                atol=2 * TOL[a.dtype]["atol"],
            )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_stages_equal_fused(device, backend):
    backend = _backend_or_skip(backend, device)
    grads, refs = make_lists(device, seed=11)
    fused = [g.clone() for g in grads]
    s_fused = align_gradients_(fused, refs, raw_ratio=0.2, backend=backend)
    stats = grad_align_reduce(grads, refs, backend=backend)
    assert torch.equal(stats, s_fused), "reduce stats differ from the fused op's stats"
    coeffs = grad_align_coeffs(stats, 0.2)
    grad_align_apply_(grads, refs, coeffs, backend=backend)
    for i, (a, b) in enumerate(zip(fused, grads)):
        assert torch.equal(a, b), f"grads[{i}]: reduce -> coeffs -> apply differs from the fused op"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_apply_with_projection_coefficients(device, backend):
    """coeffs [n]: c_t = |<g,r>| / ||r||^2 with raw_ratio gives the blend of docs/alignment.md (no keep rule)."""
    backend = _backend_or_skip(backend, device)
    spec = [((37, 5), torch.float32, "plain"), ((1000,), torch.bfloat16, "plain"), ((3, 3, 3), torch.float64, "plain")]
    grads, refs = make_lists(device, seed=5, spec=spec)
    grads_in = [g.clone() for g in grads]
    stats = grad_align_reduce(grads, refs, backend=backend).double()
    c = stats[:, 0].abs() / stats[:, 2]
    grad_align_apply_(grads, refs, c, raw_ratio=0.3, backend=backend)
    want, _ = paper_align_reference(grads_in, refs, 0.3)
    for i, (w, got) in enumerate(zip(want, grads)):
        m = w.abs().max()
        assert_close(
            f"grads[{i}] with [n] coeffs",
            w / m,
            (got.double() / m).to(torch.bfloat16 if got.dtype == torch.bfloat16 else torch.float32),
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_apply_modes_do_not_read_what_they_skip(device, backend):
    """(0, 1) keeps g bitwise even with NaN in r; b == 0 ignores a NaN in g; a == 0 ignores a NaN in r."""
    backend = _backend_or_skip(backend, device)
    g = [torch.randn(100, device=device) for _ in range(3)]
    r = [torch.randn(100, device=device) for _ in range(3)]
    g0 = [x.clone() for x in g]
    r[0][5] = float("nan")
    g[1][7] = float("nan")
    r[2][9] = float("nan")
    coeffs = torch.tensor([[0.0, 1.0], [0.5, 0.0], [0.0, 0.25]], device=device)
    grad_align_apply_(g, r, coeffs, backend=backend)
    assert torch.equal(g[0], g0[0]), "keep (0, 1) must not touch g"
    assert_close("replace b=0", (0.5 * r[1]).double(), g[1])
    g0[2] *= 0.25
    assert_close("scale a=0", g0[2].double(), g[2])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_tensor_is_isolated(device, backend):
    backend = _backend_or_skip(backend, device)
    spec = [
        ((50,), torch.float32, "plain"),
        ((64, 3), torch.float32, "plain"),
        ((70000,), torch.bfloat16, "plain"),
        ((9,), torch.float16, "plain"),
        ((33,), torch.float32, "plain"),
    ]
    grads, refs = make_lists(device, seed=3, spec=spec)
    grads[1][10, 2] = float("nan")  # NaN in a gradient
    refs[2][69999] = float("inf")  # inf in a reference gradient
    grads[3][0] = float("-inf")
    grads_in = [g.clone() for g in grads]
    stats = align_gradients_(grads, refs, raw_ratio=0.1, backend=backend).cpu()
    for i in (1, 2, 3):
        assert not torch.isfinite(stats[i]).all(), f"stats[{i}] must flag the non-finite tensor, got {stats[i]}"
        assert torch.equal(
            grads[i].cpu().view(-1).float().nan_to_num(1e30), grads_in[i].cpu().view(-1).float().nan_to_num(1e30)
        ), f"grads[{i}] has a non-finite value and must be left unchanged"
    assert torch.isfinite(stats[[0, 4]]).all(), "finite tensors must have finite stats"
    clean = [0, 4]
    check_against_reference(
        [grads_in[i] for i in clean],
        [refs[i] for i in clean],
        [grads[i] for i in clean],
        stats[clean],
        0.1,
        f"{backend} finite tensors next to non-finite ones",
    )


def test_coefficient_rule():
    stats = torch.tensor(
        [
            [2.0, 4.0, 8.0],
            [-2.0, 4.0, 8.0],
            [1.0, 0.0, 3.0],
            [1.0, 3.0, 0.0],
            [float("nan"), 1.0, 1.0],
            [1.0, float("inf"), 1.0],
            [3e38, 1.0, 1e-30],
        ]
    )
    c = grad_align_coeffs(stats, 0.25)
    want = torch.tensor([[0.75 * 0.25, 0.25], [0.75 * 0.25, 0.25], [0, 1], [0, 1], [0, 1], [0, 1], [0, 1]])
    assert torch.equal(c, want), f"coefficients {c.tolist()} != {want.tolist()}"
    with pytest.raises(ValueError, match=r"stats: expected shape \[n_tensors, 3\]"):
        grad_align_coeffs(torch.zeros(3, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_list_and_non_contiguous(backend):
    backend = _backend_or_skip(backend, "cpu")
    out = align_gradients_([], [], backend=backend)
    assert out.shape == (0, 3) and out.dtype == torch.float32
    base = torch.randn(24, 10)
    g = base.t()  # a non-contiguous view: aligned through a contiguous copy and written back
    r = torch.randn(10, 24)
    g_in = g.clone()
    align_gradients_([g], [r], backend=backend)
    (want,), _ = paper_align_reference([g_in], [r])
    assert_close("non-contiguous grads[0]", want, g)
    assert torch.equal(base.t(), g), "the write must land in the original storage"


def test_thread_count_does_not_change_results():
    _backend_or_skip("extension", "cpu")
    # over 1M elements in total, so that the kernel really splits the work over threads
    grads, refs = make_lists("cpu", seed=9, spec=MIXED + [(((1 << 20) + 77,), torch.float32, "plain")])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = grad_align_reduce(grads, refs, backend="extension")
        torch.set_num_threads(max(2, threads))
        many = grad_align_reduce(grads, refs, backend="extension")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many), "stats depend on the thread count"


# ---- argument errors ----
def test_errors_name_the_argument():
    g = [torch.randn(3, 4), torch.randn(5)]
    with pytest.raises(ValueError, match=r"same length, got 2 and 1"):
        align_gradients_(g, [torch.randn(3, 4)])
    with pytest.raises(ValueError, match=r"ref_grads\[1\] has shape \(4,\) but grads\[1\] has shape \(5,\)"):
        align_gradients_(g, [torch.randn(3, 4), torch.randn(4)])
    with pytest.raises(
        TypeError, match=r"ref_grads\[0\] has dtype torch.float16 but grads\[0\] has dtype torch.float32"
    ):
        align_gradients_(g, [torch.randn(3, 4).half(), torch.randn(5)])
    with pytest.raises(TypeError, match=r"grads\[0\]: dtype torch.int64 is not supported"):
        align_gradients_([torch.ones(3, dtype=torch.long)], [torch.ones(3, dtype=torch.long)])
    with pytest.raises(TypeError, match=r"grads\[1\]: expected a tensor, got list"):
        align_gradients_([torch.randn(2), [1.0]], [torch.randn(2), torch.randn(1)])
    with pytest.raises(TypeError, match=r"expected lists of tensors, got a single tensor"):
        align_gradients_(torch.randn(3), torch.randn(3))
    with pytest.raises(ValueError, match=r"raw_ratio: expected a number in \[0, 1\], got 1.5"):
        align_gradients_(g, [torch.randn(3, 4), torch.randn(5)], raw_ratio=1.5)
    with pytest.raises(ValueError, match=r"backend: expected one of"):
        align_gradients_(g, [torch.randn(3, 4), torch.randn(5)], backend="fast")
    refs = [torch.randn(3, 4), torch.randn(5)]
    with pytest.raises(ValueError, match=r"coeffs: expected shape \[2\] or \[2, 2\] for 2 tensors, got \(3,\)"):
        grad_align_apply_(g, refs, torch.ones(3))
    with pytest.raises(ValueError, match=r"raw_ratio: must be 0 with \[n, 2\] coeffs"):
        grad_align_apply_(g, refs, torch.ones(2, 2), raw_ratio=0.1)
    with pytest.raises(TypeError, match=r"coeffs: expected a floating-point tensor"):
        grad_align_apply_(g, refs, torch.ones(2, dtype=torch.long))
    if torch.device("meta") is not None:
        with pytest.raises(ValueError, match=r"grads\[1\] is on meta but grads\[0\] is on cpu"):
            align_gradients_(
                [torch.randn(2), torch.empty(3, device="meta")], [torch.randn(2), torch.empty(3, device="meta")]
            )


def test_cpp_op_checks_name_the_index():
    """The registered op validates on its own too (callers may use torch.ops directly)."""
    _backend_or_skip("extension", "cpu")
    ops = torch.ops.muscle_kernels
    with pytest.raises(RuntimeError, match=r"refs\[1\] has shape \[4\] but grads\[1\] has shape \[5\]"):
        ops.grad_align_reduce([torch.randn(2), torch.randn(5)], [torch.randn(2), torch.randn(4)])
    with pytest.raises(RuntimeError, match=r"refs\[0\] is Half but grads\[0\] is Float"):
        ops.grad_align_fused([torch.randn(2)], [torch.randn(2).half()], 0.0)
    with pytest.raises(RuntimeError, match=r"grads\[0\] and refs\[0\] must be contiguous"):
        ops.grad_align_reduce([torch.randn(3, 4).t()], [torch.randn(4, 3)])
    with pytest.raises(RuntimeError, match=r"coeffs must have shape \[n_tensors, 2\] = \[1, 2\]"):
        ops.grad_align_apply([torch.randn(2)], [torch.randn(2)], torch.ones(2))
    with pytest.raises(RuntimeError, match=r"raw_ratio must be in \[0, 1\]"):
        ops.grad_align_fused([torch.randn(2)], [torch.randn(2)], -0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    _backend_or_skip("extension", device)
    grads, refs = make_lists(device, seed=2, spec=MIXED[:5])
    coeffs = grad_align_coeffs(grad_align_reduce(grads, refs, backend="extension"), 0.1)
    ops = torch.ops.muscle_kernels
    torch.library.opcheck(ops.grad_align_reduce.default, ([g.clone() for g in grads], refs))
    torch.library.opcheck(ops.grad_align_apply.default, ([g.clone() for g in grads], refs, coeffs))
    torch.library.opcheck(ops.grad_align_fused.default, ([g.clone() for g in grads], refs, 0.1))


def test_torch_compile_sees_the_op():
    _backend_or_skip("extension", "cpu")
    grads, refs = make_lists("cpu", seed=4, spec=MIXED[:4])
    eager = [g.clone() for g in grads]

    def step(gs, rs):
        return torch.ops.muscle_kernels.grad_align_fused(gs, rs, 0.0)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    s_c = compiled(grads, refs)
    s_e = step(eager, refs)
    assert torch.equal(s_c, s_e), "compiled stats differ"
    for i, (a, b) in enumerate(zip(eager, grads)):
        assert torch.equal(a, b), f"compiled grads[{i}] differ"
