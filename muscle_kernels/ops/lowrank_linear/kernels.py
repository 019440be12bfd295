"""Every Triton kernel of the multi-scale low-rank linear op, and the heuristics and autotuner on them.

Launched by launch.py, with the tile tables of configs.py. Four kernels: the fused GEMM (forward y, backward dx), the
shrink (forward T, backward G, optionally dR in the same pass), the M-reduction (backward dR, dL) and the dropout-mask
kernel.

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
  whenever dropout is on, because the in-loop product would have to mask the A tile again in every N tile.
  FOLD_DR (backward dx only, either mode): dR = dy^T (T s) is folded into the same K loop. The programs of the first
  column tile hold their rows' (T s) [BLOCK_M, n*r] and add ``A_tile^T (T s)`` into an fp32 dR [out, n*r] per K step
  with relaxed atomics, so dR needs no pass over dy of its own; the other column tiles skip it at run time.
- `_reduce_m_kernel` computes the adapter gradients, ``C[N, NR] = drop(A)[M, N]^T (B[M, NR] * s)``:
  dR [out, NR] = dy^T (T * s) (A = dy), and dL^T [in, NR] = drop(x)^T (G * s) (A = x, written through transposed
  strides into dL [NR, in]). Tiny outputs, a long reduction over M, memory-bound on the read of A. Each program owns
  BLOCK_N columns and a slice of M; when there are too few column tiles to fill the GPU the M range is split across
  programs that add into a zeroed fp32 C with atomics (the launcher keeps a single split, and so a deterministic sum,
  when torch.use_deterministic_algorithms is on). A third grid axis splits NR into BLOCK_R chunks where one chunk
  would not fit in registers (fp32 without TF32).
- Dropout keeps element (m, c) of x iff ``uniform(philox(seed, (c // 4, m, 0, 0))[c % 4]) >= p``: a pure function of
  the seed and the coordinates, whatever the tiling, with one Philox call for four adjacent columns.
  `_dropout_bits_kernel` evaluates it once per forward into a packed mask (bit c % 32 of int32 word (m, c // 32),
  1/16 of x's size in bf16), which the shrink, the backward dx epilogue and the dL reduction read back with one load
  and a shift per element instead of running Philox's ten rounds three times. No unpacked [M, in] mask is ever
  stored. The 1 / (1 - p) factor is applied to fp32 accumulators, never to low-precision operands.
- fp32 accumulation everywhere. Under the Triton interpreter tl.dot on bf16 multiplies raw bits, so UPCAST (set
  when interpreting) casts every dot operand to fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .configs import all_fused_configs, prune_fused


# do_not_specialize: Triton otherwise specialises an int argument equal to 1 (a constant) or divisible by 16 (an
# alignment hint), so a random seed would compile a new variant of the kernel in 1 of 16 training steps. The launcher
# keeps the seed below 2^31, so its type (i32) never changes either.
@triton.jit(do_not_specialize=["seed"])
def _dropout_bits_kernel(
    bits_ptr,
    M,
    W,
    stride_bm,
    seed,
    seed_ptr,
    p,
    SEED_FROM_PTR: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """The packed dropout keep-mask of an [M, K] input: bit b of int32 word (m, w) keeps x[m, 32 w + b];
    W = cdiv(K, 32).

    Word (m, w) takes 8 Philox calls, counters (8 w + j, m) for j < 8, whose 4 outputs are columns 32 w + 4 j + i.
    SEED_FROM_PTR: the seed is read at run time from seed_ptr (one int64 in [0, 2^31), drawn on the device by torch's
    generator), so a CUDA graph replays the draw and the kernel sees a new seed each time; Philox takes it as a 64-bit
    key, so the mask equals the one from the same value passed as `seed`."""
    if SEED_FROM_PTR:
        seed = tl.load(seed_ptr)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rw = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    c1 = (rm[:, None] + rw[None, :] * 0).to(tl.uint32)
    zero = c1 * 0
    word = zero
    # A loop, not unrolled: eight Philox calls in flight at once would need 8x the registers (and spilled).
    for j in range(8):
        c0 = (rw[None, :] * 8 + j + rm[:, None] * 0).to(tl.uint32)
        r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero, zero)
        word |= (tl.uint_to_uniform_float(r0) >= p).to(tl.uint32) << (4 * j)
        word |= (tl.uint_to_uniform_float(r1) >= p).to(tl.uint32) << (4 * j + 1)
        word |= (tl.uint_to_uniform_float(r2) >= p).to(tl.uint32) << (4 * j + 2)
        word |= (tl.uint_to_uniform_float(r3) >= p).to(tl.uint32) << (4 * j + 3)
    ok = (rm[:, None] < M) & (rw[None, :] < W)
    out = bits_ptr + rm.to(tl.int64)[:, None] * stride_bm + rw.to(tl.int64)[None, :]
    tl.store(out, word.to(tl.int32, bitcast=True), mask=ok)


@triton.jit
def _kept(bits_ptr, stride_bm, rows, col0, W, ROWS: tl.constexpr, COLS: tl.constexpr, COLS_AXIS: tl.constexpr):
    """Keep-mask of x[rows, col0 : col0 + COLS] from the packed mask, as a [ROWS, COLS] block (COLS_AXIS 1) or its
    transpose [COLS, ROWS] (COLS_AXIS 0). rows: [ROWS] valid row indices; col0 and COLS are multiples of 32.

    The COLS / 32 words of each row are loaded once and broadcast over their 32 columns in registers: loading a word
    per element instead needs a 64-bit address per element, which spilled in the dL reduction at sm_90."""
    tl.static_assert(COLS % 32 == 0, "the mask is read in whole words of 32 columns")
    NW: tl.constexpr = COLS // 32
    wi = col0 // 32 + tl.arange(0, NW)
    shift = tl.arange(0, COLS) & 31
    rows64 = rows.to(tl.int64)
    if COLS_AXIS == 1:
        words = tl.load(bits_ptr + rows64[:, None] * stride_bm + wi[None, :], mask=(wi < W)[None, :], other=0)
        full = tl.reshape(tl.broadcast_to(words[:, :, None], (ROWS, NW, 32)), (ROWS, COLS))
        return ((full >> shift[None, :]) & 1) != 0
    else:
        words = tl.load(bits_ptr + rows64[None, :] * stride_bm + wi[:, None], mask=(wi < W)[:, None], other=0)
        full = tl.reshape(tl.broadcast_to(words[:, None, :], (NW, 32, ROWS)), (COLS, ROWS))
        return ((full >> shift[:, None]) & 1) != 0


@triton.jit
def _write_partial(ptr, acc, mask, ATOMIC: tl.constexpr):
    """The epilogue of the split reductions: add into a zeroed output when the reduction is split, else store.

    sem="relaxed": the partial sums only meet in the output, which nothing reads before the kernel ends, so no
    ordering is needed. Triton's default (acq_rel) wraps every element atomic in a full GPU fence (sm_90 SASS:
    MEMBAR.ALL.GPU + ATOMG + ERRBAR + CCTL.IVALL instead of one REDG; benchmarks/sm90_report.py checks it)."""
    if ATOMIC:
        tl.atomic_add(ptr, acc, mask=mask, sem="relaxed")
    else:
        tl.store(ptr, acc, mask=mask)


@triton.jit
def _scaled_t_rows(ts_ptr, s_ptr, like_ptr, rows, rows_ok, rr, r_ok, stride_tsm, stride_tsr, UPCAST: tl.constexpr):
    """(T s)[rows] [ROWS, R], the B operand of dR = dy^T (T s), loaded once per program. Rounded to the dtype of
    like_ptr (dy's), as the dR reduction rounds it, so that the dot runs on the tensor cores; rows past M (the
    wrapped-around ones of the main loop) read as zero and add nothing."""
    sc = tl.load(s_ptr + rr, mask=r_ok, other=0.0)
    ts = tl.load(
        ts_ptr + rows[:, None] * stride_tsm + rr.to(tl.int64)[None, :] * stride_tsr,
        mask=rows_ok[:, None] & r_ok[None, :],
        other=0.0,
    )
    ts = (ts * sc[None, :]).to(like_ptr.dtype.element_ty)
    if UPCAST:
        ts = ts.to(tl.float32)
    return ts


@triton.jit
def _add_dr_partial(
    dr_ptr, a, ts, kk, k_lim, rr, r_ok, stride_drk, stride_drr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr
):
    """dR[kk, rr] += a^T ts for one [ROWS, BLOCK_K] tile a of dy (columns kk, those < k_lim valid): the row tiles
    meet in an fp32 dR through atomics. sem="relaxed": dR is only read after the kernel (see _write_partial)."""
    dr = tl.dot(tl.trans(a), ts, input_precision=PRECISION)
    at = dr_ptr + kk.to(tl.int64)[:, None] * stride_drk + rr.to(tl.int64)[None, :] * stride_drr
    if EVEN_K:
        tl.atomic_add(at, dr, mask=r_ok[None, :], sem="relaxed")
    else:
        tl.atomic_add(at, dr, mask=(kk < k_lim)[:, None] & r_ok[None, :], sem="relaxed")


@triton.jit
def _fused_lowrank_mm_kernel(
    a_ptr,
    b_ptr,
    p_ptr,
    q_ptr,
    s_ptr,
    bias_ptr,
    t_ptr,
    c_ptr,
    bits_ptr,
    ts_ptr,
    dr_ptr,
    M,
    N,
    K,
    NR,
    m_bucket,
    drop_scale,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_pr,
    stride_pk,
    stride_qn,
    stride_qr,
    stride_tm,
    stride_tr,
    stride_cm,
    stride_cn,
    stride_bits,
    stride_tsm,
    stride_tsr,
    stride_drk,
    stride_drr,
    HAS_BIAS: tl.constexpr,
    T_MODE: tl.constexpr,
    STORE_T: tl.constexpr,
    OUT_DROP: tl.constexpr,
    FOLD_DR: tl.constexpr,
    FOLD_R: tl.constexpr,
    BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
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
            t = tl.load(
                t_ptr + rm_safe[:, None] * stride_tm + rc64[None, :] * stride_tr, mask=rc_ok[None, :], other=0.0
            )
            sc = tl.load(s_ptr + rc, mask=rc_ok, other=0.0)
            q = tl.load(
                q_ptr + rn_safe[None, :] * stride_qn + rc64[:, None] * stride_qr, mask=rc_ok[:, None], other=0.0
            )
            if UPCAST:
                q = q.to(tl.float32)
            acc = tl.dot((t * sc[None, :]).to(q.dtype), q, acc, input_precision=PRECISION)
        if OUT_DROP:
            # Backward through dropout: only the adapter's part of dx is masked (docs/layer.md: dx = dy W + drop'(...)).
            keep = _kept(bits_ptr, stride_bits, rm_safe, pid_n * BLOCK_N, tl.cdiv(N, 32), BLOCK_M, BLOCK_N, 1)
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
    if FOLD_DR:
        # Backward (A = dy): dR = dy^T (T s) folded into this GEMM. Only the first column tile's programs add their
        # rows' share (as STORE_T stores G), so each dy tile is counted once; the others skip it at run time.
        rd = tl.arange(0, FOLD_R)
        rd_ok = rd < NR
        ts = _scaled_t_rows(ts_ptr, s_ptr, a_ptr, rm_safe, m_ok, rd, rd_ok, stride_tsm, stride_tsr, UPCAST)
        fold = pid_n == 0
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        kk64 = kk.to(tl.int64)
        if EVEN_K:
            a = tl.load(a_rows + kk64[None, :] * stride_ak)
            b = tl.load(b_cols + kk64[:, None] * stride_bk)
        else:
            k_ok = kk < K
            a = tl.load(a_rows + kk64[None, :] * stride_ak, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_cols + kk64[:, None] * stride_bk, mask=k_ok[:, None], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if FOLD_DR:
            if fold:
                _add_dr_partial(dr_ptr, a, ts, kk, K, rd, rd_ok, stride_drk, stride_drr, EVEN_K, PRECISION)
        if T_MODE == 0:
            if EVEN_K:
                pt = tl.load(p_cols + kk64[:, None] * stride_pk, mask=r_ok[None, :], other=0.0)
            else:
                pt = tl.load(p_cols + kk64[:, None] * stride_pk, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            if UPCAST:
                pt = pt.to(tl.float32)
            t_acc = tl.dot(a, pt, t_acc, input_precision=PRECISION)

    if T_MODE == 0:
        s = tl.load(s_ptr + rr, mask=r_ok, other=0.0)
        if STORE_T:
            if pid_n == 0:
                tl.store(
                    t_ptr + rm.to(tl.int64)[:, None] * stride_tm + rr64[None, :] * stride_tr,
                    t_acc,
                    mask=m_ok[:, None] & r_ok[None, :],
                )
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
    a_ptr,
    p_ptr,
    t_ptr,
    bits_ptr,
    ts_ptr,
    s_ptr,
    dr_ptr,
    M,
    K,
    NR,
    k_per_split,
    drop_scale,
    stride_am,
    stride_ak,
    stride_pr,
    stride_pk,
    stride_tm,
    stride_tr,
    stride_bits,
    stride_tsm,
    stride_tsr,
    stride_drk,
    stride_drr,
    HAS_DROP: tl.constexpr,
    ATOMIC: tl.constexpr,
    EVEN_K: tl.constexpr,
    FUSED_DR: tl.constexpr,
    BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """T[M, NR] (fp32) = drop(A)[M, K] @ P[NR, K]^T. Split over K (ATOMIC adds into a zeroed T) when M is short.
    EVEN_K: K is a multiple of BLOCK_K (so is every slice), and the loads need no K mask.

    FUSED_DR (backward, A = dy): the same pass also adds A^T (TS * s) into a zeroed fp32 DR [K, NR], TS [M, NR]
    being the forward's T, so dR = dy^T (T s) needs no second read of dy (LoRAFusion's fused dY). The row tiles
    meet in DR through fp32 atomics: not deterministic, so the launcher never asks for it in deterministic mode."""
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
    if FUSED_DR:
        ts = _scaled_t_rows(ts_ptr, s_ptr, a_ptr, rm_safe, m_ok, rr, r_ok, stride_tsm, stride_tsr, UPCAST)
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + rk
        # int64 before the stride: k * stride_pk reaches 2^31 for long K. (Pointer tensors carried around this loop, as
        # in the fused GEMM, would cost a [BLOCK_K, BLOCK_R] block of 64-bit registers: 12 bytes of spills at sm_90.)
        kk64 = kk.to(tl.int64)
        if EVEN_K:
            a = tl.load(a_rows + kk64[None, :] * stride_ak)
            pt = tl.load(p_cols + kk64[:, None] * stride_pk, mask=r_ok[None, :], other=0.0)
        else:
            k_ok = kk < k_end
            a = tl.load(a_rows + kk64[None, :] * stride_ak, mask=k_ok[None, :], other=0.0)
            pt = tl.load(p_cols + kk64[:, None] * stride_pk, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        if HAS_DROP:
            a = tl.where(_kept(bits_ptr, stride_bits, rm_safe, k0, tl.cdiv(K, 32), BLOCK_M, BLOCK_K, 1), a, 0.0).to(
                a.dtype
            )
        if UPCAST:
            a = a.to(tl.float32)
            pt = pt.to(tl.float32)
        acc = tl.dot(a, pt, acc, input_precision=PRECISION)
        if FUSED_DR:
            _add_dr_partial(dr_ptr, a, ts, kk, k_end, rr, r_ok, stride_drk, stride_drr, EVEN_K, PRECISION)
    if HAS_DROP:
        acc = acc * drop_scale
    t = t_ptr + rm.to(tl.int64)[:, None] * stride_tm + rr64[None, :] * stride_tr
    ok = m_ok[:, None] & r_ok[None, :]
    _write_partial(t, acc, ok, ATOMIC)


@triton.jit
def _reduce_m_kernel(
    a_ptr,
    g_ptr,
    s_ptr,
    c_ptr,
    bits_ptr,
    M,
    N,
    NR,
    m_per_split,
    drop_scale,
    stride_am,
    stride_an,
    stride_gm,
    stride_gr,
    stride_cn,
    stride_cr,
    stride_bits,
    HAS_DROP: tl.constexpr,
    ATOMIC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
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
        g = tl.load(
            g_ptr + rm64[:, None] * stride_gm + rr64[None, :] * stride_gr, mask=m_ok[:, None] & r_ok[None, :], other=0.0
        )
        if UPCAST:
            a_t = a_t.to(tl.float32)
        gs = (g * s[None, :]).to(a_t.dtype)
        acc = tl.dot(a_t, gs, acc, input_precision=PRECISION)
    if HAS_DROP:
        acc = acc * drop_scale
    c = c_ptr + rn.to(tl.int64)[:, None] * stride_cn + rr64[None, :] * stride_cr
    ok = n_ok[:, None] & r_ok[None, :]
    _write_partial(c, acc, ok, ATOMIC)


# ----------------------------------------------------------------------------------------------------------------
# Heuristics and autotuning of the fused GEMM (the other kernels take their configs from configs.py directly).
# ----------------------------------------------------------------------------------------------------------------
# EVEN_K (K a multiple of BLOCK_K, as in every LLM layer) drops the K masks from the main loop's loads.
fused_even = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(_fused_lowrank_mm_kernel)
# Autotuned per (M bucket, N, K, n*r, mode, B's layout, dtypes): a new token count within a power-of-two bucket
# reuses the tuned config instead of re-tuning. FOLD_DR is its own mode: its first column tile does more work and its
# atomics scale with M / BLOCK_M, so the best tile may differ from the plain dx GEMM's.
fused_tuned = triton.autotune(
    configs=all_fused_configs(),
    key=["m_bucket", "N", "K", "NR", "T_MODE", "OUT_DROP", "FOLD_DR", "stride_bk", "PRECISION"],
    prune_configs_by={"early_config_prune": prune_fused},
)(fused_even)
