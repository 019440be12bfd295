"""The torch._foreach fallback is as accurate as the kernels and needs O(chunk) extra memory (issue 15); where <g, r>
nearly cancels, the extension's sums are at least as accurate as the fallback's (issue 20); and both backends follow
one rule for a gradient that requires grad, for grads that share memory and for inference tensors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from muscle_kernels.ops.grad_align import align_gradients_, extension, grad_align_apply_, grad_align_reduce
from muscle_kernels.ops.grad_align.foreach import CHUNK

from .utils import nearly_orthogonal

ROOT = Path(__file__).resolve().parents[1]

# 60M fp32 elements (240 MB per tensor) whose sums are large: a plain fp32 accumulation of ||g||^2 is far off there.
# The fp64 oracle is computed first, slice by slice; then the data segment is capped at what the process holds plus
# 160 MB, well below one more full-size fp32 tensor (240 MB), and the fallback must run in place under that cap.
BIG = textwrap.dedent("""
    import resource, time, torch
    from muscle_kernels.ops.grad_align import align_gradients_
    n = 60_000_000
    gen = torch.Generator().manual_seed(0)
    g = torch.empty(n).normal_(1.0, 0.5, generator=gen)
    r = torch.empty(n).normal_(0.0, 1.0, generator=gen).mul_(0.1).add_(g, alpha=0.7)
    step = 1 << 22
    want = torch.zeros(3, dtype=torch.float64)
    for s in range(0, n, step):
        a, b = g[s:s + step].double(), r[s:s + step].double()
        want += torch.stack([a @ b, a @ a, b @ b])
    coef = float(want[0].abs() / want[2])
    r_sample = r[::9973].double()

    def vm_data():
        for line in open("/proc/self/status"):
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024

    cap = vm_data() + 160 * 2**20
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))  # the soft limit: raised again below
    t0 = time.perf_counter()
    stats = align_gradients_([g], [r], raw_ratio=0.0, backend="foreach")
    seconds = time.perf_counter() - t0
    resource.setrlimit(resource.RLIMIT_DATA, (hard, hard))
    rel = ((stats[0].double() - want).abs() / want.abs()).max().item()
    assert rel < 1e-6, f"stats off by {rel:.2e} relative: {stats[0].tolist()} vs {want.tolist()}"
    err = (g[::9973].double() - coef * r_sample).abs().max().item()
    assert err <= 1e-6 * max(1.0, abs(coef) * r_sample.abs().max().item()), f"aligned gradient off by {err:.2e}"
    print("OK", rel, seconds)
""")


def test_fallback_on_a_60m_tensor_is_exact_in_place_and_small():
    assert 60_000_000 > 50 * CHUNK, "the test tensor must span many buckets"
    env = dict(os.environ, PYTHONPATH=str(ROOT), MALLOC_ARENA_MAX="2", OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", BIG], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    print(proc.stdout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_fallback_buckets_match_the_oracle(dtype, monkeypatch):
    """Bucket boundaries: small tensors grouped, a tensor cut over several buckets, odd sizes, with a tiny CHUNK."""
    from muscle_kernels.ops.grad_align import foreach, paper_align_reference

    monkeypatch.setattr(foreach, "CHUNK", 1000)
    gen = torch.Generator().manual_seed(11)
    shapes = [(7,), (999,), (1000,), (1001,), (3, 700), (5,), (2500,), (0,), (13, 11)]
    g = [torch.randn(s, generator=gen).add_(0.3).to(dtype) for s in shapes]
    r = [(0.4 * x.double() + 0.05 * torch.randn(x.shape, generator=gen, dtype=torch.float64)).to(dtype) for x in g]
    g0 = [x.clone() for x in g]
    for rho in (0.0, 0.3):
        work = [x.clone() for x in g0]
        stats = align_gradients_(work, r, raw_ratio=rho, backend="foreach")
        want, want_stats = paper_align_reference(g0, r, rho)
        scale = want_stats.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
        assert torch.allclose(stats.double() / scale, want_stats / scale, atol=1e-6), (stats, want_stats)
        tol = {torch.float64: 1e-6, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
        for i, (w, x) in enumerate(zip(want, work)):
            if x.numel():
                m = max(1.0, w.abs().max().item())
                assert torch.allclose(x.double() / m, w / m, atol=tol), f"grads[{i}] {tuple(x.shape)} {dtype}"


BACKENDS = ["foreach", "extension"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_grads_that_require_grad_are_refused_by_every_backend(backend):
    if backend == "extension":
        extension.load_extension()
        if not extension.has_kernel("grad_align_fused", "cpu"):
            pytest.skip(f"no compiled CPU kernel here: {extension.extension_info('none')['reason']}")
    leaf = torch.nn.Parameter(torch.randn(4, 3))
    plain = torch.randn(5)
    refs = [torch.randn(5), torch.randn(4, 3)]
    before = leaf.detach().clone()
    with pytest.raises(
        ValueError,
        match=r"grads\[1\] requires grad \(a leaf tensor, e\.g\. a parameter\); grads is "
        r"written in place",
    ):
        align_gradients_([plain, leaf], refs, backend=backend)
    with pytest.raises(ValueError, match=r"grads\[1\] requires grad"):
        grad_align_apply_([plain, leaf], refs, torch.ones(2, 2).mul_(0.5), backend=backend)
    assert torch.equal(leaf.detach(), before), "the parameter must not be written"
    # Reading is fine: the reduce stage does not write grads, and p.grad itself does not require grad.
    stats = grad_align_reduce([plain, leaf], refs, backend=backend)
    assert stats.shape == (2, 3) and torch.isfinite(stats).all()
    leaf.grad = torch.randn(4, 3)
    align_gradients_([leaf.grad], [refs[1]], backend=backend)


# -- aliasing and inference tensors: one rule on both backends ---------------------------------------------------------
def alias_cases():
    g = torch.randn(6)
    big = torch.randn(10)
    return {
        "same tensor as grad and ref": (
            [g],
            [g],
            "grads\\[0\\] and ref_grads\\[0\\] share memory|ref_grads\\[0\\] and grads\\[0\\] share memory",
        ),
        "one grad twice": ([g, g], [torch.randn(6), torch.randn(6)], "grads\\[0\\] and grads\\[1\\] share memory"),
        "overlapping views": ([big[:6], big[4:]], [torch.randn(6), torch.randn(6)], "share memory"),
        "grad inside a ref's span": ([torch.randn(4), big[5:9]], [big[0:4], big[2:6]], "share memory"),
    }


@pytest.mark.parametrize("backend", ["foreach", "extension"])
@pytest.mark.parametrize("case", list(alias_cases()))
def test_aliasing_refused_on_every_backend(backend, case):
    from muscle_kernels.ops.grad_align.function import align_gradients_, grad_align_apply_

    grads, refs, match = alias_cases()[case]
    before = [g.clone() for g in grads]
    with pytest.raises(ValueError, match=match):
        align_gradients_(grads, refs, backend=backend)
    with pytest.raises(ValueError, match="share memory"):
        grad_align_apply_(grads, refs, torch.ones(len(grads)), backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(grads, before)), "nothing written"


def test_refs_may_share_memory():
    from muscle_kernels.ops.grad_align.function import align_gradients_

    r = torch.randn(6)
    g1, g2 = torch.randn(6), torch.randn(6)
    want = [g1.clone(), g2.clone()]
    align_gradients_(want, [r.clone(), r.clone()], backend="foreach")
    align_gradients_([g1, g2], [r, r], backend="foreach")
    torch.testing.assert_close([g1, g2], want)


@pytest.mark.parametrize("backend", ["foreach", "extension"])
def test_inference_tensors_one_rule(backend):
    from muscle_kernels.ops.grad_align.function import align_gradients_

    with torch.inference_mode():
        g, r = torch.randn(8), torch.randn(8)
    with pytest.raises(ValueError, match=r"grads\[0\] is an inference tensor"):
        align_gradients_([g], [r], backend=backend)


def test_inference_tensors_inside_inference_mode():
    from muscle_kernels.ops.grad_align.function import align_gradients_

    with torch.inference_mode():
        g, r = torch.randn(8), torch.randn(8)
        align_gradients_([g], [r], backend="foreach")
        torch.testing.assert_close(g, (g @ r) / (r @ r) * r)


# -- the extension's sums are at least as accurate as the fallback's where <g, r> nearly cancels -----------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_extension_dot_as_accurate_as_the_fallback(dtype):
    from muscle_kernels.ops.grad_align.function import grad_align_reduce

    from .test_grad_align import _backend_or_skip

    _backend_or_skip("extension", "cpu")
    worst = {"extension": 0.0, "foreach": 0.0}
    for seed in range(300):
        g, r = nearly_orthogonal(seed, dtype=dtype)
        exact = g.double() @ r.double()
        errors = {}
        for backend in worst:
            got = grad_align_reduce([g], [r], backend=backend)[0, 0].double()
            errors[backend] = abs(float((got - exact) / exact))
            worst[backend] = max(worst[backend], errors[backend])
        # the stats are fp32: one rounding (6e-8) is the floor of both
        assert errors["extension"] <= max(errors["foreach"], 1.2e-7), (seed, errors)
    assert worst["extension"] <= 1.2e-7, worst
    # the CUDA kernel's counterpart (fp64 reference, needs a GPU): tests/test_grad_align_gpu.py::test_nearly_cancelling_dot
