"""What the Triton launchers (launch.py) choose, as functions of the problem: tile tables and their pruning to shared
memory, the launch-mode limits, the H100 constants and the tl.dot precision. No state and no kernel here: the sm_90
report (benchmarks/sm90_report.py) compiles exactly these configs, and the tests force them one by one.

Hopper first (wgmma wants BLOCK_M >= 64 per warp group; 128x256 with 2 warp groups is the classic H100 tile), the
smaller ones keep Ampere (164 KiB shared) and short M busy. BLOCK_K * element size is 128 bytes (one swizzled
shared-memory row): 64 for fp16/bf16, 32 for fp32.
"""

from __future__ import annotations

import os

import torch
import triton

__all__ = [
    "INTERPRET",
    "FUSE_T_MAX_R",
    "T_CHUNK",
    "FUSED_DY_MAX_R",
    "FUSED_DY_MAX_R_IEEE",
    "FOLD_DX_MAX_R",
    "H100_SMEM",
    "BITS_CONFIG",
    "INTERPRETER_CONFIG",
    "block_r",
    "fused_configs",
    "all_fused_configs",
    "prune_fused",
    "shrink_config",
    "reduce_config",
    "bits_config",
    "fused_dy_max_r",
    "fold_dx_max_r",
    "tf32_allowed",
    "precision",
]

# Read once, like Triton itself, which reads TRITON_INTERPRET when the kernels are defined.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Largest padded n*r accumulated inside the GEMM's K loop (T_MODE 0). Above it the separate shrink is cheaper:
# the in-loop product costs BLOCK_R / BLOCK_N of the GEMM's MMA work, the shrink about one extra read of x.
FUSE_T_MAX_R = 32
# Chunk of n*r per tl.dot when the GEMM loads a precomputed T (T_MODE 1): 64 spills at 128x256 on sm_90.
T_CHUNK = 32
# Widest padded n*r for which the backward may compute dR in the G pass (dr_pass "g"): a [BLOCK_K, n*r] fp32 partial
# per step, and (M / BLOCK_M) * out * n*r atomic adds in all. fp32 without TF32 (FMA dots, operands in registers) spilled
# at 64 on sm_90 (benchmarks/sm90_report.py).
FUSED_DY_MAX_R = 64
FUSED_DY_MAX_R_IEEE = 16
# Widest padded n*r for which the backward may compute dR inside the dx GEMM (dr_pass "dx"), fp16/bf16 only: programs
# hold a [BLOCK_M, n*r] (T s) tile for the whole K loop and make a [BLOCK_K, n*r] fp32 partial per step, on top of the
# [BLOCK_M, BLOCK_N] accumulator. benchmarks/sm90_report.py: every shipped fp16/bf16 tile compiles without spills at
# 64; fp32 (TF32 or not) spilled with G in the K loop even at 16 (benchmarks/RESULTS.md), so fp32 does not fold.
FOLD_DX_MAX_R = 64
H100_SMEM = 227 * 1024
# (BLOCK_M, BLOCK_W, warps) of the dropout-mask kernel: 2048 words (65536 mask bits) per program.
BITS_CONFIG = (64, 32, 4)


def fused_dy_max_r(precision: str) -> int:
    return FUSED_DY_MAX_R_IEEE if precision == "ieee" else FUSED_DY_MAX_R


def fold_dx_max_r(elt_size: int) -> int:
    """The widest padded n*r folded into the dx GEMM for operands of elt_size bytes; 0: never folds (fp32)."""
    return FOLD_DX_MAX_R if elt_size == 2 else 0


def block_r(nr: int) -> int:
    """n*r padded to a power of two >= 16 (tl.dot's smallest tile side)."""
    return max(16, triton.next_power_of_2(int(nr)))


# ----------------------------------------------------------------------------------------------------------------
# The fused GEMM.
# ----------------------------------------------------------------------------------------------------------------
_FUSED_SHAPES = [
    # BLOCK_M, BLOCK_N, warps, stages. The same tiles serve the dropout epilogue, which only reads the packed mask.
    (128, 256, 8, 4),  # the deeper pipeline where shared memory allows (autotune keeps whichever is faster)
    (128, 256, 8, 3),
    (128, 128, 8, 4),  # 128x128 with 4 warps spilled 184 bytes in the T-loaded prologue at sm_90
    (64, 128, 4, 4),
    (128, 64, 4, 4),
    (64, 64, 4, 4),
]
# fp32 without TF32 runs on FMA units, whose operands live in registers: only the smaller tiles fit without spills.
_FUSED_SHAPES_IEEE = [
    (64, 64, 4, 3),
    (128, 64, 8, 3),
    (64, 128, 8, 3),
]


def _fused_smem(bm, bn, bk, br, stages, elt, fold_r=0):
    # One pipeline stage holds an A, a B and (T accumulated in the loop only) a P tile; dR folded in adds the (T s)
    # tile, held for the whole loop, and room for its fp32 [BLOCK_K, n*r] partial (an upper bound of what the sm_90
    # report's compiles add).
    return stages * (bm * bk + bk * bn + bk * br) * elt + fold_r * (bm * elt + bk * 4)


def fused_configs(
    elt_size: int, precision: str = "tf32", br: int = FUSE_T_MAX_R, smem_limit: int = H100_SMEM, fold_r: int = 0
):
    """The shipped configs of the fused GEMM for an element size (bytes) and tl.dot precision, fitted to shared
    memory. br: the P tile's width in the K loop (0 when T is loaded, T_MODE 1); fold_r: the width of dR folded into
    the dx GEMM (0: not folded)."""
    bk = 128 // elt_size
    out = []
    shapes = _FUSED_SHAPES_IEEE if elt_size == 4 and precision == "ieee" else _FUSED_SHAPES
    for bm, bn, w, st in shapes:
        while st > 2 and _fused_smem(bm, bn, bk, br, st, elt_size, fold_r) > smem_limit:
            st -= 1
        if _fused_smem(bm, bn, bk, br, st, elt_size, fold_r) <= smem_limit:
            out.append(
                triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=st)
            )
    return out


INTERPRETER_CONFIG = triton.Config(
    {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}, num_warps=4, num_stages=1
)


def all_fused_configs():
    """The autotuner's candidates: every shipped config of every element size and precision, once each (pruned per
    launch by `prune_fused`)."""
    if INTERPRET:
        # The interpreter cannot benchmark several configs (and would take minutes): one small config.
        return [INTERPRETER_CONFIG]
    seen, out = set(), []
    for elt, prec in ((2, "tf32"), (4, "tf32"), (4, "ieee")):
        for c in fused_configs(elt, prec):
            key = (tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages)
            if key not in seen:
                seen.add(key)
                out.append(c)
    return out


def prune_fused(configs, named_args, **kwargs):
    """The autotuner's early prune: keep the configs shipped for this launch's element size, precision and mode."""
    if INTERPRET:
        return configs
    elt = named_args["a_ptr"].element_size()
    br = kwargs["BLOCK_R"] if kwargs["T_MODE"] == 0 else 0
    fold_r = kwargs["FOLD_R"] if kwargs["FOLD_DR"] else 0
    keep = {
        (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
        for c in fused_configs(elt, kwargs["PRECISION"], br, fold_r=fold_r)
    }
    return [
        c
        for c in configs
        if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) in keep
    ]


# ----------------------------------------------------------------------------------------------------------------
# The shrink, the M-reduction and the dropout mask: one config each (memory-bound, nothing to autotune).
# ----------------------------------------------------------------------------------------------------------------
def shrink_config(br: int, elt_size: int, interpret: bool | None = None):
    """(BLOCK_M, BLOCK_K, warps, stages) of the shrink kernel: memory-bound, so enough stages to stream x.
    interpret=False gives the shipped (GPU) config even under the interpreter (for the config-sweep tests)."""
    if INTERPRET if interpret is None else interpret:
        return 32, 32, 4, 1
    bk = 128 // elt_size
    if br <= 64:
        return 64, bk, 4, 4
    return 64, bk, 8, 3


def reduce_config(br: int, elt_size: int, precision: str = "tf32", interpret: bool | None = None):
    """(BLOCK_M, BLOCK_N, BLOCK_R, warps, stages) of the M-reduction kernel; BLOCK_R < br splits NR over the grid."""
    if INTERPRET if interpret is None else interpret:
        return 32, 32, min(br, 64), 4, 1
    bm = 128 // elt_size
    if elt_size == 4 and precision == "ieee":
        # FMA dot: a [64, 256] fp32 accumulator made ptxas spill 20 KB, [64, 64] with 4 warps 1.1 KB; 8 warps do not.
        return bm, 64, min(br, 64), 8, 3
    if br <= 64:
        return bm, 128, br, 4, 4
    return bm, 64, br, 8, 3


def bits_config(interpret: bool | None = None):
    """(BLOCK_M, BLOCK_W, warps) of the dropout-mask kernel; a small block under the interpreter (numpy per block)."""
    return (32, 16, 4) if (INTERPRET if interpret is None else interpret) else BITS_CONFIG


# ----------------------------------------------------------------------------------------------------------------
# tl.dot precision.
# ----------------------------------------------------------------------------------------------------------------
def tf32_allowed() -> bool:
    """Whether torch allows TF32 for fp32 matmuls, read through the new API where it exists.

    `torch.backends.cuda.matmul.fp32_precision` is "tf32" / "ieee" once set (directly or through the global
    `torch.backends.fp32_precision`), "none" while unset; reading the legacy `allow_tf32` after the new API was used
    raises on recent torch, so it is only consulted when the new one says nothing.
    """
    matmul = torch.backends.cuda.matmul
    prec = getattr(matmul, "fp32_precision", None)
    if prec == "tf32":
        return True
    if prec == "ieee":
        return False
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:  # a mix of the two APIs: torch itself refuses to say; IEEE is the safe answer
        return False


def precision(dtype: torch.dtype) -> str:
    """The PRECISION constexpr of every kernel for inputs of `dtype`: "ieee" or "tf32"."""
    if INTERPRET:
        return "ieee"
    if dtype == torch.float32 and not tf32_allowed():
        return "ieee"
    return "tf32"  # ignored by tl.dot for fp16/bf16 operands
