"""The fused Gaussian filter K_sigma f of the frequency analysis as one Triton kernel (the "triton" backend).

    low_frequency_part_triton(x [N, d], f [N, c], sigmas) -> [len(sigmas), N, c] fp32

K_ij = softmax_j(-||x_i - x_j|| / (2 sigma)) is attention-shaped: a program owns BLOCK_M rows i and streams tiles of
BLOCK_N columns j, keeping a flash-attention style online normaliser, so memory is O(N * c * len(sigmas)) for the
output and O(tile) inside the kernel; no N x N matrix exists anywhere.

Why it is cheap to do every sigma in the same pass: the row maximum of the logits -d_ij / (2 sigma) is
-min_j d_ij / (2 sigma) for every sigma, so one running minimum distance per row is the shared "running max" of all
sigmas. Each distance tile is computed once; the sigmas become an extra axis of the probability tile, [BLOCK_M, S, BLOCK_N],
reshaped to [BLOCK_M * S, BLOCK_N] for a single tl.dot with the f tile.

Distances are exact: the sum of squared differences, accumulated in fp32 over chunks of BLOCK_D features. The matmul
shortcut ||x_i||^2 + ||x_j||^2 - 2 x_i.x_j cancels catastrophically for near neighbours (d_ii != 0), which is exactly
what a narrow filter looks at. Inputs may be fp32, fp16 or bf16; everything is upcast in registers, accumulated in
fp32, and the probability-times-f product runs in IEEE fp32 (no TF32: its 10-bit mantissa would show in the ratios).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

__all__ = ["low_frequency_part_triton", "MAX_SIGMAS_PER_PASS", "MAX_COLUMNS_PER_PASS", "tile_config"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# More sigmas than this are split into passes (each pass recomputes the distances): the probability tile grows with
# the padded sigma count, and BLOCK_M shrinks to keep it at 4096 elements, down to tl.dot's minimum of 16 rows.
MAX_SIGMAS_PER_PASS = 16
# Likewise outputs wider than this go in column groups (the accumulator is [BLOCK_M * S_PAD, BLOCK_C] registers).
MAX_COLUMNS_PER_PASS = 32


@triton.jit
def _lowpass_kernel(
    x_ptr,
    f_ptr,
    inv_ptr,
    out_ptr,
    N,
    D,
    C,
    stride_xn,
    stride_xd,
    stride_fn,
    stride_fc,
    stride_os,
    stride_on,
    stride_oc,
    NUM_S: tl.constexpr,
    S_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rs = tl.arange(0, S_PAD)
    rc = tl.arange(0, BLOCK_C)
    rd = tl.arange(0, BLOCK_D)
    m_ok = rm < N
    # 1 / (2 sigma) per sigma; padded sigmas repeat a real one (a zero would give inf * 0 = NaN on the first tile)
    inv = tl.load(inv_ptr + tl.minimum(rs, NUM_S - 1))

    d_min = tl.full([BLOCK_M], float("inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_M, S_PAD], tl.float32)
    acc = tl.zeros([BLOCK_M * S_PAD, BLOCK_C], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        rn = start_n + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        d2 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for start_d in range(0, D, BLOCK_D):
            kd = start_d + rd
            d_ok = kd < D
            xi = tl.load(
                x_ptr + rm[:, None] * stride_xn + kd[None, :] * stride_xd, mask=m_ok[:, None] & d_ok[None, :], other=0.0
            ).to(tl.float32)
            xj = tl.load(
                x_ptr + rn[:, None] * stride_xn + kd[None, :] * stride_xd, mask=n_ok[:, None] & d_ok[None, :], other=0.0
            ).to(tl.float32)
            diff = xi[:, None, :] - xj[None, :, :]
            d2 += tl.sum(diff * diff, axis=2)
        dist = tl.where(n_ok[None, :], tl.sqrt(d2), float("inf"))
        new_min = tl.minimum(d_min, tl.min(dist, axis=1))
        # rescale of the old sums: exp(-(d_min_old - d_min_new) / (2 sigma)); exp(-inf) = 0 on the first tile
        alpha = tl.exp(-(d_min - new_min)[:, None] * inv[None, :])  # [BLOCK_M, S_PAD]
        p = tl.exp(-(dist - new_min[:, None])[:, None, :] * inv[None, :, None])  # [BLOCK_M, S_PAD, BLOCK_N]
        l_sum = l_sum * alpha + tl.sum(p, axis=2)
        fj = tl.load(
            f_ptr + rn[:, None] * stride_fn + rc[None, :] * stride_fc, mask=n_ok[:, None] & (rc[None, :] < C), other=0.0
        ).to(tl.float32)
        pf = tl.dot(tl.reshape(p, (BLOCK_M * S_PAD, BLOCK_N)), fj, input_precision="ieee")
        acc = acc * tl.reshape(alpha, (BLOCK_M * S_PAD, 1)) + pf
        d_min = new_min
    out = tl.reshape(acc, (BLOCK_M, S_PAD, BLOCK_C)) / l_sum[:, :, None]
    ptrs = out_ptr + rs[None, :, None] * stride_os + rm[:, None, None] * stride_on + rc[None, None, :] * stride_oc
    mask = m_ok[:, None, None] & (rs[None, :, None] < NUM_S) & (rc[None, None, :] < C)
    tl.store(ptrs, out, mask=mask)


def tile_config(n_sigmas: int, d: int, *, interpret: bool = _INTERPRET):
    """(S_PAD, BLOCK_M, BLOCK_N, BLOCK_D, num_warps) for a pass over `n_sigmas` sigmas of d-dimensional inputs."""
    s_pad = triton.next_power_of_2(max(1, n_sigmas))
    if interpret:  # the interpreter runs each program in numpy: bigger tiles mean fewer, faster programs
        return s_pad, 16, 32, min(64, triton.next_power_of_2(d)), 1
    block_m = max(16, 4096 // (s_pad * 64))  # the probability tile [BLOCK_M, S_PAD, 64] stays at 4096 elements
    # The difference tile [BLOCK_M, 64, BLOCK_D] is the other register hog (16K fp32 at 64 x 64 x 4). 8 warps: with
    # 4, sm_90 spilled at 8 and 16 sigmas (benchmarks/RESULTS.md, the compile check of bench_frequency.py).
    block_d = 4 if block_m >= 64 else 8
    return s_pad, block_m, 64, min(block_d, triton.next_power_of_2(d)), 8


def low_frequency_part_triton(x: torch.Tensor, f: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """K_sigma f for every sigma, [len(sigmas), N, c] in fp32 (inputs checked by the caller: x [N, d], f [N, c])."""
    n = x.shape[0]
    c = f.shape[1]
    if _INTERPRET:  # the interpreter emulates bf16 through numpy and gets it wrong: give it fp32
        x, f = x.float(), f.float()
    elif x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        x = x.float()
    if not _INTERPRET and f.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        f = f.float()
    out = torch.empty(len(sigmas), n, c, dtype=torch.float32, device=x.device)
    if n == 0 or c == 0:
        return out
    for col in range(0, c, MAX_COLUMNS_PER_PASS):
        cols = slice(col, min(c, col + MAX_COLUMNS_PER_PASS))
        _launch(x, f[:, cols], sigmas, out[:, :, cols])
    return out


def _launch(x, f, sigmas, out):
    n, d = x.shape
    c = f.shape[1]
    block_c = max(16, triton.next_power_of_2(c))  # tl.dot's smallest tile side
    for first in range(0, len(sigmas), MAX_SIGMAS_PER_PASS):
        group = [float(s) for s in sigmas[first : first + MAX_SIGMAS_PER_PASS]]
        inv = torch.tensor([0.5 / s for s in group], dtype=torch.float32, device=x.device)
        s_pad, block_m, block_n, block_d, warps = tile_config(len(group), d)
        part = out[first : first + len(group)]
        grid = (triton.cdiv(n, block_m),)
        _lowpass_kernel[grid](
            x,
            f,
            inv,
            part,
            n,
            d,
            c,
            x.stride(0),
            x.stride(1),
            f.stride(0),
            f.stride(1),
            part.stride(0),
            part.stride(1),
            part.stride(2),
            NUM_S=len(group),
            S_PAD=s_pad,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            BLOCK_C=block_c,
            num_warps=warps,
        )
