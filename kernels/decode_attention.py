"""Decode attention over a KV cache, split along the cache length (flash-decoding).

At decode time each (batch row, head) has ONE query and a cache of up to S keys/values.
A kernel with one program per (row, head) launches only B*H programs: at batch 1 that is
a dozen programs for a GPU with 132 SMs, each streaming tens of MB of cache alone. So the
cache length is cut into ``num_splits`` contiguous chunks and each chunk gets its own
program (grid ``(B*H, num_splits)``):

1. ``_decode_split_kernel``: the program for chunk ``c`` of row ``b``, kv head ``h`` runs
   the online softmax (in fp32, base 2) over the keys of its chunk that are valid for that
   row (positions ``< cache_lens[b]``, and ``>= key_start[b]`` with key ranges), for every
   query head of the kv head's group at once (grouped-query attention: each K/V block is
   loaded once for the group), and writes, per query head, its normalised partial output
   ``o_c = sum_j p_j v_j / sum_j p_j`` (fp32) and its log-sum-exp ``lse_c`` (base 2).
   A chunk that starts at or past the row's cache length reads no cache and writes
   ``o_c = 0``, ``lse_c = -inf``.
2. ``_decode_reduce_kernel``: one program per (row, head) merges the splits:
   ``out = sum_c 2^(lse_c - M) o_c / sum_c 2^(lse_c - M)`` with ``M = max_c lse_c``.
   Split 0 always holds at least one valid key, so ``M`` is finite (with key ranges a row
   may have none: it outputs 0).

Scores use an elementwise product and a row sum, ``sum(q[None, :] * k, axis=1)``, rather
than ``tl.dot``: with a single query ``tl.dot`` would need M padded to 16 (15/16 of the
tensor-core work wasted) and decode is bound by reading the cache from memory (one
multiply-add per loaded element), not by arithmetic. It also keeps the kernel exact in the
Triton CPU interpreter, whose ``tl.dot`` mishandles bf16.

Cache lengths are read from device memory by the kernels (no host synchronisation), and
every allocation depends only on shapes, so the launch can be captured in a CUDA graph.
Lengths outside ``[1, S]`` are clamped into it in the kernel, so the kernel never reads
outside the cache; the op layer (``gptfast.ops.decode_attention``) reports such lengths as errors
where checking them is cheap.

Launchers assume validated inputs; ``gptfast.ops.decode_attention`` is the public face.
"""
import torch
import triton
import triton.language as tl

from ._common import (cdiv, next_power_of_2, DEFAULT_NUM_SMS, LOG2E, LaunchConfig, check_out, device_guard, div, empty,
                      launch, padded_head_dim,
                      pointer, sm_count, static_entry, TRITON_TYPE)
from ._tuned import pick

# Split heuristic (see ``choose_num_splits``).
PROGRAMS_PER_SM = 4  # target total programs per SM: enough cache reads in flight to hide DRAM latency
MIN_KEYS_PER_SPLIT = 256  # below this a split's fixed cost (q load, partial write) dominates
MAX_SPLITS = 64  # bounds the reduction kernel's tile (BLOCK_SPLITS x BLOCK_D registers)
# The key loop's loads feed no tl.dot, so Triton's software pipeliner leaves them alone
# (num_stages 1, 2 and 3 give identical PTX); DRAM latency is hidden by running several
# programs per SM instead (PROGRAMS_PER_SM).
NUM_STAGES = 1


@triton.jit
def _online_softmax(q, k_block, v_block, k_offs, v_offs, lo, hi, stride_ks, stride_vs, d_mask,
                    BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """The online softmax over keys [lo, hi) of one cache row: returns (acc, m_i, l_i) (the
    running sum of p*v, max (base 2) and sum) of the queries ``q``: (BLOCK_D,) when
    BLOCK_G == 1, else (BLOCK_G, BLOCK_D) sharing each loaded K/V block. The single query
    keeps its own 1-D code: the 3-D broadcast of the group costs ptxas several times the
    registers."""
    offs_n = tl.arange(0, BLOCK_N)
    if BLOCK_G == 1:
        m_i = tl.full([], float("-inf"), tl.float32)
        l_i = tl.full([], 0.0, tl.float32)
        acc = tl.zeros(q.shape, dtype=tl.float32)
    else:
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros(q.shape, dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        n_mask = (start_n + offs_n) < hi
        # Masked loads never touch positions >= hi: stale entries (even NaN) stay unread.
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_block + k_offs, mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(v_block + v_offs, mask=kv_mask, other=0.0).to(tl.float32)
        # Every block in the loop holds at least one valid key, so m_new is finite.
        if BLOCK_G == 1:
            s = tl.where(n_mask, tl.sum(q[None, :] * k, axis=1), float("-inf"))  # (BLOCK_N,) scores, base 2
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old max
            p = tl.exp2(s - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        else:
            s = tl.where(n_mask[None, :], tl.sum(q[:, None, :] * k[None, :, :], axis=2), float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new
        k_block += BLOCK_N * stride_ks
        v_block += BLOCK_N * stride_vs
    return acc, m_i, l_i


@triton.jit
def _decode_split_kernel(
    Q, K, V, LENS, KEY_START, O_PART, LSE_PART,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_lens,
    H_KV, GROUP, S, CHUNK,
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of two >= HEAD_DIM; the extra lanes are masked
    BLOCK_N: tl.constexpr,  # keys per loop iteration; CHUNK is a multiple of it
    BLOCK_G: tl.constexpr,  # next power of two >= GROUP: the query heads sharing one kv head
    HAS_KEY_START: tl.constexpr,
):
    pid_bkv = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    # int64 so that b * stride_kb cannot overflow for a large (max_batch, H, max_seq, D) cache.
    b = (pid_bkv // H_KV).to(tl.int64)
    kvh = (pid_bkv % H_KV).to(tl.int64)

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
    heads = kvh * GROUP + offs_g  # the query heads of this kv head's group

    # The group's queries, pre-multiplied by scale * log2(e) so that scores feed exp2
    # directly: (BLOCK_D,) for one query head per kv head, else (BLOCK_G, BLOCK_D).
    if BLOCK_G == 1:
        q = tl.load(Q + b * stride_qb + kvh * stride_qh + offs_d * stride_qd, mask=d_mask, other=0.0)
    else:
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                    mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    q = q.to(tl.float32) * qk_scale

    # Loop-invariant offsets inside one (BLOCK_N, BLOCK_D) block; the scalar base pointers
    # advance instead (64-bit pointer arithmetic, so long caches with big strides are safe).
    k_offs = offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd
    v_offs = offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd
    k_block = K + b * stride_kb + kvh * stride_kh + lo.to(tl.int64) * stride_ks
    v_block = V + b * stride_vb + kvh * stride_vh + lo.to(tl.int64) * stride_vs
    acc, m_i, l_i = _online_softmax(q, k_block, v_block, k_offs, v_offs, lo, hi, stride_ks, stride_vs, d_mask,
                                    BLOCK_N, BLOCK_G)

    # An empty chunk has l_i == 0: it writes o = 0 and lse = -inf, i.e. weight 0 in the merge.
    has_keys = l_i > 0.0
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    if BLOCK_G == 1:
        part = (b * H_KV + kvh) * num_splits + split
        o = div(acc, tl.where(has_keys, l_i, 1.0), Q.dtype.element_ty == tl.float32)
        tl.store(O_PART + part * HEAD_DIM + offs_d, o, mask=d_mask)
        tl.store(LSE_PART + part, lse)
    else:
        part = (b * H_KV * GROUP + heads) * num_splits + split  # (BLOCK_G,) per query head
        o = div(acc, tl.where(has_keys, l_i, 1.0)[:, None], Q.dtype.element_ty == tl.float32)
        tl.store(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], o, mask=g_mask[:, None] & d_mask[None, :])
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


def _builtin_split(head_dim: int) -> LaunchConfig:
    """A key block holds 4096 elements (BLOCK_N x BLOCK_D), 32 per thread of 4 warps for K and
    as many for V: 64 x 64 for D=64, 32 x 128 for D=128. That leaves the sm_90 build at
    64 registers with no spills, and 8 KB of cache per load per program in flight.
    """
    return LaunchConfig(block_n=min(128, max(16, 4096 // padded_head_dim(head_dim))), num_warps=4,
                        num_stages=NUM_STAGES)


def config_key(head_dim: int, dtype: torch.dtype) -> str:
    """The configuration tables' key of a head size and cache dtype, e.g. ``d64_16bit``."""
    return f"d{padded_head_dim(head_dim)}_{'fp32' if dtype == torch.float32 else '16bit'}"


def split_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> LaunchConfig:
    """block_n and num_warps of the split kernel: the device's tuned config, else the built-in one."""
    builtin = _builtin_split(head_dim)
    if device.type != "cuda":
        return builtin
    return pick("decode_attention.split", config_key(head_dim, dtype), builtin, device)


def block_sizes(head_dim: int):
    """(BLOCK_D, BLOCK_N, num_warps) of the built-in split config for a head size."""
    cfg = _builtin_split(head_dim)
    return padded_head_dim(head_dim), cfg.block_n, cfg.num_warps


# Tuning candidates (gptfast.tune) of the split kernel, 16-bit caches: the built-in config
# first. Every one passes the static compile report (no spills).
CANDIDATES = {"split": {
    f"d{d}_16bit": [LaunchConfig(block_n=n, num_warps=w, num_stages=NUM_STAGES) for n, w in rows] for d, rows in (
        (64, ((64, 4), (32, 4), (128, 4), (128, 8), (64, 8), (32, 2))),
        (128, ((32, 4), (16, 4), (64, 4), (64, 8), (16, 2), (128, 8))),
    )}}


def reduce_num_warps(block_d: int) -> int:
    """The reduction holds a (BLOCK_SPLITS, BLOCK_D) fp32 tile: 8 warps past D=128."""
    return 4 if block_d <= 128 else 8


def choose_num_splits(batch_heads: int, seq_len: int, sms: int = DEFAULT_NUM_SMS) -> int:
    """How many chunks to cut the cache length into.

    Aim for about PROGRAMS_PER_SM programs per SM in total (B*H*splits ~= 4 * SMs). At 64
    registers a thread, 8 programs of 4 warps fit on an SM, so all of them run at once,
    each with a K and a V block load in flight: about 4 x 16 KB per SM, above the ~30 KB
    that 4.8 TB/s x ~1 us of DRAM latency spread over 132 SMs asks for. So batch 1 with 12
    heads at 32k context runs 12 x 43 programs on 132 SMs (44 asked, 43 after rounding the
    chunk to BLOCK_N), while a batch with B*H >= 4 * SMs needs no split at all. Each
    split keeps at least MIN_KEYS_PER_SPLIT keys, and there are at most MAX_SPLITS.
    Depends on shapes only (CUDA-graph safe).
    """
    wanted = triton.cdiv(PROGRAMS_PER_SM * sms, max(batch_heads, 1))
    return max(1, min(wanted, MAX_SPLITS, triton.cdiv(seq_len, MIN_KEYS_PER_SPLIT)))


def split_plan(seq_len: int, num_splits: int, block_n: int):
    """(chunk, num_splits): chunk = ceil(S / num_splits) rounded up to block_n, and the
    number of chunks that then covers S (can be fewer than asked after the rounding)."""
    chunk = triton.cdiv(triton.cdiv(seq_len, num_splits), block_n) * block_n
    return chunk, triton.cdiv(seq_len, chunk)


def allocate_workspace(batch_heads: int, num_splits: int, head_dim: int, device):
    """Partial outputs (B*H, splits, D) and log-sum-exps (B*H, splits), both fp32. Every
    element is written by the split kernel, empty splits included."""
    o_part = empty((batch_heads, num_splits, head_dim), torch.float32, device)
    lse_part = empty((batch_heads, num_splits), torch.float32, device)
    return o_part, lse_part


def group_block(heads: int, kv_heads: int) -> int:
    """BLOCK_G: the query heads one split program serves (the next power of two >= H / H_kv)."""
    return triton.next_power_of_2(heads // kv_heads)


def decode_attention(q, k_cache, v_cache, cache_lens, scale: float, *, key_start=None, out=None, num_splits=None,
                     block_n=None, config=None):
    """Launch split + reduce. q (B, H, D); caches (B, H_kv, S, D) with H_kv dividing H (query
    head h reads kv head h // (H / H_kv)), any strides; cache_lens (B,) int32/int64;
    ``key_start`` (B,) int32/int64 or None: row b reads positions [key_start[b], cache_lens[b])
    (0 where none is left). Writes and returns ``out`` (B, H, D), a new tensor in q's dtype
    by default.

    ``num_splits`` and ``block_n`` override the heuristics (tests use them to exercise
    several splits on tiny caches); ``config`` (a LaunchConfig with block_n and num_warps)
    overrides ``split_config``. One program serves a kv head's whole group of query heads,
    so each K/V block is read once; its default key block shrinks by the group size
    (down to 16) to keep the (group, keys, D) product in registers.
    """
    batch, heads, head_dim = q.shape
    kv_heads, seq_len = k_cache.shape[1], k_cache.shape[2]
    out = check_out("decode_attention", "out", out, (batch, heads, head_dim), q.dtype, q.device)
    if out.numel() == 0:
        return out
    cfg = config or split_config(head_dim, q.dtype, q.device)
    block_g = group_block(heads, kv_heads)
    block_d, block_n = padded_head_dim(head_dim), block_n or max(16, cfg.block_n // block_g)
    if num_splits is None:
        num_splits = choose_num_splits(batch * kv_heads, seq_len, sm_count(q.device))
    chunk, num_splits = split_plan(seq_len, num_splits, block_n)

    o_part, lse_part = allocate_workspace(batch * heads, num_splits, head_dim, q.device)
    with device_guard(q.device):
        launch(_decode_split_kernel, (batch * kv_heads, num_splits),
            q, k_cache, v_cache, cache_lens, q if key_start is None else key_start.contiguous(), o_part, lse_part,
            *q.stride(), *k_cache.stride(), *v_cache.stride(), cache_lens.stride(0),
            kv_heads, heads // kv_heads, seq_len, chunk, scale * LOG2E,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_G=block_g,
            HAS_KEY_START=key_start is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
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
                 block_g: int = 1, key_start: bool = False) -> dict:
    """The split kernel as launched with ``cfg``; ``block_g`` query heads per kv head (the
    launcher then divides the key block by it) and per-row key starts when ``key_start``."""
    fn = _decode_split_kernel
    constexprs = {**{k: v for k, v in _UNIT_STRIDES.items() if k in fn.arg_names},
                  "HEAD_DIM": head_dim, "BLOCK_D": padded_head_dim(head_dim),
                  "BLOCK_N": max(16, cfg.block_n // block_g), "BLOCK_G": block_g, "HAS_KEY_START": key_start}
    if block_g == 1:  # one query head per kv head: the launch specialises GROUP == 1 (Triton's JIT does)
        constexprs["GROUP"] = 1
    return static_entry(f"decode_attention_split_d{head_dim}_{TRITON_TYPE[dtype]}{suffix}", fn, cfg, constexprs,
                        pointers=_pointers(fn, dtype), floats=("qk_scale",), require_ptx=require_ptx)


def _reduce_entry(head_dim: int, dtype: torch.dtype, suffix: str = "", require_ptx=()) -> dict:
    """The reduction at its largest tile (MAX_SPLITS splits), its worst case for registers."""
    fn = _decode_reduce_kernel
    block_d = padded_head_dim(head_dim)
    constexprs = {"stride_od": 1, "HEAD_DIM": head_dim, "BLOCK_D": block_d,
                  "BLOCK_SPLITS": triton.next_power_of_2(MAX_SPLITS), "HAS_KEY_START": False}
    return static_entry(f"decode_attention_reduce_d{head_dim}_{TRITON_TYPE[dtype]}{suffix}", fn,
                        LaunchConfig(num_warps=reduce_num_warps(block_d)), constexprs,
                        pointers=_pointers(fn, dtype), require_ptx=require_ptx)


def static_configs():
    """Shipped configurations (bf16, head sizes 64 and 128) of both kernels for
    ``gptfast.compile_report``, as launched on a cache whose last dimension is contiguous
    and whose other strides are multiples of 16 (the loads then vectorise to 128 bits).
    """
    entries = []
    for head_dim in (64, 128):
        entries.append(_split_entry(head_dim, torch.bfloat16, _builtin_split(head_dim)))
        # A padded batch of a grouped-query model (4 query heads per kv head, as Llama 3 8B).
        entries.append(_split_entry(head_dim, torch.bfloat16, _builtin_split(head_dim), "_gqa4_key_start",
                                    block_g=4, key_start=True))
        entries.append(_reduce_entry(head_dim, torch.bfloat16))
    return entries


def candidate_configs():
    """Static compile entries of the split kernel's tuning candidates other than the built-in one."""
    return [_split_entry(int(key[1:].split("_")[0]), torch.bfloat16, cfg, f"_cand_{cfg.tag()}")
            for key, configs in CANDIDATES["split"].items() for cfg in configs
            if cfg != _builtin_split(int(key[1:].split("_")[0]))]


def precision_configs():
    """fp32 caches: the partial and merged normalisations must round to nearest."""
    return [_split_entry(128, torch.float32, _builtin_split(128), require_ptx=("div.rn.f32",)),
            _reduce_entry(128, torch.float32, require_ptx=("div.rn.f32",))]
