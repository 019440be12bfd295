"""Triton kernel for the adapter gradients of the multi-scale low-rank linear op: reductions over all M rows.

    dR [out, NR] = dy^T (T * s)            (A = dy)
    dL^T [in, NR] = drop(x)^T (G * s)      (A = x, written through transposed strides into dL [NR, in])

Both are ``C[N, NR] = drop(A)[M, N]^T (B[M, NR] * s)``: tiny outputs, a long reduction over M, memory-bound on the
read of A. Each program owns BLOCK_N columns and a slice of M; when there are too few column tiles to fill the GPU the
M range is split across programs that add into a zeroed fp32 C with atomics (the launcher keeps a single split, and so
a deterministic sum, when torch.use_deterministic_algorithms is on). A third grid axis splits NR into BLOCK_R chunks
where one chunk would not fit in registers (fp32 without TF32). The dx GEMM and the forward live in triton_fwd.py.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_fwd import _kept, _write_partial


@triton.jit
def _reduce_m_kernel(
    a_ptr, g_ptr, s_ptr, c_ptr, bits_ptr,
    M, N, NR, m_per_split, drop_scale,
    stride_am, stride_an, stride_gm, stride_gr, stride_cn, stride_cr, stride_bits,
    HAS_DROP: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm0 = tl.arange(0, BLOCK_M)
    n_ok = rn < N
    r_ok = rr < NR
    rn_safe = (rn % N).to(tl.int64)
    rr64 = rr.to(tl.int64)
    s = tl.load(s_ptr + rr, mask=r_ok, other=0.0)
    m_start = pid_s * m_per_split
    m_end = tl.minimum(M, m_start + m_per_split)
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rm = m0 + rm0
        m_ok = rm < m_end
        rm64 = rm.to(tl.int64)
        # A^T tile loaded directly as [BLOCK_N, BLOCK_M]; rows past the slice read as zero.
        a_t = tl.load(a_ptr + rm64[None, :] * stride_am + rn_safe[:, None] * stride_an, mask=m_ok[None, :], other=0.0)
        if HAS_DROP:
            keep = _kept(bits_ptr, stride_bits, rm % M, pid_n * BLOCK_N, tl.cdiv(N, 32), BLOCK_M, BLOCK_N, 0)
            a_t = tl.where(keep, a_t, 0.0).to(a_t.dtype)
        g = tl.load(g_ptr + rm64[:, None] * stride_gm + rr64[None, :] * stride_gr, mask=m_ok[:, None] & r_ok[None, :],
                    other=0.0)
        if UPCAST:
            a_t = a_t.to(tl.float32)
        gs = (g * s[None, :]).to(a_t.dtype)
        acc = tl.dot(a_t, gs, acc, input_precision=PRECISION)
    if HAS_DROP:
        acc = acc * drop_scale
    c = c_ptr + rn.to(tl.int64)[:, None] * stride_cn + rr64[None, :] * stride_cr
    ok = n_ok[:, None] & r_ok[None, :]
    _write_partial(c, acc, ok, ATOMIC)
