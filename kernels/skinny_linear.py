"""Skinny matmul for decode steps: ``y = epilogue(prologue(x) @ W^T + b)`` for few rows, in one launch.

A decode step multiplies 1..16 activation rows (the batch, or a speculative verify
step's k+1 rows per sequence) by every weight matrix of the model. Each product is
bound by reading the weight once and, at these sizes, by the launches around it (the
layer norm before, the GELU or the residual add after, the KV-cache writes). This
kernel folds them into the matmul's launch:

* prologue (``LAYER_NORM``): the rows are layer-normalised on the fly. Each program first
  takes the row statistics over the whole of K in two passes over x (the mean, then the
  centred variance, in fp32; x is a few KB, read from L2), then normalises every x tile
  of its K loop, applies the layer norm's weight and bias and rounds to x's dtype (what a
  separate layer norm would have written) before the product;
* weights in x's dtype (fp16, bf16, fp32) or int8 with one scale per output channel
  (``QUANTIZED``): the int8 tile is widened in registers (exact) and the scale, which
  factors out of the sum over K, is applied once in the epilogue;
* epilogue: the bias, then GPT-2's GELU (tanh approximation, ``GELU``), then a residual
  add (``RESIDUAL``), all in fp32 with one rounding to x's dtype; or (``KV_CACHE``) the
  output columns split as ``[q | k | v]``: the q part is stored to ``Y`` and the k and v
  parts straight into the (B, H_kv, S, D) caches at each row's position (row ``m`` is
  token ``m % rows_per_seq`` of sequence ``m // rows_per_seq``; its position is read from
  the positions tensor on the device and clamped into [0, S), so a bad position can
  never write outside the cache).

Swapped operands (as ``int8_linear``): the (BLOCK_N, BLOCK_K) weight tile is the dot's
left operand and the rows its narrow right one, ``acc (BLOCK_N, BLOCK_M) += w @ x^T``, so
64+ output channels fill the MMA's wide side and the 1..16 rows are padded (with masked
zeros) to its 16-wide one; tensor-core work is free in a memory-bound step.

Split-K, reduced in the same launch. A narrow output (768 channels = 12 tiles of 64)
leaves most of the H200's 132 SMs idle, so ``plan()`` cuts K into chunks until about
``PROGRAMS_PER_SM`` programs run per SM. Each chunk stores its fp32 partial tile into a
(splits, M, N) workspace and increments the tile's arrival counter (an atomic with
acquire-release semantics, after a barrier so that the whole tile is stored first); the
program that arrives last sums the partials, resets the counter to 0 and runs the
epilogue. No second kernel, and the nonlinear epilogues see the full sum. The counters
are one int32 buffer per device, zeroed once when first needed and left at zero by every
launch (``counters()``), so launches can be captured in CUDA graphs; the first launch
needing a bigger buffer must not happen during a capture (a warm-up call does it), and
launches sharing it must not run concurrently on two streams.

Every decision depends on shapes only (no host synchronisation, no allocation that
depends on values). fp32 activations multiply in IEEE fp32 (no TF32), and their divisions
and square root round to nearest (``_common.div`` / ``rsqrt``). Launchers assume
validated inputs; ``gptfast.ops.skinny_linear`` is the public face.
"""
import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (DEFAULT_NUM_SMS, TRITON_TYPE, LaunchConfig, cdiv, cuda_index, device_guard, div, empty, launch,
                      next_power_of_2, pointer, rsqrt, sm_count, static_entry)
from ._tuned import pick

PROGRAMS_PER_SM = 2  # split-K target: weight loads in flight on every SM
MIN_K_PER_SPLIT = 256  # below this a chunk's fixed cost (statistics, partial tile) dominates
MAX_ROWS = 16  # the rows one tile holds; more rows take more row tiles (each reads the weight again)
COUNTER_CHUNK = 4096  # the per-device counter buffer grows in these steps


@triton.jit
def _gelu_tanh(x, PRECISE: tl.constexpr):
    """GPT-2's GELU on fp32 ``x``: 0.5 x (1 + tanh(u)) == x * sigmoid(2u) == x / (1 + exp(-2u)),
    u = sqrt(2 / pi) (x + 0.044715 x^3); the sigmoid form has no cancellation near 0."""
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    # exp(-2u) past fp32's range is inf either way (x / inf = -0); the clamp keeps it finite.
    return div(x, 1.0 + tl.exp(tl.minimum(-2.0 * u, 88.0)), PRECISE)


@triton.jit
def _skinny_linear_kernel(
    X, W, SCALE, BIAS, LN_W, LN_B, RES, Y, PARTIAL, COUNTERS, K_CACHE, V_CACHE, POS,
    M, N, K, K_PER_SPLIT, eps,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_rm, stride_rn, stride_ym, stride_yn,
    stride_kb, stride_kh, stride_ks, stride_kd, stride_vb, stride_vh, stride_vs, stride_vd,
    stride_pb, stride_pt,
    seq_len, rows_per_seq, q_cols, kv_cols, head_dim,
    QUANTIZED: tl.constexpr,  # int8 W with per-channel SCALE
    HAS_BIAS: tl.constexpr,
    LAYER_NORM: tl.constexpr,  # normalise x's rows first (LN_W; LN_B when HAS_LN_BIAS)
    HAS_LN_BIAS: tl.constexpr,
    GELU: tl.constexpr,
    RESIDUAL: tl.constexpr,  # add RES (M, N) after the activation
    KV_CACHE: tl.constexpr,  # columns [q | k | v]: q to Y, k and v into the caches
    SPLIT_K: tl.constexpr,  # several K chunks (grid axis 2), reduced by the last to arrive
    IEEE_FP32: tl.constexpr,  # fp32 activations: exact fp32 products, round-to-nearest divisions
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
    rows = offs_m.to(tl.int64)
    x_ptrs0 = X + offs_k[:, None] * stride_xk + rows[None, :] * stride_xm  # x^T tile (BLOCK_K, BLOCK_M)

    if LAYER_NORM:
        # Row statistics over the whole of K, two passes (no E[x^2] - E[x]^2 cancellation).
        total = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            xt = tl.load(x_ptrs0 + k * stride_xk, mask=((k + offs_k) < K)[:, None] & m_mask[None, :], other=0.0)
            total += tl.sum(xt.to(tl.float32), axis=0)
        mean = div(total, K, IEEE_FP32)
        squares = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            mask = ((k + offs_k) < K)[:, None] & m_mask[None, :]
            xt = tl.load(x_ptrs0 + k * stride_xk, mask=mask, other=0.0)
            centred = tl.where(mask, xt.to(tl.float32) - mean[None, :], 0.0)
            squares += tl.sum(centred * centred, axis=0)
        rstd = rsqrt(div(squares, K, IEEE_FP32) + eps, IEEE_FP32)

    k_lo = split * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    # 64-bit offsets: N * K of a vocabulary-sized LM head is near 2**31 for big models.
    w_ptrs = W + offs_n[:, None].to(tl.int64) * stride_wn + (k_lo + offs_k)[None, :] * stride_wk
    x_ptrs = x_ptrs0 + k_lo * stride_xk
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        k_mask = (k + offs_k) < k_hi
        w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0)
        xt = tl.load(x_ptrs, mask=k_mask[:, None] & m_mask[None, :], other=0.0)
        if LAYER_NORM:
            g = tl.load(LN_W + k + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            xn = (xt.to(tl.float32) - mean[None, :]) * rstd[None, :] * g[:, None]
            if HAS_LN_BIAS:
                xn += tl.load(LN_B + k + offs_k, mask=k_mask, other=0.0).to(tl.float32)[:, None]
            xt = xn.to(X.dtype.element_ty)  # the layer norm's output, rounded as it would be stored
        w = w.to(xt.dtype)  # int8: dequantise in registers (the scale comes after the sum)
        if IEEE_FP32:
            acc = tl.dot(w, xt, acc, input_precision="ieee")
        else:
            acc = tl.dot(w, xt, acc)
        w_ptrs += BLOCK_K * stride_wk
        x_ptrs += BLOCK_K * stride_xk

    out_mask = n_mask[:, None] & m_mask[None, :]
    if SPLIT_K:
        # Store this chunk's partial tile, count the arrival; the last program to arrive
        # reduces and finishes (everyone else's epilogue below is fully masked off).
        splits = tl.num_programs(2)
        tile = pid_m * tl.num_programs(0) + pid_n
        part = rows[None, :] * N + offs_n[:, None]
        tl.store(PARTIAL + split.to(tl.int64) * M * N + part, acc, mask=out_mask)
        tl.debug_barrier()  # every thread's part of the tile is stored before the release below
        arrived = tl.atomic_add(COUNTERS + tile, 1, sem="acq_rel")
        last = arrived == splits - 1
        out_mask = tl.where(last, out_mask, False)  # (a tensor & a scalar bool is no bool mask in triton 3.9's interpreter)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for s in range(0, splits):
            acc += tl.load(PARTIAL + s * M * N + part, mask=out_mask, other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(COUNTERS + tile, 0, mask=last)  # leave the counter at zero for the next launch

    if QUANTIZED:
        acc = acc * tl.load(SCALE + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    if HAS_BIAS:
        acc = acc + tl.load(BIAS + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    if GELU:
        acc = _gelu_tanh(acc, IEEE_FP32)
    if RESIDUAL:
        res = tl.load(RES + rows[None, :] * stride_rm + offs_n[:, None] * stride_rn, mask=out_mask, other=0.0)
        acc = acc + res.to(tl.float32)
    y = acc.to(Y.dtype.element_ty)

    if KV_CACHE:
        seq = rows // rows_per_seq
        pos = tl.load(POS + seq * stride_pb + (rows % rows_per_seq) * stride_pt, mask=m_mask, other=0)
        pos = tl.minimum(tl.maximum(pos.to(tl.int64), 0), seq_len - 1)
        tl.store(Y + rows[None, :] * stride_ym + offs_n[:, None] * stride_yn, y,
                 mask=out_mask & (offs_n < q_cols)[:, None])
        col = offs_n - q_cols  # k columns: [0, kv_cols); v columns: [kv_cols, 2 kv_cols)
        is_v = col >= kv_cols
        col = tl.where(is_v, col - kv_cols, col)
        head = (col // head_dim).to(tl.int64)
        d = (col % head_dim).to(tl.int64)
        k_ptrs = K_CACHE + seq[None, :] * stride_kb + head[:, None] * stride_kh + pos[None, :] * stride_ks \
            + d[:, None] * stride_kd
        v_ptrs = V_CACHE + seq[None, :] * stride_vb + head[:, None] * stride_vh + pos[None, :] * stride_vs \
            + d[:, None] * stride_vd
        in_kv = (offs_n >= q_cols)[:, None]
        tl.store(k_ptrs, y, mask=out_mask & in_kv & ~is_v[:, None])
        tl.store(v_ptrs, y, mask=out_mask & in_kv & is_v[:, None])
    else:
        tl.store(Y + rows[None, :] * stride_ym + offs_n[:, None] * stride_yn, y, mask=out_mask)


# --------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------


def weight_kind(weight_dtype: torch.dtype, x_dtype: torch.dtype) -> str:
    """``int8``, ``fp32`` or ``16bit``: what the tuned tables key the weights by."""
    if weight_dtype == torch.int8:
        return "int8"
    return "fp32" if x_dtype == torch.float32 else "16bit"


def config_key(n: int, k: int, kind: str) -> str:
    """The tuned tables' key of an (N, K) weight, bucketed by powers of two, e.g. ``n1024_k4096_16bit``."""
    return f"n{next_power_of_2(max(n, 1))}_k{next_power_of_2(max(k, 1))}_{kind}"


def block_m_for(m: int) -> int:
    """Rows per tile: 16 (the narrow side of an MMA) up to ``MAX_ROWS`` rows."""
    return 16 if m <= MAX_ROWS else 32


def builtin_config(m: int, kind: str = "16bit") -> LaunchConfig:
    """64 output channels x the rows, K in steps of 128, 4 warps, 3 stages; fp32 activations
    (IEEE products on the CUDA cores, the weight tile held in registers) step K by 32."""
    return _builtin(block_m_for(m), kind == "fp32")


@functools.lru_cache(maxsize=None)
def _builtin(block_m: int, fp32: bool) -> LaunchConfig:
    return LaunchConfig(num_warps=4, num_stages=3, block_m=block_m, block_n=64, block_k=32 if fp32 else 128)


@functools.lru_cache(maxsize=256)
def _with_rows(tuned: LaunchConfig, block_m: int) -> LaunchConfig:
    """A tuned (N, K) config with the row tile of the launch (built once per pair)."""
    return LaunchConfig(num_warps=tuned.num_warps, num_stages=tuned.num_stages, block_m=block_m,
                        block_n=tuned.block_n, block_k=tuned.block_k)


def tile_config(m: int, n: int, k: int, kind: str, device: Optional[torch.device] = None) -> LaunchConfig:
    """The launch config: the device's tuned one for (N, K) when its table has it, else the
    built-in one (the row tile always follows from ``m``)."""
    builtin = builtin_config(m, kind)
    if device is None or device.type != "cuda":
        return builtin
    tuned = pick("skinny_linear.fwd", config_key(n, k, kind), builtin, device)
    return builtin if tuned is builtin else _with_rows(tuned, builtin.block_m)


def plan(m: int, n: int, k: int, cfg: LaunchConfig, sms: int = DEFAULT_NUM_SMS):
    """(k_per_split, splits): K cut into chunks of whole BLOCK_K steps so that about
    ``PROGRAMS_PER_SM * sms`` programs run, each chunk at least ``MIN_K_PER_SPLIT`` long."""
    k_blocks = cdiv(max(k, 1), cfg.block_k)
    tiles = cdiv(n, cfg.block_n) * cdiv(m, cfg.block_m)
    wanted = cdiv(PROGRAMS_PER_SM * sms, tiles)
    wanted = max(1, min(wanted, cdiv(k, MIN_K_PER_SPLIT), k_blocks))
    k_per_split = cdiv(k_blocks, wanted) * cfg.block_k
    return k_per_split, cdiv(max(k, 1), k_per_split)


_COUNTERS = {}  # device -> int32 arrival counters, all zero between launches


def counters(device: torch.device, tiles: int) -> torch.Tensor:
    """The device's split-K arrival counters (at least ``tiles``), zero between launches.

    Allocated (zeroed) once per device and grown in ``COUNTER_CHUNK`` steps; every launch
    leaves them at zero. Growing inside a CUDA graph capture would capture an allocation
    the eager launches cannot see, so it raises instead: run the step once before capturing.
    """
    key = f"cuda:{cuda_index(device)}" if device.type == "cuda" else str(device)
    buffer = _COUNTERS.get(key)
    if buffer is None or buffer.numel() < tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"skinny_linear: the split-K counters of {device} must grow to {tiles} tiles during a CUDA graph "
                "capture; run the step once outside the capture first (a warm-up call allocates them)")
        buffer = torch.zeros(cdiv(tiles, COUNTER_CHUNK) * COUNTER_CHUNK, dtype=torch.int32, device=device)
        _COUNTERS[key] = buffer
    return buffer


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def _launch(x, weight, scale, bias, ln_weight, ln_bias, eps, gelu, residual, y, kv, config, split_k):
    m, k = x.shape
    n = weight.shape[0]
    if m == 0 or n == 0:
        return
    cfg = config or tile_config(m, n, k, weight_kind(weight.dtype, x.dtype), x.device)
    k_per_split, splits = plan(m, n, k, cfg, sm_count(x.device))
    if split_k is not None:
        k_per_split = cdiv(cdiv(max(k, 1), cfg.block_k), split_k) * cfg.block_k
        splits = cdiv(max(k, 1), k_per_split)
    grid = (cdiv(n, cfg.block_n), cdiv(m, cfg.block_m), splits)
    if splits > 1:
        partial = empty((splits, m, n), torch.float32, x.device)
        count = counters(x.device, grid[0] * grid[1])
    else:
        partial = count = y  # unused
    if kv is None:
        k_cache = v_cache = positions = y  # unused
        cache_strides, pos_strides, seq_len, rows_per_seq, q_cols, kv_cols, head_dim = (0,) * 8, (0, 0), 1, 1, n, 0, 1
    else:
        k_cache, v_cache, positions = kv
        rows_per_seq = positions.shape[1]
        head_dim, seq_len = k_cache.shape[3], k_cache.shape[2]
        kv_cols = k_cache.shape[1] * head_dim
        q_cols = n - 2 * kv_cols
        cache_strides, pos_strides = (*k_cache.stride(), *v_cache.stride()), positions.stride()
    placeholder = x  # pointer arguments the constexprs switch off
    with device_guard(x.device):
        launch(_skinny_linear_kernel, grid,
            x, weight, scale if scale is not None else placeholder, bias if bias is not None else placeholder,
            ln_weight if ln_weight is not None else placeholder, ln_bias if ln_bias is not None else placeholder,
            residual if residual is not None else placeholder, y, partial, count, k_cache, v_cache, positions,
            m, n, k, k_per_split, eps,
            *x.stride(), *weight.stride(),
            *(residual.stride() if residual is not None else (0, 0)), *y.stride(),
            *cache_strides, *pos_strides,
            seq_len, rows_per_seq, q_cols, kv_cols, head_dim,
            QUANTIZED=weight.dtype == torch.int8, HAS_BIAS=bias is not None, LAYER_NORM=ln_weight is not None,
            HAS_LN_BIAS=ln_bias is not None, GELU=gelu, RESIDUAL=residual is not None, KV_CACHE=kv is not None,
            SPLIT_K=splits > 1, IEEE_FP32=x.dtype == torch.float32,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )


def skinny_linear(x, weight, bias=None, *, scale=None, ln_weight=None, ln_bias=None, eps=1e-5, gelu=False,
                  residual=None, out=None, config=None, split_k=None):
    """``y = act(LN(x) @ W^T * scale + bias) + residual`` (every part optional) in one launch.

    x (M, K) fp16/bf16/fp32, any strides; weight (N, K) in x's dtype, or int8 with
    ``scale`` (N,) fp32 or x's dtype; bias (N,) x's dtype; ln_weight / ln_bias (K,) x's
    dtype or fp32 (``ln_weight`` turns the layer-norm prologue on); ``gelu``: GPT-2's tanh
    GELU; residual (M, N) x's dtype, any strides. Writes and returns ``out`` (M, N) in x's
    dtype (any strides), a new tensor by default. ``config`` / ``split_k`` override the
    launch config and the split (the tuner and the tests use them).
    """
    y = empty((x.shape[0], weight.shape[0]), x.dtype, x.device) if out is None else out
    _launch(x, weight, scale, bias, ln_weight, ln_bias, eps, gelu, residual, y, None, config, split_k)
    return y


def skinny_linear_kv(x, weight, bias, k_cache, v_cache, positions, *, scale=None, ln_weight=None, ln_bias=None,
                     eps=1e-5, out=None, config=None, split_k=None):
    """The QKV projection that writes its k and v columns into the KV caches.

    x (B * T, K) (row ``b * T + t`` is token t of sequence b); weight (N, K) with
    ``N = Q + 2 * H_kv * D``, columns ordered ``[q | k | v]`` and k, v head-major (column
    ``Q + h * D + d``); k_cache, v_cache (B_max >= B, H_kv, S, D) in x's dtype, any
    strides; positions (B, T) int32/int64 on the device, any strides. Writes
    ``k_cache[b, h, positions[b, t], d]`` (and v) for every row and returns the q columns
    (B * T, Q) (``out`` if given). Prologue, int8 weights and bias as ``skinny_linear``.
    """
    kv_cols = k_cache.shape[1] * k_cache.shape[3]
    y = empty((x.shape[0], weight.shape[0] - 2 * kv_cols), x.dtype, x.device) if out is None else out
    _launch(x, weight, scale, bias, ln_weight, ln_bias, eps, False, None, y, (k_cache, v_cache, positions), config,
            split_k)
    return y


# --------------------------------------------------------------------------------------
# Tuning candidates and static compile entries
# --------------------------------------------------------------------------------------

# GPT-2-family weights (N, K) at decode: c_attn, attn c_proj, c_fc, mlp c_proj, the LM head.
# Their tuned-table keys get candidates for 16-bit and int8 weights; the built-in first.
TUNING_SHAPES = ((2304, 768), (768, 768), (3072, 768), (768, 3072), (50257, 768))
_CANDIDATE_TILES = ((64, 128, 4, 3), (32, 128, 4, 3), (128, 128, 4, 3), (64, 256, 4, 3), (32, 256, 4, 4),
                    (64, 64, 4, 4), (128, 64, 8, 3), (64, 128, 8, 4), (32, 128, 2, 4), (16, 256, 2, 3))
CANDIDATES = {"fwd": {config_key(n, k, kind): [LaunchConfig(num_warps=w, num_stages=s, block_m=16, block_n=bn,
                                                            block_k=bk) for bn, bk, w, s in _CANDIDATE_TILES]
                      for n, k in TUNING_SHAPES for kind in ("16bit", "int8")}}


def _entry(name: str, cfg: LaunchConfig, dtype: torch.dtype, *, quantized=False, layer_norm=False, gelu=False,
           residual=False, kv_cache=False, split_k=False, require_ptx=()) -> dict:
    """A static entry as launched on contiguous x, weight and output (unit strides are
    constexprs, as Triton's JIT specialises integer arguments equal to 1)."""
    pointers = {"X": pointer(dtype), "W": "*i8" if quantized else pointer(dtype), "SCALE": pointer(torch.float32),
                "BIAS": pointer(dtype), "LN_W": pointer(dtype), "LN_B": pointer(dtype), "RES": pointer(dtype),
                "Y": pointer(dtype), "PARTIAL": pointer(torch.float32), "COUNTERS": pointer(torch.int32),
                "K_CACHE": pointer(dtype), "V_CACHE": pointer(dtype), "POS": pointer(torch.int64)}
    constexprs = {"stride_xk": 1, "stride_wk": 1, "stride_rn": 1, "stride_yn": 1, "stride_kd": 1, "stride_vd": 1,
                  "QUANTIZED": quantized, "HAS_BIAS": True, "LAYER_NORM": layer_norm, "HAS_LN_BIAS": layer_norm,
                  "GELU": gelu, "RESIDUAL": residual, "KV_CACHE": kv_cache, "SPLIT_K": split_k,
                  "IEEE_FP32": dtype == torch.float32, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                  "BLOCK_K": cfg.block_k}
    aligned = ["N", "K", "K_PER_SPLIT", "stride_xm", "stride_wn", "stride_rm", "stride_ym", "stride_kb", "stride_kh",
               "stride_ks", "stride_vb", "stride_vh", "stride_vs", "seq_len", "q_cols", "kv_cols", "head_dim"]
    return static_entry(f"skinny_linear_{name}_{cfg.tag()}_{'i8_' if quantized else ''}{TRITON_TYPE[dtype]}",
                        _skinny_linear_kernel, cfg, constexprs, pointers=pointers, floats=("eps",),
                        divisible_by_16=aligned, require_ptx=require_ptx)


def static_configs():
    """The launches of a GPT-2 decode step in bf16 (built-in tile, one row tile): the
    layer norm + QKV + KV-cache write, the output projection + residual (split-K), the
    layer norm + MLP up-projection + GELU, the down-projection + residual (split-K), the
    final layer norm + LM head; and the same five with int8 weights. HGMMA is not
    required: the rows are the MMA's narrow side (see the module docstring)."""
    cfg = builtin_config(1)
    entries = []
    for quantized in (False, True):
        entries += [
            _entry("qkv_kv", cfg, torch.bfloat16, quantized=quantized, layer_norm=True, kv_cache=True, split_k=True),
            _entry("proj_residual", cfg, torch.bfloat16, quantized=quantized, residual=True, split_k=True),
            _entry("fc_gelu", cfg, torch.bfloat16, quantized=quantized, layer_norm=True, gelu=True, split_k=True),
            _entry("lm_head", cfg, torch.bfloat16, quantized=quantized, layer_norm=True),
        ]
    return entries


def candidate_configs():
    """Static compile entries of every distinct tuning candidate that is not the built-in
    config, on the heaviest variant (layer norm + GELU + split-K)."""
    builtin = builtin_config(1)
    seen = {}
    for configs in CANDIDATES["fwd"].values():
        for cfg in configs:
            if cfg != builtin:
                seen.setdefault(cfg, None)
    entries = []
    for cfg in seen:
        for quantized in (False, True):
            entries.append(_entry("cand", cfg, torch.bfloat16, quantized=quantized, layer_norm=True, gelu=True,
                                  split_k=True))
    return entries


def precision_configs():
    """fp32 activations: IEEE fp32 products (``fma.rn.f32``, no TF32), and the layer
    norm's and GELU's divisions round to nearest (``div.rn.f32``)."""
    return [_entry("fc_gelu_fp32", builtin_config(1, "fp32"), torch.float32, layer_norm=True, gelu=True, split_k=True,
                   require_ptx=("fma.rn.f32", "div.rn.f32"))]
