"""Weight-only int8 matmul: ``y = (x @ w^T) * scale + bias`` with ``w`` int8 (N, K).

Decoding reads every weight once per step, so it is bound by memory bandwidth; int8
weights halve the bytes of bf16. The kernel loads a (BLOCK_N, BLOCK_K) int8 weight tile,
widens it to x's dtype in registers (exact: |w| <= 127 fits fp16 and bf16 mantissas)
and multiplies on the tensor cores, accumulating in fp32. The scale is per output
channel, so it factors out of the sum over K and is applied once, after the loop.

Swapped operands. The weight tile is the *left* operand and x's rows the right one:
``acc (BLOCK_N, BLOCK_M) += dot(w (BLOCK_N, BLOCK_K), x^T (BLOCK_K, BLOCK_M))``. A decode
step has 1..64 rows, far below the 64-row minimum of a Hopper warpgroup MMA's left
operand, while BLOCK_N = 64 output channels fills it; the rows become the MMA's narrow
side (16 at least: Triton's dot needs every dimension >= 16, so 1..15 rows are padded
with masked zeros and the spare tensor-core work is free in a memory-bound step). The
left operand may come from registers, which is where the widened weights are.

Split-K. At batch 1 a 768-wide projection has only 12 tiles of 64 channels: far too few
programs for 132 SMs to stream the weights at full bandwidth. ``plan()`` cuts K into
``split_k`` chunks so that about ``PROGRAMS_PER_SM`` programs run per SM; each chunk
writes its scaled fp32 partial sums into a (split_k, M, N) workspace (the bias rides on
chunk 0) and a torch sum reduces them. Everything depends on shapes only, so launches
can be captured in CUDA graphs.

Large M (prefill) takes the same kernel with 128 x 128 tiles and no split: there the
product is compute-bound and the weight is read once per 128 rows.

fp32 inputs multiply in IEEE fp32 (no TF32), so the result is as exact as F.linear's.
Launchers assume validated inputs; ``gptfast.ops.int8_linear`` is the public face.
"""
import functools

import torch
import triton
import triton.language as tl

from gptfast.kernels._common import (DEFAULT_NUM_SMS, TRITON_TYPE, LaunchConfig, cdiv, empty, launch, pointer, sm_count,
                                     static_entry)

PROGRAMS_PER_SM = 2  # split-K target: enough weight loads in flight per SM to cover DRAM latency
MIN_K_PER_SPLIT = 256  # below this a chunk's fixed cost (x tile, partial write) dominates
DECODE_MAX_ROWS = 64  # up to here: decode tiles and split-K; above: prefill tiles


@triton.jit
def _int8_linear_kernel(
    X, W, SCALE, BIAS, Y,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_ys, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr,
    IEEE_FP32: tl.constexpr,  # fp32 inputs: exact fp32 products instead of TF32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    m_mask = offs_m < M

    k_lo = split * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    # 64-bit offsets: N * K of a vocabulary-sized LM head is near 2**31 for big models.
    w_ptrs = W + offs_n[:, None].to(tl.int64) * stride_wn + (k_lo + offs_k)[None, :] * stride_wk
    x_ptrs = X + (k_lo + offs_k)[:, None] * stride_xk + offs_m[None, :].to(tl.int64) * stride_xm

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        k_mask = (k + offs_k) < k_hi
        w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0)
        xt = tl.load(x_ptrs, mask=k_mask[:, None] & m_mask[None, :], other=0.0)
        w = w.to(xt.dtype)  # dequantise in registers (the scale comes after the sum)
        if IEEE_FP32:
            acc = tl.dot(w, xt, acc, input_precision="ieee")
        else:
            acc = tl.dot(w, xt, acc)
        w_ptrs += BLOCK_K * stride_wk
        x_ptrs += BLOCK_K * stride_xk

    scale = tl.load(SCALE + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    acc = acc * scale[:, None]
    if HAS_BIAS:
        bias = tl.load(BIAS + offs_n, mask=tl.where(split == 0, n_mask, False), other=0.0).to(tl.float32)
        acc = acc + bias[:, None]
    y_ptrs = Y + split * stride_ys + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None] * stride_yn
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])


def tile_config(m: int) -> LaunchConfig:
    """Tile sizes and launch options for ``m`` rows (shapes only: CUDA-graph safe).

    Decode (m <= DECODE_MAX_ROWS): 64 channels x the rows rounded up to 16/32/64, K in
    steps of 128. Prefill: 128 x 128 tiles, K steps of 64, one split.
    """
    if m <= DECODE_MAX_ROWS:
        return _DECODE_TILES[16 if m <= 16 else (32 if m <= 32 else 64)]
    return _PREFILL_TILE


# Built once: a launcher call should not pay for building its config.
_DECODE_TILES = {rows: LaunchConfig(num_warps=4, num_stages=3, block_m=rows, block_n=64, block_k=128)
                 for rows in (16, 32, 64)}
_PREFILL_TILE = LaunchConfig(num_warps=8, num_stages=3, block_m=128, block_n=128, block_k=64)


@functools.lru_cache(maxsize=1024)
def plan(m: int, n: int, k: int, cfg: LaunchConfig, sms: int = DEFAULT_NUM_SMS):
    """(k_per_split, split_k): K cut into chunks of whole BLOCK_K steps, so that about
    PROGRAMS_PER_SM * sms programs run (decode shapes only), each chunk at least
    MIN_K_PER_SPLIT long."""
    block_k = cfg.block_k
    k_blocks = cdiv(max(k, 1), block_k)
    tiles = cdiv(n, cfg.block_n) * cdiv(m, cfg.block_m)
    wanted = 1
    if m <= DECODE_MAX_ROWS:
        wanted = cdiv(PROGRAMS_PER_SM * sms, tiles)
    wanted = max(1, min(wanted, cdiv(k, MIN_K_PER_SPLIT), k_blocks))
    k_per_split = cdiv(k_blocks, wanted) * block_k
    return k_per_split, cdiv(max(k, 1), k_per_split)


def int8_linear(x, weight, scale, bias=None, *, split_k=None, out=None):
    """Launch the kernel. x (M, K) any strides, fp16/bf16/fp32; weight (N, K) int8, any
    strides; scale (N,) fp32 or x's dtype, contiguous; bias (N,) x's dtype or None.
    Writes and returns ``out`` (M, N) in x's dtype, a new tensor by default. ``split_k``
    overrides the heuristic (tests use it to exercise several chunks on small shapes)."""
    m, k = x.shape
    n = weight.shape[0]
    if m == 0 or n == 0:
        return empty((m, n), x.dtype, x.device) if out is None else out
    cfg = tile_config(m)
    k_per_split, splits = plan(m, n, k, cfg, sm_count(x.device))
    if split_k is not None:
        k_per_split = cdiv(cdiv(max(k, 1), cfg.block_k), split_k) * cfg.block_k
        splits = cdiv(max(k, 1), k_per_split)
    if splits == 1:
        y = out = empty((m, n), x.dtype, x.device) if out is None else out
    else:  # fp32 partial sums; the output comes from their sum (no buffer of its own unless given)
        y = empty((splits, m, n), torch.float32, x.device)
    grid = (cdiv(n, cfg.block_n), cdiv(m, cfg.block_m), splits)
    launch(_int8_linear_kernel, grid,
        x, weight, scale, bias if bias is not None else scale, y,
        m, n, k, k_per_split,
        *x.stride(), *weight.stride(),
        y.stride(0) if splits > 1 else 0, y.stride(-2), y.stride(-1),
        HAS_BIAS=bias is not None, IEEE_FP32=x.dtype == torch.float32,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if splits > 1:
        if x.dtype == torch.float32:
            out = torch.sum(y, dim=0) if out is None else torch.sum(y, dim=0, out=out)  # one launch
        else:  # summed in fp32, then rounded once (a 16-bit sum would round every partial)
            out = y.sum(dim=0).to(x.dtype) if out is None else out.copy_(y.sum(dim=0))
    return out


def static_configs():
    """Shipped configurations for ``gptfast.compile_report``: bf16 activations with bias,
    every decode tile (16, 32 and 64 rows) and the prefill tile, as launched on a
    contiguous x and weight (unit K strides are constexprs, as Triton's JIT specialises
    integer arguments equal to 1; the other strides and sizes are multiples of 16 at
    GPT-2 shapes). Every tile multiplies on the tensor cores; the warpgroup MMA (HGMMA)
    is required where the left operand spans 64+ channels and 4+ warps, i.e. all of them.
    """
    return [_entry(tile_config(rows), torch.bfloat16) for rows in (1, 17, 64, 1024)]


def candidate_configs():
    """No tuning candidates: the tiles follow from the row count alone (``tile_config``)."""
    return []


def precision_configs():
    """fp32 activations multiply in IEEE fp32 (``fma.rn.f32``), not TF32 tensor cores."""
    return [_entry(tile_config(1), torch.float32, require_hgmma=False, require_ptx=("fma.rn.f32",))]


def _entry(cfg: LaunchConfig, dtype: torch.dtype, require_hgmma: bool = True, require_ptx=()) -> dict:
    """A static entry as launched on contiguous x and weight with a bias."""
    pointers = {"X": pointer(dtype), "W": "*i8", "SCALE": pointer(torch.float32), "BIAS": pointer(dtype),
                "Y": pointer(dtype)}
    aligned = ["N", "K", "K_PER_SPLIT", "stride_xm", "stride_wn", "stride_ys", "stride_ym"]
    constexprs = {"stride_xk": 1, "stride_wk": 1, "stride_yn": 1, "HAS_BIAS": True,
                  "IEEE_FP32": dtype == torch.float32, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                  "BLOCK_K": cfg.block_k}
    name = f"int8_linear_{cfg.tag()}_{TRITON_TYPE[dtype]}"
    return static_entry(name, _int8_linear_kernel, cfg, constexprs, pointers=pointers, divisible_by_16=aligned,
                        require_hgmma=require_hgmma, require_ptx=require_ptx)
