"""Cross-entropy rows of the fused linear + cross-entropy op: loss per row, and the
gradient of the logits written over the logits in place.

``gptfast.ops.linear_cross_entropy`` computes the logits of a chunk of rows with a
matmul, then calls ``cross_entropy_rows_`` on that chunk. One program owns one row of
``V`` logits and walks it twice in blocks of ``BLOCK_V``:

    pass 1   m, s = running max and sum of exp(x - m)          (online softmax, fp32)
             lse  = m + log(s)
             loss = lse - x[target]      (0 for a row whose target is ignore_index)
    pass 2   x   <- (exp(x - lse) - onehot(target)) * (1 / n_valid)    (in x's dtype)

so the logits buffer holds ``d(mean loss)/d(logits)`` afterwards and no second
(rows x V) buffer is ever needed. ``n_valid`` is read from a device tensor (no host
sync; CUDA-graph safe) and ``1 / max(n_valid, 1)`` is rounded to nearest for fp32, as
PyTorch's division of the summed loss by the count is. An ignored row gets a zero
gradient. A target outside ``[0, V)`` that is not ``ignore_index`` gives a NaN loss
(and a NaN gradient row) instead of an out-of-bounds read: the error shows up in the
loss without a device-side assert.

Statistics are float32 whatever the logits' dtype. Launchers assume validated inputs:
a 2-D logits matrix whose last dimension is contiguous, int64 targets, an int64
one-element count and a float32 per-row loss output.
"""
import functools

import torch
import triton
import triton.language as tl

from ._common import LOG2E, TRITON_TYPE, LaunchConfig, device_guard, div, launch, next_power_of_2, pointer, static_entry

_LOG2E = tl.constexpr(LOG2E)  # exp(x) == exp2(x * LOG2E)
_LN2 = tl.constexpr(1.0 / LOG2E)  # log(x) == log2(x) * LN2
MAX_BLOCK_V = 4096  # logits per step of a row walk (16 fp32 values per thread at 8 warps)


@triton.jit
def _cross_entropy_rows_kernel(
    LOGITS, TARGETS, COUNT, LOSS,
    n_cols, stride_row, ignore_index,
    WRITE_GRAD: tl.constexpr,  # overwrite the logits with the gradient of the mean loss
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = LOGITS + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    target = tl.load(TARGETS + row)

    # Pass 1: max and sum of exponentials, base 2, one running pair per row.
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.full([], 0.0, tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        mask = start + cols < n_cols
        x = tl.load(row_ptr + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp2((m - m_new) * _LOG2E) + tl.sum(tl.exp2((x - m_new) * _LOG2E), axis=0)
        m = m_new
    lse = m + tl.log2(s) * _LN2

    ignored = target == ignore_index
    in_range = (target >= 0) & (target < n_cols)
    picked = tl.load(row_ptr + target, mask=in_range & ~ignored, other=0.0).to(tl.float32)
    loss = tl.where(in_range, lse - picked, float("nan"))
    tl.store(LOSS + row, tl.where(ignored, 0.0, loss))

    if WRITE_GRAD:
        count = tl.maximum(tl.load(COUNT), 1)
        inv = div(1.0, count, LOGITS.dtype.element_ty == tl.float32)
        scale = tl.where(ignored, 0.0, tl.where(in_range, inv, float("nan")))
        for start in range(0, n_cols, BLOCK_V):
            offs = start + cols
            mask = offs < n_cols
            x = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp2((x - lse) * _LOG2E)
            grad = (p - tl.where(offs == target, 1.0, 0.0)) * scale
            tl.store(row_ptr + offs, grad.to(LOGITS.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=256)
def launch_config(n_cols: int) -> LaunchConfig:
    """One program per row; a step of up to MAX_BLOCK_V logits (fewer for a small vocabulary)."""
    block_v = min(MAX_BLOCK_V, max(16, next_power_of_2(n_cols)))
    return LaunchConfig(num_warps=8 if block_v >= 2048 else 4, block_n=block_v)


def cross_entropy_rows_(logits: torch.Tensor, targets: torch.Tensor, count: torch.Tensor, loss: torch.Tensor,
                        ignore_index: int, write_grad: bool) -> None:
    """Per-row loss into ``loss`` (rows,) float32; with ``write_grad``, ``logits`` (rows, V)
    is overwritten with ``(softmax - onehot) / max(count, 1)`` (zero rows where ignored).
    ``targets`` (rows,) int64, ``count`` (1,) int64: the number of counted targets of the
    whole batch, not only these rows."""
    rows, n_cols = logits.shape
    if rows == 0:
        return
    cfg = launch_config(n_cols)
    with device_guard(logits.device):
        launch(_cross_entropy_rows_kernel, (rows,),
            logits, targets, count, loss, n_cols, logits.stride(0), ignore_index,
            WRITE_GRAD=write_grad, BLOCK_V=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )


def static_configs():
    """Shipped configurations for ``gptfast.compile_report``: GPT-2's vocabulary (50,257
    logits a row, so rows are not 16-aligned) in bf16 and fp16, with the gradient pass,
    and the loss-only variant (evaluation, no gradient) in bf16."""
    cfg = launch_config(50257)
    return [_entry(cfg, torch.bfloat16, True), _entry(cfg, torch.float16, True), _entry(cfg, torch.bfloat16, False)]


def candidate_configs():
    """No tuning candidates: one row per program, the step fixed by the vocabulary size."""
    return []


def precision_configs():
    """fp32 logits: the 1 / n_valid factor of the gradient is rounded to nearest."""
    return [_entry(launch_config(50257), torch.float32, True, require_ptx=("div.rn.f32",))]


def _entry(cfg: LaunchConfig, dtype: torch.dtype, write_grad: bool, require_ptx=()) -> dict:
    pointers = {"LOGITS": pointer(dtype), "TARGETS": pointer(torch.int64), "COUNT": pointer(torch.int64),
                "LOSS": pointer(torch.float32)}
    constexprs = {"WRITE_GRAD": write_grad, "BLOCK_V": cfg.block_n}
    name = f"cross_entropy_rows_{cfg.tag()}_{TRITON_TYPE[dtype]}" + ("" if write_grad else "_loss_only")
    return static_entry(name, _cross_entropy_rows_kernel, cfg, constexprs, pointers=pointers, divisible_by_16=[],
                        require_ptx=require_ptx)
