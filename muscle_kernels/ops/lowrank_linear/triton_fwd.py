"""Triton kernels of the multi-scale low-rank linear op: the fused GEMM (forward y, backward dx) and the shrink.

Design (docs/layer.md, M = all leading dims flattened, R = n*r padded to BLOCK_R, a power of two >= 16 for tl.dot):

- `_fused_lowrank_mm_kernel` computes ``C = A B + ((A' P^T) * s) Q^T (+ bias)`` for one [BLOCK_M, BLOCK_N] tile and
  stores it once. Forward: A = x, B = W^T, P = L, Q = R, C = y. Backward: A = dy, B = W, P = R^T, Q = L^T, C = dx
  (the ``[dy, G*s] @ [W; L]`` view). Only strides differ, so one kernel serves both.
  T_MODE 0: the small product ``A P^T`` (T in forward, G in backward) is accumulated in the same K loop as the base
  GEMM, from the A tile already in registers/shared memory, and the N-tile-0 programs store it for backward. This
  recomputes it once per N tile: BLOCK_R / BLOCK_N extra MMA work (6% at R=16, BLOCK_N=256), so it is used for small R.
  T_MODE 1: the small product was computed by `_shrink_kernel` (one extra read of A, ~ FLOPS / (N * bandwidth) of
  the GEMM, i.e. 2-6% on an H100); the tile loads it and seeds its accumulator with ``(T * s) Q^T`` before the K loop
  (masked by dropout first in backward, so one [BLOCK_M, BLOCK_N] accumulator is ever live). Used for large R and
  whenever dropout is on, because regenerating the mask once per N tile would cost ~40 integer ops per element.
- Dropout keeps element (m, c) of x iff ``uniform(philox(seed, c, m)) >= p``: a pure function of the seed and the
  coordinates, whatever the tiling, so backward regenerates it and no [M, in] mask is ever stored. The 1 / (1 - p)
  factor is applied to fp32 accumulators, never to low-precision operands.
- fp32 accumulation everywhere. Under the Triton interpreter tl.dot on bf16 multiplies raw bits, so UPCAST (set
  when interpreting) casts every dot operand to fp32.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _keep_mask(seed, rows, cols, p):
    """Dropout keep-mask for x[rows, cols]; rows and cols are broadcastable 2-D index blocks."""
    c0 = (cols + rows * 0).to(tl.uint32)
    c1 = (rows + cols * 0).to(tl.uint32)
    zero = c0 * 0
    r0, _, _, _ = tl.philox(seed, c0, c1, zero, zero)
    return tl.uint_to_uniform_float(r0) >= p


@triton.jit
def _write_partial(ptr, acc, mask, ATOMIC: tl.constexpr):
    """The epilogue of the split reductions: add into a zeroed output when the reduction is split, else store."""
    if ATOMIC:
        tl.atomic_add(ptr, acc, mask=mask)
    else:
        tl.store(ptr, acc, mask=mask)


@triton.jit
def _dropout_mask_kernel(out_ptr, M, K, seed, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Writes the keep-mask (uint8) of an [M, K] input; only for tests and debugging."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _keep_mask(seed, rm[:, None], rk[None, :], p)
    ok = (rm[:, None] < M) & (rk[None, :] < K)
    tl.store(out_ptr + rm[:, None].to(tl.int64) * K + rk[None, :].to(tl.int64), keep.to(tl.uint8), mask=ok)


@triton.jit
def _fused_lowrank_mm_kernel(
    a_ptr, b_ptr, p_ptr, q_ptr, s_ptr, bias_ptr, t_ptr, c_ptr,
    M, N, K, NR, m_bucket, seed, drop_p, drop_scale,
    stride_am, stride_ak, stride_bk, stride_bn, stride_pr, stride_pk, stride_qn, stride_qr,
    stride_tm, stride_tr, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr, T_MODE: tl.constexpr, STORE_T: tl.constexpr, OUT_DROP: tl.constexpr,
    BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped launch order: GROUP_M row tiles share each column tile of B while it is hot in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    m_ok = rm < M
    n_ok = rn < N
    r_ok = rr < NR
    # Out-of-range rows/columns wrap onto valid memory (their results are never stored), which keeps the main-loop
    # loads free of M/N masks; int64 so that M * stride cannot overflow for long inputs.
    rm_safe = (rm % M).to(tl.int64)
    rn_safe = (rn % N).to(tl.int64)
    rr64 = rr.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if T_MODE == 1:
        # The precomputed [M, NR] product seeds the accumulator before the K loop, in chunks of BLOCK_R so any NR up
        # to 256 fits; a second [BLOCK_M, BLOCK_N] accumulator would spill at 128x256 (1.5 KB/thread at sm_90).
        for r0 in range(0, NR, BLOCK_R):
            rc = r0 + rr
            rc_ok = rc < NR
            rc64 = rc.to(tl.int64)
            t = tl.load(t_ptr + rm_safe[:, None] * stride_tm + rc64[None, :] * stride_tr, mask=rc_ok[None, :],
                        other=0.0)
            sc = tl.load(s_ptr + rc, mask=rc_ok, other=0.0)
            q = tl.load(q_ptr + rn_safe[None, :] * stride_qn + rc64[:, None] * stride_qr, mask=rc_ok[:, None],
                        other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
            acc = tl.dot((t * sc[None, :]).to(q.dtype), q, acc, input_precision=PRECISION)
        if OUT_DROP:
            # Backward through dropout: only the adapter's part of dx is masked (docs/layer.md: dx = dy W + drop'(...)).
            keep = _keep_mask(seed, rm[:, None], rn[None, :], drop_p)
            acc = tl.where(keep, acc * drop_scale, 0.0)
    else:
        tl.static_assert(not OUT_DROP, "OUT_DROP needs T_MODE 1 (the masked part must come before the base GEMM)")
        t_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    # int64 before the strides: k * stride_bk overflows int32 once out * in >= 2^31 (a 256k-vocabulary head), and
    # every offset here is int64 for the same reason. (Pointer tensors carried around the loop instead cost 64-bit
    # registers per element: 104 bytes of spills at 128x256 fp32 on sm_90.)
    a_rows = a_ptr + rm_safe[:, None] * stride_am
    b_cols = b_ptr + rn_safe[None, :] * stride_bn
    if T_MODE == 0:
        p_cols = p_ptr + rr64[None, :] * stride_pr
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        kk64 = kk.to(tl.int64)
        a = tl.load(a_rows + kk64[None, :] * stride_ak, mask=k_ok[None, :], other=0.0)
        b = tl.load(b_cols + kk64[:, None] * stride_bk, mask=k_ok[:, None], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if T_MODE == 0:
            pt = tl.load(p_cols + kk64[:, None] * stride_pk, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            if UPCAST:
                pt = pt.to(tl.float32)
            t_acc = tl.dot(a, pt, t_acc, input_precision=PRECISION)

    if T_MODE == 0:
        s = tl.load(s_ptr + rr, mask=r_ok, other=0.0)
        if STORE_T:
            if pid_n == 0:
                tl.store(t_ptr + rm.to(tl.int64)[:, None] * stride_tm + rr64[None, :] * stride_tr, t_acc,
                         mask=m_ok[:, None] & r_ok[None, :])
        q = tl.load(q_ptr + rn_safe[None, :] * stride_qn + rr64[:, None] * stride_qr, mask=r_ok[:, None], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        acc = tl.dot((t_acc * s[None, :]).to(q.dtype), q, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn_safe).to(tl.float32)[None, :]
    c = c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn.to(tl.int64)[None, :] * stride_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _shrink_kernel(
    a_ptr, p_ptr, t_ptr,
    M, K, NR, k_per_split, seed, drop_p, drop_scale,
    stride_am, stride_ak, stride_pr, stride_pk, stride_tm, stride_tr,
    HAS_DROP: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """T[M, NR] (fp32) = drop(A)[M, K] @ P[NR, K]^T. Split over K (ATOMIC adds into a zeroed T) when M is short."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    r_ok = rr < NR
    rm_safe = (rm % M).to(tl.int64)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    rr64 = rr.to(tl.int64)
    a_rows = a_ptr + rm_safe[:, None] * stride_am
    p_cols = p_ptr + rr64[None, :] * stride_pr
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < k_end
        # int64 before the stride: k * stride_pk reaches 2^31 for long K. (Pointer tensors carried around this loop, as
        # in the fused GEMM, would cost a [BLOCK_K, BLOCK_R] block of 64-bit registers: 12 bytes of spills at sm_90.)
        kk64 = kk.to(tl.int64)
        a = tl.load(a_rows + kk64[None, :] * stride_ak, mask=k_ok[None, :], other=0.0)
        if HAS_DROP:
            a = tl.where(_keep_mask(seed, rm[:, None], kk[None, :], drop_p), a, 0.0).to(a.dtype)
        pt = tl.load(p_cols + kk64[:, None] * stride_pk, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            pt = pt.to(tl.float32)
        acc = tl.dot(a, pt, acc, input_precision=PRECISION)
    if HAS_DROP:
        acc = acc * drop_scale
    t = t_ptr + rm.to(tl.int64)[:, None] * stride_tm + rr64[None, :] * stride_tr
    ok = m_ok[:, None] & r_ok[None, :]
    _write_partial(t, acc, ok, ATOMIC)
