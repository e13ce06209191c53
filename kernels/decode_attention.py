"""Decode attention over a KV cache on the tensor cores, split along the cache length
(flash-decoding).

At decode time each (batch row, query head) has ONE query and a cache of up to S keys and
values; with grouped-query attention the ``G = H / H_kv`` query heads of a group share one
kv head. The work is reading the cache: per step ``2 * B * H_kv * S * D`` elements (K and
V) against ``4 * B * H * S * D`` flops, i.e. ``G`` multiply-adds per loaded element. At
bf16 that is ``G`` flops per byte: even G = 8 (8 flops/byte x 4.8 TB/s = 38 TFLOP/s) is
far below the tensor cores' ~800 TFLOP/s, so the step's limit is the bytes:
``t >= 4 * B * H_kv * S * D / bandwidth`` (bf16; e.g. B8 H_kv 8 S32k D128: 1.07 GB,
224 us at the H200's nominal 4.8 TB/s; B8 H_kv 32: 4.3 GB, 0.9 ms). Everything
here serves that bound: read each K/V byte once, keep enough bytes in flight, fill the
chip.

**The group on the tensor cores (transposed products).** One program serves one kv head
of one row and ALL its group's queries, so every K/V block is loaded once. The group is
the narrow side of two ``tl.dot``s, with the keys (and the head size) as the wide side:

    S^T (BLOCK_N, BLOCK_G) = K_blk (BLOCK_N, D) @ Q^T (D, BLOCK_G)
    O^T (D, BLOCK_G)      += V_blk^T (D, BLOCK_N) @ P^T (BLOCK_N, BLOCK_G)

``BLOCK_G`` is the group padded to at least 16 (padding queries are zero; their columns
are computed and never stored). Hopper's warpgroup MMA (HGMMA, ``m64nNk16``) needs M >= 64
and takes N down to 8: with the keys as M (BLOCK_N >= 64) and the head size as M of the
second product (D >= 64) both products run as HGMMA whatever the group, where putting the
G queries as M would pad them to 64 rows (64/G times the tensor work). Multi-head decode
(G = 1) runs the same kernel: 15/16 of its tensor-core work is padding, 16 flops per
loaded byte, still far from the limit; what it gains is the point of the design:
**loads that feed a ``tl.dot`` are software-pipelined** by Triton (``num_stages`` copies
of the K and V blocks in flight through shared memory, cp.async), so each program keeps
``(num_stages - 1) * 2 * BLOCK_N * D * 2`` bytes (bf16) in flight instead of one block
(elementwise products, which the pipeliner leaves alone, made the previous kernel wait on
DRAM latency every block).

**Bytes in flight.** Little's law: 4.8 TB/s x ~1 us of DRAM latency = ~4.8 MB in flight
chip-wide, ~36 KB per SM. The built-in D=128 config (BLOCK_N 64, 3 stages) holds 2 x 32 KB
per program; two programs fit per SM (96 KB of shared memory each), so ~128 KB per SM.

**Splits.** The cache length is cut into ``num_splits`` contiguous chunks (grid
``(B * H_kv, num_splits)``) so that there are about ``PROGRAMS_PER_SM`` programs per SM
(``choose_num_splits``: from the cache length, B * H_kv and the SM count):

1. ``_decode_split_kernel``: the program for chunk ``c`` of row ``b``, kv head ``h`` runs
   the online softmax (fp32, base 2) over the keys of its chunk that are valid for the row
   (positions ``< cache_lens[b]``, and ``>= key_start[b]`` with key ranges) and writes,
   per query head of the group, its normalised partial output ``o_c`` (fp32) and its
   log-sum-exp ``lse_c`` (base 2). A chunk with no valid key reads no cache and writes
   ``o_c = 0``, ``lse_c = -inf``.
2. ``_decode_reduce_kernel``: one program per (row, query head) merges the splits:
   ``out = sum_c 2^(lse_c - M) o_c / sum_c 2^(lse_c - M)``, ``M = max_c lse_c`` (a row
   with no key at all, possible only with key ranges, outputs 0). It reads
   ``B * H * splits * (D + 1)`` fp32 values: noise next to the cache.

**One pass.** When one split suffices (short caches: ``S <= ONE_PASS_MAX_KEYS``, or a
batch that fills the chip alone) the split kernel normalises and writes the output itself
(``ONE_PASS``): one launch, no workspace. GPT-2's step (B1 H12 S1024 D64) reads 3 MB; it
is bound by launch and latency, not bandwidth, so one launch beats a split.

Precision: 16-bit caches feed the tensor cores in their dtype with fp32 accumulation
(P is rounded to the cache dtype before P @ V, as in flash attention); fp32 caches use
IEEE fp32 products (``input_precision="ieee"``, never TF32) and round-to-nearest division.

Cache lengths are read from device memory by the kernels (no host synchronisation), and
every allocation depends only on shapes, so the launch can be captured in a CUDA graph.
Lengths outside ``[1, S]`` are clamped into it in the kernel, so the kernel never reads
outside the cache; the op layer (``gptfast.ops.decode_attention``) reports such lengths as
errors where checking them is cheap.

Launchers assume validated inputs; ``gptfast.ops.decode_attention`` is the public face.
"""
import functools

import torch
import triton
import triton.language as tl

from ._common import (cdiv, next_power_of_2, DEFAULT_NUM_SMS, LOG2E, LaunchConfig, check_out, device_guard, div, empty,
                      launch, padded_head_dim,
                      pointer, sm_count, static_entry, TRITON_TYPE)
from ._tuned import pick

# Split heuristic (see ``choose_num_splits``).
PROGRAMS_PER_SM = 4  # target total programs per SM: about two resident at a time, in about two waves
MIN_KEYS_PER_SPLIT = 512  # below this a split's fixed cost (q load, pipeline fill, partial write) dominates
MAX_SPLITS = 64  # bounds the reduction kernel's tile (BLOCK_SPLITS x BLOCK_D registers)
ONE_PASS_MAX_KEYS = 1024  # caches this short run in one pass: one launch beats any split
MIN_BLOCK_G = 16  # the group is padded to this many query columns (the N of the products)
# Shared memory of the split kernel's pipelined K and V blocks (``_builtin_split``).
STAGE_BUDGET = 112 * 1024  # per program, so that two programs fit on one SM (228 KB)
MAX_STAGE_BYTES = 192 * 1024  # one program alone on an SM


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b on the tensor cores; IEEE fp32 products (no TF32) for fp32 operands."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _decode_split_kernel(
    Q, K, V, LENS, KEY_START, O_PART, LSE_PART, OUT,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_lens,
    stride_ob, stride_oh, stride_od,
    H_KV, GROUP, S, CHUNK,
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of two >= HEAD_DIM; the extra lanes are masked
    BLOCK_N: tl.constexpr,  # keys per loop iteration (M of S^T = K Q^T); CHUNK is a multiple of it
    BLOCK_G: tl.constexpr,  # the group's query heads, padded to >= MIN_BLOCK_G (N of both products)
    HAS_KEY_START: tl.constexpr,
    ONE_PASS: tl.constexpr,  # one split: write the normalised output to OUT (O_PART, LSE_PART unused)
):
    pid_bkv = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    # int64 so that b * stride_kb cannot overflow for a large (max_batch, H, max_seq, D) cache.
    b = (pid_bkv // H_KV).to(tl.int64)
    kvh = (pid_bkv % H_KV).to(tl.int64)
    IEEE: tl.constexpr = K.dtype.element_ty == tl.float32

    # This row's valid length, clamped into [1, S] so that no load leaves the cache.
    # (Clamped before narrowing, so a huge int64 length cannot wrap around to a small one.)
    cache_len = tl.load(LENS + b * stride_lens)
    cache_len = tl.minimum(tl.maximum(cache_len, 1), S).to(tl.int32)
    # This program's keys: [lo, hi), from the row's key_start on. Empty (hi <= lo) when the
    # chunk lies wholly before key_start or past cache_len.
    lo = split * CHUNK
    if HAS_KEY_START:
        key_start = tl.load(KEY_START + b)
        lo = tl.maximum(lo, tl.minimum(tl.maximum(key_start, 0), S).to(tl.int32))
    hi = tl.minimum(split * CHUNK + CHUNK, cache_len)

    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    offs_n = tl.arange(0, BLOCK_N)
    offs_g = tl.arange(0, BLOCK_G)
    g_mask = offs_g < GROUP
    heads = kvh * GROUP + offs_g  # the query heads of this kv head's group (and padding)

    # Q^T (BLOCK_D, BLOCK_G) in the cache dtype; padding columns are 0 (finite scores, never stored).
    qt = tl.load(Q + b * stride_qb + heads[None, :] * stride_qh + offs_d[:, None] * stride_qd,
                 mask=d_mask[:, None] & g_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D, BLOCK_G], dtype=tl.float32)  # O^T, unnormalised
    # Loop-invariant offsets inside one (BLOCK_N, BLOCK_D) block; the scalar base pointers
    # advance instead (64-bit pointer arithmetic, so long caches with big strides are safe).
    k_offs = offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd
    v_offs = offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd
    k_block = K + b * stride_kb + kvh * stride_kh + lo.to(tl.int64) * stride_ks
    v_block = V + b * stride_vb + kvh * stride_vh + lo.to(tl.int64) * stride_vs
    for start_n in range(lo, hi, BLOCK_N):
        n_mask = (start_n + offs_n) < hi
        # Masked loads never touch positions >= hi: stale entries (even NaN) stay unread.
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_block + k_offs, mask=kv_mask, other=0.0)
        s = _dot(k, qt, tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.float32), IEEE)  # S^T: keys x queries
        s = tl.where(n_mask[:, None], s * qk_scale, float("-inf"))  # base 2
        # Every block in the loop holds at least one valid key, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old max
        p = tl.exp2(s - m_new[None, :])
        l_i = l_i * alpha + tl.sum(p, axis=0)
        v = tl.load(v_block + v_offs, mask=kv_mask, other=0.0)
        acc = _dot(tl.trans(v), p.to(v.dtype), acc * alpha[None, :], IEEE)
        m_i = m_new
        k_block += BLOCK_N * stride_ks
        v_block += BLOCK_N * stride_vs

    # An empty chunk has l_i == 0: it holds acc == 0 (and writes lse = -inf).
    has_keys = l_i > 0.0
    o = div(acc, tl.where(has_keys, l_i, 1.0)[None, :], K.dtype.element_ty == tl.float32)
    store_mask = d_mask[:, None] & g_mask[None, :]
    if ONE_PASS:
        tl.store(OUT + b * stride_ob + heads[None, :] * stride_oh + offs_d[:, None] * stride_od,
                 o.to(OUT.dtype.element_ty), mask=store_mask)
    else:
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        part = (b * H_KV * GROUP + heads) * num_splits + split  # (BLOCK_G,) per query head
        tl.store(O_PART + part[None, :] * HEAD_DIM + offs_d[:, None], o, mask=store_mask)
        tl.store(LSE_PART + part, lse, mask=g_mask)


@triton.jit
def _decode_reduce_kernel(
    O_PART, LSE_PART, OUT,
    stride_ob, stride_oh, stride_od,
    H, NUM_SPLITS,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,  # next power of two >= NUM_SPLITS
    HAS_KEY_START: tl.constexpr,  # a row may have no key at all (key_start >= its length)
):
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    part = pid_bh.to(tl.int64) * NUM_SPLITS + offs_s

    lse = tl.load(LSE_PART + part, mask=offs_s < NUM_SPLITS, other=float("-inf"))
    # Finite without key ranges: split 0 always covers position 0. With them no split may
    # have seen a key (a row whose key_start is at or past its length): every weight is
    # then 0 and the row outputs 0.
    lse_max = tl.max(lse, axis=0)
    if HAS_KEY_START:
        lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weight = tl.exp2(lse - lse_max)  # 0 for empty and padding splits
    # Only splits that saw keys are read, so an empty split can never inject NaN.
    o_mask = (lse > float("-inf"))[:, None] & d_mask[None, :]
    o = tl.load(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], mask=o_mask, other=0.0)
    acc = tl.sum(weight[:, None] * o, axis=0)
    total = tl.sum(weight, axis=0)
    if HAS_KEY_START:
        total = tl.where(total > 0.0, total, 1.0)
    out = div(acc, total, OUT.dtype.element_ty == tl.float32)
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_d * stride_od,
             out.to(OUT.dtype.element_ty), mask=d_mask)


@functools.lru_cache(maxsize=None)
def _builtin_split(head_dim: int, itemsize: int = 2) -> LaunchConfig:
    """64 keys per block (M of the first product: HGMMA needs >= 64), one warpgroup, and as
    many stages (up to 4) as fit in STAGE_BUDGET bytes of shared memory, so that
    (num_stages - 1) K and V blocks are in flight: 3 stages of 2 x 16 KB for bf16 D=128
    (two programs per SM), 4 of 2 x 8 KB at D=64. Blocks too big for two stages in that
    budget (fp32, D=256) take at least 2 stages in a whole SM's worth, halving the key
    block where even that does not fit.
    """
    block_d, block_n = padded_head_dim(head_dim), 64
    while block_n > 16 and 2 * 2 * block_n * block_d * itemsize > MAX_STAGE_BYTES:
        block_n //= 2
    stage_bytes = 2 * block_n * block_d * itemsize  # one K block and one V block
    stages = min(4, STAGE_BUDGET // stage_bytes)
    if stages < 2:
        stages = 2 if 2 * stage_bytes <= MAX_STAGE_BYTES else 1
    return LaunchConfig(block_n=block_n, num_warps=4, num_stages=stages)


def config_key(head_dim: int, dtype: torch.dtype) -> str:
    """The configuration tables' key of a head size and cache dtype, e.g. ``d64_16bit``."""
    return f"d{padded_head_dim(head_dim)}_{'fp32' if dtype == torch.float32 else '16bit'}"


def split_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> LaunchConfig:
    """block_n, num_warps and num_stages of the split kernel: the device's tuned config, else
    the built-in one."""
    builtin = _builtin_split(head_dim, dtype.itemsize)
    if device.type != "cuda":
        return builtin
    return pick("decode_attention.split", config_key(head_dim, dtype), builtin, device)


def block_sizes(head_dim: int):
    """(BLOCK_D, BLOCK_N, num_warps) of the built-in split config for a head size."""
    cfg = _builtin_split(head_dim)
    return padded_head_dim(head_dim), cfg.block_n, cfg.num_warps


# Tuning candidates (gptfast.tune) of the split kernel, 16-bit caches: the built-in config
# first. Every one passes the static compile report (no spills, HGMMA).
CANDIDATES = {"split": {
    f"d{d}_16bit": [LaunchConfig(block_n=n, num_warps=w, num_stages=s) for n, w, s in rows] for d, rows in (
        (64, ((64, 4, 4), (64, 4, 3), (128, 4, 3), (128, 4, 4), (64, 4, 6), (128, 8, 3))),
        (128, ((64, 4, 3), (64, 4, 4), (64, 4, 2), (128, 4, 2), (128, 4, 3), (128, 8, 2))),
    )}}


def reduce_num_warps(block_d: int) -> int:
    """The reduction holds a (BLOCK_SPLITS, BLOCK_D) fp32 tile: 8 warps past D=128."""
    return 4 if block_d <= 128 else 8


def choose_num_splits(batch_heads: int, seq_len: int, sms: int = DEFAULT_NUM_SMS) -> int:
    """How many chunks to cut the cache length into; ``batch_heads`` = B * H_kv (programs
    per split).

    Caches up to ONE_PASS_MAX_KEYS keys take one split (one launch: short steps are bound
    by launches and latency). Longer ones aim for about PROGRAMS_PER_SM programs per SM in
    total (B * H_kv * splits ~= 4 * SMs): with about two programs resident per SM (shared
    memory) that is two waves, each program with its pipelined K and V blocks in flight.
    So batch 1 with 12 heads at 32k runs 12 x 44 programs, while B * H_kv >= 4 * SMs
    needs no split at all. Each split keeps at least MIN_KEYS_PER_SPLIT keys, and there
    are at most MAX_SPLITS. Depends on shapes only (CUDA-graph safe).
    """
    if seq_len <= ONE_PASS_MAX_KEYS:
        return 1
    wanted = cdiv(PROGRAMS_PER_SM * sms, max(batch_heads, 1))
    return max(1, min(wanted, MAX_SPLITS, cdiv(seq_len, MIN_KEYS_PER_SPLIT)))


def split_plan(seq_len: int, num_splits: int, block_n: int):
    """(chunk, num_splits): chunk = ceil(S / num_splits) rounded up to block_n, and the
    number of chunks that then covers S (can be fewer than asked after the rounding)."""
    chunk = cdiv(cdiv(seq_len, num_splits), block_n) * block_n
    return chunk, cdiv(seq_len, chunk)


def allocate_workspace(batch_heads: int, num_splits: int, head_dim: int, device):
    """Partial outputs (B*H, splits, D) and log-sum-exps (B*H, splits), both fp32. Every
    element is written by the split kernel, empty splits included."""
    o_part = empty((batch_heads, num_splits, head_dim), torch.float32, device)
    lse_part = empty((batch_heads, num_splits), torch.float32, device)
    return o_part, lse_part


def group_block(heads: int, kv_heads: int) -> int:
    """BLOCK_G: the query heads one split program serves, H / H_kv rounded up to a power
    of two and to at least MIN_BLOCK_G (the N of its tensor-core products)."""
    return max(MIN_BLOCK_G, next_power_of_2(heads // kv_heads))


def decode_attention(q, k_cache, v_cache, cache_lens, scale: float, *, key_start=None, out=None, num_splits=None,
                     block_n=None, config=None):
    """Launch split (+ reduce when split in several). q (B, H, D); caches (B, H_kv, S, D)
    with H_kv dividing H (query head h reads kv head h // (H / H_kv)), any strides;
    cache_lens (B,) int32/int64; ``key_start`` (B,) int32/int64 or None: row b reads
    positions [key_start[b], cache_lens[b]) (0 where none is left). Writes and returns
    ``out`` (B, H, D), a new tensor in q's dtype by default.

    ``num_splits`` and ``block_n`` override the heuristics (tests use them to exercise
    several splits on tiny caches; ``num_splits=1`` is the one-pass path); ``config`` (a
    LaunchConfig with block_n, num_warps and num_stages) overrides ``split_config``. One
    program serves a kv head's whole group of query heads, so each K/V block is read once.
    """
    batch, heads, head_dim = q.shape
    kv_heads, seq_len = k_cache.shape[1], k_cache.shape[2]
    device, dtype = q.device, q.dtype
    out = check_out("decode_attention", "out", out, (batch, heads, head_dim), dtype, device)
    if out.numel() == 0:
        return out
    cfg = config or split_config(head_dim, dtype, device)
    block_d, block_n = padded_head_dim(head_dim), block_n or cfg.block_n
    if num_splits is None:
        num_splits = choose_num_splits(batch * kv_heads, seq_len, sm_count(device))
    chunk, num_splits = split_plan(seq_len, num_splits, block_n)
    one_pass = num_splits == 1

    if one_pass:  # the split kernel writes `out` itself; the workspace arguments are unused
        o_part = lse_part = out
    else:
        o_part, lse_part = allocate_workspace(batch * heads, num_splits, head_dim, device)
    with device_guard(device):
        launch(_decode_split_kernel, (batch * kv_heads, num_splits),
            q, k_cache, v_cache, cache_lens, q if key_start is None else key_start.contiguous(), o_part, lse_part,
            out, *q.stride(), *k_cache.stride(), *v_cache.stride(), cache_lens.stride(0), *out.stride(),
            kv_heads, heads // kv_heads, seq_len, chunk, scale * LOG2E,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_G=group_block(heads, kv_heads),
            HAS_KEY_START=key_start is not None, ONE_PASS=one_pass, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
        if not one_pass:
            launch(_decode_reduce_kernel, (batch * heads,),
                o_part, lse_part, out, *out.stride(), heads, num_splits,
                HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_SPLITS=max(2, next_power_of_2(num_splits)),
                HAS_KEY_START=key_start is not None, num_warps=reduce_num_warps(block_d),
            )
    return out


# Pointer types of the kernels' tensors other than Q, K, V and OUT (which take the cache dtype).
_FIXED_POINTERS = {"LENS": "*i32", "KEY_START": "*i64", "O_PART": "*fp32", "LSE_PART": "*fp32"}
# The head dimension's stride 1 (and the lengths' stride 1) are constexprs, as Triton's
# JIT specialises integer arguments equal to 1.
_UNIT_STRIDES = {"stride_qd": 1, "stride_kd": 1, "stride_vd": 1, "stride_lens": 1, "stride_od": 1}


def _pointers(fn, dtype: torch.dtype) -> dict:
    return {a: _FIXED_POINTERS.get(a, pointer(dtype)) for a in ("Q", "K", "V", "OUT", *_FIXED_POINTERS)
            if a in fn.arg_names}


def _split_entry(head_dim: int, dtype: torch.dtype, cfg: LaunchConfig, suffix: str = "", require_ptx=(),
                 group: int = 1, key_start: bool = False, one_pass: bool = False) -> dict:
    """The split kernel as launched with ``cfg`` for ``group`` query heads per kv head,
    per-row key starts when ``key_start``, writing the output itself when ``one_pass``.
    16-bit caches with D >= 64 must show HGMMA (both products have M >= 64)."""
    fn = _decode_split_kernel
    constexprs = {**{k: v for k, v in _UNIT_STRIDES.items() if k in fn.arg_names},
                  "HEAD_DIM": head_dim, "BLOCK_D": padded_head_dim(head_dim), "BLOCK_N": cfg.block_n,
                  "BLOCK_G": group_block(group, 1), "HAS_KEY_START": key_start, "ONE_PASS": one_pass}
    if group == 1:  # multi-head: the launch specialises GROUP == 1 (Triton's JIT does)
        constexprs["GROUP"] = 1
    hgmma = dtype != torch.float32 and padded_head_dim(head_dim) >= 64 and cfg.block_n >= 64
    return static_entry(f"decode_attention_split_d{head_dim}_{TRITON_TYPE[dtype]}{suffix}", fn, cfg, constexprs,
                        pointers=_pointers(fn, dtype), floats=("qk_scale",), require_ptx=require_ptx,
                        require_hgmma=hgmma)


def _reduce_entry(head_dim: int, dtype: torch.dtype, suffix: str = "", require_ptx=()) -> dict:
    """The reduction at its largest tile (MAX_SPLITS splits), its worst case for registers."""
    fn = _decode_reduce_kernel
    block_d = padded_head_dim(head_dim)
    constexprs = {"stride_od": 1, "HEAD_DIM": head_dim, "BLOCK_D": block_d,
                  "BLOCK_SPLITS": next_power_of_2(MAX_SPLITS), "HAS_KEY_START": False}
    return static_entry(f"decode_attention_reduce_d{head_dim}_{TRITON_TYPE[dtype]}{suffix}", fn,
                        LaunchConfig(num_warps=reduce_num_warps(block_d)), constexprs,
                        pointers=_pointers(fn, dtype), require_ptx=require_ptx)


def static_configs():
    """Shipped configurations (bf16, head sizes 64 and 128) of both kernels for
    ``gptfast.compile_report``, as launched on a cache whose last dimension is contiguous
    and whose other strides are multiples of 16 (the loads then vectorise to 128 bits):
    multi-head split, grouped-query (4 query heads per kv head, as Llama 3 8B) with key
    starts, the one-pass form (GPT-2's short caches, D=64), and the reduction.
    """
    entries = []
    for head_dim in (64, 128):
        entries.append(_split_entry(head_dim, torch.bfloat16, _builtin_split(head_dim)))
        entries.append(_split_entry(head_dim, torch.bfloat16, _builtin_split(head_dim), "_gqa4_key_start",
                                    group=4, key_start=True))
        entries.append(_reduce_entry(head_dim, torch.bfloat16))
    entries.append(_split_entry(64, torch.bfloat16, _builtin_split(64), "_one_pass", one_pass=True))
    entries.append(_split_entry(128, torch.bfloat16, _builtin_split(128), "_gqa8", group=8))
    return entries


def candidate_configs():
    """Static compile entries of the split kernel's tuning candidates other than the
    built-in one, multi-head and grouped-query (group 4)."""
    entries = []
    for key, configs in CANDIDATES["split"].items():
        head_dim = int(key[1:].split("_")[0])
        for cfg in configs:
            if cfg != _builtin_split(head_dim):
                entries.append(_split_entry(head_dim, torch.bfloat16, cfg, f"_cand_{cfg.tag()}"))
                entries.append(_split_entry(head_dim, torch.bfloat16, cfg, f"_cand_{cfg.tag()}_gqa4", group=4))
    return entries


def precision_configs():
    """fp32 caches: IEEE products and round-to-nearest normalisations."""
    return [_split_entry(128, torch.float32, _builtin_split(128, 4), require_ptx=("div.rn.f32",)),
            _split_entry(256, torch.float32, _builtin_split(256, 4), "_gqa4", require_ptx=("div.rn.f32",),
                         group=4),
            _reduce_entry(128, torch.float32, require_ptx=("div.rn.f32",))]
