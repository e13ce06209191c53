"""Fused LayerNorm in Triton: forward, backward and the residual-add variant.

LayerNorm over the last dimension of a row-major ``(n_rows, n_cols)`` matrix::

    h    = x (+ residual)                    # the fused variant also writes h
    mean = sum(h) / N
    var  = sum((h - mean)^2) / N             # biased, as torch.nn.LayerNorm
    rstd = 1 / sqrt(var + eps)
    xhat = (h - mean) * rstd
    y    = xhat * weight + bias

Forward: each program owns ``BLOCK_ROWS`` whole rows (one row for wide rows, a few for
narrow ones, so every program keeps enough bytes in flight), so the row is read once,
its statistics are taken in float32 in registers, and ``y`` (and ``h``) are written
once. ``mean`` and ``rstd`` are saved in float32 for the backward pass.

Statistics about a pivot: a row far from zero with a small spread (values near 300, spread
1e-2) loses the digits that matter to a float32 sum of the raw values, and rounding the
mean to float32 before subtracting it loses them again. The forward therefore shifts each
row by its first element ``p`` (``h - p`` is exact when the values are within a factor of
two of each other, Sterbenz), takes ``m = sum(h - p) / N`` and the centred values
``(h - p) - m`` from the shifted values, the variance from those in a second pass, and only
the saved mean ``p + m`` is rounded at the row's magnitude. The backward does the same
about the saved mean: ``d = h - mean`` and ``xhat = (d - sum(d) / N) * rstd``, which
removes the saved mean's rounding error from ``xhat``.

Backward, with ``g = dy * weight`` and ``N`` the row length::

    dh = rstd * (g - (xhat * mean(g * xhat) + mean(g)))    (+ the incoming grad of h)
    dweight = sum over rows of dy * xhat
    dbias   = sum over rows of dy

``dh`` is a per-row computation. ``dweight`` and ``dbias`` are reductions across rows:
rather than serialising programs on a lock, a persistent grid of ``G`` programs (a few
per SM) each owns one contiguous range of rows, walks it ``BLOCK_ROWS`` rows at a time
(each step reads ``h`` and ``dy`` once and writes ``dx`` once), accumulates its own
float32 partial sums in registers and writes them to row ``pid`` of a ``(G, N)`` buffer;
the launcher then sums the ``G`` partials (a small second pass over ``G * N`` floats).

Widths: a row of up to ``MAX_HIDDEN`` elements fits one program's registers when its
length and row strides are multiples of 16 (Triton then specialises the launch for
16-byte vector loads with few predicates); other lengths are served up to
``MAX_HIDDEN_UNALIGNED``. ``check_hidden_size`` raises a clear error beyond that; the ops
layer calls it before reaching these launchers.

Launchers expect validated inputs: 2-D tensors whose last dimension is contiguous
(any row stride), on one device, floating dtypes.
"""
import functools

import torch
import triton
import triton.language as tl

from ._common import (LaunchConfig, cdiv, check_out, device_guard, div, empty, launch, next_power_of_2, pointer,
                      rsqrt, sm_count, static_entry)
from ._tuned import pick

# Widest row one program holds (in elements). The backward keeps about five float32
# values per column live (h, dy, xhat, and the two partial sums); at 8192 columns and 16
# warps that fits sm_90's 128 registers a thread (512 threads) only with vectorised,
# 16-aligned rows; an unaligned row length spills there, so it stops at 4096. Wider rows
# would spill: gptfast.compile_report compiles both widths among the shipped configs
# and fails on any spill.
MAX_HIDDEN = 8192
MAX_HIDDEN_UNALIGNED = 4096

# Elements a forward program (a backward step) aims to hold: narrow rows are packed
# several per program (step). The backward keeps more live per element (h, dy, xhat, g and
# the two accumulators), hence its smaller tile (at 2048, rows of 1024 unaligned elements
# spill on sm_90). At most 8 rows a program: 16 rows of 256 unaligned elements spill with
# triton 3.9.
_FWD_ELEMS_PER_PROGRAM = 4096
_BWD_ELEMS_PER_STEP = 1024
_MAX_BLOCK_ROWS = 8


@triton.jit
def _layer_norm_fwd_kernel(
    X, RES, Y, H, W, B, MEAN, RSTD,  # pointers
    stride_x_row, stride_res_row, stride_y_row, stride_h_row,
    n_rows, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr,  # also write h = x + residual and normalise h
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_STATS: tl.constexpr,  # write mean and rstd (for a backward; inference skips them)
    BLOCK_ROWS: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # next power of two >= n_cols
):
    pid = tl.program_id(0)
    # int64 row indices: row * stride overflows int32 beyond 2**31 elements.
    rows = pid.to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]

    x = tl.load(X + rows[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(RES + rows[:, None] * stride_res_row + cols[None, :], mask=mask, other=0.0)
        # h is rounded to the input dtype (it is the residual stream the next block reads)
        # and the statistics are taken of the rounded value, exactly like x + residual
        # followed by a plain layernorm.
        x = (x.to(tl.float32) + res.to(tl.float32)).to(H.dtype.element_ty)
        tl.store(H + rows[:, None] * stride_h_row + cols[None, :], x, mask=mask)
    x = x.to(tl.float32)

    # The pivot: each row's first element (of h in the residual variant, rounded as h is).
    # A separate load of one element a row (it hits the cache line the row load brings).
    pivot = tl.load(X + rows * stride_x_row, mask=row_mask, other=0.0)
    if HAS_RESIDUAL:
        pivot_res = tl.load(RES + rows * stride_res_row, mask=row_mask, other=0.0)
        pivot = (pivot.to(tl.float32) + pivot_res.to(tl.float32)).to(H.dtype.element_ty)
    pivot = pivot.to(tl.float32)

    # Two-pass statistics in float32 about the pivot (see the module docstring): subtracting
    # the mean before squaring avoids the cancellation of E[x^2] - E[x]^2. Masked columns
    # must stay out of both sums. fp32 outputs round the divisions and the square root to
    # nearest (see _common).
    PRECISE: tl.constexpr = Y.dtype.element_ty == tl.float32
    shifted = tl.where(mask, x - pivot[:, None], 0.0)
    shift_mean = div(tl.sum(shifted, axis=1), n_cols, PRECISE)
    centered = tl.where(mask, shifted - shift_mean[:, None], 0.0)
    var = div(tl.sum(centered * centered, axis=1), n_cols, PRECISE)
    rstd = rsqrt(var + eps, PRECISE)
    if STORE_STATS:
        tl.store(MEAN + rows, pivot + shift_mean, mask=row_mask)
        tl.store(RSTD + rows, rstd, mask=row_mask)

    y = centered * rstd[:, None]
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = y * w[None, :]
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = y + b[None, :]
    tl.store(Y + rows[:, None] * stride_y_row + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_bwd_kernel(
    DY, H, W, MEAN, RSTD, DH_IN, DX, DW_PARTIAL, DB_PARTIAL,  # pointers
    stride_dy_row, stride_h_row, stride_dh_row, stride_dx_row,
    n_rows, n_cols, rows_per_program,
    HAS_WEIGHT: tl.constexpr,
    HAS_DH_IN: tl.constexpr,  # residual variant: add the incoming gradient of h
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,  # rows per step
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    PRECISE: tl.constexpr = DX.dtype.element_ty == tl.float32  # round-to-nearest divisions (see _common)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    # Per-row-slot partial sums; summed over the slots once, after the loop.
    dw_acc = tl.zeros((BLOCK_ROWS, BLOCK_N), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_ROWS, BLOCK_N), dtype=tl.float32)

    # This program's rows: one contiguous range, BLOCK_ROWS rows a step.
    row_begin = pid * rows_per_program
    row_end = tl.minimum(row_begin + rows_per_program, n_rows)
    for start in range(row_begin, row_end, BLOCK_ROWS):
        rows = start + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < row_end
        rows64 = rows.to(tl.int64)  # row * stride may pass 2**31
        mask = row_mask[:, None] & col_mask[None, :]
        h = tl.load(H + rows64[:, None] * stride_h_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * stride_dy_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        # xhat about the saved mean, corrected by the mean of the exact differences (see the
        # module docstring). Masked rows have rstd == 0 and dy == 0; masked columns load
        # dy == 0, so g == 0 there and they add nothing to the sums below, whatever xhat
        # holds in them.
        d = tl.where(mask, h - mean[:, None], 0.0)
        d_mean = div(tl.sum(d, axis=1), n_cols, PRECISE)
        xhat = (d - d_mean[:, None]) * rstd[:, None]
        if COMPUTE_DW:
            dw_acc += dy * xhat
        if COMPUTE_DB:
            db_acc += dy
        if HAS_WEIGHT:
            g = dy * w[None, :]
        else:
            g = dy
        c_xhat = div(tl.sum(g * xhat, axis=1), n_cols, PRECISE)
        c_one = div(tl.sum(g, axis=1), n_cols, PRECISE)
        dx = (g - (xhat * c_xhat[:, None] + c_one[:, None])) * rstd[:, None]
        if HAS_DH_IN:
            dx += tl.load(DH_IN + rows64[:, None] * stride_dh_row + cols[None, :], mask=mask,
                          other=0.0).to(tl.float32)
        tl.store(DX + rows64[:, None] * stride_dx_row + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)

    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
    if COMPUTE_DB:
        tl.store(DB_PARTIAL + pid * n_cols + cols, tl.sum(db_acc, axis=0), mask=col_mask)


# --------------------------------------------------------------------------------------
# Launch configuration: one place decides block sizes and warps, for the launchers and
# for static_configs() alike, so the compile report checks what actually ships.
# --------------------------------------------------------------------------------------


def block_n_for(n_cols: int) -> int:
    return next_power_of_2(n_cols)


def config_key(n_cols: int, dtype: torch.dtype) -> str:
    """The configuration tables' key of a row length and dtype, e.g. ``n1024_16bit``."""
    return f"n{block_n_for(n_cols)}_{'fp32' if dtype == torch.float32 else '16bit'}"


@functools.lru_cache(maxsize=None)
def _builtin_fwd(n_cols: int) -> LaunchConfig:
    block_n = block_n_for(n_cols)
    block_rows = max(1, min(_MAX_BLOCK_ROWS, _FWD_ELEMS_PER_PROGRAM // block_n))
    # About 16 elements per thread (at most 16 warps: 32 warps would cap a thread at 64 registers).
    num_warps = max(4, min(16, (block_n * block_rows) // 512))
    return LaunchConfig(block_rows=block_rows, num_warps=num_warps)


@functools.lru_cache(maxsize=None)
def _builtin_bwd(n_cols: int) -> LaunchConfig:
    block_n = block_n_for(n_cols)
    block_rows = max(1, min(_MAX_BLOCK_ROWS, _BWD_ELEMS_PER_STEP // block_n))
    # About 8 elements per thread (h, dy, xhat, g and two accumulators each), at most 16 warps.
    return LaunchConfig(block_rows=block_rows, num_warps=max(4, min(16, (block_n * block_rows) // 256)))


def fwd_config(n_cols: int, dtype: torch.dtype = torch.bfloat16, device=None) -> LaunchConfig:
    """block_rows and num_warps of the forward kernel for rows of ``n_cols`` (BLOCK_N is
    ``block_n_for(n_cols)``): the device's tuned config, else the built-in rule."""
    builtin = _builtin_fwd(n_cols)
    if device is None or device.type != "cuda":
        return builtin
    return pick("layer_norm.fwd", config_key(n_cols, dtype), builtin, device)


def bwd_config(n_cols: int, dtype: torch.dtype = torch.bfloat16, device=None) -> LaunchConfig:
    """block_rows (rows per step) and num_warps of the backward kernel, as fwd_config."""
    builtin = _builtin_bwd(n_cols)
    if device is None or device.type != "cuda":
        return builtin
    return pick("layer_norm.bwd", config_key(n_cols, dtype), builtin, device)


def bwd_plan(n_rows: int, device: torch.device, cfg: LaunchConfig) -> tuple:
    """``(programs, rows_per_program)`` of the backward's persistent grid: each program owns
    ``rows_per_program`` consecutive rows (a multiple of block_rows; the last program may
    own fewer), and programs = dweight/dbias partial rows."""
    block_rows = cfg.block_rows or 1
    if device.type != "cuda":
        target = 4  # interpreter: few programs, each loops over several steps
    else:
        # Enough programs to fill every SM (up to 64 resident warps each; registers may
        # admit fewer, then the rest wait for a slot), few enough that the (G, N) partials
        # stay small next to the activations.
        target = sm_count(device) * max(1, min(8, 64 // cfg.num_warps))
    rows_per_program = block_rows * cdiv(cdiv(n_rows, target), block_rows)
    return cdiv(n_rows, rows_per_program), rows_per_program


# Tuning candidates (gptfast.tune) at the benchmark widths (16-bit rows): the built-in
# config first. (block_rows, num_warps) of the forward and of the backward (rows per step);
# every one passes the static compile report (no spills).
CANDIDATES = {
    "fwd": {f"n{n}_16bit": [LaunchConfig(block_rows=r, num_warps=w) for r, w in rows] for n, rows in (
        (1024, ((4, 8), (4, 4), (2, 4), (8, 8), (8, 16), (1, 4))),
        (2048, ((2, 8), (2, 4), (1, 4), (4, 8), (4, 16), (1, 8))),
        (4096, ((1, 8), (1, 4), (1, 16), (2, 16), (2, 8))),
        (8192, ((1, 16), (1, 8))),
    )},
    "bwd": {f"n{n}_16bit": [LaunchConfig(block_rows=r, num_warps=w) for r, w in rows] for n, rows in (
        (1024, ((1, 4), (2, 8), (2, 4), (4, 8), (4, 16), (1, 8))),
        (2048, ((1, 8), (1, 4), (2, 8), (1, 16))),  # (2, 16) spills with triton 3.9
        (4096, ((1, 16), (1, 8), (2, 16))),
        (8192, ((1, 16), (1, 32))),
    )},
}


def check_hidden_size(n_cols: int) -> None:
    """Raise ValueError when rows of ``n_cols`` elements do not fit one program."""
    if n_cols > MAX_HIDDEN:
        raise ValueError(
            f"layer_norm: hidden size {n_cols} exceeds the fused kernel's maximum of {MAX_HIDDEN} "
            "elements per row (one program holds a whole row)"
        )
    if n_cols > MAX_HIDDEN_UNALIGNED and n_cols % 16:
        raise ValueError(
            f"layer_norm: hidden size {n_cols} is not a multiple of 16; the fused kernel serves such "
            f"rows up to {MAX_HIDDEN_UNALIGNED} elements (multiples of 16 up to {MAX_HIDDEN})"
        )


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def _row_stride(t: torch.Tensor) -> int:
    # A single row has no meaningful row stride (row index 0); report the row length so a
    # one-row launch specialises like a contiguous one.
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def _is_16_aligned(t: torch.Tensor) -> bool:
    """Whether Triton specialises ``t`` for 16-byte vector access: 16-byte aligned data
    and, for a matrix, a row stride that is a multiple of 16 elements."""
    return t.data_ptr() % 16 == 0 and (t.dim() == 1 or _row_stride(t) % 16 == 0)


def _wide_rows_aligned(t, n_cols: int):
    """Rows wider than MAX_HIDDEN_UNALIGNED are only compiled spill-free for 16-aligned
    tensors (see MAX_HIDDEN): copy a misaligned view into a fresh, aligned tensor."""
    if t is None or n_cols <= MAX_HIDDEN_UNALIGNED or _is_16_aligned(t):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _vector(t, n_cols: int):
    """A weight or bias as the kernels read it: contiguous (and aligned for wide rows)."""
    return None if t is None else _wide_rows_aligned(t.contiguous(), n_cols)


def _check_out(name: str, out, shape, dtype, device) -> torch.Tensor:
    """A caller's buffer checked (or a fresh one); wide rows must also be 16-aligned."""
    if out is None:
        return empty(shape, dtype, device)
    out = check_out("layer_norm", name, out, shape, dtype, device)
    if out.dim() == 2 and shape[1] > MAX_HIDDEN_UNALIGNED and not _is_16_aligned(out):
        raise ValueError(f"layer_norm: {name} must be 16-byte aligned with a row stride that is a multiple of 16")
    return out


def layer_norm_fwd(x, weight, bias, eps, residual=None, *, out=None, h_out=None, mean_out=None, rstd_out=None,
                   config=None, store_stats=True):
    """Forward of ``layer_norm(x (+ residual)) * weight + bias`` over the rows of a 2-D ``x``.

    Returns ``(y, h, mean, rstd)``: ``y`` and ``h`` in ``x.dtype`` (``h`` is None without
    ``residual``), ``mean`` and ``rstd`` float32 of shape ``(n_rows,)``, or None with
    ``store_stats=False`` (inference: no backward will read them, so they are neither
    allocated nor written). Buffers passed as ``out``/``h_out``/``mean_out``/``rstd_out``
    are written in place (``mean_out``/``rstd_out`` with ``store_stats=False`` are refused:
    nothing would write them); ``config`` (a LaunchConfig with block_rows and num_warps)
    overrides ``fwd_config``.
    """
    n_rows, n_cols = x.shape
    check_hidden_size(n_cols)
    dev = x.device
    x, residual = _wide_rows_aligned(x, n_cols), _wide_rows_aligned(residual, n_cols)
    weight, bias = _vector(weight, n_cols), _vector(bias, n_cols)
    y = _check_out("out", out, (n_rows, n_cols), x.dtype, dev)
    h = None if residual is None else _check_out("h_out", h_out, (n_rows, n_cols), x.dtype, dev)
    if store_stats:
        mean = _check_out("mean_out", mean_out, (n_rows,), torch.float32, dev)
        rstd = _check_out("rstd_out", rstd_out, (n_rows,), torch.float32, dev)
    elif mean_out is not None or rstd_out is not None:  # a buffer that would silently stay unwritten
        raise ValueError("layer_norm: mean_out/rstd_out were given with store_stats=False, which writes no statistics")
    else:
        mean = rstd = None
    if n_rows == 0:
        return y, h, mean, rstd

    cfg = config or fwd_config(n_cols, x.dtype, dev)
    grid = (cdiv(n_rows, cfg.block_rows),)
    # Absent optional tensors are passed as x: the constexpr flags keep the kernel off them.
    with device_guard(dev):
        launch(_layer_norm_fwd_kernel, grid,
            x, residual if residual is not None else x, y, h if h is not None else y,
            weight if weight is not None else x, bias if bias is not None else x,
            mean if store_stats else y, rstd if store_stats else y,
            _row_stride(x), _row_stride(residual) if residual is not None else 0,
            _row_stride(y), _row_stride(h) if h is not None else 0,
            n_rows, n_cols, float(eps),
            HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            STORE_STATS=store_stats, BLOCK_ROWS=cfg.block_rows, BLOCK_N=block_n_for(n_cols), num_warps=cfg.num_warps,
        )
    return y, h, mean, rstd


def layer_norm_bwd(dy, h, weight, mean, rstd, dh_in=None, *, compute_dw=True, compute_db=True,
                   dw_dtype=torch.float32, db_dtype=torch.float32, dx_out=None, config=None):
    """Backward of :func:`layer_norm_fwd`.

    ``h`` is the normalised input (``x``, or ``x + residual`` in the fused variant) and
    ``dh_in`` the incoming gradient of the ``h`` output in the fused variant (None when
    unused). Returns ``(dx, dweight, dbias)``: ``dx`` (``h.dtype``) is the gradient of
    ``h``, hence of ``x`` and of ``residual`` alike; ``dweight`` (needs a weight) and
    ``dbias`` are None unless requested, else in ``dw_dtype``/``db_dtype``. ``config`` (a
    LaunchConfig with block_rows and num_warps) overrides ``bwd_config``.
    """
    n_rows, n_cols = h.shape
    check_hidden_size(n_cols)
    dev = h.device
    compute_dw = compute_dw and weight is not None
    dy, h, dh_in = (_wide_rows_aligned(t, n_cols) for t in (dy, h, dh_in))
    weight = _vector(weight, n_cols)
    dx = _check_out("dx_out", dx_out, (n_rows, n_cols), h.dtype, dev)
    cfg = config or bwd_config(n_cols, h.dtype, dev)
    programs, rows_per_program = bwd_plan(n_rows, dev, cfg) if n_rows else (0, 1)
    # The dweight and dbias partials share one allocation.
    partials = (empty((int(compute_dw) + int(compute_db), programs, n_cols), torch.float32, dev)
                if compute_dw or compute_db else None)
    dw_partial = partials[0] if compute_dw else None
    db_partial = partials[-1] if compute_db else None
    if n_rows > 0:
        with device_guard(dev):
            launch(_layer_norm_bwd_kernel, (programs,),
                dy, h, weight if weight is not None else h, mean, rstd,
                dh_in if dh_in is not None else dy, dx,
                dw_partial if compute_dw else dx, db_partial if compute_db else dx,
                _row_stride(dy), _row_stride(h), _row_stride(dh_in) if dh_in is not None else 0, _row_stride(dx),
                n_rows, n_cols, rows_per_program,
                HAS_WEIGHT=weight is not None, HAS_DH_IN=dh_in is not None,
                COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db,
                BLOCK_ROWS=cfg.block_rows or 1, BLOCK_N=block_n_for(n_cols), num_warps=cfg.num_warps,
            )
    # Second pass of the dweight/dbias reduction: sum the G float32 partial rows (with no
    # rows at all, the sum over zero partials is the correct zero gradient). Both at once
    # when both are wanted in one dtype: one reduction (a launch fewer), the two gradients
    # then being rows of one tensor.
    if compute_dw and compute_db and dw_dtype == db_dtype:
        sums = _as_dtype(partials.sum(1), dw_dtype)
        return dx, sums[0], sums[1]
    dw = _as_dtype(dw_partial.sum(0), dw_dtype) if compute_dw else None
    db = _as_dtype(db_partial.sum(0), db_dtype) if compute_db else None
    return dx, dw, db


def _as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


# --------------------------------------------------------------------------------------
# Shipped configurations for the static compile report (gptfast.compile_report)
# --------------------------------------------------------------------------------------

# Row lengths whose launch configs the report compiles: tiny test models, GPT-2
# small/medium/large/xl, wider models, and the widest rows served.
_REPORT_HIDDEN = (64, 256, 768, 1024, 1280, 1600, 4096, 5120, MAX_HIDDEN)
_FP32_POINTERS = ("MEAN", "RSTD", "DW_PARTIAL", "DB_PARTIAL")


def _entry(kind: str, n_cols: int, dtype: torch.dtype, cfg: LaunchConfig, aligned: bool, *,
           residual: bool = True, param_dtype=None, suffix: str = "", require_ptx=()) -> dict:
    """The static compile entry of one launch: the forward (plain or residual) or the
    heaviest backward variant (weight, incoming dh, both parameter gradients), for rows
    and strides that are multiples of 16 ("a16", what GPT models launch) or arbitrary
    ("any", served up to MAX_HIDDEN_UNALIGNED)."""
    block_n = block_n_for(n_cols)
    if kind == "fwd":
        fn = _layer_norm_fwd_kernel
        name = f"layer_norm_{'fwd_residual' if residual else 'fwd'}_N{block_n}_R{cfg.block_rows}_w{cfg.num_warps}"
        constexprs = {"HAS_RESIDUAL": residual, "HAS_WEIGHT": True, "HAS_BIAS": True, "STORE_STATS": True,
                      "BLOCK_ROWS": cfg.block_rows, "BLOCK_N": block_n}
    else:
        fn = _layer_norm_bwd_kernel
        name = f"layer_norm_bwd_N{block_n}_R{cfg.block_rows}_w{cfg.num_warps}"
        constexprs = {"HAS_WEIGHT": True, "HAS_DH_IN": True, "COMPUTE_DW": True, "COMPUTE_DB": True,
                      "BLOCK_ROWS": cfg.block_rows, "BLOCK_N": block_n}
    pointers = {a: pointer(torch.float32 if a in _FP32_POINTERS else dtype) for a in fn.arg_names if a.isupper()}
    if param_dtype is not None:  # float32 parameters with low-precision activations (autocast-style)
        pointers.update({a: pointer(param_dtype) for a in ("W", "B") if a in pointers})
    # What Triton specialises for a row length and row strides divisible by 16.
    divisible = [a for a in fn.arg_names if a.startswith("stride_") or a == "n_cols"] if aligned else []
    return static_entry(name + ("_a16" if aligned else "_any") + suffix, fn, cfg, constexprs, pointers=pointers,
                        floats=("eps",), divisible_by_16=divisible, require_ptx=require_ptx)


def static_configs(dtype: torch.dtype = torch.bfloat16) -> list:
    """The kernel configurations this module launches, for compiling ahead of time.

    Per distinct built-in launch config over the report's row lengths: the forward
    (plain and residual) and the heaviest backward variant, each aligned and unaligned
    (see ``_entry``). ``dtype`` is bf16 by default: the GPU's training and inference dtype.
    """
    entries = []
    for hidden in _REPORT_HIDDEN:
        for aligned in (True, False):
            if not aligned and hidden > MAX_HIDDEN_UNALIGNED:
                continue
            entries += [_entry("fwd", hidden, dtype, _builtin_fwd(hidden), aligned, residual=r) for r in (False, True)]
            entries.append(_entry("bwd", hidden, dtype, _builtin_bwd(hidden), aligned))
    # float32 parameters with low-precision activations, at the widest rows, where register
    # pressure is highest.
    if dtype != torch.float32:
        entries.append(_entry("fwd", MAX_HIDDEN, dtype, _builtin_fwd(MAX_HIDDEN), True, param_dtype=torch.float32,
                              suffix="_fp32params"))
        entries.append(_entry("bwd", MAX_HIDDEN, dtype, _builtin_bwd(MAX_HIDDEN), True, param_dtype=torch.float32,
                              suffix="_fp32params"))
    return _unique(entries)


def _unique(entries: list) -> list:
    """Entries with distinct names (several row lengths share one launch config)."""
    seen = {}
    for entry in entries:
        seen.setdefault(entry["name"], entry)
    return list(seen.values())


def candidate_configs() -> list:
    """Static compile entries of the tuning candidates that are not the built-in config
    (aligned rows: the benchmark widths are multiples of 16)."""
    entries = []
    for kind, by_key in CANDIDATES.items():
        builtin = _builtin_fwd if kind == "fwd" else _builtin_bwd
        for key, configs in by_key.items():
            n_cols = int(key[1:].split("_")[0])
            entries += [_entry(kind, n_cols, torch.bfloat16, cfg, True, suffix="_cand")
                        for cfg in configs if cfg != builtin(n_cols)]
    return _unique(entries)


def precision_configs() -> list:
    """fp32 rows at the widths where the error ratio is tightest: the statistics' divisions
    and square root, and the backward's means, must round to nearest."""
    entries = [_entry("fwd", n, torch.float32, _builtin_fwd(n), True, suffix="_fp32",
                      require_ptx=("div.rn.f32", "sqrt.rn.f32")) for n in (4096, MAX_HIDDEN)]
    entries.append(_entry("bwd", MAX_HIDDEN, torch.float32, _builtin_bwd(MAX_HIDDEN), True, suffix="_fp32",
                          require_ptx=("div.rn.f32",)))
    return entries
