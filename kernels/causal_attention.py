"""Causal flash attention for prefill and training: Triton forward and backward kernels.

Shapes: q (B, H, Tq, D), k and v (B, H_kv, Tk, D) with ``Tk == q_offset + Tq`` and H_kv
dividing H. Query ``i`` sits at absolute position ``q_offset + i`` and sees keys
``0 .. q_offset + i`` (``q_offset > 0`` is chunked prefill against a KV cache, or verifying
draft tokens). Three extensions, each read on the device (no host synchronisation):

- ``Q_START_TENSOR``: the offset is the first element of a position tensor, read per
  batch row at ``Q_START + b * stride_pos_b``: a (Tq,) tensor shared by every row
  (stride 0: a compiled prefill over a whole static cache) or a (B, Tq) one (each row's
  own positions: a speculative verify step); keys past a row's last query are never read.
- grouped-query heads: query head h reads kv head ``h // group``; the dK/dV program of a
  kv head's key block walks the queries of every head of its group, so dK and dV sum over
  the group in registers (no repeated K/V, no atomics).
- ``HAS_KEY_START``: row b's keys before ``key_start[b]`` are hidden (whole key blocks
  before it are skipped, the boundary block is masked and loads them as 0, so padding is
  never read). A query before key_start sees no key: its output is 0 and its lse +inf,
  which makes every probability the backward recomputes for it 0.

Forward (FlashAttention-2). One program owns BLOCK_M queries of one (batch, head) and
streams over key/value blocks of BLOCK_N keys, keeping a running row maximum ``m``, a
running denominator ``l`` and an un-normalised fp32 accumulator; the T x T score matrix
never exists. Scores are pre-multiplied by ``scale * log2(e)`` so the softmax uses the
cheap ``exp2``. The key loop is split in two:

    keys:    0 ............................. lo_end ........ hi
             [ blocks every query of the tile  ][ blocks on the  ]
             [ sees: no mask at all            ][ diagonal: mask ]

and blocks above the diagonal are never visited (with key ranges one more masked block,
the one holding key_start, comes first; blocks before it are not visited either). The program saves the per-row
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
and every program writes its own rows, so results are deterministic. The atomic
variant (``tma_atomic_dq``) of the dK/dV kernel fuses the two passes instead: each (key block, query block)
step of the dK/dV program, which already holds dS, adds its share dS K of dQ to an fp32
(B * H, Tq, D) sum with atomic adds (the delta kernel clears it, a last small kernel
scales and casts it into dQ). That is five products per step instead of the split's
four plus the dQ pass's three (which recomputes P and dP), bought with the atomic traffic
to L2 and an fp32 summation order that varies from run to run (dQ is then not bitwise
deterministic; dK and dV still are). Which backward is faster on a GPU is the tuner's
call (both are candidates).

Variants (``VARIANTS``, chosen by ``LaunchConfig.variant``). ``tma``: the tiles a loop
streams (K and V in the forward and dQ passes, Q and dO in the dK/dV pass; Q and the
output of the forward) move through tensor descriptors built on the device
(``tl.make_tensor_descriptor``): on Hopper the tensor memory accelerator copies each tile
into shared memory (``UTMALDG``; ``UTMASTG`` for the forward's output), freeing the
registers and address arithmetic of per-thread loads, and fills rows past the sequence
and columns past HEAD_DIM with 0 as the masked loads do. The masked block holding
key_start keeps pointer loads (its padded keys must not be read). A descriptor needs a
16-byte aligned start and 16-byte multiple strides: the launcher falls back to the
pointer loads of the same tiles otherwise (``_tma_ready``). The interpreter runs the
descriptors too, so the tests cover both paths.

Persistent variants of the forward and dK/dV passes (``persistent``, ``tma_persistent``,
``tma_atomic_dq_persistent``; ``_x2``: two programs per SM instead of one). A causal grid's
programs differ in length (the forward's last query block streams every key, its first one
block), and a one-tile-per-program grid ends with a tail where the long programs of the
last wave hold a few SMs while the rest idle. A persistent launch starts
``PROGRAMS_PER_SM`` programs per SM instead, and each loops over tiles dealt longest first
in a snake (``_persistent_tile``): the tail is filled with short tiles and the per-program
prologue is paid once per SM. Same kernels, one constexpr (``PERSISTENT``) and a 1-D grid
(``persistent_programs``); the tile body is the same function in both.

Short sequences (at most ``SHORT_MAX_LEN`` queries) look their forward config up under a
key of their own (``forward_key``: ``d64_16bit_short``), with their own tuning candidates:
at T 512-1k a tile sees few key blocks, so other tiles, grids and pipelines may win. A
tuned table without that key serves them the long key's config.

Any T >= 1 works: loads past the sequence end are masked to zero and rows past it are
never stored (their recomputed values stay finite: zero queries give zero scores).
Head sizes up to 256 are padded to BLOCK_D, the next power of two >= 16, with masked
loads along D. Inputs may have any strides except along D, which must be 1 (the
launcher copies otherwise).
"""
import dataclasses
import functools
import types

import torch
import triton
import triton.language as tl

from ._common import (cdiv, cuda_index, LOG2E, LaunchConfig, check_out, device_guard, div, empty, launch,
                      padded_head_dim, pointer, sm_count, static_entry, TRITON_TYPE)
from ._tuned import pick

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
def _load_rows(base, rows, stride_t, limit, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """Load a (len(rows), BLOCK_D) tile; rows >= limit and columns >= HEAD_DIM read 0."""
    offs_d = tl.arange(0, BLOCK_D)
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
def _store_rows(base, rows, stride_t, tile, limit, HEAD_DIM: tl.constexpr):
    """Store a (len(rows), BLOCK_D) tile, skipping rows >= limit and columns >= HEAD_DIM."""
    BLOCK_D: tl.constexpr = tile.shape[1]
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = base + rows[:, None] * stride_t + offs_d[None, :]
    if BLOCK_D == HEAD_DIM:
        tl.store(ptrs, tile, mask=rows[:, None] < limit)
    else:
        tl.store(ptrs, tile, mask=(rows[:, None] < limit) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _positions(Q_START, KEY_START, off_b, q_offset, stride_pos_b, Q_START_TENSOR: tl.constexpr,
               HAS_KEY_START: tl.constexpr):
    """(q_offset, key_start) of batch row ``off_b``: the first query's absolute position (the
    host int, or read on the device from row ``off_b`` of the position tensor Q_START, whose
    batch stride is ``stride_pos_b``, 0 for a (Tq,) tensor) and the row's first visible key
    (KEY_START[off_b], clamped at 0; 0 without key ranges)."""
    if Q_START_TENSOR:
        q_offset = tl.load(Q_START + off_b * stride_pos_b).to(tl.int32)
    if HAS_KEY_START:
        key_start = tl.maximum(tl.load(KEY_START + off_b).to(tl.int32), 0)
    else:
        key_start = 0
    return q_offset, key_start


@triton.jit
def _query_tile(Q_START, KEY_START, pid_bh, start_m, num_heads, group, q_len, q_offset, stride_pos_b,
                BLOCK_M: tl.constexpr, Q_START_TENSOR: tl.constexpr, HAS_KEY_START: tl.constexpr):
    """Where the forward or the dQ kernel works on query block ``start_m`` of (batch, head)
    ``pid_bh``, as ``(off_b, off_h, off_kvh, q_offset, key_start, kv_len, offs_m, q_pos)``.
    Query head h reads kv head h // group (grouped-query attention; group 1 is plain MHA).
    ``q_pos``: the absolute positions of the tile's queries."""
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    q_offset, key_start = _positions(Q_START, KEY_START, off_b, q_offset, stride_pos_b, Q_START_TENSOR,
                                    HAS_KEY_START)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    kv_len = q_offset + q_len
    return off_b, off_h, off_h // group, q_offset, key_start, kv_len, offs_m, q_offset + offs_m


@triton.jit
def _grid_tile():
    """``(pid_bh, start_m)`` of a program of the (B * H, query blocks) grid; the query-block
    axis is walked from the last block, the one with the most keys, so the longest programs
    start first (causal load balance)."""
    return tl.program_id(0), tl.num_programs(1) - 1 - tl.program_id(1)


@triton.jit
def _persistent_tile(rnd, batch_heads, q_blocks):
    """``(pid_bh, start_m, valid)`` of this program's tile in round ``rnd`` of a persistent launch
    (a grid of P programs, each looping over rounds). Tiles are numbered longest first:
    tile t is query block ``q_blocks - 1 - t // batch_heads`` of (batch, head)
    ``t % batch_heads``, so a causal sequence's last blocks (the most keys) come first and the
    grid's tail is filled with short tiles. Round r holds tiles [r * P, r * P + P), dealt
    out left to right in even rounds and right to left in odd ones (a snake), so the
    program that took a round's longest tile takes the next round's shortest: the sums
    even out. ``valid``: the tile exists (the last round may be partial)."""
    programs = tl.num_programs(0)
    pid = tl.program_id(0)
    lane = tl.where(rnd % 2 == 0, pid, programs - 1 - pid)
    tile = rnd * programs + lane
    return tile % batch_heads, q_blocks - 1 - tile // batch_heads, tile < batch_heads * q_blocks


@triton.jit
def _key_regions(first_q_pos, kv_len, key_start, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key loop of a query tile whose first query sits at ``first_q_pos``, as
    ``(lo, mid, lo_end, hi)``: blocks [lo, mid) hold the row's first visible key
    ``key_start`` off a block boundary (masked), [mid, lo_end) lie between it and the
    tile's first query (no mask at all), [max(lo_end, lo), hi) straddle the diagonal or
    the sequence end (masked). Blocks before ``key_start`` and keys past the tile's last
    query (or past ``kv_len``) are never visited."""
    lo = (key_start // BLOCK_N) * BLOCK_N
    lo_end = ((first_q_pos + 1) // BLOCK_N) * BLOCK_N
    mid = tl.minimum(tl.where(key_start > lo, lo + BLOCK_N, lo), lo_end)
    hi = tl.minimum(first_q_pos + BLOCK_M, kv_len)
    return lo, mid, lo_end, hi


@triton.jit
def _load_keys(base, k_pos, stride_t, kv_len, key_start, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               CHECK_ROWS: tl.constexpr, HAS_KEY_START: tl.constexpr):
    """``_load_rows`` of a key (or value) block; in a checked block with key ranges the keys
    before key_start read 0 as well, so left padding is never read (even NaN there is harmless)."""
    if CHECK_ROWS and HAS_KEY_START:
        offs_d = tl.arange(0, BLOCK_D)
        inside = (k_pos >= key_start) & (k_pos < kv_len)
        return tl.load(base + k_pos[:, None] * stride_t + offs_d[None, :],
                       mask=inside[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        return _load_rows(base, k_pos, stride_t, kv_len, HEAD_DIM, BLOCK_D, CHECK_ROWS)


@triton.jit
def _rows_source(base, length, stride_t, BLOCK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 USE_TMA: tl.constexpr):
    """What a loop reads its (BLOCK_ROWS, BLOCK_D) tiles of the ``(length, HEAD_DIM)`` rows at
    ``base`` from: with USE_TMA a tensor descriptor (Hopper's tensor memory accelerator
    copies each tile into shared memory, filling rows >= length and columns >= HEAD_DIM with
    0, as the masked pointer loads do), else ``base`` itself (pointer loads)."""
    if USE_TMA:
        return tl.make_tensor_descriptor(base, shape=[length, HEAD_DIM], strides=[stride_t, 1],
                                         block_shape=[BLOCK_ROWS, BLOCK_D])
    else:
        return base


@triton.jit
def _load_tile(src, base, start, rows, stride_t, limit, key_start, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               CHECK_ROWS: tl.constexpr, HAS_KEY_START: tl.constexpr, USE_TMA: tl.constexpr):
    """The tile of ``rows`` (= start + arange) as ``_load_keys`` reads it, through the
    descriptor ``src`` with USE_TMA. A checked block with key ranges keeps the pointer load
    (at most one such block per loop, besides the diagonal ones): its keys before key_start
    must not be read at all, which a rectangular copy cannot skip."""
    if USE_TMA:
        if CHECK_ROWS and HAS_KEY_START:
            return _load_keys(base, rows, stride_t, limit, key_start, HEAD_DIM, BLOCK_D, CHECK_ROWS, HAS_KEY_START)
        else:
            return src.load([start, 0])
    else:
        return _load_keys(base, rows, stride_t, limit, key_start, HEAD_DIM, BLOCK_D, CHECK_ROWS, HAS_KEY_START)


@triton.jit
def _visible(q_pos, k_pos, key_start, HAS_KEY_START: tl.constexpr):
    """(queries x keys) mask of a masked block: causal, and keys before key_start hidden."""
    seen = q_pos[:, None] >= k_pos[None, :]
    if HAS_KEY_START:
        seen = seen & (k_pos[None, :] >= key_start)
    return seen


# Tuples passed between the kernels and their loops (Triton unpacks them at compile time):
#   kv   = (k_base, v_base, stride_kt, stride_vt, kv_len, k_src, v_src): one (batch, kv head)'s keys
#          and values, and their ``_rows_source`` (descriptors with USE_TMA, else the bases again)
#   rows = per query tile, what the backward loops read (see each loop's docstring)


# ----------------------------------------------------------------------------- forward


@triton.jit
def _attn_fwd_inner(state, q, q_pos, kv, start, end, qk_scale, key_start,
                    CAUSAL_MASK: tl.constexpr, HAS_KEY_START: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    USE_TMA: tl.constexpr):
    """Online softmax over key blocks [start, end) of ``kv``; ``state = (acc, m_i, l_i)``.
    With CAUSAL_MASK the blocks straddle the diagonal, the sequence end or key_start:
    scores of keys a query may not see become -inf."""
    acc, m_i, l_i = state
    k_base, v_base, stride_kt, stride_vt, kv_len, k_src, v_src = kv
    BLOCK_D: tl.constexpr = q.shape[1]
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        k_pos = start_n + offs_n
        # Unmasked blocks lie entirely before every query of the tile, so inside the keys.
        k = _load_tile(k_src, k_base, start_n, k_pos, stride_kt, kv_len, key_start, HEAD_DIM, BLOCK_D, CAUSAL_MASK,
                       HAS_KEY_START, USE_TMA)
        v = _load_tile(v_src, v_base, start_n, k_pos, stride_vt, kv_len, key_start, HEAD_DIM, BLOCK_D, CAUSAL_MASK,
                       HAS_KEY_START, USE_TMA)
        qk = _mma(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), DOT_FP32, DOT_PRECISION)
        qk = qk * qk_scale  # now in log2 units
        if CAUSAL_MASK:
            qk = tl.where(_visible(q_pos, k_pos, key_start, HAS_KEY_START), qk, float("-inf"))
        # Without key ranges every row sees key 0 in its first block, so m_new is finite from
        # then on and fully masked rows of later blocks just add exp2(-inf) = 0. With them a
        # row may have seen nothing yet (or ever: a padded query): subtract 0 instead of -inf.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if HAS_KEY_START:
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old maximum
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], DOT_FP32, DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, Q_START, KEY_START,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    num_heads, group, q_len, q_offset, stride_pos_b, qk_scale, batch_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    Q_START_TENSOR: tl.constexpr, HAS_KEY_START: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, PERSISTENT: tl.constexpr,
    STORE_LSE: tl.constexpr,
):
    """Grid (B * H, query blocks): one tile a program. With PERSISTENT a 1-D grid of a few
    programs per SM, each looping over tiles in ``_persistent_tile``'s order (the launcher
    sizes it); ``batch_heads`` = B * H. STORE_LSE: write the log-sum-exp (the backward
    reads it; an inference forward does not)."""
    if PERSISTENT:
        q_blocks = tl.cdiv(q_len, BLOCK_M)
        for rnd in range(0, tl.cdiv(batch_heads * q_blocks, tl.num_programs(0))):
            pid_bh, start_m, valid = _persistent_tile(rnd, batch_heads, q_blocks)
            if valid:
                _attn_fwd_tile(Q, K, V, O, LSE, Q_START, KEY_START, pid_bh, start_m,
                               stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                               stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                               num_heads, group, q_len, q_offset, stride_pos_b, qk_scale,
                               HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, Q_START_TENSOR, HAS_KEY_START,
                               DOT_FP32, DOT_PRECISION, USE_TMA, STORE_LSE)
    else:
        pid_bh, start_m = _grid_tile()
        _attn_fwd_tile(Q, K, V, O, LSE, Q_START, KEY_START, pid_bh, start_m,
                       stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                       stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                       num_heads, group, q_len, q_offset, stride_pos_b, qk_scale,
                       HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, Q_START_TENSOR, HAS_KEY_START,
                       DOT_FP32, DOT_PRECISION, USE_TMA, STORE_LSE)


@triton.jit
def _attn_fwd_tile(
    Q, K, V, O, LSE, Q_START, KEY_START, pid_bh, start_m,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    num_heads, group, q_len, q_offset, stride_pos_b, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    Q_START_TENSOR: tl.constexpr, HAS_KEY_START: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, STORE_LSE: tl.constexpr,
):
    """The forward of query block ``start_m`` of (batch, head) ``pid_bh``."""
    off_b, off_h, off_kvh, q_offset, key_start, kv_len, offs_m, q_pos = _query_tile(
        Q_START, KEY_START, pid_bh, start_m, num_heads, group, q_len, q_offset, stride_pos_b, BLOCK_M,
        Q_START_TENSOR, HAS_KEY_START)

    q_base = Q + off_b * stride_qb + off_h * stride_qh
    q = _load_tile(_rows_source(q_base, q_len, stride_qt, BLOCK_M, HEAD_DIM, BLOCK_D, USE_TMA), q_base,
                   start_m * BLOCK_M, offs_m, stride_qt, q_len, 0, HEAD_DIM, BLOCK_D, True, False, USE_TMA)
    k_base = K + off_b * stride_kb + off_kvh * stride_kh
    v_base = V + off_b * stride_vb + off_kvh * stride_vh
    kv = (k_base, v_base, stride_kt, stride_vt, kv_len,
          _rows_source(k_base, kv_len, stride_kt, BLOCK_N, HEAD_DIM, BLOCK_D, USE_TMA),
          _rows_source(v_base, kv_len, stride_vt, BLOCK_N, HEAD_DIM, BLOCK_D, USE_TMA))

    state = (tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32),
             tl.full([BLOCK_M], float("-inf"), dtype=tl.float32),
             tl.zeros([BLOCK_M], dtype=tl.float32))
    lo, mid, lo_end, hi = _key_regions(q_offset + start_m * BLOCK_M, kv_len, key_start, BLOCK_M, BLOCK_N)
    state = _attn_fwd_inner(state, q, q_pos, kv, lo, mid, qk_scale, key_start,
                            True, HAS_KEY_START, HEAD_DIM, BLOCK_N, DOT_FP32, DOT_PRECISION, USE_TMA)
    state = _attn_fwd_inner(state, q, q_pos, kv, mid, lo_end, qk_scale, key_start,
                            False, HAS_KEY_START, HEAD_DIM, BLOCK_N, DOT_FP32, DOT_PRECISION, USE_TMA)
    acc, m_i, l_i = _attn_fwd_inner(state, q, q_pos, kv, tl.maximum(lo_end, lo), hi, qk_scale, key_start,
                                    True, HAS_KEY_START, HEAD_DIM, BLOCK_N, DOT_FP32, DOT_PRECISION, USE_TMA)

    if HAS_KEY_START:
        # A query before its row's key_start sees no key: output 0, and lse = +inf makes
        # every recomputed probability of the backward 0 (so its gradients are 0 too).
        seen = l_i > 0.0
        l_i = tl.where(seen, l_i, 1.0)
        lse = tl.where(seen, m_i + tl.log2(l_i), float("inf"))
    else:
        lse = m_i + tl.log2(l_i)
    acc = div(acc, l_i[:, None], O.dtype.element_ty == tl.float32)
    if STORE_LSE:
        tl.store(LSE + pid_bh.to(tl.int64) * q_len + offs_m, lse, mask=offs_m < q_len)
    o_base = O + off_b * stride_ob + off_h * stride_oh
    if USE_TMA:  # the copy engine clips the rows past q_len and the columns past HEAD_DIM
        _rows_source(o_base, q_len, stride_ot, BLOCK_M, HEAD_DIM, BLOCK_D, True).store(
            [start_m * BLOCK_M, 0], acc.to(O.dtype.element_ty))
    else:
        _store_rows(o_base, offs_m, stride_ot, acc.to(O.dtype.element_ty), q_len, HEAD_DIM)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, DELTA, DQ_ACC,
    stride_ob, stride_oh, stride_ot,
    stride_dob, stride_doh, stride_dot,
    num_heads, q_len,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, ZERO_DQ: tl.constexpr,
):
    """delta[row] = sum_d dO[row, d] * O[row, d], in fp32. With ZERO_DQ it also clears the
    same rows of the fp32 dQ accumulator (B * H, Tq, HEAD_DIM) that the atomic backward adds to."""
    pid_bh = tl.program_id(0)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    o = _load_rows(O + off_b * stride_ob + off_h * stride_oh, offs_m, stride_ot, q_len, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(DO + off_b * stride_dob + off_h * stride_doh, offs_m, stride_dot, q_len, HEAD_DIM, BLOCK_D,
                    True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + pid_bh.to(tl.int64) * q_len + offs_m, delta, mask=offs_m < q_len)
    if ZERO_DQ:
        _store_rows(DQ_ACC + pid_bh.to(tl.int64) * q_len * HEAD_DIM, offs_m, HEAD_DIM,
                    tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), q_len, HEAD_DIM)


@triton.jit
def _attn_bwd_dkdv_inner(grads, k, v, k_pos, rows_in, start, end, q_offset, qk_scale,
                         CAUSAL_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                         DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
                         ATOMIC_DQ: tl.constexpr):
    """Accumulate ``grads = (dk, dv)`` of one key block over query blocks [start, end);
    ``rows_in = (q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, q_len, q_src,
    do_src, dq_acc)`` (q_src / do_src: ``_rows_source`` of q and dO; dq_acc: this head's rows
    of the fp32 dQ accumulator). With ATOMIC_DQ each step also adds its share of dQ,
    dS K (unscaled), to dq_acc with fp32 atomics: the dQ pass and its recomputation of P
    and dP disappear, for one more product and the atomic traffic.

    Works on transposed tiles (keys x queries) so that dV = P^T dO and dK = dS^T Q are
    plain products with the key block as the M dimension. Query rows past q_len load as
    zeros: their scores are 0 and lse/delta load as 0, so P = 1 but dO = 0 and Q = 0,
    which contributes exactly nothing. Padded queries (before key_start) have lse = +inf,
    so P = 0 for them.
    """
    dk, dv = grads
    q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, q_len, q_src, do_src, dq_acc = rows_in
    BLOCK_D: tl.constexpr = k.shape[1]
    offs_m = tl.arange(0, BLOCK_M)
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + offs_m
        q = _load_tile(q_src, q_base, start_m, rows, stride_qt, q_len, 0, HEAD_DIM, BLOCK_D, True, False, USE_TMA)
        do = _load_tile(do_src, do_base, start_m, rows, stride_dot, q_len, 0, HEAD_DIM, BLOCK_D, True, False,
                        USE_TMA)
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
        ds_t = ds_t.to(q.dtype)
        dk = _mma(ds_t, q, dk, DOT_FP32, DOT_PRECISION)
        if ATOMIC_DQ:
            dq = _mma(tl.trans(ds_t), k, tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), DOT_FP32, DOT_PRECISION)
            offs_d = tl.arange(0, BLOCK_D)
            tl.atomic_add(dq_acc + rows[:, None] * HEAD_DIM + offs_d[None, :], dq,
                          mask=(rows[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM), sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, Q_START, KEY_START,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt,
    stride_dvb, stride_dvh, stride_dvt,
    num_kv_heads, group, q_len, k_len, q_offset, stride_pos_b, qk_scale, sm_scale, batch_kv_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    Q_START_TENSOR: tl.constexpr, HAS_KEY_START: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    PERSISTENT: tl.constexpr,
):
    """Grid: (B * H_kv, key blocks); the first key blocks meet the most queries, so they go
    first. With PERSISTENT a 1-D grid of a few programs per SM, each looping over (kv head,
    key block) tiles in ``_persistent_tile``'s order, the first key blocks first;
    ``batch_kv_heads`` = B * H_kv."""
    if PERSISTENT:
        k_blocks = tl.cdiv(k_len, BLOCK_N)
        for rnd in range(0, tl.cdiv(batch_kv_heads * k_blocks, tl.num_programs(0))):
            pid_bkv, last_first, valid = _persistent_tile(rnd, batch_kv_heads, k_blocks)
            if valid:
                _attn_bwd_dkdv_tile(Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, Q_START, KEY_START,
                                    pid_bkv, (k_blocks - 1 - last_first) * BLOCK_N,
                                    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                                    stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                                    stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
                                    num_kv_heads, group, q_len, k_len, q_offset, stride_pos_b, qk_scale, sm_scale,
                                    HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, Q_START_TENSOR, HAS_KEY_START,
                                    DOT_FP32, DOT_PRECISION, USE_TMA, ATOMIC_DQ)
    else:
        _attn_bwd_dkdv_tile(Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, Q_START, KEY_START,
                            tl.program_id(0), tl.program_id(1) * BLOCK_N,
                            stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                            stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                            stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
                            num_kv_heads, group, q_len, k_len, q_offset, stride_pos_b, qk_scale, sm_scale,
                            HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, Q_START_TENSOR, HAS_KEY_START,
                            DOT_FP32, DOT_PRECISION, USE_TMA, ATOMIC_DQ)


@triton.jit
def _attn_bwd_dkdv_tile(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, Q_START, KEY_START, pid_bkv, start_n,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt,
    stride_dvb, stride_dvh, stride_dvt,
    num_kv_heads, group, q_len, k_len, q_offset, stride_pos_b, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    Q_START_TENSOR: tl.constexpr, HAS_KEY_START: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, ATOMIC_DQ: tl.constexpr,
):
    """dK and dV of the key block at ``start_n`` of (batch, kv head) ``pid_bkv``. The program
    walks the queries of every query head of its group, so dK and dV sum over the group in
    registers (no atomics)."""
    off_b = (pid_bkv // num_kv_heads).to(tl.int64)
    off_kvh = (pid_bkv % num_kv_heads).to(tl.int64)
    q_offset, key_start = _positions(Q_START, KEY_START, off_b, q_offset, stride_pos_b, Q_START_TENSOR,
                                    HAS_KEY_START)
    kv_len = q_offset + q_len

    k_pos = start_n + tl.arange(0, BLOCK_N)
    k = _load_keys(K + off_b * stride_kb + off_kvh * stride_kh, k_pos, stride_kt, kv_len, key_start, HEAD_DIM, BLOCK_D,
                   True, HAS_KEY_START)
    v = _load_keys(V + off_b * stride_vb + off_kvh * stride_vh, k_pos, stride_vt, kv_len, key_start, HEAD_DIM, BLOCK_D,
                   True, HAS_KEY_START)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query row i (absolute position q_offset + i) sees key j iff q_offset + i >= j.
    # The first query block that sees any key of this block holds row start_n - q_offset;
    # from row start_n + BLOCK_N - 1 - q_offset on, every query sees the whole block. A
    # block wholly before key_start is seen by no query: its loops are empty.
    q_end = tl.where(start_n + BLOCK_N <= key_start, 0, q_len)
    mask_begin = (tl.maximum(start_n - q_offset, 0) // BLOCK_M) * BLOCK_M
    mask_end = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - q_offset, 0), BLOCK_M) * BLOCK_M
    for g in range(0, group):
        off_h = off_kvh * group + g
        row = (off_b * num_kv_heads * group + off_h) * q_len  # this head's rows of LSE, DELTA (and DQ_ACC)
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_dob + off_h * stride_doh
        rows_in = (q_base, do_base, LSE + row, DELTA + row, stride_qt, stride_dot, q_len,
                   _rows_source(q_base, q_len, stride_qt, BLOCK_M, HEAD_DIM, BLOCK_D, USE_TMA),
                   _rows_source(do_base, q_len, stride_dot, BLOCK_M, HEAD_DIM, BLOCK_D, USE_TMA),
                   DQ_ACC + row * HEAD_DIM)
        dk, dv = _attn_bwd_dkdv_inner((dk, dv), k, v, k_pos, rows_in, mask_begin, tl.minimum(mask_end, q_end),
                                      q_offset, qk_scale, True, HEAD_DIM, BLOCK_M, DOT_FP32, DOT_PRECISION,
                                      USE_TMA, ATOMIC_DQ)
        dk, dv = _attn_bwd_dkdv_inner((dk, dv), k, v, k_pos, rows_in, mask_end, q_end,
                                      q_offset, qk_scale, False, HEAD_DIM, BLOCK_M, DOT_FP32, DOT_PRECISION,
                                      USE_TMA, ATOMIC_DQ)
    if HAS_KEY_START:
        # Each key row accumulates on its own, so the rows before key_start (which no query
        # sees) are simply zeroed here instead of being masked in every step.
        hidden = (k_pos < key_start)[:, None]
        dk = tl.where(hidden, 0.0, dk)
        dv = tl.where(hidden, 0.0, dv)

    # Keys past kv_len (the rest of a static cache) got no contribution: they store zeros.
    _store_rows(DK + off_b * stride_dkb + off_kvh * stride_dkh, k_pos, stride_dkt,
                (dk * sm_scale).to(DK.dtype.element_ty), k_len, HEAD_DIM)
    _store_rows(DV + off_b * stride_dvb + off_kvh * stride_dvh, k_pos, stride_dvt,
                dv.to(DV.dtype.element_ty), k_len, HEAD_DIM)


@triton.jit
def _attn_bwd_dq_inner(dq, rows, q_pos, kv, start, end, qk_scale, key_start,
                       CAUSAL_MASK: tl.constexpr, HAS_KEY_START: tl.constexpr, HEAD_DIM: tl.constexpr,
                       BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       USE_TMA: tl.constexpr):
    """Accumulate dQ of one query block over key blocks [start, end) of ``kv``;
    ``rows = (q, do, lse, delta)`` of the query block."""
    q, do, lse, delta = rows
    k_base, v_base, stride_kt, stride_vt, kv_len, k_src, v_src = kv
    BLOCK_D: tl.constexpr = q.shape[1]
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        k_pos = start_n + offs_n
        k = _load_tile(k_src, k_base, start_n, k_pos, stride_kt, kv_len, key_start, HEAD_DIM, BLOCK_D, CAUSAL_MASK,
                       HAS_KEY_START, USE_TMA)
        v = _load_tile(v_src, v_base, start_n, k_pos, stride_vt, kv_len, key_start, HEAD_DIM, BLOCK_D, CAUSAL_MASK,
                       HAS_KEY_START, USE_TMA)
        qk = _mma(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), DOT_FP32, DOT_PRECISION)
        p = tl.exp2(qk * qk_scale - lse[:, None])
        if CAUSAL_MASK:
            p = tl.where(_visible(q_pos, k_pos, key_start, HAS_KEY_START), p, 0.0)
        dp = _mma(do, tl.trans(v), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), DOT_FP32, DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = _mma(ds.to(k.dtype), k, dq, DOT_FP32, DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, Q_START, KEY_START,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    num_heads, group, q_len, q_offset, stride_pos_b, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    Q_START_TENSOR: tl.constexpr, HAS_KEY_START: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    pid_bh, start_m = _grid_tile()
    off_b, off_h, off_kvh, q_offset, key_start, kv_len, offs_m, q_pos = _query_tile(
        Q_START, KEY_START, pid_bh, start_m, num_heads, group, q_len, q_offset, stride_pos_b, BLOCK_M,
        Q_START_TENSOR, HAS_KEY_START)

    # Rows past q_len load zeros (lse and delta too); they stay finite and are not stored.
    rows = (_load_rows(Q + off_b * stride_qb + off_h * stride_qh, offs_m, stride_qt, q_len, HEAD_DIM, BLOCK_D, True),
            _load_rows(DO + off_b * stride_dob + off_h * stride_doh, offs_m, stride_dot, q_len, HEAD_DIM, BLOCK_D,
                       True),
            tl.load(LSE + pid_bh.to(tl.int64) * q_len + offs_m, mask=offs_m < q_len, other=0.0),
            tl.load(DELTA + pid_bh.to(tl.int64) * q_len + offs_m, mask=offs_m < q_len, other=0.0))
    k_base = K + off_b * stride_kb + off_kvh * stride_kh
    v_base = V + off_b * stride_vb + off_kvh * stride_vh
    kv = (k_base, v_base, stride_kt, stride_vt, kv_len,
          _rows_source(k_base, kv_len, stride_kt, BLOCK_N, HEAD_DIM, BLOCK_D, USE_TMA),
          _rows_source(v_base, kv_len, stride_vt, BLOCK_N, HEAD_DIM, BLOCK_D, USE_TMA))

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, mid, lo_end, hi = _key_regions(q_offset + start_m * BLOCK_M, kv_len, key_start, BLOCK_M, BLOCK_N)
    dq = _attn_bwd_dq_inner(dq, rows, q_pos, kv, lo, mid, qk_scale, key_start,
                            True, HAS_KEY_START, HEAD_DIM, BLOCK_N, DOT_FP32, DOT_PRECISION, USE_TMA)
    dq = _attn_bwd_dq_inner(dq, rows, q_pos, kv, mid, lo_end, qk_scale, key_start,
                            False, HAS_KEY_START, HEAD_DIM, BLOCK_N, DOT_FP32, DOT_PRECISION, USE_TMA)
    dq = _attn_bwd_dq_inner(dq, rows, q_pos, kv, tl.maximum(lo_end, lo), hi, qk_scale, key_start,
                            True, HAS_KEY_START, HEAD_DIM, BLOCK_N, DOT_FP32, DOT_PRECISION, USE_TMA)

    _store_rows(DQ + off_b * stride_dqb + off_h * stride_dqh, offs_m, stride_dqt,
                (dq * sm_scale).to(DQ.dtype.element_ty), q_len, HEAD_DIM)


@triton.jit
def _attn_bwd_dq_convert_kernel(
    DQ_ACC, DQ,
    stride_dqb, stride_dqh, stride_dqt,
    num_heads, q_len, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dQ = sm_scale * the fp32 accumulator of the atomic backward, in dQ's dtype."""
    pid_bh = tl.program_id(0)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = _load_rows(DQ_ACC + pid_bh.to(tl.int64) * q_len * HEAD_DIM, offs_m, HEAD_DIM, q_len, HEAD_DIM, BLOCK_D, True)
    _store_rows(DQ + off_b * stride_dqb + off_h * stride_dqh, offs_m, stride_dqt,
                (acc * sm_scale).to(DQ.dtype.element_ty), q_len, HEAD_DIM)


# ----------------------------------------------------------------------------- configurations

# Hopper (sm_90) configurations, keyed by ``config_key``: BLOCK_D and whether the inputs
# are 16-bit or fp32. The 16-bit ones at BLOCK_D 64, 128 and 256 are what the static
# compile report checks (wgmma in SASS but for NO_TENSOR_CORES, no spills, shared memory
# within 227 KiB); the others were checked the same way for spills and shared memory. block_m
# is the query tile and block_n the key tile in every kernel. fp32 uses exact
# (non-tf32) dots, which run on CUDA cores with every operand in registers: correct but
# slower, so its tiles are small (chosen so that ptxas reports no spills).
#
# D=256 (16-bit): the forward and dQ run on wgmma; dK/dV cannot (NO_TENSOR_CORES).


def _configs(rows):
    """``{config_key: LaunchConfig}`` from rows (BLOCK_D, kind, block_m, block_n, warps, stages)."""
    return {f"d{d}_{kind}": LaunchConfig(block_m=m, block_n=n, num_warps=w, num_stages=s)
            for d, kind, m, n, w, s in rows}


def _candidates(rows):
    """LaunchConfigs from rows (block_m, block_n, warps, stages[, variant])."""
    return [LaunchConfig(block_m=row[0], block_n=row[1], num_warps=row[2], num_stages=row[3],
                         variant=row[4] if len(row) > 4 else None) for row in rows]


_GPU = {
    "fwd": _configs([
        (16, "16bit", 128, 64, 4, 3), (32, "16bit", 128, 64, 4, 3), (64, "16bit", 128, 128, 8, 3),
        (128, "16bit", 128, 64, 8, 3), (256, "16bit", 64, 32, 8, 2),
        (16, "fp32", 32, 32, 4, 2), (32, "fp32", 32, 32, 4, 2), (64, "fp32", 64, 32, 8, 2),
        (128, "fp32", 32, 16, 8, 2), (256, "fp32", 32, 16, 8, 1),
    ]),
    "dkdv": _configs([
        (16, "16bit", 64, 128, 8, 2), (32, "16bit", 64, 128, 8, 2), (64, "16bit", 64, 128, 8, 2),
        (128, "16bit", 32, 128, 8, 2), (256, "16bit", 16, 32, 4, 1),  # D=256: see NO_TENSOR_CORES
        (16, "fp32", 32, 32, 8, 2), (32, "fp32", 32, 32, 8, 2), (64, "fp32", 32, 32, 8, 2),
        (128, "fp32", 16, 16, 4, 2), (256, "fp32", 16, 32, 8, 1),
    ]),
    "dq": _configs([
        (16, "16bit", 128, 64, 8, 2), (32, "16bit", 128, 64, 8, 2), (64, "16bit", 128, 64, 8, 2),
        (128, "16bit", 128, 32, 8, 2), (256, "16bit", 64, 32, 8, 2),
        (16, "fp32", 32, 32, 8, 2), (32, "fp32", 32, 32, 8, 2), (64, "fp32", 32, 32, 8, 2),
        (128, "fp32", 32, 16, 8, 2), (256, "fp32", 32, 16, 8, 1),
    ]),
}

# Short sequences (at most SHORT_MAX_LEN queries) have their own forward key,
# ``<config_key>_short``: a batch of short sequences has few key blocks per tile, so
# smaller tiles, more programs per SM or a persistent grid may pay off there and not at
# 8k. A table without the short key (the first H200 run's) leaves short sequences on the
# long key's config, tuned or shipped.
SHORT_MAX_LEN = 1024
SHORT = "_short"


# Tuning candidates (gptfast.tune) of the 16-bit fast paths: the shipped config first,
# then the first H200 run's winner where it differs, then the variants (see VARIANTS):
# ``tma`` tiles (the copy engine frees the registers the pointer loads held: the D=64
# forward's 128 x 128 tile drops from about 224 to about 165 a thread, room for deeper
# pipelines), for dK/dV the fused ``tma_atomic_dq`` backward, and persistent grids
# (``*_persistent``; ``_x2`` on tiles small enough for two programs an SM). Every one passes the
# static compile report (wgmma, no spills, shared memory within the sm_90 limit, and the
# TMA loads / fp32 atomics it claims in the SASS). Which is faster is for the device to say.
_CANDIDATE_TILES = {  # kernel -> BLOCK_D -> (block_m, block_n, warps, stages[, variant]), the shipped one first
    "fwd": {64: ((128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 3, "tma"), (128, 64, 8, 3, "tma"),
                 (128, 128, 8, 4, "tma"), (128, 128, 8, 2, "tma"), (128, 64, 4, 3, "tma"),
                 (128, 128, 8, 3, "tma_persistent")),
            128: ((128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3, "tma"), (128, 128, 8, 2, "tma"),
                  (128, 128, 8, 3, "tma"), (128, 64, 8, 4, "tma"), (128, 32, 8, 3, "tma"),
                  (128, 64, 8, 3, "tma_persistent"))},
    # Short sequences (``forward_key``): the long key's shipped tile first (the baseline),
    # then persistent grids and half-height tiles that put two programs on an SM.
    "fwd_short": {64: ((128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 8, 3, "tma_persistent"),
                       (64, 64, 4, 3, "tma_persistent_x2"), (64, 64, 4, 3, "tma"), (64, 128, 4, 3, "tma"),
                       (128, 64, 8, 3, "persistent"), (64, 64, 4, 2, "persistent_x2")),
                  128: ((128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3, "tma_persistent"),
                        (64, 64, 4, 2, "tma_persistent_x2"), (64, 64, 4, 3, "tma"), (64, 128, 4, 2, "tma"),
                        (128, 64, 8, 3, "persistent"), (64, 64, 4, 2, "persistent_x2"))},
    "dkdv": {64: ((64, 128, 8, 2), (32, 64, 4, 2), (64, 128, 8, 2, "tma"), (32, 64, 4, 2, "tma"),
                  (64, 128, 8, 2, "tma_atomic_dq"), (32, 64, 4, 2, "tma_atomic_dq"),
                  (32, 64, 4, 2, "tma_persistent_x2"), (32, 64, 4, 2, "tma_atomic_dq_persistent_x2")),
             128: ((32, 128, 8, 2), (16, 128, 8, 2), (32, 128, 8, 2, "tma"), (64, 64, 8, 2, "tma"),
                   (32, 128, 8, 2, "tma_atomic_dq"), (16, 128, 8, 2, "tma_atomic_dq"),
                   (64, 64, 8, 2, "tma_atomic_dq"),  # (32, 64, 4, 2, tma_atomic_dq) spills at D=128
                   (32, 64, 8, 2, "tma_persistent"))},  # 32 x 128 spills (triton 3.6), 64 x 64 (3.9)
    "dq": {64: ((128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 8, 2, "tma"), (128, 64, 8, 3, "tma"),
                (128, 128, 8, 2, "tma"), (128, 32, 8, 3, "tma"), (64, 64, 4, 2, "tma"), (64, 128, 4, 2, "tma")),
           128: ((128, 32, 8, 2), (128, 64, 8, 2), (128, 32, 8, 2, "tma"), (128, 64, 8, 2, "tma"),
                 (128, 32, 8, 3, "tma"), (64, 64, 8, 2, "tma"), (64, 32, 4, 2, "tma"), (64, 64, 8, 2))},
}
CANDIDATES = {kernel: {f"d{d}_16bit": _candidates(rows) for d, rows in by_d.items()}
              for kernel, by_d in _CANDIDATE_TILES.items() if kernel in _GPU}
CANDIDATES["fwd"].update({f"d{d}_16bit{SHORT}": _candidates(rows) for d, rows in _CANDIDATE_TILES["fwd_short"].items()})

# Under the CPU interpreter: small, unequal tiles, so that tiny test shapes still cross
# several blocks, the diagonal split and the sequence edge.
_INTERPRETER = {
    "fwd": LaunchConfig(block_m=32, block_n=16, num_warps=4, num_stages=1),
    "dkdv": LaunchConfig(block_m=16, block_n=32, num_warps=4, num_stages=1),
    "dq": LaunchConfig(block_m=32, block_n=16, num_warps=4, num_stages=1),
}
DELTA_CONFIG = LaunchConfig(block_m=64, num_warps=4, num_stages=1)

# Code paths of each kernel (LaunchConfig.variant -> its constexpr flags). ``tma``: the
# tiles a loop streams (K and V in the forward and dQ passes; Q and dO in the dK/dV pass)
# and the forward's output come through device-side tensor descriptors (Hopper's copy
# engine: UTMALDG / UTMASTG), not per-thread pointer loads. ``tma_atomic_dq``: that, and the
# dK/dV pass also adds dS K to an fp32 dQ sum with atomics, so no dQ pass runs (see the
# docstring). Inputs a descriptor cannot read fall back to pointer loads (and, for the
# atomic variant, keep the atomics: a path compiled on demand, not in the static report).
#
# The forward and dK/dV passes also have persistent variants (``persistent``,
# ``tma_persistent`` and, for dK/dV, ``tma_atomic_dq_persistent``: one program per SM; the
# same with ``_x2``: two, for tiles of which two fit an SM, which the compile report
# checks): a 1-D grid of ``PROGRAMS_PER_SM[variant]`` programs per SM (never more than
# there are tiles), each looping over tiles longest first (``_persistent_tile``; the
# forward's last query blocks, dK/dV's first key blocks), so no SM idles at the grid's
# tail while another runs a long block, and a program's prologue is paid once per SM
# rather than once per tile.
_PERSISTENT = ("persistent", "tma_persistent", "persistent_x2", "tma_persistent_x2")
PROGRAMS_PER_SM = {**{v: 2 if v.endswith("_x2") else 1 for v in _PERSISTENT},
                   "tma_atomic_dq_persistent": 1, "tma_atomic_dq_persistent_x2": 2}


def _flags(variant, atomic: bool = False) -> types.MappingProxyType:
    """The constexpr flags a variant's name spells."""
    flags = {"USE_TMA": bool(variant) and variant.startswith("tma")}
    if atomic:
        flags["ATOMIC_DQ"] = bool(variant) and "atomic_dq" in variant
    return types.MappingProxyType({**flags, "PERSISTENT": variant in PROGRAMS_PER_SM})  # read-only: shared


VARIANTS = {
    "fwd": {v: _flags(v) for v in (None, "tma", *_PERSISTENT)},
    "dq": {v: types.MappingProxyType({"USE_TMA": v == "tma"}) for v in (None, "tma")},
    "dkdv": {v: _flags(v, atomic=True) for v in (None, "tma", "tma_atomic_dq", *PROGRAMS_PER_SM)},
}


def config_key(head_dim: int, dtype: torch.dtype) -> str:
    """The configuration tables' key of a head size and input dtype, e.g. ``d64_16bit``."""
    return f"d{padded_head_dim(head_dim)}_{'fp32' if dtype == torch.float32 else '16bit'}"


def _select(kernel: str, head_dim: int, dtype: torch.dtype, device: torch.device) -> LaunchConfig:
    if device.type != "cuda":
        return _INTERPRETER[kernel]
    key = config_key(head_dim, dtype)
    return pick(f"causal_attention.{kernel}", key, _GPU[kernel][key], device)


def forward_key(head_dim: int, dtype: torch.dtype, q_len: int) -> str:
    """The forward's tuning key of a launch: ``config_key``, with ``_short`` for q_len <= SHORT_MAX_LEN."""
    key = config_key(head_dim, dtype)
    return key + SHORT if q_len <= SHORT_MAX_LEN else key


def forward_config(head_dim: int, dtype: torch.dtype, device: torch.device, q_len: int = SHORT_MAX_LEN + 1
                   ) -> LaunchConfig:
    """The forward's launch config for ``q_len`` queries: the tuned short-sequence config when
    q_len <= SHORT_MAX_LEN and the device's table has one, else the long key's (tuned or shipped)."""
    cfg = _select("fwd", head_dim, dtype, device)
    if device.type == "cuda" and q_len <= SHORT_MAX_LEN:
        cfg = pick("causal_attention.fwd", forward_key(head_dim, dtype, q_len), cfg, device)
    return cfg


# dK/dV with grouped-query heads loops over the group's query heads around the query loop,
# which costs a few registers: at D=64 the shipped 64 x 128 tile then spills (64 bytes), so
# grouped launches take half the query tile there (139 registers, no spills, wgmma).
GROUPED_DKDV = {"d64_16bit": LaunchConfig(block_m=32, block_n=128, num_warps=8, num_stages=2)}


def dkdv_config(head_dim: int, dtype: torch.dtype, device: torch.device, grouped: bool = False) -> LaunchConfig:
    """The dK/dV launch config; ``grouped``: several query heads share each kv head."""
    key = config_key(head_dim, dtype)
    if grouped and device.type == "cuda" and key in GROUPED_DKDV:
        return GROUPED_DKDV[key]
    return _select("dkdv", head_dim, dtype, device)


def dq_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> LaunchConfig:
    return _select("dq", head_dim, dtype, device)


def shipped_config(kernel: str, head_dim: int, dtype: torch.dtype) -> LaunchConfig:
    """The built-in sm_90 config of ``kernel`` (fwd, dkdv, dq), whatever a tuned table says."""
    return _GPU[kernel][config_key(head_dim, dtype)]


# (kernel, BLOCK_D) of 16-bit paths without a tensor-core config. dK/dV at D=256: wgmma
# needs M >= 64 rows per warpgroup, and the key tile is the M dimension, so BLOCK_N >= 64.
# The dK and dV accumulators then hold 64 x 256 x 2 fp32 values: 128 registers a thread
# at 8 warps before K, V, P^T and dS^T are counted, past ptxas' 255 (every 8-warp
# candidate compiled for sm_90 spills, the best (16, 64, 8 warps, 2 stages) 96 bytes);
# 16 warps cap a thread at 128 registers and spill more. It keeps a small pre-Hopper tile
# (no wgmma) until dK and dV are computed in separate passes.
NO_TENSOR_CORES = {("dkdv", 256)}

# ----------------------------------------------------------------------------- launchers


def _unit_stride_d(t: torch.Tensor) -> torch.Tensor:
    """The kernels assume stride 1 along the head dimension; any other strides are free."""
    return t if t.shape[-1] == 1 or t.stride(-1) == 1 else t.contiguous()


def _dot_flags(dtype: torch.dtype, device: torch.device):
    """(DOT_FP32, DOT_PRECISION): widen dots to fp32 under the interpreter; exact fp32 dots."""
    return device.type != "cuda", ("ieee" if dtype == torch.float32 else "tf32")


def _bht(t: torch.Tensor):
    """Batch, head and time strides of a (B, H, T, D) tensor (one call for all: each
    ``stride(i)`` call costs as much as the whole tuple)."""
    return t.stride()[:3]


@functools.lru_cache(maxsize=256)
def _tiles(cfg: LaunchConfig, head_dim: int, device: torch.device, dtype: torch.dtype) -> types.MappingProxyType:
    """The tile constexprs and launch options of one kernel launch (cached: launches spread
    the dict into keywords and never change it)."""
    dot_fp32, dot_precision = _dot_flags(dtype, device)
    return types.MappingProxyType(dict(
        HEAD_DIM=head_dim, BLOCK_D=padded_head_dim(head_dim), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        DOT_FP32=dot_fp32, DOT_PRECISION=dot_precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages))


@functools.lru_cache(maxsize=512)
def _constexprs(kernel: str, cfg: LaunchConfig, head_dim: int, device: torch.device, dtype: torch.dtype,
                use_tma: bool, has_positions: bool, has_key_start: bool, store_lse=None) -> types.MappingProxyType:
    """Every keyword of one main-loop launch (tiles and options, the variant's flags with
    USE_TMA as ``_use_tma`` decided, the position flags, STORE_LSE for the forward) in one
    cached mapping: spreading one mapping into a call costs a third of spreading three."""
    kwargs = {**_tiles(cfg, head_dim, device, dtype), **variant_flags(kernel, cfg), "USE_TMA": use_tma,
              **_POSITION_FLAGS[has_positions, has_key_start]}
    if store_lse is not None:
        kwargs["STORE_LSE"] = store_lse
    return types.MappingProxyType(kwargs)


def variant_flags(kernel: str, cfg: LaunchConfig) -> types.MappingProxyType:
    """The constexpr flags (USE_TMA, and ATOMIC_DQ for dkdv) of ``cfg.variant`` (a shared,
    read-only mapping); ValueError for a variant the kernel does not have."""
    known = VARIANTS[kernel]
    flags = known.get(cfg.variant)
    if flags is None:
        raise ValueError(f"causal_attention.{kernel}: unknown variant {cfg.variant!r} "
                         f"(known: {sorted(v for v in known if v)} or None)")
    return flags


def _tma_ready(*tensors) -> bool:
    """Whether the tensor copy engine can read these (B, H, T, D) tensors: a 16-byte aligned
    start and batch, head and time strides that are multiples of 16 bytes (a descriptor's
    rule), on a Hopper or later GPU or under the interpreter. Otherwise the launch takes
    the pointer loads of the same tiles."""
    t0 = tensors[0]
    if t0.device.type == "cuda" and _major_capability(cuda_index(t0.device)) < 9:
        return False
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or any((s * size) % 16 for s in _bht(t)):
            return False
    return True


@functools.lru_cache(maxsize=None)
def _major_capability(device_index: int) -> int:
    """The compute capability's major number of a CUDA device (asked once: microseconds a call)."""
    return torch.cuda.get_device_capability(device_index)[0]


def _tma_allocator(size: int, alignment: int, stream):
    """Global scratch for the descriptors the kernels build on the device (128 bytes each)."""
    return torch.empty(size, dtype=torch.int8, device="cuda" if torch.cuda.is_available() else "cpu")


def _use_tma(flags: dict, *tensors) -> dict:
    """``flags`` with USE_TMA cleared where ``_tma_ready`` says no. A TMA launch needs
    triton's allocator (device-side descriptors live in global scratch): installed here
    unless the program set its own."""
    if flags["USE_TMA"]:
        if not _tma_ready(*tensors):
            return {**flags, "USE_TMA": False}
        from triton.runtime import _allocation

        if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            triton.set_allocator(_tma_allocator)
    return flags


# SMs a persistent launch assumes under the CPU interpreter: few, so that the tests' small
# shapes give every program several tiles (and a partial last round).
INTERPRETER_SMS = 2


def persistent_programs(tiles: int, variant: str, device: torch.device) -> int:
    """The grid of a persistent forward: ``PROGRAMS_PER_SM[variant]`` programs per SM
    (``INTERPRETER_SMS`` off CUDA), at most one per tile."""
    sms = sm_count(device) if device.type == "cuda" else INTERPRETER_SMS
    return max(1, min(tiles, PROGRAMS_PER_SM[variant] * sms))


def _position_stride(q_positions) -> int:
    """The kernels' ``stride_pos_b``: the batch stride of a (B, Tq) position tensor; 0 for a
    (Tq,) one (every row reads the same positions) or none."""
    return q_positions.stride(0) if q_positions is not None and q_positions.dim() == 2 else 0


_POSITION_FLAGS = {(p, s): types.MappingProxyType(dict(Q_START_TENSOR=p, HAS_KEY_START=s))
                   for p in (False, True) for s in (False, True)}


def _position_pointers(q, q_positions, key_start):
    """``(Q_START, KEY_START)``: the kernels' position pointers (their constexpr flags are
    ``_POSITION_FLAGS``). An absent one is replaced by q (never read: its flag is off)."""
    return q if q_positions is None else q_positions, q if key_start is None else key_start.contiguous()


def attention_forward(q, k, v, scale: float, q_offset: int = 0, *, q_positions=None, key_start=None,
                      out=None, lse=None, config=None, store_lse=True):
    """Launch the forward kernel. Returns ``(out, lse)``: out (B, H, Tq, D) in q's dtype
    (contiguous), lse (B, H, Tq) fp32, the base-2 log-sum-exp of ``scale * log2(e) * q.k``
    (+inf for a query that sees no key, i.e. before its row's ``key_start``); lse is None
    with ``store_lse=False`` (inference: no backward reads it, so it is neither allocated
    nor written).

    k, v: (B, H_kv, Tk, D), H_kv dividing H. ``q_positions`` ((Tq,) consecutive integer
    positions on the device, or (B, Tq): each row's own) replaces ``q_offset`` by its (row's)
    first element, read in the kernel; keys past a row's last query are then never read. ``key_start`` ((B,) integers on
    the device): row b's keys before it are invisible and never read, its queries before it
    output 0.

    Inputs are assumed validated (gptfast.ops.causal_attention does it). ``out``/``lse`` may be
    preallocated (``lse`` with ``store_lse=False`` is refused: nothing would write it);
    ``config`` (a LaunchConfig) overrides the table's choice.
    """
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = _unit_stride_d(q), _unit_stride_d(k), _unit_stride_d(v)
    batch, heads, q_len, head_dim = q.shape
    device, dtype = q.device, q.dtype
    out = check_out("causal_attention", "out", out, q.shape, dtype, device)
    if store_lse:
        lse = check_out("causal_attention", "lse", lse, (batch, heads, q_len), torch.float32, device, contiguous=True)
    elif lse is not None:  # a buffer that would silently stay unwritten
        raise ValueError("causal_attention: lse was given with store_lse=False, which writes no log-sum-exp")
    cfg = config or forward_config(head_dim, dtype, device, q_len)
    flags = _use_tma(variant_flags("fwd", cfg), q, k, v, out)
    q_start, key_start_ptr = _position_pointers(q, q_positions, key_start)
    grid = (batch * heads, cdiv(q_len, cfg.block_m))
    if flags["PERSISTENT"]:
        grid = (persistent_programs(grid[0] * grid[1], cfg.variant, device),)
    with device_guard(device):
        launch(_attn_fwd_kernel, grid,
            q, k, v, out, lse if store_lse else out, q_start, key_start_ptr,
            *_bht(q), *_bht(k), *_bht(v), *_bht(out),
            heads, heads // k.shape[1], q_len, q_offset, _position_stride(q_positions), scale * LOG2E, batch * heads,
            **_constexprs("fwd", cfg, head_dim, device, dtype, flags["USE_TMA"], q_positions is not None,
                          key_start is not None, store_lse),
        )
    return out, lse if store_lse else None


def attention_backward(grad_out, q, k, v, out, lse, scale: float, q_offset: int = 0, *, q_positions=None,
                       key_start=None, dq=None, dk=None, dv=None, delta=None, dkdv_cfg=None, dq_cfg=None):
    """Launch the backward kernels (delta, dK/dV, then dQ: its own pass, or the conversion of
    the fp32 sums the dK/dV pass added up with the ``tma_atomic_dq`` variant, which needs the
    fp32 scratch ``dq_acc``). Returns ``(dq, dk, dv)``, contiguous, in the
    inputs' dtype and shapes (dk, dv with the kv heads: each sums its group's query heads;
    zero at keys no query sees). ``out`` and ``lse`` are what attention_forward returned
    for the same ``q_offset`` / ``q_positions`` / ``key_start``.
    Output buffers (and the fp32 ``delta`` scratch of shape (B, H, Tq)) may be preallocated;
    ``dkdv_cfg`` / ``dq_cfg`` (LaunchConfigs) override the table's choices.
    """
    if grad_out.stride(-1) != 1 or q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 or out.stride(-1) != 1:
        grad_out, q, k, v, out = (_unit_stride_d(t) for t in (grad_out, q, k, v, out))
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    lse = lse.contiguous()
    op, device, dtype = "causal_attention", q.device, q.dtype
    dq = check_out(op, "dq", dq, q.shape, dtype, device)
    dk = check_out(op, "dk", dk, k.shape, dtype, device)
    dv = check_out(op, "dv", dv, v.shape, dtype, device)
    delta = check_out(op, "delta", delta, (batch, heads, q_len), torch.float32, device, contiguous=True)
    kv_cfg = dkdv_cfg or dkdv_config(head_dim, dtype, device, grouped=kv_heads != heads)
    q_cfg = dq_cfg or dq_config(head_dim, dtype, device)
    kv_flags = _use_tma(variant_flags("dkdv", kv_cfg), q, grad_out)
    kv_grid = (batch * kv_heads, cdiv(kv_len, kv_cfg.block_n))
    if kv_flags["PERSISTENT"]:
        kv_grid = (persistent_programs(kv_grid[0] * kv_grid[1], kv_cfg.variant, device),)
    atomic = kv_flags["ATOMIC_DQ"]
    # The atomic variants sum dQ in fp32 (B * H, Tq, D), cleared by the delta kernel.
    dq_acc = empty((batch * heads, q_len, head_dim), torch.float32, device) if atomic else delta
    starts = _position_pointers(q, q_positions, key_start)
    has_positions, has_key_start = q_positions is not None, key_start is not None
    pos_stride = _position_stride(q_positions)
    block_d = padded_head_dim(head_dim)
    with device_guard(device):
        launch(_attn_bwd_delta_kernel, (batch * heads, cdiv(q_len, DELTA_CONFIG.block_m)),
            out, grad_out, delta, dq_acc, *_bht(out), *_bht(grad_out), heads, q_len,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=DELTA_CONFIG.block_m, ZERO_DQ=atomic,
            num_warps=DELTA_CONFIG.num_warps,
        )
        launch(_attn_bwd_dkdv_kernel, kv_grid,
            q, k, v, grad_out, lse, delta, dk, dv, dq_acc, *starts,
            *_bht(q), *_bht(k), *_bht(v), *_bht(grad_out), *_bht(dk), *_bht(dv),
            kv_heads, heads // kv_heads, q_len, kv_len, q_offset, pos_stride, scale * LOG2E, scale, batch * kv_heads,
            **_constexprs("dkdv", kv_cfg, head_dim, device, dtype, kv_flags["USE_TMA"], has_positions, has_key_start),
        )
        if atomic:
            launch(_attn_bwd_dq_convert_kernel, (batch * heads, cdiv(q_len, DELTA_CONFIG.block_m)),
                dq_acc, dq, *_bht(dq), heads, q_len, scale,
                HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=DELTA_CONFIG.block_m, num_warps=DELTA_CONFIG.num_warps,
            )
        else:
            launch(_attn_bwd_dq_kernel, (batch * heads, cdiv(q_len, q_cfg.block_m)),
                q, k, v, grad_out, lse, delta, dq, *starts,
                *_bht(q), *_bht(k), *_bht(v), *_bht(grad_out), *_bht(dq),
                heads, heads // kv_heads, q_len, q_offset, pos_stride, scale * LOG2E, scale,
                **_constexprs("dq", q_cfg, head_dim, device, dtype, _use_tma(variant_flags("dq", q_cfg), k, v)["USE_TMA"],
                              has_positions, has_key_start),
            )
    return dq, dk, dv


# ----------------------------------------------------------------------------- static compile

_KERNELS = {"fwd": ("attention_fwd", _attn_fwd_kernel), "dkdv": ("attention_bwd_dkdv", _attn_bwd_dkdv_kernel),
            "dq": ("attention_bwd_dq", _attn_bwd_dq_kernel)}


_FIXED_POINTERS = {"LSE": "*fp32", "DELTA": "*fp32", "DQ_ACC": "*fp32", "Q_START": "*i64", "KEY_START": "*i64"}

# An fp32 atomic add to global memory: ATOMG when its old value is used (triton 3.6 emits it
# either way), REDG when not (triton 3.9 for the dQ sums); the report counts either.
FP32_GLOBAL_ADD = "ATOMG.E.ADD.F32|REDG.E.ADD.F32"
# What the SASS of a variant must show: the tensor-memory copies (TMA loads; the forward
# also stores its output with one) and, for the atomic dQ, fp32 atomic adds to global memory.
_VARIANT_SASS = {"USE_TMA": ("UTMALDG",), "ATOMIC_DQ": (FP32_GLOBAL_ADD,), "PERSISTENT": ()}
# A persistent grid has no opcode of its own to claim.
_VARIANT_SASS_FWD = {"USE_TMA": ("UTMALDG", "UTMASTG"), "PERSISTENT": ()}


def _pointers(fn, dtype: torch.dtype) -> dict:
    """Tensors are the upper-case arguments: LSE and DELTA fp32, the positions int64, the
    others in ``dtype``."""
    return {a: _FIXED_POINTERS.get(a, pointer(dtype)) for a in fn.arg_names if a.isupper()}


def _entry(kernel: str, head_dim: int, dtype: torch.dtype, cfg: LaunchConfig, suffix: str = "", require_ptx=(),
           positions: bool = False, gqa: bool = False, row_positions: bool = False):
    """The static compile entry of one main-loop kernel launch on CUDA; ``positions``: the
    launch with a (Tq,) position tensor (batch stride 0) and per-row key starts (a padded
    prefill over a cache); ``row_positions``: the launch with a (B, Tq) position tensor and
    no key starts (a speculative verify step), whose batch stride (Tq) is no multiple of 16."""
    name, fn = _KERNELS[kernel]
    flags = variant_flags(kernel, cfg)
    # The launcher's own keywords (the forward as training runs it: storing the
    # log-sum-exp), less the launch options.
    launch_kwargs = _constexprs(kernel, cfg, head_dim, torch.device("cuda"), dtype, flags["USE_TMA"],
                                positions or row_positions, positions, True if kernel == "fwd" else None)
    constexprs = {k: v for k, v in launch_kwargs.items() if k not in ("num_warps", "num_stages")}
    claims = _VARIANT_SASS_FWD if kernel == "fwd" else _VARIANT_SASS
    require_sass = tuple(i for flag, on in flags.items() if on for i in claims[flag])
    if not gqa:  # a launch with one query head per kv head specialises group == 1 (Triton's JIT does)
        constexprs["group"] = 1
    strides = [a for a in fn.arg_names if a.startswith("stride") and a not in constexprs]
    entry = static_entry(f"{name}_d{head_dim}_{TRITON_TYPE[dtype]}{suffix}", fn, cfg, constexprs,
                        pointers=_pointers(fn, dtype), floats=("qk_scale", "sm_scale"),
                        divisible_by_16=[a for a in strides if not (row_positions and a == "stride_pos_b")],
                        require_hgmma=(dtype != torch.float32
                                       and (kernel, padded_head_dim(head_dim)) not in NO_TENSOR_CORES),
                        require_ptx=require_ptx, require_sass=require_sass)
    if PROGRAMS_PER_SM.get(cfg.variant, 1) > 1:  # the report checks that so many fit an SM
        entry["programs_per_sm"] = PROGRAMS_PER_SM[cfg.variant]
    return entry


# Variants whose shipped tile spills get another one in the static report (and should in
# the candidates): the persistent dK/dV loop at D=128 costs registers the 32 x 128 tile has
# not got to spare.
VARIANT_TILES = {("dkdv", 128, "tma_persistent"): LaunchConfig(block_m=32, block_n=64, num_warps=8, num_stages=2),
                 ("dkdv", 128, "tma_atomic_dq_persistent"): LaunchConfig(block_m=16, block_n=128, num_warps=8,
                                                                         num_stages=2)}


def static_configs(dtype: torch.dtype = torch.bfloat16, head_dims=(64, 128, 256)):
    """The shipped sm_90 configurations (bf16, head sizes 64, 128 and 256 by default) of the
    forward, dK/dV and dQ kernels (main loops on wgmma, but see NO_TENSOR_CORES), their
    variants (VARIANTS) on the same tiles (or VARIANT_TILES) at D 64 and 128, the delta
    preprocess and the dQ conversion of the atomic backward."""
    entries = []
    for head_dim in head_dims:
        for kernel in _KERNELS:
            entries.append(_entry(kernel, head_dim, dtype, shipped_config(kernel, head_dim, dtype)))
            if head_dim in (64, 128):  # the padded / cached-prefill launch (GQA changes no constexpr)
                entries.append(_entry(kernel, head_dim, dtype, shipped_config(kernel, head_dim, dtype),
                                      "_positions", positions=True))
                grouped = GROUPED_DKDV.get(config_key(head_dim, dtype)) if kernel == "dkdv" else None
                entries.append(_entry(kernel, head_dim, dtype, grouped or shipped_config(kernel, head_dim, dtype),
                                      "_gqa_positions", positions=True, gqa=True))
                entries.append(_entry(kernel, head_dim, dtype, shipped_config(kernel, head_dim, dtype),
                                      "_row_positions", row_positions=True))
                # The variants on the shipped tiles, plain and with key ranges over a cache
                # (the masked blocks near key_start keep pointer loads there).
                for variant in VARIANTS[kernel]:  # (x2 persistent variants: the same code as x1)
                    if variant and PROGRAMS_PER_SM.get(variant) != 2:
                        tiles = VARIANT_TILES.get((kernel, head_dim, variant))
                        cfg = dataclasses.replace(tiles or shipped_config(kernel, head_dim, dtype), variant=variant)
                        entries.append(_entry(kernel, head_dim, dtype, cfg, f"_{variant}"))
                        entries.append(_entry(kernel, head_dim, dtype, cfg, f"_{variant}_positions", positions=True))
        fn = _attn_bwd_delta_kernel
        for zero_dq in (False, True):
            entries.append(static_entry(
                f"attention_bwd_delta_d{head_dim}_{TRITON_TYPE[dtype]}{'_zero_dq' if zero_dq else ''}", fn,
                DELTA_CONFIG, {"HEAD_DIM": head_dim, "BLOCK_D": padded_head_dim(head_dim),
                               "BLOCK_M": DELTA_CONFIG.block_m, "ZERO_DQ": zero_dq},
                pointers=_pointers(fn, dtype)))
        fn = _attn_bwd_dq_convert_kernel
        entries.append(static_entry(
            f"attention_bwd_dq_convert_d{head_dim}_{TRITON_TYPE[dtype]}", fn, DELTA_CONFIG,
            {"HEAD_DIM": head_dim, "BLOCK_D": padded_head_dim(head_dim), "BLOCK_M": DELTA_CONFIG.block_m},
            pointers=_pointers(fn, dtype), floats=("sm_scale",)))
    return entries


def candidate_configs():
    """Static compile entries of the tuning candidates that are not the shipped config."""
    entries = {}
    for kernel, by_key in CANDIDATES.items():
        for key, configs in by_key.items():
            head_dim = int(key[1:].split("_")[0])
            shipped = shipped_config(kernel, head_dim, torch.bfloat16)
            for cfg in configs:  # a tile in both the long and the short list compiles once
                name = f"{_KERNELS[kernel][0]}_d{head_dim}_cand_{cfg.tag()}"
                if cfg != shipped and name not in entries:
                    entries[name] = _entry(kernel, head_dim, torch.bfloat16, cfg, f"_cand_{cfg.tag()}")
    return list(entries.values())


def precision_configs():
    """fp32 forwards, whose softmax normalisation must round to nearest (``div.rn.f32``)."""
    return [_entry("fwd", head_dim, torch.float32, shipped_config("fwd", head_dim, torch.float32),
                   require_ptx=("div.rn.f32",)) for head_dim in (64, 128)]
