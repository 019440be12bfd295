"""Shared helpers for the tests: device choice, dtype tolerances and a comparison that names the tensor."""

from __future__ import annotations

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Tolerances for comparing a fast path against an fp64 reference, by dtype of the fast path.
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-2, rtol=2e-2),
    torch.bfloat16: dict(atol=1e-1, rtol=5e-2),
}


def assert_close(
    name: str,
    ref: torch.Tensor,
    got: torch.Tensor,
    *,
    base: torch.Tensor | None = None,
    ratio: float = 2.0,
    atol: float | None = None,
):
    """Compare `got` with `ref` (usually fp64) and name the tensor on failure.

    Without `base`: allclose with the tolerance of got's dtype. With `base` (plain PyTorch computing the same thing
    in got's dtype): flash-attention's rule -- got's max error may be at most `ratio` times base's, plus a small atol.
    """
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: has non-finite values (an unwritten tile?)"
    ref64, got64 = ref.detach().double(), got.detach().double()
    err = (got64 - ref64).abs()
    if base is not None:
        base_err = (base.detach().double() - ref64).abs().max().item()
        tol = atol if atol is not None else TOL[got.dtype]["atol"] * 0.05
        worst = err.max().item()
        assert worst <= ratio * base_err + tol, (
            f"{name}: max error {worst:.3e} > {ratio} x plain-PyTorch error {base_err:.3e} + {tol:.1e} "
            f"(at index {tuple(int(i) for i in torch.nonzero(err == err.max())[0])})"
        )
        return
    tol = TOL[got.dtype]
    bound = (atol if atol is not None else tol["atol"]) + tol["rtol"] * ref64.abs()
    bad = err > bound
    if bad.any():
        idx = torch.nonzero(bad)[:5].tolist()
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements off (max error {err.max().item():.3e}); "
            f"first bad indices {idx}"
        )


def nearly_orthogonal(seed: int, n: int = 3000, cos: float = 3e-4, dtype: torch.dtype = torch.float32):
    """A pair (g, r) of n values whose dot nearly cancels: r is a unit vector at cosine `cos` from g (in fp64, then
    rounded to `dtype`). The case where an fp32 running sum of <g, r> loses its digits (issue 20, row 19)."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    r = torch.randn(n, generator=gen, dtype=torch.float64)
    r = r - (g @ r) / (g @ g) * g
    r = r / r.norm() + cos * g / g.norm()
    return g.to(dtype), r.to(dtype)
