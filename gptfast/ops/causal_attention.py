"""``causal_attention``: fused causal attention for prefill and training.

A drop-in for ``F.scaled_dot_product_attention(q, k, v, is_causal=True)`` that also takes
a cache offset: queries may start at absolute position ``q_offset`` of a key sequence of
length ``q_offset + Tq`` (chunked prefill against a KV cache, verification of several
draft tokens), or at a device tensor of positions over a whole static cache (shared by
every row, or one row of positions per batch row); grouped-query heads (k/v with fewer
heads than q) and per-row key ranges (``key_start``, a left-padded batch).

On CUDA (or on the CPU under ``TRITON_INTERPRET=1``) it runs the Triton kernels of
``gptfast.kernels.causal_attention`` through two registered ops:

- ``gptfast::causal_attention_fwd(q, k, v, scale, q_offset, q_positions=None, key_start=None) -> (out, lse)``
- ``gptfast::causal_attention_bwd(grad_out, q, k, v, out, lse, scale, q_offset, q_positions=None,
  key_start=None) -> (dq, dk, dv)``

with fake (meta) implementations and an autograd formula tying the two together, so
``torch.compile(fullgraph=True)`` sees single opaque ops and training works. Elsewhere it
runs ``gptfast.ops.torch_path.causal_attention`` (SDPA), except for the few queries per row of
a speculative verify step on the CPU (float32, ``q_positions`` given, at most
``CPU_KERNEL_MAX_QUERIES`` of them, no gradient, eager): the C++ decode-attention kernel takes
a row's T newest queries (csrc/cpu_attention.cpp), without the masks, copies and zeroing SDPA
needs there.

Eager calls (outside ``torch.compile``) skip the registered ops, whose dispatch costs
several times a torch op's host time: the launcher directly when no gradient is needed,
else ``CausalAttentionFunction``, an ``autograd.Function`` over the same launchers.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from gptfast.ops import torch_path
from gptfast.ops._dispatch import check_same_device_dtype, use_triton
from gptfast.ops._validation import check_positions, resolve_scale, validate_heads, validate_key_start
from gptfast.ops.decode_attention import cpu_kernel

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
# Queries per row up to which the CPU's C++ kernel serves a float32 inference call with
# q_positions: it computes one query at a time, which beats SDPA's masked path for a verify
# step's few queries and loses to its blocked products for a prefill (BENCHMARKS.md, the
# speculative-decoding section, gives the crossover measured here).
CPU_KERNEL_MAX_QUERIES = 24


def _validate_positions(q, k, q_positions) -> None:
    """``q_positions``: a (Tq,) or (B, Tq) integer tensor on q's device; its values are
    checked (in [0, Tk), consecutive along each row) where that reads no device memory."""
    if not isinstance(q_positions, Tensor):
        raise TypeError(f"causal_attention: q_positions must be a torch.Tensor, got {type(q_positions).__name__}")
    batch, q_len = q.shape[0], q.shape[2]
    shapes = ((q_len,), (batch, q_len))
    if q_positions.dtype not in (torch.int32, torch.int64) or tuple(q_positions.shape) not in shapes:
        raise ValueError(f"causal_attention: q_positions must be a ({q_len},) or ({batch}, {q_len}) integer tensor "
                         f"(shared or per-row query positions), got {tuple(q_positions.shape)} {q_positions.dtype}")
    if q_positions.device != q.device:
        raise ValueError(f"causal_attention: q_positions is on {q_positions.device} but q is on {q.device}")
    check_positions("causal_attention: q_positions", q_positions, k.shape[2], "keys")


def _validate(q, k, v, q_offset, q_positions=None, key_start=None) -> None:
    """Raise a clear exception for anything the kernels (or the torch path) cannot take."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"causal_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"causal_attention: {name} must be 4-D (B, H, T, D), got shape {tuple(t.shape)}")
    check_same_device_dtype("causal_attention", ("q", "k", "v"), q, k, v)
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"causal_attention: dtype {q.dtype} is not supported; use float16, bfloat16 or float32")
    q_shape, k_shape = q.shape, k.shape  # (each .shape builds a new Size: read once, on every eager call)
    if k_shape != v.shape:
        raise ValueError(f"causal_attention: k and v must have the same shape, got {tuple(k_shape)} and {tuple(v.shape)}")
    batch, heads, q_len, head_dim = q_shape
    if batch != k_shape[0] or head_dim != k_shape[3]:
        raise ValueError(
            f"causal_attention: q {tuple(q_shape)} and k/v {tuple(k_shape)} must agree on batch and head size "
            "(B, *, *, D)"
        )
    validate_heads("causal_attention", heads, k_shape[1])
    if batch == 0 or heads == 0 or q_len == 0 or head_dim == 0:
        raise ValueError(f"causal_attention: empty input, q has shape {tuple(q.shape)}")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"causal_attention: head size D={head_dim} is larger than the supported maximum {MAX_HEAD_DIM}")
    if isinstance(q_offset, bool) or not isinstance(q_offset, (int, torch.SymInt)):
        raise TypeError(f"causal_attention: q_offset must be an int, got {type(q_offset).__name__}")
    if q_offset < 0:
        raise ValueError(f"causal_attention: q_offset must be >= 0, got {q_offset}")
    if key_start is not None:
        validate_key_start("causal_attention", key_start, q)
    if q_positions is not None:
        if q_offset:
            raise ValueError("causal_attention: give q_offset or q_positions, not both")
        _validate_positions(q, k, q_positions)
    elif k_shape[2] != q_offset + q_len:
        raise ValueError(
            f"causal_attention: q_offset with the wrong T: keys length Tk={k_shape[2]} must equal "
            f"q_offset ({q_offset}) + queries length Tq ({q_len})"
        )


_kernel_module = []


def _kernels():
    # Imported on first use so that the torch path never imports triton.
    if not _kernel_module:
        from gptfast.kernels import causal_attention as kernels

        _kernel_module.append(kernels)
    return _kernel_module[0]


# ----------------------------------------------------------------------------- registered ops


@torch.library.custom_op("gptfast::causal_attention_fwd", mutates_args=())
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float, q_offset: int,
                   q_positions: Optional[Tensor] = None, key_start: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Fused forward. Returns out (B, H, Tq, D) and the fp32 base-2 log-sum-exp (B, H, Tq)."""
    out, lse = _kernels().attention_forward(q, k, v, scale, q_offset, q_positions=q_positions, key_start=key_start)
    return out, lse


@_attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, scale, q_offset, q_positions=None, key_start=None):
    batch, heads, q_len, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, q_len), dtype=torch.float32)


@torch.library.custom_op("gptfast::causal_attention_bwd", mutates_args=())
def _attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   scale: float, q_offset: int, q_positions: Optional[Tensor] = None,
                   key_start: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Fused backward: (dq, dk, dv), contiguous, shaped like q, k, v."""
    return _kernels().attention_backward(grad_out, q, k, v, out, lse, scale, q_offset, q_positions=q_positions,
                                         key_start=key_start)


@_attention_bwd.register_fake
def _attention_bwd_fake(grad_out, q, k, v, out, lse, scale, q_offset, q_positions=None, key_start=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, q_offset, q_positions, key_start = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, q_positions, key_start)
    ctx.scale, ctx.q_offset = scale, q_offset
    ctx.mark_non_differentiable(lse)  # an internal statistic, not part of the public result


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, q_positions, key_start = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(grad_out, q, k, v, out, lse, ctx.scale, ctx.q_offset, q_positions, key_start)
    return dq, dk, dv, None, None, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- eager path


class CausalAttentionFunction(torch.autograd.Function):
    """The eager path with gradients: ``apply(q, k, v, scale, q_offset, q_positions,
    key_start)``, the registered ops' results and gradients without their dispatch cost."""

    @staticmethod
    def forward(ctx, q, k, v, scale, q_offset, q_positions, key_start):
        out, lse = _kernels().attention_forward(q, k, v, scale, q_offset, q_positions=q_positions,
                                                key_start=key_start)
        ctx.save_for_backward(q, k, v, out, lse, q_positions, key_start)
        ctx.scale, ctx.q_offset = scale, q_offset
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, q_positions, key_start = ctx.saved_tensors
        dq, dk, dv = _kernels().attention_backward(grad_out, q, k, v, out, lse, ctx.scale, ctx.q_offset,
                                                   q_positions=q_positions, key_start=key_start)
        return dq, dk, dv, None, None, None, None


def _cpu_kernel_serves(q, k, v) -> bool:
    """Whether the CPU's C++ kernel may take a call with q_positions: float32 CPU inference
    (eager, no gradient) of at most CPU_KERNEL_MAX_QUERIES queries per row."""
    return (q.is_cpu and q.dtype == torch.float32 and q.shape[2] <= CPU_KERNEL_MAX_QUERIES
            and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)))


# ----------------------------------------------------------------------------- public function


def causal_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None, q_offset: int = 0,
                     q_positions: Optional[Tensor] = None, key_start: Optional[Tensor] = None) -> Tensor:
    """Causal attention, a drop-in for ``F.scaled_dot_product_attention(q, k, v, is_causal=True)``.

    q: (B, H, Tq, D); k, v: (B, H_kv, Tk, D) with ``Tk == q_offset + Tq``; query ``i`` sees
    keys ``0 .. q_offset + i``. H_kv must divide H (grouped- or multi-query attention: query
    head h reads kv head ``h // (H // H_kv)``; K/V are never repeated). D <= 256; float16,
    bfloat16 or float32; any strides (a q/k/v split of a fused qkv projection is read in
    place). ``scale`` defaults to 1/sqrt(D). Differentiable in q, k and v. Returns (B, H, Tq, D).

    ``q_positions`` ((Tq,) integer tensor of consecutive positions, instead of ``q_offset``):
    the queries' absolute positions, read on the device, never on the host; ``k``/``v`` may
    then be a whole static KV cache (any Tk), each query seeing the keys at or before its
    position; keys past the last query (the unwritten rest of the cache) are never read, and
    get zero gradients. This is the prefill of a model whose start position is a tensor (a
    compiled or CUDA-graph step). A (B, Tq) tensor gives each row its own consecutive
    positions over its own cache row (a speculative verify step: T draft tokens per row at
    that row's length); keys past a row's last query position are never read.

    ``key_start`` ((B,) int32/int64 tensor on q's device, per-row key ranges, e.g. a
    left-padded batch): row b's keys before ``key_start[b]`` are invisible (never read, zero
    gradients). Its queries at positions before ``key_start[b]`` see no key at all: by
    definition their output is 0 and their gradients are 0. No host synchronisation.
    """
    _validate(q, k, v, q_offset, q_positions, key_start)
    scale = resolve_scale("causal_attention", scale, q.shape[-1])
    if use_triton(q):
        if torch.compiler.is_compiling():  # the registered op: one opaque node for the compiler
            return _attention_fwd(q, k, v, scale, q_offset, q_positions, key_start)[0]
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return CausalAttentionFunction.apply(q, k, v, scale, q_offset, q_positions, key_start)
        return _kernels().attention_forward(q, k, v, scale, q_offset, q_positions=q_positions,
                                            key_start=key_start, store_lse=False)[0]
    if q_positions is not None and _cpu_kernel_serves(q, k, v):
        op = cpu_kernel()
        if op is not None:  # the positions are consecutive, so each row's last one fixes them all
            return op(q, k, v, (q_positions[..., -1] + 1).expand(q.shape[0]), scale, key_start)
    return torch_path.causal_attention(q, k, v, scale=scale, q_offset=q_offset, q_positions=q_positions,
                                       key_start=key_start)
