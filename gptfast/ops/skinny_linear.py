"""``skinny_linear``: a decode step's linear layer with its neighbours fused in, for few rows.

    y = skinny_linear(x, weight, bias=None, *, scale=None, ln_weight=None, ln_bias=None,
                      eps=1e-5, activation=None, residual=None)
      = act(layer_norm(x) @ (weight * scale)^T + bias) + residual      (every part optional)

    q = skinny_linear_kv(x, weight, bias, k_cache, v_cache, positions, *, scale=None,
                         ln_weight=None, ln_bias=None, eps=1e-5)

x (..., K) fp16/bf16/fp32, any strides; weight (N, K) in x's dtype, or int8 with
``scale`` (N,) (float32 or x's dtype; symmetric per-output-channel scales, as
``gptfast.ops.int8_linear.quantize_weight`` makes them); bias (N,) x's dtype;
``ln_weight`` / ``ln_bias`` (K,) in x's dtype or float32: with ``ln_weight`` the rows
are layer-normalised first (over K, ``eps``), as ``gptfast.ops.layer_norm`` would;
``activation``: None or ``"gelu"`` (GPT-2's tanh approximation); residual (..., N) in
x's dtype, added last. Returns (..., N) in x's dtype.

``skinny_linear_kv`` is the attention's QKV projection with the KV-cache write as its
epilogue: x (B, T, K); weight (N, K) whose output columns are ``[q | k | v]`` with
``N = Q + 2 * H_kv * D``, k and v head-major (column ``Q + h * D + d``, as GPT-2's
``c_attn``); k_cache, v_cache (B_max >= B, H_kv, S, D) in x's dtype (the model's
``KVCache`` buffers), any strides; positions (B, T) int32/int64 on x's device: token t
of row b goes to slot ``positions[b, t]`` of cache row b (a decode step is T = 1, a
speculative verify step T = k + 1), as ``KVCache.write_decode`` / ``write_rows`` do.
Writes the caches in place and returns q (B, T, Q). Position values are checked
(ValueError outside [0, S)) for CPU tensors; on CUDA reading them would synchronise,
so they are not, and the kernel clamps them into [0, S) (never writing outside the cache).

Where it runs: the Triton kernel (``gptfast.kernels.skinny_linear``: one launch, split-K
reduced in the same launch) on CUDA or on CPU tensors under the Triton interpreter;
elsewhere the torch path (``gptfast.ops.torch_path.skinny_linear``). The kernel is built
for decode (up to 16 rows per tile); more rows work but read the weight once per 16 rows,
so prefill belongs to the plain ops. Registered as ``torch.ops.gptfast.skinny_linear`` and
``torch.ops.gptfast.skinny_linear_kv`` (which mutates the caches) with fake
implementations, so ``torch.compile(fullgraph=True)`` sees one op and CUDA graphs can
capture it. Inference-only: a backward through ``skinny_linear`` raises a RuntimeError.
"""
import math
from typing import Optional

import torch

from gptfast.ops import torch_path
from gptfast.ops._dispatch import register_inference_only, use_triton

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ACTIVATIONS = (None, "gelu")


def _fail(op, arg, message, error=ValueError):
    raise error(f"{op}: {arg} {message}")


def _check_tensor(op, arg, t, optional=True):
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        _fail(op, arg, f"must be a torch.Tensor{' or None' if optional else ''}, got {type(t).__name__}", TypeError)


def _validate(op, x, weight, bias, scale, ln_weight, ln_bias, eps) -> None:
    """Types, shapes, dtypes and devices of the projection's inputs (static facts only)."""
    _check_tensor(op, "x", x, optional=False)
    _check_tensor(op, "weight", weight, optional=False)
    for arg, t in (("bias", bias), ("scale", scale), ("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        _check_tensor(op, arg, t)
    if x.dtype not in SUPPORTED_DTYPES:
        _fail(op, "x", f"has dtype {x.dtype}; supported: float16, bfloat16, float32", TypeError)
    if weight.dim() != 2:
        _fail(op, "weight", f"must have shape (N, K), got {tuple(weight.shape)}")
    n, k = weight.shape
    if x.dim() < 1 or x.shape[-1] != k:
        _fail(op, "x", f"of shape {tuple(x.shape)} does not end in the weight's K = {k} (weight {tuple(weight.shape)})")
    if weight.dtype == torch.int8:
        if scale is None:
            _fail(op, "scale", "is required with an int8 weight (one scale per output channel)")
        if scale.dtype not in (torch.float32, x.dtype):
            _fail(op, "scale", f"has dtype {scale.dtype}; it must be float32 or x's dtype {x.dtype}", TypeError)
        if tuple(scale.shape) != (n,):
            _fail(op, "scale", f"must have shape ({n},) (one per output channel), got {tuple(scale.shape)}")
    elif weight.dtype != x.dtype:
        _fail(op, "weight", f"has dtype {weight.dtype}; it must be x's dtype {x.dtype} or int8", TypeError)
    elif scale is not None:
        _fail(op, "scale", f"is only for int8 weights, but weight has dtype {weight.dtype}")
    if bias is not None:
        if bias.dtype != x.dtype:
            _fail(op, "bias", f"has dtype {bias.dtype} but x has {x.dtype}", TypeError)
        if tuple(bias.shape) != (n,):
            _fail(op, "bias", f"must have shape ({n},), got {tuple(bias.shape)}")
    if ln_bias is not None and ln_weight is None:
        _fail(op, "ln_bias", "needs ln_weight (the layer norm is on when ln_weight is given)")
    for arg, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t is None:
            continue
        if t.dtype not in (torch.float32, x.dtype):
            _fail(op, arg, f"has dtype {t.dtype}; it must be float32 or x's dtype {x.dtype}", TypeError)
        if tuple(t.shape) != (k,):
            _fail(op, arg, f"must have shape ({k},) (x's last dimension), got {tuple(t.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps >= 0 and math.isfinite(eps)):
        _fail(op, "eps", f"must be a finite number >= 0, got {eps!r}")
    for arg, t in (("weight", weight), ("bias", bias), ("scale", scale), ("ln_weight", ln_weight),
                   ("ln_bias", ln_bias)):
        if t is not None and t.device != x.device:
            _fail(op, arg, f"is on {t.device} but x is on {x.device}")


def _flat(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A 1-D parameter as the kernel reads it (unit stride; a no-op for parameters)."""
    return None if t is None else t.contiguous()


@torch.library.custom_op("gptfast::skinny_linear", mutates_args=())
def _skinny_linear_op(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      scale: Optional[torch.Tensor], ln_weight: Optional[torch.Tensor],
                      ln_bias: Optional[torch.Tensor], residual2: Optional[torch.Tensor], eps: float,
                      gelu: bool) -> torch.Tensor:
    if use_triton(x2):
        from gptfast.kernels import skinny_linear as kernel  # imports triton: only on this path

        return kernel.skinny_linear(x2, weight, _flat(bias), scale=_flat(scale), ln_weight=_flat(ln_weight),
                                    ln_bias=_flat(ln_bias), eps=eps, gelu=gelu, residual=residual2)
    return torch_path.skinny_linear(x2, weight, bias, scale=scale, ln_weight=ln_weight, ln_bias=ln_bias, eps=eps,
                                    activation="gelu" if gelu else None, residual=residual2)


@_skinny_linear_op.register_fake
def _(x2, weight, bias, scale, ln_weight, ln_bias, residual2, eps, gelu):
    return x2.new_empty((x2.shape[0], weight.shape[0]))


register_inference_only(
    _skinny_linear_op,
    "skinny_linear is inference-only and has no backward; train with the plain layers "
    "(gptfast.ops.layer_norm, torch.nn.Linear) and decode with skinny_linear",
)


def skinny_linear(x, weight, bias=None, *, scale=None, ln_weight=None, ln_bias=None, eps=1e-5, activation=None,
                  residual=None):
    """``act(layer_norm(x) @ (weight * scale)^T + bias) + residual``; see the module docstring.

    x (..., K); weight (N, K) in x's dtype or int8 with ``scale`` (N,); bias (N,);
    ln_weight / ln_bias (K,) (the layer norm is on with ln_weight); activation None or
    ``"gelu"``; residual (..., N). Returns (..., N) in x's dtype. Inference-only.
    """
    op = "skinny_linear"
    _validate(op, x, weight, bias, scale, ln_weight, ln_bias, eps)
    if activation not in ACTIVATIONS:
        _fail(op, "activation", f"must be None or 'gelu', got {activation!r}")
    n, k = weight.shape
    out_shape = (*x.shape[:-1], n)
    residual2 = None
    if residual is not None:
        _check_tensor(op, "residual", residual)
        if tuple(residual.shape) != out_shape:
            _fail(op, "residual", f"must have shape {out_shape} (x's rows by N), got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            _fail(op, "residual", f"has dtype {residual.dtype} but x has {x.dtype}", TypeError)
        if residual.device != x.device:
            _fail(op, "residual", f"is on {residual.device} but x is on {x.device}")
        residual2 = residual.reshape(-1, n)
    y = _skinny_linear_op(x.reshape(-1, k), weight, bias, scale, ln_weight, ln_bias, residual2, float(eps),
                          activation == "gelu")
    return y.view(out_shape)


# --------------------------------------------------------------------------------------
# The KV-cache-writing variant
# --------------------------------------------------------------------------------------


def _validate_kv(x, weight, k_cache, v_cache, positions) -> None:
    op = "skinny_linear_kv"
    for arg, t in (("k_cache", k_cache), ("v_cache", v_cache), ("positions", positions)):
        _check_tensor(op, arg, t, optional=False)
    if x.dim() != 3:
        _fail(op, "x", f"must have shape (B, T, K), got {tuple(x.shape)}")
    batch, tokens = x.shape[:2]
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        _fail(op, "k_cache", f"and v_cache must have one shape (B_max, H_kv, S, D), got {tuple(k_cache.shape)} and "
              f"{tuple(v_cache.shape)}")
    max_batch, kv_heads, seq_len, head_dim = k_cache.shape
    if max_batch < batch or seq_len < 1 or kv_heads < 1 or head_dim < 1:
        _fail(op, "k_cache", f"of shape {tuple(k_cache.shape)} cannot hold {batch} rows of x {tuple(x.shape)}")
    kv_cols = kv_heads * head_dim
    if weight.shape[0] <= 2 * kv_cols:
        _fail(op, "weight", f"of shape {tuple(weight.shape)} has no q columns: N must exceed 2 * H_kv * D = "
              f"{2 * kv_cols} (columns [q | k | v])")
    for arg, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != x.dtype:
            _fail(op, arg, f"has dtype {t.dtype} but x has {x.dtype}", TypeError)
        if t.device != x.device:
            _fail(op, arg, f"is on {t.device} but x is on {x.device}")
    if positions.dtype not in (torch.int32, torch.int64):
        _fail(op, "positions", f"must be int32 or int64, got {positions.dtype}", TypeError)
    if tuple(positions.shape) != (batch, tokens):
        _fail(op, "positions", f"must have shape ({batch}, {tokens}) (one slot per token of x), "
              f"got {tuple(positions.shape)}")
    if positions.device != x.device:
        _fail(op, "positions", f"is on {positions.device} but x is on {x.device}")
    if positions.device.type == "cpu" and positions.numel():  # a host read only where it costs no sync
        bad = (positions < 0) | (positions >= seq_len)
        if bool(bad.any()):
            b, t = (int(i) for i in bad.nonzero()[0])
            _fail(op, f"positions[{b}, {t}]", f"= {int(positions[b, t])} is outside [0, {seq_len}) "
                  f"(the cache holds {seq_len} positions)")


@torch.library.custom_op("gptfast::skinny_linear_kv", mutates_args=("k_cache", "v_cache"))
def _skinny_linear_kv_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                         scale: Optional[torch.Tensor], ln_weight: Optional[torch.Tensor],
                         ln_bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    if use_triton(x):
        from gptfast.kernels import skinny_linear as kernel  # imports triton: only on this path

        q = kernel.skinny_linear_kv(x.reshape(-1, x.shape[-1]), weight, _flat(bias), k_cache, v_cache, positions,
                                    scale=_flat(scale), ln_weight=_flat(ln_weight), ln_bias=_flat(ln_bias), eps=eps)
        return q.view(*x.shape[:2], q.shape[-1])
    return torch_path.skinny_linear_kv(x, weight, bias, k_cache, v_cache, positions, scale=scale,
                                       ln_weight=ln_weight, ln_bias=ln_bias, eps=eps)


@_skinny_linear_kv_op.register_fake
def _(x, weight, bias, k_cache, v_cache, positions, scale, ln_weight, ln_bias, eps):
    return x.new_empty((*x.shape[:2], weight.shape[0] - 2 * k_cache.shape[1] * k_cache.shape[3]))


def skinny_linear_kv(x, weight, bias, k_cache, v_cache, positions, *, scale=None, ln_weight=None, ln_bias=None,
                     eps=1e-5):
    """QKV projection of x (B, T, K) writing k and v into the caches at ``positions`` (B, T);
    returns q (B, T, Q). See the module docstring. Inference-only (no autograd)."""
    _validate("skinny_linear_kv", x, weight, bias, scale, ln_weight, ln_bias, eps)
    _validate_kv(x, weight, k_cache, v_cache, positions)
    return _skinny_linear_kv_op(x, weight, bias, k_cache, v_cache, positions, scale, ln_weight, ln_bias, float(eps))
