"""Launchers of the Triton kernels of the multi-scale low-rank linear op (the "triton" backend of function.py).

    lowrank_linear_fwd_triton(x2, weight, bias, lora_L, lora_R, scales, dropout_p, seed)
        -> (y [M, out], T [M, n*r] fp32, bits: the packed dropout mask [M, cdiv(in, 32)] int32 or, without
            dropout, empty)
    lowrank_linear_bwd_triton(dy2, x2, weight, lora_L, lora_R, scales, t, dropout_p, seed,
                              needs_dx, needs_dL, needs_dR, bits=None, dr_pass=None)
        -> (dx | None, dL | None, dR | None); dr_pass "g" / "dx": dR inside the G shrink / the dx GEMM
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
              (dR in the G shrink or in the dx GEMM with dr_pass "g" / "dx": no launch of its own)

fp32 inputs use TF32 in tl.dot only when torch allows TF32 for matmuls (`torch.backends.cuda.matmul.fp32_precision`,
or the legacy `allow_tf32` where the new API is unset or missing), IEEE otherwise. Every launch runs under a device
guard for the inputs' device, so tensors on `cuda:1` launch on `cuda:1` whatever the current device is.

Tests force configs, launch modes, split counts and NaN-filled outputs through `force_configs` (one
`Overrides` object, restored when the block ends).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import NamedTuple

import torch
import triton

from .configs import (
    FOLD_DX_MAX_R,
    FUSE_T_MAX_R,
    FUSED_DY_MAX_R,
    INTERPRET,
    T_CHUNK,
    bits_config,
    block_r,
    fold_dx_max_r,
    fused_dy_max_r,
    precision,
    reduce_config,
    shrink_config,
)
from .kernels import _dropout_bits_kernel, _reduce_m_kernel, _shrink_kernel, fused_even, fused_tuned

__all__ = [
    "lowrank_linear_fwd_triton",
    "lowrank_linear_bwd_triton",
    "lowrank_linear_bwd_triton_fused_dy",
    "lowrank_linear_bwd_triton_fold_dx",
    "uses_fused_dy",
    "uses_fold_dx",
    "dropout_mask_triton",
    "unpack_bits",
    "force_configs",
    "Overrides",
    "Mat",
    "Dropout",
    "FusedOperands",
    "FusedMode",
    "FusedDR",
]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------------
# Test overrides.
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Overrides:
    """What a test (or the benchmark) may force on the launchers; the defaults force nothing.

    fill_nan: fill every output with NaN (the packed mask with all bits set) before the launch, so that a tile a
        kernel forgot to write fails.
    fuse_t: T_MODE 0 (True) or 1 (False) where the plan allows both (no dropout, padded n*r <= FUSE_T_MAX_R), to
        exercise both launch modes on small shapes.
    split: how many slices the split (atomic) reductions take, instead of enough to fill the GPU.
    fused: a triton.Config for the fused GEMM, run instead of autotuning (whose cache would otherwise keep the first
        config it picked); shrink: (BLOCK_M, BLOCK_K, warps, stages); reduce: (BLOCK_M, BLOCK_N, BLOCK_R, warps,
        stages) (configs.py).
    """

    fill_nan: bool = False
    fuse_t: bool | None = None
    split: int | None = None
    fused: triton.Config | None = None
    shrink: tuple | None = None
    reduce: tuple | None = None


# The innermost force_configs block's overrides last; only force_configs pushes and pops.
_OVERRIDES = [Overrides()]


def _forced() -> Overrides:
    return _OVERRIDES[-1]


@contextlib.contextmanager
def force_configs(fused=None, shrink=None, reduce=None, *, fuse_t=None, split=None, fill_nan=None):
    """Run every launch inside the block with these overrides (see `Overrides`); an argument left None keeps the
    enclosing block's value (outside any block: the default, nothing forced). Yields the overrides in force."""
    given = dict(fused=fused, shrink=shrink, reduce=reduce, fuse_t=fuse_t, split=split, fill_nan=fill_nan)
    _OVERRIDES.append(dataclasses.replace(_forced(), **{k: v for k, v in given.items() if v is not None}))
    try:
        yield _forced()
    finally:
        _OVERRIDES.pop()


# ----------------------------------------------------------------------------------------------------------------
# Operands of the launches.
# ----------------------------------------------------------------------------------------------------------------
class Mat(NamedTuple):
    """A matrix operand read through strides: element (i, j) at data[i * strides[0] + j * strides[1]], so that a
    transposed view (W read as W^T, R as R^T) costs no copy."""

    data: torch.Tensor
    strides: tuple[int, int]

    @classmethod
    def of(cls, t: torch.Tensor) -> Mat:
        return cls(t, (t.stride(0), t.stride(1)))

    @classmethod
    def transposed(cls, t: torch.Tensor) -> Mat:
        return cls(t, (t.stride(1), t.stride(0)))


class Dropout(NamedTuple):
    """The dropout of one launch: its probability (the 1 / (1 - p) factor) and the packed keep-mask it reads
    (None where the launch masks nothing)."""

    p: float
    bits: torch.Tensor | None


NO_DROPOUT = Dropout(0.0, None)


class FusedOperands(NamedTuple):
    """The fused GEMM's C [M, N] = A B + ((A P^T) * s) Q^T (+ bias) (kernels.py: `_fused_lowrank_mm_kernel`)."""

    a: torch.Tensor  # [M, K]: x (forward) or dy (backward dx)
    b: Mat  # [K, N]: W^T or W
    p: Mat  # [NR, K]: L or R^T
    q: Mat  # [N, NR]: R or L^T
    s: torch.Tensor  # [NR] fp32 scales
    bias: torch.Tensor | None  # [N], forward only
    t: torch.Tensor  # [M, NR] fp32 A P^T (T or G): loaded in T_MODE 1, stored with STORE_T, else a stand-in
    c: torch.Tensor  # [M, N]: y or dx


class FusedMode(NamedTuple):
    """How the fused GEMM gets A P^T: accumulated in its K loop (t_mode 0, stored when store_t) or loaded (1);
    out_drop: the loaded part is masked by dropout (backward dx)."""

    t_mode: int
    store_t: bool
    out_drop: bool


class FusedDR(NamedTuple):
    """dR computed inside another backward pass over dy, dr += dy^T (ts * s): the G shrink's (dr_pass "g",
    `_shrink_kernel`) or the dx GEMM's (dr_pass "dx", `_fused_lowrank_mm_kernel` with FOLD_DR)."""

    ts: torch.Tensor  # [M, NR] fp32: the forward's T
    s: torch.Tensor  # [NR] fp32 scales
    dr: torch.Tensor  # [out, NR] fp32, zeroed


# ----------------------------------------------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------------------------------------------
def _alloc(shape, dtype, device):
    if _forced().fill_nan:
        # Integers have no NaN: all bits set instead (a mask word the kernel forgot to write keeps all 32 elements).
        return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


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
    forced = _forced().split
    if forced is not None:
        return max(1, min(forced, triton.cdiv(length, block)))
    if torch.are_deterministic_algorithms_enabled():
        return 1
    want = triton.cdiv(2 * _num_sms(device), max(tiles, 1))
    # Each slice keeps at least 4 blocks of work so the atomics stay a rounding error.
    return max(1, min(want, triton.cdiv(length, 4 * block)))


def _fuse_t(nr: int, dropout_p: float) -> bool:
    # Dropout needs T_MODE 1 (see kernels.py); a wider in-loop T would need configs the sm_90 report has not seen.
    if dropout_p > 0.0 or block_r(nr) > FUSE_T_MAX_R:
        return False
    forced = _forced().fuse_t
    return True if forced is None else forced


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
    bits = _alloc((m, w), torch.int32, device)
    if m and w:
        bm, bw, warps = bits_config()
        seed_i, seed_ptr, from_ptr = _seed_args(seed, device)
        _dropout_bits_kernel[(triton.cdiv(m, bm), triton.cdiv(w, bw))](
            bits,
            m,
            w,
            bits.stride(0),
            seed_i,
            seed_ptr,
            float(p),
            SEED_FROM_PTR=from_ptr,
            BLOCK_M=bm,
            BLOCK_W=bw,
            num_warps=warps,
        )
    return bits


def _check_bits(bits, m, k, device):
    want = (m, triton.cdiv(k, 32))
    if bits.dtype != torch.int32 or tuple(bits.shape) != want or bits.stride(1) != 1 or bits.device != device:
        raise ValueError(
            f"bits: expected the forward's packed dropout mask, int32 {want} with unit column stride on "
            f"{device}, got {bits.dtype} {tuple(bits.shape)} strides {bits.stride()} on {bits.device}"
        )


def _check_dtypes(x2, **others):
    if x2.dtype not in _DTYPES:
        raise TypeError(f"x: the triton backend supports float32, float16 and bfloat16, got {x2.dtype}")
    for name, t in others.items():
        if t is not None and t.dtype != x2.dtype:
            raise TypeError(f"{name}: expected dtype {x2.dtype} (the dtype of x), got {t.dtype}")


# ----------------------------------------------------------------------------------------------------------------
# One launcher per kernel: configs, grid, strides.
# ----------------------------------------------------------------------------------------------------------------
def _launch_shrink(a, p: Mat, t, drop: Dropout, fused_dr: FusedDR | None = None):
    """t[M, NR] (fp32) = drop(a) @ P^T, P [NR, K]; the mask from drop.bits.
    fused_dr: also dr += a^T (ts * s) in the same pass (see `FusedDR`)."""
    m, k = a.shape
    nr = t.shape[1]
    br = block_r(nr)
    bm, bk, warps, stages = _forced().shrink or shrink_config(br, a.element_size())
    m_tiles = triton.cdiv(m, bm)
    split = _splits(m_tiles, k, bk, a.device)
    k_per_split = triton.cdiv(triton.cdiv(k, split), bk) * bk
    split = triton.cdiv(k, k_per_split) if k > 0 else 1
    if split > 1 or k == 0:
        t.zero_()
    if k == 0:
        return
    bits = _no_bits(a.device) if drop.bits is None else drop.bits
    ts, s, dr = fused_dr if fused_dr is not None else (t, t, t)  # unused without FUSED_DR
    _shrink_kernel[(m_tiles, split)](
        a,
        p.data,
        t,
        bits,
        ts,
        s,
        dr,
        m,
        k,
        nr,
        k_per_split,
        1.0 / (1.0 - drop.p),
        a.stride(0),
        a.stride(1),
        p.strides[0],
        p.strides[1],
        t.stride(0),
        t.stride(1),
        bits.stride(0),
        ts.stride(0),
        ts.stride(-1),
        dr.stride(0),
        dr.stride(-1),
        HAS_DROP=drop.p > 0.0,
        ATOMIC=split > 1,
        EVEN_K=k % bk == 0,
        FUSED_DR=fused_dr is not None,
        BLOCK_R=br,
        UPCAST=INTERPRET,
        PRECISION=precision(a.dtype),
        BLOCK_M=bm,
        BLOCK_K=bk,
        num_warps=warps,
        num_stages=stages,
    )


def _launch_reduce(a, g, s, c: Mat, drop: Dropout):
    """c[N, NR] (fp32) = drop(a)^T (g * s), a: [M, N], g: [M, NR] fp32; the mask from drop.bits."""
    m, n = a.shape
    nr = g.shape[1]
    br = block_r(nr)
    prec = precision(a.dtype)
    bm, bn, br, warps, stages = _forced().reduce or reduce_config(br, a.element_size(), prec)
    br = min(br, block_r(nr))
    n_tiles = triton.cdiv(n, bn) * triton.cdiv(nr, br)
    split = _splits(n_tiles, m, bm, a.device)
    m_per_split = triton.cdiv(triton.cdiv(m, split), bm) * bm
    split = triton.cdiv(m, m_per_split)
    if split > 1:
        c.data.zero_()
    bits = _no_bits(a.device) if drop.bits is None else drop.bits
    _reduce_m_kernel[(triton.cdiv(n, bn), split, triton.cdiv(nr, br))](
        a,
        g,
        s,
        c.data,
        bits,
        m,
        n,
        nr,
        m_per_split,
        1.0 / (1.0 - drop.p),
        a.stride(0),
        a.stride(1),
        g.stride(0),
        g.stride(1),
        c.strides[0],
        c.strides[1],
        bits.stride(0),
        HAS_DROP=drop.p > 0.0,
        ATOMIC=split > 1,
        BLOCK_R=br,
        UPCAST=INTERPRET,
        PRECISION=prec,
        BLOCK_M=bm,
        BLOCK_N=bn,
        num_warps=warps,
        num_stages=stages,
    )


def _launch_fused(ops: FusedOperands, mode: FusedMode, drop: Dropout, fold: FusedDR | None = None):
    """The fused GEMM; fold (backward dx only): also dr += dy^T (ts * s) from the dy tiles it streams."""
    a, c = ops.a, ops.c
    m, k = a.shape
    n = c.shape[1]
    nr = ops.s.shape[0]
    br = block_r(nr) if mode.t_mode == 0 else min(T_CHUNK, block_r(nr))

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    bits = _no_bits(a.device) if drop.bits is None else drop.bits
    # Stand-ins without FOLD_DR (never read); the fold's scales are ops.s, already an argument.
    ts, _, dr = fold if fold is not None else (ops.t, None, ops.t)
    args = (
        a,
        ops.b.data,
        ops.p.data,
        ops.q.data,
        ops.s,
        ops.bias if ops.bias is not None else ops.s,
        ops.t,
        c,
        bits,
        ts,
        dr,
        m,
        n,
        k,
        nr,
        _m_bucket(m),
        1.0 / (1.0 - drop.p),
        a.stride(0),
        a.stride(1),
        *ops.b.strides,
        *ops.p.strides,
        *ops.q.strides,
        ops.t.stride(0),
        ops.t.stride(1),
        c.stride(0),
        c.stride(1),
        bits.stride(0),
        ts.stride(0),
        ts.stride(1),
        dr.stride(0),
        dr.stride(1),
    )
    meta = dict(
        HAS_BIAS=ops.bias is not None,
        T_MODE=mode.t_mode,
        STORE_T=mode.store_t,
        OUT_DROP=mode.out_drop,
        FOLD_DR=fold is not None,
        FOLD_R=block_r(nr) if fold is not None else 16,
        BLOCK_R=br,
        UPCAST=INTERPRET,
        PRECISION=precision(a.dtype),
    )
    forced = _forced().fused
    if forced is not None:
        fused_even[grid(forced.kwargs)](
            *args, **meta, **forced.kwargs, num_warps=forced.num_warps, num_stages=forced.num_stages
        )
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
    bits = _dropout_bits(m, k, p, seed, x2.device) if p > 0.0 else torch.empty(0, dtype=torch.int32, device=x2.device)
    if m == 0:
        return y, t, bits
    s = scales.to(device=x2.device, dtype=torch.float32).contiguous()
    fuse = _fuse_t(nr, p)
    if not fuse:
        _launch_shrink(x2, Mat.of(lora_L), t, Dropout(p, bits if p > 0.0 else None))
    # The GEMM's B [in, out] is W^T, P [n*r, in] is L, Q [out, n*r] is R; the mask is applied by the shrink.
    _launch_fused(
        FusedOperands(x2, Mat.transposed(weight), Mat.of(lora_L), Mat.of(lora_R), s, bias, t, y),
        FusedMode(t_mode=0 if fuse else 1, store_t=fuse, out_drop=False),
        Dropout(p, None),
    )
    return y, t, bits


# Where the backward may compute dR (lowrank_linear_bwd_triton's dr_pass).
_DR_PASSES = (None, "g", "dx")


def lowrank_linear_bwd_triton(
    dy2, x2, weight, lora_L, lora_R, scales, t, dropout_p, seed, needs_dx, needs_dL, needs_dR, bits=None, dr_pass=None
):
    """docs/layer.md: dx = dy W + drop'((G s) L), dR = dy^T (T s), dL = (G s)^T drop(x), with G = dy R.

    bits: the forward's packed dropout mask; None (or empty) regenerates it from `seed`, the same mask.
    dr_pass: where dR is computed. None: a reduction over dy of its own (deterministic). Otherwise inside another pass
    over dy, the row tiles meeting in dR through fp32 atomics (so never in deterministic mode, which runs the
    reduction):
    - "g": where G has its own pass over dy (n*r > 32 or dropout), in that pass (n*r up to 64, 16 for fp32 without
      TF32). backend="auto" times this variant as "triton-fdy".
    - "dx": where dx is computed, in the dx GEMM, which streams every dy tile anyway: its first column tile's programs
      add dy_tile^T (T s) (fp16/bf16, n*r up to FOLD_DX_MAX_R, either GEMM mode, with or without dropout). No pass
      over dy is left for dR. backend="auto" times it as "triton-fdx".
    Where the asked pass does not exist or n*r does not fit, dR falls back to its reduction."""
    if dr_pass not in _DR_PASSES:
        raise ValueError(f"dr_pass: expected one of {_DR_PASSES}, got {dr_pass!r}")
    _check_dtypes(x2, dy=dy2, weight=weight, lora_L=lora_L, lora_R=lora_R)
    with _device_guard(x2.device):
        return _bwd(
            dy2, x2, weight, lora_L, lora_R, scales, t, dropout_p, seed, needs_dx, needs_dL, needs_dR, bits, dr_pass
        )


# The backwards of auto's "triton-fdy" and "triton-fdx" candidates (the backends' backward signature).
lowrank_linear_bwd_triton_fused_dy = functools.partial(lowrank_linear_bwd_triton, dr_pass="g")
lowrank_linear_bwd_triton_fold_dx = functools.partial(lowrank_linear_bwd_triton, dr_pass="dx")


def uses_fused_dy(nr: int, dropout_p: float, dtype: torch.dtype) -> bool:
    """Whether dr_pass="g" changes anything for this n*r, dropout and dtype (G has its own pass over dy, n*r fits)."""
    # The limit is a register budget of compiled kernels; the interpreter runs every width (for the tests).
    limit = FUSED_DY_MAX_R if INTERPRET else fused_dy_max_r(precision(dtype))
    return not _fuse_t(nr, dropout_p) and block_r(nr) <= limit


def uses_fold_dx(nr: int, dtype: torch.dtype) -> bool:
    """Whether dr_pass="dx" changes anything for this n*r and dtype when dx and dR are both wanted (the dx GEMM reads dy
    in every mode, with or without dropout, so only the width of the (T s) tile it holds limits it)."""
    limit = FOLD_DX_MAX_R if INTERPRET else fold_dx_max_r(dtype.itemsize)
    return block_r(nr) <= limit


def _dr_source(wanted, needs_dx, needs_dR, shrink_g, nr, p, dtype):
    """The pass over dy that also computes dR: "g" (the G shrink), "dx" (the dx GEMM), or None (dR's own
    reduction). wanted: the pass the caller asked for; it is kept only where it exists and fits, and never in
    deterministic mode (the row tiles meet through atomics)."""
    if not needs_dR or torch.are_deterministic_algorithms_enabled():
        return None
    if wanted == "g" and shrink_g and uses_fused_dy(nr, p, dtype):
        return "g"
    if wanted == "dx" and needs_dx and uses_fold_dx(nr, dtype):
        return "dx"
    return None


def _bwd(dy2, x2, weight, lora_L, lora_R, scales, t, dropout_p, seed, needs_dx, needs_dL, needs_dR, bits, dr_pass):
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
        return (
            _alloc((0, k), x2.dtype, dev) if needs_dx else None,
            torch.zeros_like(lora_L) if needs_dL else None,
            torch.zeros_like(lora_R) if needs_dR else None,
        )
    s = scales.to(device=dev, dtype=torch.float32).contiguous()
    dx = dL = dR = None
    g = None
    # P[r, k'] = R^T[r, k'] = R[k', r] (the K of this GEMM runs over out)
    r_as_p = Mat.transposed(lora_R)
    fuse = _fuse_t(nr, p)  # dropout needs the masked low-rank part first (T_MODE 1)
    # The G shrink reads dy when G is not accumulated in the dx GEMM; dR may come from it or from the dx GEMM.
    shrink_g = (needs_dx and not fuse) or (needs_dL and not needs_dx)
    dr_in = _dr_source(dr_pass, needs_dx, needs_dR, shrink_g, nr, p, x2.dtype)
    fused_dr = None
    if dr_in is not None:
        dr32 = torch.zeros((n, nr), dtype=torch.float32, device=dev)
        fused_dr = FusedDR(t.to(torch.float32).contiguous(), s, dr32)  # T is fp32 already: no copy
    if needs_dx:
        dx = _alloc((m, k), x2.dtype, dev)
        if needs_dL or not fuse:
            g = _alloc((m, nr), torch.float32, dev)
        if not fuse:
            _launch_shrink(dy2, r_as_p, g, NO_DROPOUT, fused_dr if dr_in == "g" else None)
        # B[k', n'] = W[k', n'] (k' over out, n' over in); Q[n', r] = L[r, n']. Without a G to store (fused, no dL)
        # the scales stand in for T's pointer, never read.
        _launch_fused(
            FusedOperands(
                dy2, Mat.of(weight), r_as_p, Mat.transposed(lora_L), s, None, g if g is not None else s[None, :], dx
            ),
            FusedMode(t_mode=0 if fuse else 1, store_t=fuse and needs_dL, out_drop=p > 0.0),
            Dropout(p, bits),
            fused_dr if dr_in == "dx" else None,
        )
    elif needs_dL:
        g = _alloc((m, nr), torch.float32, dev)
        _launch_shrink(dy2, r_as_p, g, NO_DROPOUT, fused_dr if dr_in == "g" else None)
    if needs_dL:
        dl32 = _alloc((nr, k), torch.float32, dev)
        # dL^T [in, n*r] written through dL's transposed strides
        _launch_reduce(x2, g, s, Mat.transposed(dl32), Dropout(p, bits))
        dL = dl32.to(lora_L.dtype)
    if needs_dR:
        if fused_dr is None:
            t32 = t.to(torch.float32).contiguous()
            dr32 = _alloc((n, nr), torch.float32, dev)
            _launch_reduce(dy2, t32, s, Mat.of(dr32), NO_DROPOUT)
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
