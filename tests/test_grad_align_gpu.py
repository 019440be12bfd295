"""The CUDA kernels' multi-launch paths (issue 9), each against the float64 torch._foreach fallback on the same GPU
tensors: more than 64 tensors (several launches), more than 320 blocks, a tensor split across launches, hundreds of
small tensors (the small-chunk path), 200 bf16 views at odd offsets of one buffer (unaligned pointers), one
30M-element tensor, and mixed dtypes with empty tensors. Outputs and stats, fused op and the two stages. And the
accuracy of the fp64 sums where <g, r> nearly cancels, against the fp64 oracle (issue 20, row 19).

Needs a GPU; run with `pytest -m gpu tests/test_grad_align_gpu.py` (benchmarks/gpu_run.sh).
"""

from __future__ import annotations

import pytest
import torch

from muscle_kernels.ops.grad_align import (
    align_gradients_,
    extension,
    grad_align_apply_,
    grad_align_coeffs,
    grad_align_reduce,
)
from muscle_kernels.ops.grad_align.reference import paper_align_reference

from .utils import nearly_orthogonal

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module", autouse=True)
def cuda_kernels():
    extension.load_extension()
    if not extension.has_kernel("grad_align_fused", "cuda"):
        pytest.fail(f"a GPU is visible but the extension has no CUDA kernel: {extension.extension_info('none')}")


def _pair(shape, dtype, gen, device="cuda"):
    g = torch.randn(shape, generator=gen, dtype=torch.float32).add_(0.1)
    r = 0.4 * g + 0.05 * torch.randn(shape, generator=gen, dtype=torch.float32)
    return g.to(device=device, dtype=dtype), r.to(device=device, dtype=dtype)


def _lists(shapes, dtypes, seed):
    gen = torch.Generator().manual_seed(seed)
    pairs = [_pair(s, dtypes[i % len(dtypes)], gen) for i, s in enumerate(shapes)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


_TOL = {torch.float32: 2e-5, torch.float64: 1e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _compare(grads, refs, rho=0.1, label=""):
    """Extension vs the fp64 fallback: the fused op, and reduce -> coeffs -> apply."""
    base = [g.clone() for g in grads]
    fused = [g.clone() for g in grads]
    fallback = [g.clone() for g in grads]
    s_ext = align_gradients_(fused, refs, raw_ratio=rho, backend="extension")
    s_fb = align_gradients_(fallback, refs, raw_ratio=rho, backend="foreach")
    torch.cuda.synchronize()
    scale = s_fb.double().abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    err = ((s_ext.double() - s_fb.double()) / scale).abs().max().item()
    assert err < 1e-5, f"{label}: stats differ from the fallback by {err:.2e} (relative)"
    for i, (a, b) in enumerate(zip(fused, fallback)):
        if a.numel():
            m = max(1.0, b.double().abs().max().item())
            diff = ((a.double() - b.double()) / m).abs().max().item()
            assert diff <= _TOL[a.dtype], f"{label}: grads[{i}] {tuple(a.shape)} {a.dtype} differs by {diff:.2e}"
    staged = [g.clone() for g in base]
    stats = grad_align_reduce(staged, refs, backend="extension")
    assert torch.equal(stats, s_ext), f"{label}: reduce stats differ from the fused op's"
    grad_align_apply_(staged, refs, grad_align_coeffs(stats, rho), backend="extension")
    for i, (a, b) in enumerate(zip(staged, fused)):
        assert torch.equal(a, b), f"{label}: grads[{i}]: the two stages differ from the fused op"
    return s_ext


def test_more_than_64_tensors():
    grads, refs = _lists([(97 + 13 * i,) for i in range(150)], [torch.float32], seed=1)
    _compare(grads, refs, label="150 tensors")


def test_more_than_320_blocks_and_a_tensor_split_across_launches():
    # 300 x 64K chunks in the first tensor, so the second one starts near the end of a launch and is cut in two.
    shapes = [(300 * 65536 + 17,), (50 * 65536 + 3,), (1000,), (70001,)]
    grads, refs = _lists(shapes, [torch.float32, torch.bfloat16], seed=2)
    _compare(grads, refs, label="split across launches")


def test_hundreds_of_small_tensors():
    """LoRA-like lists: the small-chunk path (several blocks per small tensor)."""
    shapes = [(8, 768), (768, 8)] * 150 + [(2,), (768,)] * 20
    grads, refs = _lists(shapes, [torch.bfloat16, torch.float32], seed=3)
    _compare(grads, refs, label="340 small tensors")


def test_200_odd_offset_bf16_views_of_one_buffer():
    gen = torch.Generator().manual_seed(4)
    n, size = 200, 1001
    g_buf, r_buf = _pair((n * (size + 3) + 7,), torch.bfloat16, gen)
    starts = [1 + i * (size + 3) for i in range(n)]  # odd element offsets: 2-byte, never 16-byte, aligned
    grads = [g_buf[s : s + size] for s in starts]
    refs = [r_buf[s + 2 : s + 2 + size] for s in starts]
    gaps0 = [g_buf[s + size : s + size + 3].clone() for s in starts[:-1]]
    assert all(g.data_ptr() % 16 for g in grads[:8]) and all(r.data_ptr() % 16 for r in refs[:8])
    fallback = [g.clone() for g in grads]
    s_fb = align_gradients_(fallback, refs, raw_ratio=0.1, backend="foreach")
    s_ext = align_gradients_(grads, refs, raw_ratio=0.1, backend="extension")  # the views themselves, in place
    scale = s_fb.double().abs().amax(dim=1, keepdim=True)
    assert ((s_ext.double() - s_fb.double()) / scale).abs().max().item() < 1e-5
    for i, (a, b) in enumerate(zip(grads, fallback)):
        m = max(1.0, b.double().abs().max().item())
        assert ((a.double() - b.double()) / m).abs().max().item() <= _TOL[torch.bfloat16], f"view {i}"
    gaps = [g_buf[s + size : s + size + 3] for s in starts[:-1]]
    assert all(torch.equal(gap, g_buf0) for gap, g_buf0 in zip(gaps, gaps0)), "bytes between the views were written"


def test_one_30m_element_tensor():
    grads, refs = _lists([(30_000_000,)], [torch.float32], seed=5)
    _compare(grads, refs, label="30M elements")


def test_mixed_dtypes_with_empty_tensors():
    shapes = [(0,), (129,), (4, 0), (65536 + 1,), (33, 17), (1,), (5000,), (0,)]
    grads, refs = _lists(shapes, [torch.float32, torch.float16, torch.bfloat16, torch.float64], seed=6)
    stats = _compare(grads, refs, label="mixed dtypes")
    assert torch.equal(stats[[0, 2, 7]].cpu(), torch.zeros(3, 3)), "empty tensors have zero stats"


# Issue 20, row 19: the CUDA counterpart of the CPU kernel's test in tests/test_grad_align_fallback.py (gpu_run.sh).
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA device: checks the CUDA kernel's fp64 sums of <g, r> against an fp64 "
    "reference where the dot nearly cancels (row 19); the CPU kernel's test is in "
    "test_grad_align_fallback.py",
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nearly_cancelling_dot(dtype):
    """The reduce kernel accumulates in double (per-thread registers, per-block partials, per-tensor sum), so each
    stat is the fp64 sum of the inputs rounded once to fp32: within 1.2e-7 of the fp64 oracle over 300 seeds, for a
    one-chunk tensor and, in the same call, a tensor of several chunks (several partials to sum). (The fp32 registers
    it replaced: up to 1.6e-5 on the one-chunk fp32 case, by a CPU emulation of their summation order.) In fp32 the
    fused op's output (rho = 0: g <- |<g, r>| / ||r||^2 * r) is checked too: a few fp32 roundings (stats,
    coefficient, product) from the oracle's."""
    worst = 0.0
    for seed in range(300):
        pairs = [nearly_orthogonal(seed, n=n, dtype=dtype) for n in (3000, 70_001)]
        grads = [g.cuda() for g, _ in pairs]
        refs = [r.cuda() for _, r in pairs]
        exact_grads, exact = paper_align_reference(grads, refs)  # fp64 sums of the (rounded) inputs
        stats = grad_align_reduce(grads, refs, backend="extension").double()
        err = ((stats - exact) / exact).abs().max().item()
        assert err <= 1.2e-7, (seed, err, stats.tolist(), exact.tolist())
        worst = max(worst, err)
        fused = [g.clone() for g in grads]
        fused_stats = align_gradients_(fused, refs, raw_ratio=0.0, backend="extension")
        assert torch.equal(fused_stats.double(), stats), seed
        if dtype == torch.float32:
            for got, want in zip(fused, exact_grads):
                rel = ((got.double() - want) / want.abs().amax()).abs().max().item()
                assert rel <= 4e-7, (seed, rel)
    assert worst <= 1.2e-7, worst
