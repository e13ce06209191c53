"""``decode_attention``: one new query per row against a KV cache (generation's attention).

    out = decode_attention(q, k_cache, v_cache, cache_lens, scale=None)

q (B, H, D); k_cache, v_cache (B, H, S, D) with any strides (typically ``cache[:B]`` of a
bigger static buffer); cache_lens (B,) int32/int64 on the same device, the number of valid
positions of each row, in [1, S] (the new token's key already written). Cache positions at
or past a row's length may hold anything, even NaN (an uninitialised cache): they are never
read. Returns (B, H, D) in q's dtype. Head sizes up to 256; fp16, bf16, fp32.

Runs the split-KV Triton kernel (``gptfast.kernels.decode_attention``) on CUDA or under the
Triton interpreter; on the CPU, for float32, the C++ kernel of the gptfast extension
(``torch.ops.gptfast_cpu.decode_attention``, csrc/cpu_attention.cpp: a direct loop over each
row's valid positions, no mask: at decode shapes SDPA's masks and dispatch cost more than the
arithmetic; BENCHMARKS.md, "Weight-only int8", measures the decode step it belongs to)
when the extension is loaded (``cpu_kernel()``); otherwise the torch path
(``gptfast.ops.torch_path.decode_attention``: SDPA with a mask built from cache_lens). The op
is registered as ``torch.ops.gptfast.decode_attention`` with a fake implementation, so
``torch.compile(fullgraph=True)`` sees one opaque op and CUDA graphs can capture it (no host
synchronisation, allocations that depend only on shapes). Eager calls without gradients run
the op's implementation (``_decode``) directly, skipping the registered op's dispatch cost;
calls that could need a gradient, and compiled ones, go through the registered op.

Decode is inference-only: the op has no derivative, and calling ``backward`` through it
raises a RuntimeError that says so (use ``causal_attention`` for training).

Checking cache_lens values. Shapes, dtypes and devices are always checked. The *values*
of cache_lens are checked (ValueError when outside [1, S]) whenever that costs no device
synchronisation: always for CPU tensors; for CUDA tensors only when the environment sets
``GPTFAST_CHECK_CACHE_LENS=1`` and the current stream is not capturing a CUDA graph (the
check copies a flag to the host). Unchecked out-of-range lengths are clamped into [1, S]
by the kernel and the torch path alike, so they can never read outside the cache.
"""
import os
from typing import Optional

import torch

from gptfast.ops import torch_path
from gptfast.ops._dispatch import check_same_device_dtype, register_inference_only, use_triton
from gptfast.ops._validation import host_readable, resolve_scale, validate_heads, validate_key_start

MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CHECK_CUDA_LENS_ENV = "GPTFAST_CHECK_CACHE_LENS"


def _validate(q, k_cache, v_cache, cache_lens, key_start=None) -> None:
    """Shape, dtype and device checks: static facts only, so torch.compile traces them."""
    name = "decode_attention"
    for arg, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("cache_lens", cache_lens)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 3:
        raise ValueError(f"{name}: q must have shape (B, H, D), got {tuple(q.shape)}")
    if k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError(
            f"{name}: k_cache and v_cache must have shape (B, H, S, D), "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{name}: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in shape")
    batch, heads, head_dim = q.shape
    if (k_cache.shape[0], k_cache.shape[3]) != (batch, head_dim):
        raise ValueError(
            f"{name}: caches of shape {tuple(k_cache.shape)} do not match q of shape {tuple(q.shape)}: "
            f"expected ({batch}, H_kv, S, {head_dim})"
        )
    validate_heads(name, heads, k_cache.shape[1], "k_cache")
    if head_dim > MAX_HEAD_DIM or head_dim < 1:
        raise ValueError(f"{name}: head size {head_dim} is not supported (1 to {MAX_HEAD_DIM})")
    if k_cache.shape[2] < 1:
        raise ValueError(f"{name}: the cache has no positions (S = 0)")
    check_same_device_dtype(name, ("q", "k_cache", "v_cache"), q, k_cache, v_cache)
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: dtype {q.dtype} is not supported (float16, bfloat16, float32)")
    if cache_lens.device != q.device:
        raise ValueError(f"{name}: cache_lens is on {cache_lens.device} but q is on {q.device}")
    if cache_lens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: cache_lens must be int32 or int64, got {cache_lens.dtype}")
    if cache_lens.dim() != 1 or cache_lens.shape[0] != batch:
        raise ValueError(f"{name}: cache_lens must have shape ({batch},), got {tuple(cache_lens.shape)}")
    if key_start is not None:
        validate_key_start(name, key_start, q)


def _should_check_lens(cache_lens: torch.Tensor) -> bool:
    if host_readable(cache_lens):
        return True
    if cache_lens.device.type == "cuda" and os.environ.get(CHECK_CUDA_LENS_ENV, "0") == "1":
        return not torch.cuda.is_current_stream_capturing()
    return False


def _check_lens_values(cache_lens: torch.Tensor, seq_len: int) -> None:
    if cache_lens.numel() == 0 or not _should_check_lens(cache_lens):
        return
    values = cache_lens.tolist()  # one read (a few tensor ops would cost several times more per call)
    if min(values) >= 1 and max(values) <= seq_len:
        return
    row = next(i for i, n in enumerate(values) if not 1 <= n <= seq_len)
    raise ValueError(
        f"decode_attention: cache_lens[{row}] = {values[row]} is outside [1, {seq_len}] "
        f"(the cache holds {seq_len} positions)"
    )


_cpu_kernel = []  # [op or None] once looked up
_kernel_module = []


def cpu_kernel():
    """``torch.ops.gptfast_cpu.decode_attention`` of the loaded gptfast extension, or None
    (no extension, or one built before csrc/cpu_attention.cpp). Looked up once."""
    if not _cpu_kernel:
        from gptfast.runtime.extension import cpu_op  # builds or loads gptfast._C (and registers the op)

        _cpu_kernel.append(cpu_op("decode_attention"))
    return _cpu_kernel[0]


def _kernels():
    # Imported on first use so that the torch path never imports triton.
    if not _kernel_module:
        from gptfast.kernels import decode_attention as kernels

        _kernel_module.append(kernels)
    return _kernel_module[0]


def _decode(q, k_cache, v_cache, cache_lens, scale: float, key_start=None):
    """The op's implementation (registered op and eager path alike)."""
    _check_lens_values(cache_lens, k_cache.shape[2])
    if use_triton(q):
        return _kernels().decode_attention(q, k_cache, v_cache, cache_lens, scale, key_start=key_start)
    if q.is_cpu and q.dtype == torch.float32:  # (k_cache and v_cache share q's device and dtype: _validate)
        op = cpu_kernel()
        if op is not None:
            return op(q, k_cache, v_cache, cache_lens, scale, key_start)
    return torch_path.decode_attention(q, k_cache, v_cache, cache_lens, scale=scale, key_start=key_start)


@torch.library.custom_op("gptfast::decode_attention", mutates_args=())
def _decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         cache_lens: torch.Tensor, scale: float,
                         key_start: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _decode(q, k_cache, v_cache, cache_lens, scale, key_start)


@_decode_attention_op.register_fake
def _(q, k_cache, v_cache, cache_lens, scale, key_start=None):
    return q.new_empty(q.shape)


register_inference_only(
    _decode_attention_op,
    "decode_attention is inference-only and has no backward; "
    "use gptfast.ops.causal_attention (with q_offset) for attention that needs gradients",
)


def decode_attention(q, k_cache, v_cache, cache_lens, *, scale=None, key_start=None):
    """Attention of one query per row over the first ``cache_lens[b]`` cache positions.

    q (B, H, D); k_cache, v_cache (B, H_kv, S, D), H_kv dividing H (grouped-query: query
    head h reads kv head h // (H / H_kv); one program reads a K/V block once for the whole
    group), any strides; cache_lens (B,) int32/int64 in [1, S]. ``key_start`` ((B,)
    int32/int64 on q's device, optional): row b reads only positions
    ``key_start[b] .. cache_lens[b] - 1`` (a left-padded batch; the positions before are
    never read), and outputs 0 where that range is empty. ``scale`` defaults to 1/sqrt(D).
    Returns (B, H, D) in q's dtype. Inference-only (no backward). See the module docstring
    for how cache_lens is checked.
    """
    _validate(q, k_cache, v_cache, cache_lens, key_start)
    scale = resolve_scale("decode_attention", scale, q.shape[-1])
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (
            q.requires_grad or k_cache.requires_grad or v_cache.requires_grad)):
        # compiled: one opaque node; gradients asked for: the op's backward raises its clear error
        return _decode_attention_op(q, k_cache, v_cache, cache_lens, scale, key_start)
    return _decode(q, k_cache, v_cache, cache_lens, scale, key_start)
