"""Every shipped config of the fused Triton GEMM, once each, forward and backward, against an fp32 reference.

Autotune picks the big tiles (128x256, 128x128) at LLM shapes, so each of them must be right on its own:
- on a GPU (marked gpu): odd M = 4113 with K = N = 4096, bf16 and fp16, at n*r 16 (T accumulated in the K loop) and
  64 (T from the shrink kernel), and the dropout-epilogue configs with p = 0.1 (shipped shrink/reduce configs too);
- without a GPU, under the Triton interpreter: the same configs at tiny odd sizes (M = 130, K = 80, N = 264, so every
  tile has a ragged edge and the K loop a remainder), bf16, so the big-tile code paths are checked for logic in CI.
Each config is forced through `launch.force_configs`, which bypasses the autotuner.
"""

from __future__ import annotations

import pytest
import torch

from muscle_kernels.ops.lowrank_linear.function import available_backends
from muscle_kernels.ops.lowrank_linear.reference import lowrank_linear_reference

from .utils import DEVICE, assert_close

if "triton" not in available_backends(DEVICE):
    pytest.skip(
        "the triton backend is not usable here (no Triton, or no CUDA and no interpreter)", allow_module_level=True
    )

from muscle_kernels.ops.lowrank_linear import configs, launch  # noqa: E402

ON_GPU = DEVICE.type == "cuda"
GPU_SHAPE = (4113, 4096, 4096)  # M, K (in), N (out)
TINY_SHAPE = (130, 80, 264)
_EPS = {torch.float16: 2**-10, torch.bfloat16: 2**-7}


@pytest.fixture(autouse=True)
def _nan_outputs():
    with launch.force_configs(fill_nan=True):  # an unwritten tile fails the comparison
        yield


def _cases(dtypes):
    out = []
    for dtype in dtypes:
        name = str(dtype).replace("torch.", "")
        for i, cfg in enumerate(configs.fused_configs(2, "tf32")):
            for nr in (16, 64):
                out.append(pytest.param(dtype, cfg, nr, 0.0, id=f"{name}-{i}-{_tag(cfg)}-nr{nr}"))
            # The dropout epilogue (dx) with the mask saved by the forward.
            out.append(pytest.param(dtype, cfg, 16, 0.1, id=f"{name}-drop{i}-{_tag(cfg)}-nr16-p0.1"))
    return out


def _tag(cfg):
    kw = cfg.kwargs
    return f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}w{cfg.num_warps}s{cfg.num_stages}"


def _reference(x, w, b, lo, ro, s, dy, mask, p):
    xr, lr, rr = (v.detach().clone().requires_grad_() for v in (x, lo, ro))
    y = lowrank_linear_reference(xr, w, b, lr, rr, s, mask, p)
    return (y.detach(), *torch.autograd.grad(y, [xr, lr, rr], dy))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device (the interpreted twin below runs the same configs tiny)")
@pytest.mark.parametrize("dtype,cfg,nr,p", _cases([torch.bfloat16, torch.float16]))
def test_every_shipped_config_at_llm_shape(dtype, cfg, nr, p):
    _check_config(GPU_SHAPE, dtype, cfg, nr, p)


@pytest.mark.skipif(ON_GPU, reason="the GPU runs these configs at LLM shapes (test above)")
@pytest.mark.parametrize("dtype,cfg,nr,p", _cases([torch.bfloat16]))
def test_every_shipped_config_interpreted(dtype, cfg, nr, p):
    _check_config(TINY_SHAPE, dtype, cfg, nr, p)


def _check_config(shape, dtype, cfg, nr, p):
    M, K, N = shape
    gen = torch.Generator(device=DEVICE).manual_seed(nr + int(p * 10))
    rnd = lambda *shape, scale=1.0: (torch.randn(*shape, device=DEVICE, generator=gen) * scale).to(dtype)  # noqa
    x, w, b = rnd(M, K), rnd(N, K, scale=K**-0.5), rnd(N)
    lo, ro, dy = rnd(nr, K, scale=K**-0.5), rnd(N, nr, scale=nr**-0.5), rnd(M, N)
    s = torch.rand(nr, device=DEVICE, generator=gen) * 2 + 0.25
    br = configs.block_r(nr)
    shrink = configs.shrink_config(br, 2, interpret=False)
    reduce = configs.reduce_config(br, 2, "tf32", interpret=False)
    seed = 4321
    with launch.force_configs(fused=cfg, shrink=shrink, reduce=reduce):
        y, t, bits = launch.lowrank_linear_fwd_triton(x, w, b, lo, ro, s, p, seed)
        dx, dl, dr = launch.lowrank_linear_bwd_triton(dy, x, w, lo, ro, s, t, p, seed, True, True, True, bits=bits)
    mask = launch.dropout_mask_triton(x.shape, p, seed, DEVICE) if p > 0 else None
    f32 = [v.float() for v in (x, w, b, lo, ro, dy)]
    ref = _reference(*f32[:5], s, f32[5], mask, p)
    base = _reference(x, w, b, lo, ro, s, dy, mask, p)  # plain PyTorch in the same dtype: the error budget
    for name, r, bs, got in zip(("y", "dx", "dL", "dR"), ref, base, (y, dx, dl, dr)):
        assert got.dtype == dtype, f"{name}: dtype {got.dtype}"
        assert_close(f"{name} [{_tag(cfg)}]", r, got, base=bs.float(), atol=2 * _EPS[dtype] * r.abs().max().item())


def test_force_configs_nests_and_restores():
    """An argument left None keeps the enclosing block's override; leaving a block restores what was in force."""
    cfg = configs.fused_configs(2, "tf32")[0]
    with launch.force_configs(fused=cfg, split=3):  # inside the autouse fill_nan block
        with launch.force_configs(fuse_t=False, split=1) as inner:
            assert (inner.fill_nan, inner.fused, inner.fuse_t, inner.split) == (True, cfg, False, 1)
        assert launch._forced() == launch.Overrides(fill_nan=True, fused=cfg, split=3)
    assert launch._forced() == launch.Overrides(fill_nan=True)
    with pytest.raises(RuntimeError), launch.force_configs(split=2):
        raise RuntimeError("a failing launch")
    assert launch._forced().split is None, "an exception must not leave an override behind"
