"""Launchers of the Triton kernels of the multi-scale low-rank linear op (the "triton" backend of function.py).

    lowrank_linear_fwd_triton(x2, weight, bias, lora_L, lora_R, scales, dropout_p, seed)
        -> (y [M, out], T [M, n*r] fp32, bits: the packed dropout mask [M, cdiv(in, 32)] int32 or, without
            dropout, empty)
    lowrank_linear_bwd_triton(dy2, x2, weight, lora_L, lora_R, scales, t, dropout_p, seed,
                              needs_dx, needs_dL, needs_dR, bits=None) -> (dx | None, dL | None, dR | None)
    dropout_mask_triton(shape, p, seed, device) -> the bool keep-mask that the kernels apply (unpacked)

The seed is an int or a one-element integer tensor on the inputs' device (what function.py passes, drawn there by
torch's generator: CUDA-graph safe, see _seed_args); both give the same mask for the same value below 2^31.

Inputs arrive 2-D and contiguous (function.py flattens and copies at most once); x, weight, bias, L and R share one
dtype among fp32 / fp16 / bf16, scales is any float [n*r]. Launch plan (kernels in kernels.py, their
configs in configs.py):

    forward   small n*r, no dropout:  fused GEMM, T accumulated in its K loop               (1 launch)
              otherwise:               shrink T = drop(x) L^T, then fused GEMM loading T     (2 launches)
              dropout:                 the packed keep-mask first, saved for backward        (+1 launch)
    backward  dx (+ G for dL):         fused GEMM dx = dy W + ((dy R) s) L, same two modes   (1-2 launches)
              dR = dy^T (T s), dL = (G s)^T drop(x): M-reductions                           (1 launch each)

fp32 inputs use TF32 in tl.dot only when torch allows TF32 for matmuls (`torch.backends.cuda.matmul.fp32_precision`,
or the legacy `allow_tf32` where the new API is unset or missing), IEEE otherwise. Every launch runs under a device
guard for the inputs' device, so tensors on `cuda:1` launch on `cuda:1` whatever the current device is.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton

from .configs import (
    FUSE_T_MAX_R, FUSED_DY_MAX_R, INTERPRET, T_CHUNK, bits_config, block_r, fused_dy_max_r, precision, reduce_config,
    shrink_config,
)
from .kernels import _dropout_bits_kernel, _reduce_m_kernel, _shrink_kernel, fused_even, fused_tuned

__all__ = [
    "lowrank_linear_fwd_triton", "lowrank_linear_bwd_triton", "lowrank_linear_bwd_triton_fused_dy", "uses_fused_dy",
    "dropout_mask_triton", "unpack_bits", "force_configs",
]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Tests set this to fill every output with NaN before the launch, so that a tile a kernel forgot to write fails.
_FILL_NAN = False
# Tests set these to exercise both launch modes and the split (atomic) reductions on small shapes.
_FORCE_FUSE_T: Optional[bool] = None
_FORCE_SPLIT: Optional[int] = None
# Tests set this to run one given config instead of autotuning (see force_configs): {"fused": triton.Config,
# "shrink": (BLOCK_M, BLOCK_K, warps, stages), "reduce": (BLOCK_M, BLOCK_N, BLOCK_R, warps, stages)}; a missing key
# keeps the default. It bypasses the autotuner (whose cache would otherwise keep the first config it picked).
_FORCE_CONFIG: dict = {}


# ----------------------------------------------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------------------------------------------
def _alloc(shape, dtype, device):
    if _FILL_NAN:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@contextlib.contextmanager
def force_configs(fused=None, shrink=None, reduce=None):
    """Run every launch inside the block with the given configs (None: the default for that kernel)."""
    old = dict(_FORCE_CONFIG)
    _FORCE_CONFIG.clear()
    _FORCE_CONFIG.update({k: v for k, v in (("fused", fused), ("shrink", shrink), ("reduce", reduce)) if v})
    try:
        yield
    finally:
        _FORCE_CONFIG.clear()
        _FORCE_CONFIG.update(old)


def _device_guard(device: torch.device):
    """Make `device` current for the launches (Triton launches on the current CUDA device, not the tensors')."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _m_bucket(m: int) -> int:
    return min(16384, max(16, triton.next_power_of_2(m)))


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _splits(tiles: int, length: int, block: int, device: torch.device) -> int:
    """How many slices of a reduction of `length` so that tiles * slices fills the GPU about twice."""
    if _FORCE_SPLIT is not None:
        return max(1, min(_FORCE_SPLIT, triton.cdiv(length, block)))
    if torch.are_deterministic_algorithms_enabled():
        return 1
    want = triton.cdiv(2 * _num_sms(device), max(tiles, 1))
    # Each slice keeps at least 4 blocks of work so the atomics stay a rounding error.
    return max(1, min(want, triton.cdiv(length, 4 * block)))


def _fuse_t(nr: int, dropout_p: float) -> bool:
    # Dropout needs T_MODE 1 (see kernels.py); a wider in-loop T would need configs the sm_90 report has not seen.
    if dropout_p > 0.0 or block_r(nr) > FUSE_T_MAX_R:
        return False
    return True if _FORCE_FUSE_T is None else _FORCE_FUSE_T


def _no_bits(device):
    # Stands in for the mask pointer when there is no dropout (never read: HAS_DROP / OUT_DROP are off).
    return torch.empty((1, 1), dtype=torch.int32, device=device)


def _seed_args(seed, device):
    """(seed, seed_ptr, SEED_FROM_PTR) for the mask kernel. A tensor seed (one integer, as function.py draws it on the
    inputs' device) is read by the kernel at run time: no host sync, and a CUDA graph replay sees the replayed draw.
    An int seed is reduced mod 2^31 so that Triton always passes it as i32 (a wider one would compile another
    variant); seeds below 2^31 give the same mask either way."""
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.is_floating_point():
            raise ValueError(f"seed: expected one integer, got a {seed.dtype} tensor of shape {tuple(seed.shape)}")
        # No copy when it is already an int64 on this device (the graph-safe case).
        return 0, seed.reshape(1).to(device=device, dtype=torch.int64), True
    return int(seed) % 2**31, _no_bits(device), False


def _dropout_bits(m: int, k: int, p: float, seed, device) -> torch.Tensor:
    """The packed keep-mask [m, cdiv(k, 32)] int32 of an [m, k] input (kernels.py: `_dropout_bits_kernel`);
    seed: an int or a one-element integer tensor (read on the device, see `_seed_args`)."""
    w = triton.cdiv(k, 32)
    bits = _alloc((m, w), torch.int32, device) if not _FILL_NAN else torch.full((m, w), -1, dtype=torch.int32,
                                                                                    device=device)
    if m and w:
        bm, bw, warps = bits_config()
        seed_i, seed_ptr, from_ptr = _seed_args(seed, device)
        _dropout_bits_kernel[(triton.cdiv(m, bm), triton.cdiv(w, bw))](
            bits, m, w, bits.stride(0), seed_i, seed_ptr, float(p), SEED_FROM_PTR=from_ptr,
            BLOCK_M=bm, BLOCK_W=bw, num_warps=warps)
    return bits


def _check_bits(bits, m, k, device):
    want = (m, triton.cdiv(k, 32))
    if bits.dtype != torch.int32 or tuple(bits.shape) != want or bits.stride(1) != 1 or bits.device != device:
        raise ValueError(f"bits: expected the forward's packed dropout mask, int32 {want} with unit column stride on "
                         f"{device}, got {bits.dtype} {tuple(bits.shape)} strides {bits.stride()} on {bits.device}")


def _check_dtypes(x2, **others):
    if x2.dtype not in _DTYPES:
        raise TypeError(f"x: the triton backend supports float32, float16 and bfloat16, got {x2.dtype}")
    for name, t in others.items():
        if t is not None and t.dtype != x2.dtype:
            raise TypeError(f"{name}: expected dtype {x2.dtype} (the dtype of x), got {t.dtype}")


def _launch_shrink(a, p, t, rows_stride_p, k_stride_p, dropout_p, bits, fused_dr=None):
    """t[M, NR] (fp32) = drop(a) @ P^T where P[r, k] = p[r * rows_stride_p + k * k_stride_p]; drop from `bits`.
    fused_dr = (ts [M, NR] fp32, s, dr [K, NR] fp32 zeroed): also dr += a^T (ts * s) in the same pass."""
    m, k = a.shape
    nr = t.shape[1]
    br = block_r(nr)
    bm, bk, warps, stages = _FORCE_CONFIG.get("shrink") or shrink_config(br, a.element_size())
    m_tiles = triton.cdiv(m, bm)
    split = _splits(m_tiles, k, bk, a.device)
    k_per_split = triton.cdiv(triton.cdiv(k, split), bk) * bk
    split = triton.cdiv(k, k_per_split) if k > 0 else 1
    if split > 1 or k == 0:
        t.zero_()
    if k == 0:
        return
    bits = _no_bits(a.device) if bits is None else bits
    ts, s, dr = fused_dr if fused_dr is not None else (t, t, t)  # unused without FUSED_DR
    _shrink_kernel[(m_tiles, split)](
        a, p, t, bits, ts, s, dr, m, k, nr, k_per_split, 1.0 / (1.0 - dropout_p),
        a.stride(0), a.stride(1), rows_stride_p, k_stride_p, t.stride(0), t.stride(1), bits.stride(0),
        ts.stride(0), ts.stride(-1), dr.stride(0), dr.stride(-1),
        HAS_DROP=dropout_p > 0.0, ATOMIC=split > 1, EVEN_K=k % bk == 0, FUSED_DR=fused_dr is not None,
        BLOCK_R=br, UPCAST=INTERPRET,
        PRECISION=precision(a.dtype), BLOCK_M=bm, BLOCK_K=bk, num_warps=warps, num_stages=stages,
    )


def _launch_reduce(a, g, s, c, c_strides, dropout_p, bits):
    """c[N, NR] (fp32, strides c_strides) = drop(a)^T (g * s), a: [M, N], g: [M, NR] fp32; drop from `bits`."""
    m, n = a.shape
    nr = g.shape[1]
    br = block_r(nr)
    prec = precision(a.dtype)
    bm, bn, br, warps, stages = _FORCE_CONFIG.get("reduce") or reduce_config(br, a.element_size(), prec)
    br = min(br, block_r(nr))
    n_tiles = triton.cdiv(n, bn) * triton.cdiv(nr, br)
    split = _splits(n_tiles, m, bm, a.device)
    m_per_split = triton.cdiv(triton.cdiv(m, split), bm) * bm
    split = triton.cdiv(m, m_per_split)
    if split > 1:
        c.zero_()
    bits = _no_bits(a.device) if bits is None else bits
    _reduce_m_kernel[(triton.cdiv(n, bn), split, triton.cdiv(nr, br))](
        a, g, s, c, bits, m, n, nr, m_per_split, 1.0 / (1.0 - dropout_p),
        a.stride(0), a.stride(1), g.stride(0), g.stride(1), c_strides[0], c_strides[1], bits.stride(0),
        HAS_DROP=dropout_p > 0.0, ATOMIC=split > 1, BLOCK_R=br, UPCAST=INTERPRET,
        PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
    )


def _launch_fused(a, b_strides, b, p, p_strides, q, q_strides, s, bias, t, c, n, t_mode, store_t, out_drop,
                  dropout_p, bits):
    m, k = a.shape
    nr = s.shape[0]
    br = block_r(nr) if t_mode == 0 else min(T_CHUNK, block_r(nr))

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    bits = _no_bits(a.device) if bits is None else bits
    args = (a, b, p, q, s, bias if bias is not None else s, t, c, bits,
            m, n, k, nr, _m_bucket(m), 1.0 / (1.0 - dropout_p),
            a.stride(0), a.stride(1), b_strides[0], b_strides[1], p_strides[0], p_strides[1],
            q_strides[0], q_strides[1], t.stride(0), t.stride(1), c.stride(0), c.stride(1), bits.stride(0))
    meta = dict(HAS_BIAS=bias is not None, T_MODE=t_mode, STORE_T=store_t, OUT_DROP=out_drop,
                BLOCK_R=br, UPCAST=INTERPRET, PRECISION=precision(a.dtype))
    forced = _FORCE_CONFIG.get("fused")
    if forced is not None:
        fused_even[grid(forced.kwargs)](*args, **meta, **forced.kwargs, num_warps=forced.num_warps,
                                        num_stages=forced.num_stages)
    else:
        fused_tuned[grid](*args, **meta)


# ----------------------------------------------------------------------------------------------------------------
# Public launchers.
# ----------------------------------------------------------------------------------------------------------------
def lowrank_linear_fwd_triton(x2, weight, bias, lora_L, lora_R, scales, dropout_p: float, seed: int):
    """x2 [M, in] -> (y [M, out] in x's dtype, T [M, n*r] fp32, bits), T = drop(x) L^T unscaled; T and the packed
    dropout keep-mask `bits` ([M, cdiv(in, 32)] int32; empty when dropout_p is 0) are saved for backward."""
    _check_dtypes(x2, weight=weight, bias=bias, lora_L=lora_L, lora_R=lora_R)
    with _device_guard(x2.device):
        return _fwd(x2, weight, bias, lora_L, lora_R, scales, dropout_p, seed)


def _fwd(x2, weight, bias, lora_L, lora_R, scales, dropout_p, seed):
    m, k = x2.shape
    n, nr = weight.shape[0], lora_L.shape[0]
    p = float(dropout_p)
    y = _alloc((m, n), x2.dtype, x2.device)
    t = _alloc((m, nr), torch.float32, x2.device)
    bits = _dropout_bits(m, k, p, seed, x2.device) if p > 0.0 else torch.empty(0, dtype=torch.int32,
                                                                                   device=x2.device)
    if m == 0:
        return y, t, bits
    s = scales.to(device=x2.device, dtype=torch.float32).contiguous()
    fuse = _fuse_t(nr, p)
    if not fuse:
        # P[r, k] = L[r, k]
        _launch_shrink(x2, lora_L, t, lora_L.stride(0), lora_L.stride(1), p, bits if p > 0.0 else None)
    # B[k, n] = W[n, k]; Q[n, r] = R[n, r]
    _launch_fused(x2, (weight.stride(1), weight.stride(0)), weight, lora_L, (lora_L.stride(0), lora_L.stride(1)),
                  lora_R, (lora_R.stride(0), lora_R.stride(1)), s, bias, t, y, n,
                  t_mode=0 if fuse else 1, store_t=fuse, out_drop=False, dropout_p=p, bits=None)
    return y, t, bits


def lowrank_linear_bwd_triton(dy2, x2, weight, lora_L, lora_R, scales, t, dropout_p, seed,
                              needs_dx, needs_dL, needs_dR, bits=None, fused_dy=False):
    """docs/layer.md: dx = dy W + drop'((G s) L), dR = dy^T (T s), dL = (G s)^T drop(x), with G = dy R.

    bits: the forward's packed dropout mask; None (or empty) regenerates it from `seed`, the same mask.
    fused_dy: where G has its own pass over dy (n*r > 32 or dropout), compute dR in that pass too, with fp32 atomics
    (n*r up to 64, 16 for fp32 without TF32; never in deterministic mode). backend="auto" times this variant as
    "triton-fdy"."""
    _check_dtypes(x2, dy=dy2, weight=weight, lora_L=lora_L, lora_R=lora_R)
    with _device_guard(x2.device):
        return _bwd(dy2, x2, weight, lora_L, lora_R, scales, t, dropout_p, seed, needs_dx, needs_dL, needs_dR, bits,
                    fused_dy)


def lowrank_linear_bwd_triton_fused_dy(dy2, x2, weight, lora_L, lora_R, scales, t, dropout_p, seed,
                                       needs_dx, needs_dL, needs_dR, bits=None):
    """`lowrank_linear_bwd_triton` with fused_dy=True (the backward of auto's "triton-fdy" candidate)."""
    return lowrank_linear_bwd_triton(dy2, x2, weight, lora_L, lora_R, scales, t, dropout_p, seed, needs_dx,
                                     needs_dL, needs_dR, bits, fused_dy=True)


def uses_fused_dy(nr: int, dropout_p: float, dtype: torch.dtype) -> bool:
    """Whether fused_dy changes anything for this n*r, dropout and dtype (G has its own pass over dy, n*r fits)."""
    # The limit is a register budget of compiled kernels; the interpreter runs every width (for the tests).
    limit = FUSED_DY_MAX_R if INTERPRET else fused_dy_max_r(precision(dtype))
    return not _fuse_t(nr, dropout_p) and block_r(nr) <= limit


def _bwd(dy2, x2, weight, lora_L, lora_R, scales, t, dropout_p, seed, needs_dx, needs_dL, needs_dR, bits,
         fused_dy=False):
    m, k = x2.shape
    n, nr = weight.shape[0], lora_L.shape[0]
    p = float(dropout_p)
    # A tensor seed stays a tensor (int() would sync, and fail under CUDA-graph capture); it only regenerates the
    # mask when the forward's packed one is missing.
    seed = seed if isinstance(seed, torch.Tensor) else int(seed)
    dev = x2.device
    if p > 0.0 and m > 0 and (needs_dx or needs_dL):
        if bits is None or bits.numel() == 0:
            bits = _dropout_bits(m, k, p, seed, dev)
        _check_bits(bits, m, k, dev)
    else:
        bits = None
    if m == 0:
        return (_alloc((0, k), x2.dtype, dev) if needs_dx else None,
                torch.zeros_like(lora_L) if needs_dL else None,
                torch.zeros_like(lora_R) if needs_dR else None)
    s = scales.to(device=dev, dtype=torch.float32).contiguous()
    dx = dL = dR = None
    g = None
    # P[r, k'] = R^T[r, k'] = R[k', r] (the K of this GEMM runs over out)
    r_as_p = (lora_R.stride(1), lora_R.stride(0))
    fuse = _fuse_t(nr, p)  # dropout needs the masked low-rank part first (T_MODE 1)
    # dR from the pass that reads dy for G, when there is such a pass (G is not accumulated in the dx GEMM).
    shrink_g = (needs_dx and not fuse) or (needs_dL and not needs_dx)
    fused_dr = None
    if fused_dy and needs_dR and shrink_g and uses_fused_dy(nr, p, x2.dtype) \
            and not torch.are_deterministic_algorithms_enabled():
        dr32 = torch.zeros((n, nr), dtype=torch.float32, device=dev)
        fused_dr = (t.to(torch.float32).contiguous(), s, dr32)  # T is fp32 already: no copy
    if needs_dx:
        dx = _alloc((m, k), x2.dtype, dev)
        if needs_dL or not fuse:
            g = _alloc((m, nr), torch.float32, dev)
        if not fuse:
            _launch_shrink(dy2, lora_R, g, r_as_p[0], r_as_p[1], 0.0, None, fused_dr)
        # B[k', n'] = W[k', n'] (k' over out, n' over in); Q[n', r] = L[r, n']
        _launch_fused(dy2, (weight.stride(0), weight.stride(1)), weight, lora_R, r_as_p,
                      lora_L, (lora_L.stride(1), lora_L.stride(0)), s, None, g if g is not None else s[None, :], dx, k,
                      t_mode=0 if fuse else 1, store_t=fuse and needs_dL, out_drop=p > 0.0, dropout_p=p, bits=bits)
    elif needs_dL:
        g = _alloc((m, nr), torch.float32, dev)
        _launch_shrink(dy2, lora_R, g, r_as_p[0], r_as_p[1], 0.0, None, fused_dr)
    if needs_dL:
        dl32 = _alloc((nr, k), torch.float32, dev)
        _launch_reduce(x2, g, s, dl32, (dl32.stride(1), dl32.stride(0)), p, bits)
        dL = dl32.to(lora_L.dtype)
    if needs_dR:
        if fused_dr is None:
            t32 = t.to(torch.float32).contiguous()
            dr32 = _alloc((n, nr), torch.float32, dev)
            _launch_reduce(dy2, t32, s, dr32, (dr32.stride(0), dr32.stride(1)), 0.0, None)
        dR = dr32.to(lora_R.dtype)
    return dx, dL, dR


def dropout_mask_triton(shape, p: float, seed: int, device) -> torch.Tensor:
    """The keep-mask (bool, `shape`) that the kernels apply to an input of that shape, unpacked from the packed mask
    they generate: x[..., c] of flattened row m is kept iff uniform(philox(seed, (c // 4, m, 0, 0))[c % 4]) >= p.
    For tests against the reference's `dropout_mask`."""
    shape = tuple(int(v) for v in shape)
    if len(shape) < 1:
        raise ValueError("shape: expected at least one dimension [..., in_features]")
    k = shape[-1]
    m = 1
    for v in shape[:-1]:
        m *= v
    with _device_guard(torch.device(device)):
        bits = _dropout_bits(m, k, float(p), seed, device)
    return unpack_bits(bits, k).reshape(shape)


def unpack_bits(bits: torch.Tensor, k: int) -> torch.Tensor:
    """[M, cdiv(k, 32)] int32 packed keep-mask -> [M, k] bool (bit c % 32 of word c // 32)."""
    cols = torch.arange(k, device=bits.device)
    if bits.numel() == 0:
        return torch.zeros((bits.shape[0], k), dtype=torch.bool, device=bits.device)
    words = bits.to(torch.int64)[:, cols // 32]
    return ((words >> (cols % 32)) & 1).bool()
