"""Causal flash attention for prefill and training: Triton forward and backward kernels.

Shapes: q (B, H, Tq, D), k and v (B, H, Tk, D) with ``Tk == q_offset + Tq``. Query ``i``
sits at absolute position ``q_offset + i`` and sees keys ``0 .. q_offset + i``
(``q_offset > 0`` is chunked prefill against a KV cache, or verifying draft tokens).

Forward (FlashAttention-2). One program owns BLOCK_M queries of one (batch, head) and
streams over key/value blocks of BLOCK_N keys, keeping a running row maximum ``m``, a
running denominator ``l`` and an un-normalised fp32 accumulator; the T x T score matrix
never exists. Scores are pre-multiplied by ``scale * log2(e)`` so the softmax uses the
cheap ``exp2``. The key loop is split in two:

    keys:    0 ............................. lo_end ........ hi
             [ blocks every query of the tile  ][ blocks on the  ]
             [ sees: no mask at all            ][ diagonal: mask ]

and blocks above the diagonal are never visited. The program saves the per-row
log-sum-exp ``lse = m + log2(l)`` (base 2, in the pre-scaled units) for the backward.

Backward. With P = softmax(S), S = scale * Q K^T and dO the output gradient:
    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   delta = rowsum(dO * O),
    dQ = scale * dS K,   dK = scale * dS^T Q.
``P`` is recomputed block by block from the saved ``lse``. Three kernels:
  1. ``_attn_bwd_delta_kernel``: delta = rowsum(dO * O) per query row.
  2. ``_attn_bwd_dkdv_kernel``: one program per key block; walks the query blocks from
     the diagonal down to the end (masked near the diagonal, unmasked below), so dK and
     dV accumulate in registers and are written once, without atomics.
  3. ``_attn_bwd_dq_kernel``: one program per query block; walks the key blocks from 0
     to the diagonal, the same loop shape as the forward.
Splitting dQ from dK/dV recomputes P twice but needs no atomics and no fp32 dQ buffer,
and every program writes its own rows, so results are deterministic.

Any T >= 1 works: loads past the sequence end are masked to zero and rows past it are
never stored (their recomputed values stay finite: zero queries give zero scores).
Head sizes up to 256 are padded to BLOCK_D, the next power of two >= 16, with masked
loads along D. Inputs may have any strides except along D, which must be 1 (the
launcher copies otherwise).
"""
import contextlib

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _mma(a, b, acc, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + a @ b. Under the CPU interpreter (DOT_FP32) the operands are widened to fp32
    first: the interpreter's low-precision dot is inexact (bf16 is garbage), while the
    widening itself is exact, so the result equals the GPU's fp32-accumulated MMA."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _load_rows(base, rows, stride_t, offs_d, limit, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """Load a (len(rows), BLOCK_D) tile; rows >= limit and columns >= HEAD_DIM read 0."""
    ptrs = base + rows[:, None] * stride_t + offs_d[None, :]
    if CHECK_ROWS:
        if BLOCK_D == HEAD_DIM:
            return tl.load(ptrs, mask=rows[:, None] < limit, other=0.0)
        else:
            return tl.load(ptrs, mask=(rows[:, None] < limit) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)


@triton.jit
def _store_rows(base, rows, stride_t, offs_d, tile, limit, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store a (len(rows), BLOCK_D) tile, skipping rows >= limit and columns >= HEAD_DIM."""
    ptrs = base + rows[:, None] * stride_t + offs_d[None, :]
    if BLOCK_D == HEAD_DIM:
        tl.store(ptrs, tile, mask=rows[:, None] < limit)
    else:
        tl.store(ptrs, tile, mask=(rows[:, None] < limit) & (offs_d[None, :] < HEAD_DIM))


# ----------------------------------------------------------------------------- forward


@triton.jit
def _attn_fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, q_pos, offs_n, offs_d,
                    start, end, kv_len, qk_scale,
                    CAUSAL_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over key blocks [start, end). With CAUSAL_MASK the blocks straddle
    the diagonal (or the sequence end): scores of keys after a query become -inf."""
    for start_n in range(start, end, BLOCK_N):
        k_pos = start_n + offs_n
        # Unmasked blocks lie entirely before every query of the tile, so inside the keys.
        k = _load_rows(k_base, k_pos, stride_kt, offs_d, kv_len, HEAD_DIM, BLOCK_D, CAUSAL_MASK)
        v = _load_rows(v_base, k_pos, stride_vt, offs_d, kv_len, HEAD_DIM, BLOCK_D, CAUSAL_MASK)
        qk = _mma(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), DOT_FP32, DOT_PRECISION)
        qk = qk * qk_scale  # now in log2 units
        if CAUSAL_MASK:
            qk = tl.where(q_pos[:, None] >= k_pos[None, :], qk, float("-inf"))
        # Every row sees key 0 in its first block, so m_new is finite from then on and
        # fully masked rows of later blocks just add exp2(-inf) = 0.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old maximum
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], DOT_FP32, DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    num_heads, q_len, q_offset, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Grid: (B * H, query blocks). The query-block axis is walked from the last block, the
    # one with the most keys, so the longest programs start first (causal load balance).
    pid_bh = tl.program_id(0)
    start_m = tl.num_programs(1) - 1 - tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    kv_len = q_offset + q_len

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_pos = q_offset + offs_m  # absolute positions of this tile's queries

    q = _load_rows(Q + off_b * stride_qb + off_h * stride_qh, offs_m, stride_qt, offs_d, q_len,
                   HEAD_DIM, BLOCK_D, True)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Key blocks [0, lo_end) end at or before the tile's first query: no mask needed.
    first_q_pos = q_offset + start_m * BLOCK_M
    lo_end = ((first_q_pos + 1) // BLOCK_N) * BLOCK_N
    # Key blocks [lo_end, hi) straddle the diagonal; keys past the tile's last query
    # (or past the sequence end) are never visited.
    hi = tl.minimum(first_q_pos + BLOCK_M, kv_len)
    acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, q_pos, offs_n, offs_d,
                                    0, lo_end, kv_len, qk_scale,
                                    False, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_FP32, DOT_PRECISION)
    acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, q_pos, offs_n, offs_d,
                                    lo_end, hi, kv_len, qk_scale,
                                    True, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_FP32, DOT_PRECISION)

    acc = acc / l_i[:, None]
    tl.store(LSE + pid_bh.to(tl.int64) * q_len + offs_m, m_i + tl.log2(l_i), mask=offs_m < q_len)
    _store_rows(O + off_b * stride_ob + off_h * stride_oh, offs_m, stride_ot, offs_d,
                acc.to(O.dtype.element_ty), q_len, HEAD_DIM, BLOCK_D)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_ot,
    stride_dob, stride_doh, stride_dot,
    num_heads, q_len,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta[row] = sum_d dO[row, d] * O[row, d], in fp32."""
    pid_bh = tl.program_id(0)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(O + off_b * stride_ob + off_h * stride_oh, offs_m, stride_ot, offs_d, q_len,
                   HEAD_DIM, BLOCK_D, True)
    do = _load_rows(DO + off_b * stride_dob + off_h * stride_doh, offs_m, stride_dot, offs_d, q_len,
                    HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + pid_bh.to(tl.int64) * q_len + offs_m, delta, mask=offs_m < q_len)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                         k_pos, offs_m, offs_d, start, end, q_len, q_offset, qk_scale,
                         CAUSAL_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_M: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dK and dV of one key block over query blocks [start, end).

    Works on transposed tiles (keys x queries) so that dV = P^T dO and dK = dS^T Q are
    plain products with the key block as the M dimension. Query rows past q_len load as
    zeros: their scores are 0 and lse/delta load as 0, so P = 1 but dO = 0 and Q = 0,
    which contributes exactly nothing.
    """
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + offs_m
        q = _load_rows(q_base, rows, stride_qt, offs_d, q_len, HEAD_DIM, BLOCK_D, True)
        do = _load_rows(do_base, rows, stride_dot, offs_d, q_len, HEAD_DIM, BLOCK_D, True)
        lse = tl.load(lse_base + rows, mask=rows < q_len, other=0.0)
        delta = tl.load(delta_base + rows, mask=rows < q_len, other=0.0)
        # P^T recomputed from the saved log-sum-exp (both in log2 units).
        qk_t = _mma(k, tl.trans(q), tl.zeros([k.shape[0], BLOCK_M], dtype=tl.float32), DOT_FP32, DOT_PRECISION)
        p_t = tl.exp2(qk_t * qk_scale - lse[None, :])
        if CAUSAL_MASK:
            p_t = tl.where(q_offset + rows[None, :] >= k_pos[:, None], p_t, 0.0)
        dv = _mma(p_t.to(do.dtype), do, dv, DOT_FP32, DOT_PRECISION)
        dp_t = _mma(v, tl.trans(do), tl.zeros([k.shape[0], BLOCK_M], dtype=tl.float32), DOT_FP32, DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = _mma(ds_t.to(q.dtype), q, dk, DOT_FP32, DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt,
    stride_dvb, stride_dvh, stride_dvt,
    num_heads, q_len, q_offset, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Grid: (B * H, key blocks); the first key blocks meet the most queries, so they go first.
    pid_bh = tl.program_id(0)
    start_n = tl.program_id(1) * BLOCK_N
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    kv_len = q_offset + q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k_pos = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(K + off_b * stride_kb + off_h * stride_kh, k_pos, stride_kt, offs_d, kv_len,
                   HEAD_DIM, BLOCK_D, True)
    v = _load_rows(V + off_b * stride_vb + off_h * stride_vh, k_pos, stride_vt, offs_d, kv_len,
                   HEAD_DIM, BLOCK_D, True)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    do_base = DO + off_b * stride_dob + off_h * stride_doh
    lse_base = LSE + pid_bh.to(tl.int64) * q_len
    delta_base = DELTA + pid_bh.to(tl.int64) * q_len

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query row i (absolute position q_offset + i) sees key j iff q_offset + i >= j.
    # The first query block that sees any key of this block holds row start_n - q_offset;
    # from row start_n + BLOCK_N - 1 - q_offset on, every query sees the whole block.
    mask_begin = (tl.maximum(start_n - q_offset, 0) // BLOCK_M) * BLOCK_M
    mask_end = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - q_offset, 0), BLOCK_M) * BLOCK_M
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                  k_pos, offs_m, offs_d, mask_begin, tl.minimum(mask_end, q_len),
                                  q_len, q_offset, qk_scale,
                                  True, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_FP32, DOT_PRECISION)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                  k_pos, offs_m, offs_d, mask_end, q_len,
                                  q_len, q_offset, qk_scale,
                                  False, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_FP32, DOT_PRECISION)

    # Keys past kv_len got no contribution (the causal mask hides them) and are not stored.
    _store_rows(DK + off_b * stride_dkb + off_h * stride_dkh, k_pos, stride_dkt, offs_d,
                (dk * sm_scale).to(DK.dtype.element_ty), kv_len, HEAD_DIM, BLOCK_D)
    _store_rows(DV + off_b * stride_dvb + off_h * stride_dvh, k_pos, stride_dvt, offs_d,
                dv.to(DV.dtype.element_ty), kv_len, HEAD_DIM, BLOCK_D)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, q_pos, offs_n, offs_d,
                       start, end, kv_len, qk_scale,
                       CAUSAL_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dQ of one query block over key blocks [start, end)."""
    for start_n in range(start, end, BLOCK_N):
        k_pos = start_n + offs_n
        k = _load_rows(k_base, k_pos, stride_kt, offs_d, kv_len, HEAD_DIM, BLOCK_D, CAUSAL_MASK)
        v = _load_rows(v_base, k_pos, stride_vt, offs_d, kv_len, HEAD_DIM, BLOCK_D, CAUSAL_MASK)
        qk = _mma(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), DOT_FP32, DOT_PRECISION)
        p = tl.exp2(qk * qk_scale - lse[:, None])
        if CAUSAL_MASK:
            p = tl.where(q_pos[:, None] >= k_pos[None, :], p, 0.0)
        dp = _mma(do, tl.trans(v), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), DOT_FP32, DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = _mma(ds.to(k.dtype), k, dq, DOT_FP32, DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    num_heads, q_len, q_offset, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Grid: (B * H, query blocks), longest (last) query blocks first, as in the forward.
    pid_bh = tl.program_id(0)
    start_m = tl.num_programs(1) - 1 - tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    kv_len = q_offset + q_len

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_pos = q_offset + offs_m

    # Rows past q_len load zeros (lse and delta too); they stay finite and are not stored.
    q = _load_rows(Q + off_b * stride_qb + off_h * stride_qh, offs_m, stride_qt, offs_d, q_len,
                   HEAD_DIM, BLOCK_D, True)
    do = _load_rows(DO + off_b * stride_dob + off_h * stride_doh, offs_m, stride_dot, offs_d, q_len,
                    HEAD_DIM, BLOCK_D, True)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * q_len + offs_m, mask=offs_m < q_len, other=0.0)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * q_len + offs_m, mask=offs_m < q_len, other=0.0)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Same split of the key range as the forward.
    first_q_pos = q_offset + start_m * BLOCK_M
    lo_end = ((first_q_pos + 1) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(first_q_pos + BLOCK_M, kv_len)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, q_pos, offs_n, offs_d,
                            0, lo_end, kv_len, qk_scale,
                            False, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_FP32, DOT_PRECISION)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, q_pos, offs_n, offs_d,
                            lo_end, hi, kv_len, qk_scale,
                            True, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_FP32, DOT_PRECISION)

    _store_rows(DQ + off_b * stride_dqb + off_h * stride_dqh, offs_m, stride_dqt, offs_d,
                (dq * sm_scale).to(DQ.dtype.element_ty), q_len, HEAD_DIM, BLOCK_D)


# ----------------------------------------------------------------------------- configurations


class KernelConfig:
    """Tile sizes and launch options of one kernel."""

    __slots__ = ("block_m", "block_n", "num_warps", "num_stages")

    def __init__(self, block_m: int, block_n: int, num_warps: int, num_stages: int):
        self.block_m, self.block_n, self.num_warps, self.num_stages = block_m, block_n, num_warps, num_stages

    def __repr__(self):
        return (f"KernelConfig(block_m={self.block_m}, block_n={self.block_n}, "
                f"num_warps={self.num_warps}, num_stages={self.num_stages})")


# Hopper (sm_90) configurations, keyed by (BLOCK_D, bytes per element). The 16-bit ones
# at BLOCK_D 64 and 128 are the shipped fast paths that the static compile report checks
# (wgmma in SASS, no spills, shared memory within 227 KiB); the others were checked the
# same way for spills and shared memory. block_m is the query tile and block_n the key
# tile in every kernel. fp32 uses exact (non-tf32) dots, which run on CUDA cores with
# every operand in registers: correct but slower, so its tiles are small (chosen so that
# ptxas reports no spills).
_GPU_FWD = {
    (16, 2): KernelConfig(128, 64, 4, 3),
    (32, 2): KernelConfig(128, 64, 4, 3),
    (64, 2): KernelConfig(128, 128, 8, 3),
    (128, 2): KernelConfig(128, 64, 8, 3),
    (256, 2): KernelConfig(64, 32, 8, 2),
    (16, 4): KernelConfig(32, 32, 4, 2),
    (32, 4): KernelConfig(32, 32, 4, 2),
    (64, 4): KernelConfig(64, 32, 8, 2),
    (128, 4): KernelConfig(32, 16, 8, 2),
    (256, 4): KernelConfig(32, 16, 8, 1),
}
_GPU_DKDV = {
    (16, 2): KernelConfig(64, 128, 8, 2),
    (32, 2): KernelConfig(64, 128, 8, 2),
    (64, 2): KernelConfig(64, 128, 8, 2),
    (128, 2): KernelConfig(32, 128, 8, 2),
    (256, 2): KernelConfig(16, 32, 4, 1),
    (16, 4): KernelConfig(32, 32, 8, 2),
    (32, 4): KernelConfig(32, 32, 8, 2),
    (64, 4): KernelConfig(32, 32, 8, 2),
    (128, 4): KernelConfig(16, 16, 4, 2),
    (256, 4): KernelConfig(16, 32, 8, 1),
}
_GPU_DQ = {
    (16, 2): KernelConfig(128, 64, 8, 2),
    (32, 2): KernelConfig(128, 64, 8, 2),
    (64, 2): KernelConfig(128, 64, 8, 2),
    (128, 2): KernelConfig(128, 32, 8, 2),
    (256, 2): KernelConfig(32, 32, 4, 1),
    (16, 4): KernelConfig(32, 32, 8, 2),
    (32, 4): KernelConfig(32, 32, 8, 2),
    (64, 4): KernelConfig(32, 32, 8, 2),
    (128, 4): KernelConfig(32, 16, 8, 2),
    (256, 4): KernelConfig(32, 16, 8, 1),
}
# Under the CPU interpreter: small, unequal tiles, so that tiny test shapes still cross
# several blocks, the diagonal split and the sequence edge.
_INTERPRETER_FWD = KernelConfig(32, 16, 4, 1)
_INTERPRETER_DKDV = KernelConfig(16, 32, 4, 1)
_INTERPRETER_DQ = KernelConfig(32, 16, 4, 1)
DELTA_BLOCK_M = 64


def padded_head_dim(head_dim: int) -> int:
    """BLOCK_D: the next power of two >= max(head_dim, 16) (tl.dot needs K >= 16)."""
    return max(16, triton.next_power_of_2(head_dim))


def _select(table, head_dim: int, dtype: torch.dtype, interpreted: KernelConfig, on_cpu: bool) -> KernelConfig:
    if on_cpu:
        return interpreted
    return table[(padded_head_dim(head_dim), 4 if dtype == torch.float32 else 2)]


def forward_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> KernelConfig:
    return _select(_GPU_FWD, head_dim, dtype, _INTERPRETER_FWD, device.type != "cuda")


def dkdv_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> KernelConfig:
    return _select(_GPU_DKDV, head_dim, dtype, _INTERPRETER_DKDV, device.type != "cuda")


def dq_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> KernelConfig:
    return _select(_GPU_DQ, head_dim, dtype, _INTERPRETER_DQ, device.type != "cuda")


# ----------------------------------------------------------------------------- launchers


def _unit_stride_d(t: torch.Tensor) -> torch.Tensor:
    """The kernels assume stride 1 along the head dimension; any other strides are free."""
    return t if t.shape[-1] == 1 or t.stride(-1) == 1 else t.contiguous()


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every output and scratch buffer of the launchers comes from here (tests wrap it to
    fill the buffers with NaN before the kernels run, proving each element is written)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _check_out(what: str, t, shape, dtype, device) -> torch.Tensor:
    """Validate a caller-provided output buffer (or allocate one when ``t`` is None)."""
    if t is None:
        return _empty(shape, dtype, device)
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != device:
        raise ValueError(f"{what}: expected a {dtype} tensor of shape {tuple(shape)} on {device}, "
                         f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{what}: the last dimension must have stride 1, got strides {t.stride()}")
    return t


def _dot_flags(dtype: torch.dtype, device: torch.device):
    """(DOT_FP32, DOT_PRECISION): widen dots to fp32 under the interpreter; exact fp32 dots."""
    return device.type != "cuda", ("ieee" if dtype == torch.float32 else "tf32")


def _device_guard(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _bht(t: torch.Tensor):
    """Batch, head and time strides of a (B, H, T, D) tensor."""
    return t.stride(0), t.stride(1), t.stride(2)


def attention_forward(q, k, v, scale: float, q_offset: int = 0, *, out=None, lse=None, config=None):
    """Launch the forward kernel. Returns ``(out, lse)``: out (B, H, Tq, D) in q's dtype
    (contiguous), lse (B, H, Tq) fp32, the base-2 log-sum-exp of ``scale * log2(e) * q.k``.

    Inputs are assumed validated (gptfast.ops.causal_attention does it). ``out``/``lse`` may be
    preallocated (tests poison them to prove every element is written).
    """
    q, k, v = _unit_stride_d(q), _unit_stride_d(k), _unit_stride_d(v)
    batch, heads, q_len, head_dim = q.shape
    out = _check_out("out", out, q.shape, q.dtype, q.device)
    lse = _check_out("lse", lse, (batch, heads, q_len), torch.float32, q.device)
    if lse.numel() and not lse.is_contiguous():
        raise ValueError("lse: must be contiguous")
    cfg = config or forward_config(head_dim, q.dtype, q.device)
    dot_fp32, dot_precision = _dot_flags(q.dtype, q.device)
    grid = (batch * heads, triton.cdiv(q_len, cfg.block_m))
    with _device_guard(q.device):
        _attn_fwd_kernel[grid](
            q, k, v, out, lse,
            *_bht(q), *_bht(k), *_bht(v), *_bht(out),
            heads, q_len, q_offset, scale * LOG2E,
            HEAD_DIM=head_dim, BLOCK_D=padded_head_dim(head_dim), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            DOT_FP32=dot_fp32, DOT_PRECISION=dot_precision,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out, lse


def attention_backward(grad_out, q, k, v, out, lse, scale: float, q_offset: int = 0, *,
                       dq=None, dk=None, dv=None, delta=None, dkdv_cfg=None, dq_cfg=None):
    """Launch the three backward kernels. Returns ``(dq, dk, dv)``, contiguous, in the
    inputs' dtype and shapes. ``out`` and ``lse`` are what attention_forward returned.
    Output buffers (and the fp32 ``delta`` scratch of shape (B, H, Tq)) may be preallocated.
    """
    grad_out, q, k, v, out = (_unit_stride_d(t) for t in (grad_out, q, k, v, out))
    batch, heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    lse = lse.contiguous()
    dq = _check_out("dq", dq, q.shape, q.dtype, q.device)
    dk = _check_out("dk", dk, k.shape, k.dtype, k.device)
    dv = _check_out("dv", dv, v.shape, v.dtype, v.device)
    delta = _check_out("delta", delta, (batch, heads, q_len), torch.float32, q.device)
    if delta.numel() and not delta.is_contiguous():
        raise ValueError("delta: must be contiguous")
    block_d = padded_head_dim(head_dim)
    dot_fp32, dot_precision = _dot_flags(q.dtype, q.device)
    kv_cfg = dkdv_cfg or dkdv_config(head_dim, q.dtype, q.device)
    q_cfg = dq_cfg or dq_config(head_dim, q.dtype, q.device)
    with _device_guard(q.device):
        _attn_bwd_delta_kernel[(batch * heads, triton.cdiv(q_len, DELTA_BLOCK_M))](
            out, grad_out, delta, *_bht(out), *_bht(grad_out), heads, q_len,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=DELTA_BLOCK_M, num_warps=4,
        )
        _attn_bwd_dkdv_kernel[(batch * heads, triton.cdiv(kv_len, kv_cfg.block_n))](
            q, k, v, grad_out, lse, delta, dk, dv,
            *_bht(q), *_bht(k), *_bht(v), *_bht(grad_out), *_bht(dk), *_bht(dv),
            heads, q_len, q_offset, scale * LOG2E, scale,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=kv_cfg.block_m, BLOCK_N=kv_cfg.block_n,
            DOT_FP32=dot_fp32, DOT_PRECISION=dot_precision,
            num_warps=kv_cfg.num_warps, num_stages=kv_cfg.num_stages,
        )
        _attn_bwd_dq_kernel[(batch * heads, triton.cdiv(q_len, q_cfg.block_m))](
            q, k, v, grad_out, lse, delta, dq,
            *_bht(q), *_bht(k), *_bht(v), *_bht(grad_out), *_bht(dq),
            heads, q_len, q_offset, scale * LOG2E, scale,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=q_cfg.block_m, BLOCK_N=q_cfg.block_n,
            DOT_FP32=dot_fp32, DOT_PRECISION=dot_precision,
            num_warps=q_cfg.num_warps, num_stages=q_cfg.num_stages,
        )
    return dq, dk, dv


# ----------------------------------------------------------------------------- static compile


_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_FLOAT_ARGS = ("qk_scale", "sm_scale")
_FP32_POINTERS = ("LSE", "DELTA")


def _static_entry(name, fn, dtype, constexprs, num_warps, num_stages, require_hgmma):
    """One ``static_configs()`` entry: every argument typed for
    ``triton.compile(ASTSource(fn, signature, constexprs))``. ``divisible_by_16`` names
    the batch/head/time strides, which the JIT specialises as multiples of 16 for typical
    tensors (pointers are taken as 16-byte aligned by the report), so the static compile
    matches a real launch."""
    signature = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.isupper():  # tensors are the upper-case arguments
            signature[arg] = "*fp32" if arg in _FP32_POINTERS else "*" + _TRITON_DTYPE[dtype]
        elif arg in _FLOAT_ARGS:
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
    strides = [arg for arg in fn.arg_names if arg.startswith("stride_")]
    return {"name": name, "fn": fn, "signature": signature, "constexprs": dict(constexprs),
            "num_warps": num_warps, "num_stages": num_stages, "require_hgmma": require_hgmma,
            "divisible_by_16": strides}


def static_configs(dtype: torch.dtype = torch.bfloat16, head_dims=(64, 128)):
    """The shipped sm_90 configurations (bf16, head sizes 64 and 128 by default) of the
    forward, dK/dV and dQ kernels (main loops on wgmma) and the delta preprocess."""
    entries = []
    itemsize = torch.tensor([], dtype=dtype).element_size()
    for head_dim in head_dims:
        block_d = padded_head_dim(head_dim)
        key = (block_d, 4 if itemsize == 4 else 2)
        tag = f"d{head_dim}_{_TRITON_DTYPE[dtype]}"
        for name, fn, cfg in (("attention_fwd", _attn_fwd_kernel, _GPU_FWD[key]),
                              ("attention_bwd_dkdv", _attn_bwd_dkdv_kernel, _GPU_DKDV[key]),
                              ("attention_bwd_dq", _attn_bwd_dq_kernel, _GPU_DQ[key])):
            constexprs = {"HEAD_DIM": head_dim, "BLOCK_D": block_d, "BLOCK_M": cfg.block_m,
                          "BLOCK_N": cfg.block_n, "DOT_FP32": False,
                          "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32"}
            entries.append(_static_entry(f"{name}_{tag}", fn, dtype, constexprs, cfg.num_warps, cfg.num_stages,
                                         require_hgmma=dtype != torch.float32))
        constexprs = {"HEAD_DIM": head_dim, "BLOCK_D": block_d, "BLOCK_M": DELTA_BLOCK_M}
        entries.append(_static_entry(f"attention_bwd_delta_{tag}", _attn_bwd_delta_kernel, dtype, constexprs,
                                     4, 1, require_hgmma=False))
    return entries
