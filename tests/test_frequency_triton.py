"""The fused Triton filter (analysis/frequency_triton.py) against the dense fp64 filter, under the interpreter on the CPU
(conftest sets TRITON_INTERPRET=1 there) and compiled on a GPU. Shapes are tiny: the interpreter runs numpy per
program."""

import math

import pytest
import torch

from muscle_kernels.analysis import (
    frequency,
    frequency_ratios,
    frequency_ratios_dense,
    frequency_triton,
    low_frequency_part,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def dense_low(x, f, sigmas):
    """K_sigma f with the N x N matrix in fp64: [len(sigmas), N, c]."""
    x64 = x.double()
    f64 = (f if f.dim() == 2 else f[:, None]).double()
    d = torch.cdist(x64, x64, compute_mode="donot_use_mm_for_euclid_dist")
    return torch.stack([torch.softmax(-d / (2.0 * s), dim=1) @ f64 for s in sigmas])


def _data(n, d, c, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    # scaled so that typical distances are about 1.4 whatever d: the sigmas below span narrow to wide filters
    x = (torch.randn(n, d, generator=g) / math.sqrt(d)).to(dtype)
    f = torch.randn(n, c, generator=g).to(dtype) if c else torch.randn(n, generator=g).to(dtype)
    return x.to(DEVICE), f.to(DEVICE)


SIGMAS = [0.02, 0.1, 0.3, 1.0, 5.0]


@pytest.mark.parametrize(
    "n,d,c,n_sigmas,dtype",
    [
        (37, 8, 2, 3, torch.float32),  # N below one tile, c = 2 padded to 16
        (70, 8, 0, 5, torch.float32),  # 1-D f, N = 2 tiles + 6 rows
        (45, 48, 3, 1, torch.bfloat16),  # bf16 inputs, one sigma
        (33, 130, 2, 4, torch.float16),  # d not a multiple of BLOCK_D
        (19, 1024, 2, 5, torch.float32),  # wide inputs, N small
        (17, 1024, 1, 2, torch.bfloat16),
    ],
)
def test_kernel_matches_dense(n, d, c, n_sigmas, dtype):
    x, f = _data(n, d, c, dtype, seed=n * 1000 + d)
    sigmas = SIGMAS[:n_sigmas]
    got = low_frequency_part(x, f, sigmas, backend="triton")
    assert got.dtype == torch.float32 and got.shape == (n_sigmas, n, max(c, 1))
    assert torch.isfinite(got).all(), "an unwritten or NaN tile"
    ref = dense_low(x.cpu(), f.cpu(), sigmas)  # the same (rounded) low-precision values, upcast to fp64
    scale = ref.abs().max().item()
    err = (got.cpu().double() - ref).abs().max().item()
    assert err <= 2e-5 * scale, f"max error {err:.2e} (scale {scale:.2e})"
    # the ratios of the public function agree with the paper's dense computation too
    r_got = frequency_ratios(x, f, sigmas, backend="triton")
    r_ref = frequency_ratios_dense(x.cpu(), f.cpu(), sigmas)
    fnorm = f.double().norm().item()
    for s in sigmas:
        for key in ("low", "high"):
            assert r_got[s][key] == pytest.approx(r_ref[s][key], rel=1e-4, abs=1e-5 * fnorm), f"sigma={s} {key}"


def test_many_sigmas_and_wide_outputs_are_split_into_passes():
    n_sig = frequency_triton.MAX_SIGMAS_PER_PASS + 3
    c = frequency_triton.MAX_COLUMNS_PER_PASS + 5
    x, f = _data(29, 8, c, torch.float32, seed=7)
    sigmas = [0.01 * 1.4**k for k in range(n_sig)]
    got = low_frequency_part(x, f, sigmas, backend="triton").cpu().double()
    ref = dense_low(x.cpu(), f.cpu(), sigmas)
    assert (got - ref).abs().max().item() <= 2e-5 * ref.abs().max().item()


def test_strided_inputs_and_the_filter_limits():
    x, f = _data(41, 16, 3, torch.float32, seed=3)
    xt = x.t().contiguous().t()  # column-major x, f a non-contiguous slice
    fs = torch.cat([f, f], 1)[:, ::2]
    assert not xt.is_contiguous() and not fs.is_contiguous()
    got = low_frequency_part(xt, fs, [1e-5, 1e6], backend="triton")
    torch.testing.assert_close(got[0], fs)  # each sample sees only itself
    torch.testing.assert_close(got[1], fs.mean(0, keepdim=True).expand_as(fs), atol=1e-5, rtol=1e-4)


def test_duplicate_points_are_exactly_at_distance_zero():
    # exact distances: two copies of a point share their filter weight at any sigma; the matmul shortcut would give
    # them a distance of sqrt(rounding error) and a narrow filter would tell them apart
    x, f = _data(24, 32, 1, torch.float32, seed=11)
    x = torch.cat([x, x[:4] + 1e3])  # far-off points ...
    x = torch.cat([x, x[-4:]])  # ... and their exact copies
    f = torch.cat([f, torch.randn(8, 1, device=f.device)])
    got = low_frequency_part(x, f, [1e-3], backend="triton")[0]
    pair_mean = (f[-8:-4] + f[-4:]) / 2
    torch.testing.assert_close(got[-8:-4], pair_mean)
    torch.testing.assert_close(got[-4:], pair_mean)


def test_backend_choice(monkeypatch):
    x, f = torch.randn(5, 2), torch.randn(5)
    assert frequency.resolve_backend("auto", torch.device("cpu")) == "torch"
    assert frequency.resolve_backend("torch", torch.device("cuda")) == "torch"
    assert frequency.resolve_backend("auto", torch.device("cuda")) == "triton"
    with pytest.raises(ValueError, match=r"backend: expected one of \('auto', 'torch', 'triton'\)"):
        low_frequency_part(x, f, [1.0], backend="dense")
    monkeypatch.setattr(frequency, "_interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="backend='triton' is not available: tensors are on cpu"):
        low_frequency_part(x, f, [1.0], backend="triton")


def test_gradients_take_the_torch_path(monkeypatch):
    x, f = _data(20, 4, 2, torch.float32, seed=2)
    x.requires_grad_(True)
    with pytest.raises(RuntimeError, match="backend='triton' computes no gradients"):
        low_frequency_part(x, f, [0.5], backend="triton")
    # where auto picks the kernel (CUDA tensors), a gradient sends it to the torch path instead
    monkeypatch.setattr(frequency, "resolve_backend", lambda backend, device: "triton")
    low = low_frequency_part(x, f, [0.5], backend="auto")
    assert low.requires_grad
    monkeypatch.undo()
    with torch.no_grad():
        got = low_frequency_part(x, f, [0.5], backend="triton")
    torch.testing.assert_close(got, low_frequency_part(x, f, [0.5], backend="torch").detach())


def test_auto_falls_back_with_one_warning_when_triton_is_broken(monkeypatch):
    monkeypatch.setattr(
        frequency, "_TRITON", {"module": None, "tried": True, "error": "ImportError: no triton", "warned": False}
    )
    with pytest.warns(RuntimeWarning, match="Triton kernel is unavailable .ImportError: no triton."):
        assert frequency.resolve_backend("auto", torch.device("cuda")) == "torch"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert frequency.resolve_backend("auto", torch.device("cuda")) == "torch"  # no second warning


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the compiled kernel at a real size")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_kernel_matches_torch_path(dtype):
    x, f = _data(3001, 384, 2, dtype, seed=5)
    sigmas = SIGMAS
    got = low_frequency_part(x, f, sigmas, backend="triton")
    ref = low_frequency_part(x.double(), f.double(), sigmas, backend="torch", chunk=512)
    err = (got.double() - ref).abs().max().item()
    assert err <= 2e-5 * ref.abs().max().item(), f"max error {err:.2e}"
