"""``layer_norm``: fused LayerNorm over the last dimension, with an optional fused residual add.

``layer_norm(x, weight, bias, eps)`` is ``F.layer_norm(x, x.shape[-1:], weight, bias,
eps)``; with ``residual`` it returns ``(layer_norm(h), h)`` for ``h = x + residual``,
the pattern of a pre-LN transformer block (``h`` is the residual stream the next block
adds to), computed in one pass.

On CUDA (or on the CPU under ``TRITON_INTERPRET=1``) it runs the Triton kernels of
``gptfast.kernels.layer_norm`` through registered ops:

- ``gptfast::layer_norm_fwd(x, weight, bias, eps) -> (y, mean, rstd)``
- ``gptfast::add_layer_norm_fwd(x, residual, weight, bias, eps) -> (y, h, mean, rstd)``
- ``gptfast::layer_norm_bwd(dy, dh, h, weight, mean, rstd, ...) -> (dx, dweight, dbias)``

with fake implementations and autograd formulas, so ``torch.compile(fullgraph=True)``
sees single opaque ops and training works. Elsewhere (and for float64) it runs
``gptfast.ops.torch_path.layer_norm`` (``F.layer_norm``).

Eager calls skip the registered ops: a registered op's dispatch costs several times a
torch op's host time, which a drop-in module pays on every call. Outside
``torch.compile`` the public function calls the launcher directly (no gradient needed)
or ``LayerNormFunction`` (an ``autograd.Function`` over the same forward and backward
implementations as the registered ops, ``_forward`` and ``_backward``); under
``torch.compile`` it calls the registered ops, which the compiler needs.
"""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from gptfast.ops import torch_path
from gptfast.ops._dispatch import use_triton

# dtypes the fused kernel takes (statistics in float32); float64 goes down the torch path.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_DTYPES = KERNEL_DTYPES + (torch.float64,)


_kernel_module = []


def _kernels():
    # Imported on first use so that importing gptfast.ops (or the torch path) never imports triton.
    if not _kernel_module:
        from gptfast.kernels import layer_norm as kernels

        _kernel_module.append(kernels)
    return _kernel_module[0]


def _validate(x, weight, bias, eps, residual) -> bool:
    """Raise a clear exception for anything layer_norm cannot take; return whether the
    parameters given are all in the fused kernel's dtypes (not float64)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"layer_norm: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"layer_norm: x has dtype {x.dtype}; use float16, bfloat16, float32 or float64")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"layer_norm: x needs a non-empty last (hidden) dimension, got shape {tuple(x.shape)}")
    hidden = x.shape[-1]
    device = x.device
    params_fit = True
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"layer_norm: {name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"layer_norm: {name} has dtype {t.dtype}; use float16, bfloat16, float32 or float64")
        params_fit = params_fit and t.dtype in KERNEL_DTYPES
        if t.shape != (hidden,):
            raise ValueError(
                f"layer_norm: {name} must have shape ({hidden},) to match x's hidden size, got {tuple(t.shape)}"
            )
        if t.device != device:
            raise ValueError(f"layer_norm: {name} is on {t.device} but x is on {device}")
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(f"layer_norm: residual must be a torch.Tensor or None, got {type(residual).__name__}")
        if residual.device != x.device:
            raise ValueError(f"layer_norm: residual is on {residual.device} but x is on {x.device}")
        if residual.dtype != x.dtype:
            raise TypeError(f"layer_norm: residual has dtype {residual.dtype} but x has dtype {x.dtype}")
        if residual.shape != x.shape:
            raise ValueError(f"layer_norm: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"layer_norm: eps must be a finite number >= 0, got {eps!r}")
    return params_fit


def _rows(t: Tensor) -> Tensor:
    """``t`` as a (rows, hidden) matrix whose last dimension is contiguous (a view when possible)."""
    rows = t if t.dim() == 2 else t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 or rows.shape[-1] == 1 else rows.contiguous()


def _stats_shape(x: Tensor):
    return x.shape[:-1]


# ----------------------------------------------------------------------------- registered ops


def _forward(x: Tensor, weight, bias, eps: float, residual=None, store_stats: bool = True):
    """The fused forward, shared by the registered ops and the eager path: y and h (None
    without residual; contiguous, shaped and typed like x), float32 mean and rstd
    (x.shape[:-1]; None without ``store_stats``, when no backward will need them)."""
    y, h, mean, rstd = _kernels().layer_norm_fwd(_rows(x), weight, bias, eps,
                                                 residual=None if residual is None else _rows(residual),
                                                 store_stats=store_stats)
    if x.dim() == 2:  # already shaped (a view costs microseconds, paid per eager call)
        return y, h, mean, rstd
    y, h = y.view(x.shape), None if h is None else h.view(x.shape)
    if not store_stats:
        return y, h, None, None
    stats = x.shape[:-1]
    return y, h, mean.view(stats), rstd.view(stats)


def _backward(dy: Tensor, dh, h: Tensor, weight, mean: Tensor, rstd: Tensor, compute_dweight: bool,
              compute_dbias: bool):
    """The fused backward, shared by the registered op and the eager path: dx (like h) and
    float32 dweight, dbias (None where not requested)."""
    flat = h.dim() == 2  # statistics already (rows,), dx already shaped (views cost microseconds a call)
    dx, dw, db = _kernels().layer_norm_bwd(
        _rows(dy), _rows(h), weight, mean if flat else mean.reshape(-1), rstd if flat else rstd.reshape(-1),
        None if dh is None else _rows(dh), compute_dw=compute_dweight, compute_db=compute_dbias,
    )
    return dx if flat else dx.view(h.shape), dw, db


@torch.library.custom_op("gptfast::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Fused forward: y (contiguous, shaped and typed like x), float32 mean and rstd (x.shape[:-1])."""
    y, _, mean, rstd = _forward(x, weight, bias, eps)
    return y, mean, rstd


@_layer_norm_fwd.register_fake
def _layer_norm_fwd_fake(x, weight, bias, eps):
    stats = x.new_empty(_stats_shape(x), dtype=torch.float32)
    return x.new_empty(x.shape), stats, torch.empty_like(stats)


@torch.library.custom_op("gptfast::add_layer_norm_fwd", mutates_args=())
def _add_layer_norm_fwd(x: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                        eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused residual add + forward: y and h = x + residual (contiguous, like x), float32 mean, rstd."""
    return _forward(x, weight, bias, eps, residual)


@_add_layer_norm_fwd.register_fake
def _add_layer_norm_fwd_fake(x, residual, weight, bias, eps):
    stats = x.new_empty(_stats_shape(x), dtype=torch.float32)
    return x.new_empty(x.shape), x.new_empty(x.shape), stats, torch.empty_like(stats)


@torch.library.custom_op("gptfast::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd(dy: Tensor, dh: Optional[Tensor], h: Tensor, weight: Optional[Tensor], mean: Tensor,
                    rstd: Tensor, compute_dweight: bool, compute_dbias: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Fused backward. ``h`` is the normalised input; ``dh`` the incoming gradient of the
    residual variant's ``h`` output (None otherwise). Returns dx (like h: the gradient of
    x and of residual alike) and float32 dweight, dbias, or empty tensors where not requested."""
    dx, dw, db = _backward(dy, dh, h, weight, mean, rstd, compute_dweight, compute_dbias)

    def empty():  # a fresh one per output: outputs of a custom op may not alias each other
        return h.new_empty((0,), dtype=torch.float32)

    if dw is not None and db is not None:  # the launcher returns both as rows of one tensor
        db = db.clone()
    return dx, empty() if dw is None else dw, empty() if db is None else db


@_layer_norm_bwd.register_fake
def _layer_norm_bwd_fake(dy, dh, h, weight, mean, rstd, compute_dweight, compute_dbias):
    hidden = h.shape[-1]
    dw = h.new_empty((hidden if compute_dweight and weight is not None else 0,), dtype=torch.float32)
    db = h.new_empty((hidden if compute_dbias else 0,), dtype=torch.float32)
    return h.new_empty(h.shape), dw, db


def _save_for_param_grads(ctx, weight, bias, mean, rstd, weight_index: int):
    # The op's inputs hold weight at weight_index and bias right after it.
    ctx.needs_dweight = weight is not None and ctx.needs_input_grad[weight_index]
    ctx.needs_dbias = bias is not None and ctx.needs_input_grad[weight_index + 1]
    ctx.weight_dtype = None if weight is None else weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(mean, rstd)  # internal statistics, not part of the public result


def _param_grads(ctx, dw, db):
    """The float32 dweight/dbias as autograd wants them: None where not needed, else in each parameter's dtype."""
    return (_as_dtype(dw, ctx.weight_dtype) if ctx.needs_dweight else None,
            _as_dtype(db, ctx.bias_dtype) if ctx.needs_dbias else None)


def _as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _layer_norm_setup_context(ctx, inputs, output):
    x, weight, bias, _eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    _save_for_param_grads(ctx, weight, bias, mean, rstd, weight_index=1)


def _layer_norm_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _layer_norm_bwd(dy, None, x, weight, mean, rstd, ctx.needs_dweight, ctx.needs_dbias)
    return (dx, *_param_grads(ctx, dw, db), None)


def _add_layer_norm_setup_context(ctx, inputs, output):
    _x, _residual, weight, bias, _eps = inputs
    _y, h, mean, rstd = output
    ctx.save_for_backward(h, weight, mean, rstd)
    _save_for_param_grads(ctx, weight, bias, mean, rstd, weight_index=2)


def _add_layer_norm_backward(ctx, dy, dh, _dmean, _drstd):
    h, weight, mean, rstd = ctx.saved_tensors
    # h = x + residual, so both receive dL/dh: the normalisation's gradient plus the
    # gradient that reached the h output directly (added inside the kernel).
    dx, dw, db = _layer_norm_bwd(dy, dh, h, weight, mean, rstd, ctx.needs_dweight, ctx.needs_dbias)
    return (dx, dx, *_param_grads(ctx, dw, db), None)


_layer_norm_fwd.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup_context)
_add_layer_norm_fwd.register_autograd(_add_layer_norm_backward, setup_context=_add_layer_norm_setup_context)


# ----------------------------------------------------------------------------- eager path


class LayerNormFunction(torch.autograd.Function):
    """The eager path with gradients: ``apply(x, residual, weight, bias, eps)`` returns
    ``(y, h)`` (h None without residual), the registered ops' results and gradients
    without their dispatch cost."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps):
        y, h, mean, rstd = _forward(x, weight, bias, eps, residual)
        ctx.has_residual = residual is not None
        ctx.save_for_backward(x if residual is None else h, weight, mean, rstd)
        ctx.needs_dweight = weight is not None and ctx.needs_input_grad[2]
        ctx.needs_dbias = bias is not None and ctx.needs_input_grad[3]
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.set_materialize_grads(False)
        return y, h

    @staticmethod
    def backward(ctx, dy, dh):
        h, weight, mean, rstd = ctx.saved_tensors
        if dy is None:  # only h's gradient reached us: it passes to x and residual unchanged
            dy = torch.zeros_like(h)
        dx, dw, db = _backward(dy, dh if ctx.has_residual else None, h, weight, mean, rstd, ctx.needs_dweight,
                               ctx.needs_dbias)
        dw, db = _param_grads(ctx, dw, db)
        return dx, dx if ctx.has_residual else None, dw, db, None


def _needs_grad(x, residual, weight, bias) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or (residual is not None and residual.requires_grad)
                                        or (weight is not None and weight.requires_grad)
                                        or (bias is not None and bias.requires_grad))


# ----------------------------------------------------------------------------- public function


def layer_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, eps: float = 1e-5,
               residual: Optional[Tensor] = None):
    """LayerNorm over the last dimension of ``x``; with ``residual``, of ``h = x + residual``.

    Returns ``y`` (shaped and typed like ``x``), or ``(y, h)`` when ``residual`` is given.

    - ``x``: any leading shape and strides; float16, bfloat16 or float32 run the fused
      kernel (statistics in float32), float64 runs the torch path.
    - ``weight``, ``bias``: optional ``(hidden,)`` tensors in any of those dtypes, which
      may differ from x's (float32 parameters with bfloat16 activations); ``y`` keeps
      x's dtype, gradients come back in each parameter's dtype. A float64 parameter
      sends the call down the torch path.
    - ``residual``: x's shape, dtype and device.

    The fused kernel holds a whole row: up to 8192 elements, or 4096 when the hidden size
    is not a multiple of 16; wider rows raise ValueError. Differentiable in x, residual,
    weight and bias.
    """
    params_fit = _validate(x, weight, bias, eps, residual)
    eps = float(eps)
    if use_triton(x) and x.dtype in KERNEL_DTYPES and params_fit:
        _kernels().check_hidden_size(x.shape[-1])
        if torch.compiler.is_compiling():  # the registered ops: single opaque nodes for the compiler
            if residual is None:
                return _layer_norm_fwd(x, weight, bias, eps)[0]
            y, h, _, _ = _add_layer_norm_fwd(x, residual, weight, bias, eps)
            return y, h
        if _needs_grad(x, residual, weight, bias):
            y, h = LayerNormFunction.apply(x, residual, weight, bias, eps)
        else:  # inference: no statistics
            y, h, _, _ = _forward(x, weight, bias, eps, residual, store_stats=False)
        return y if residual is None else (y, h)
    return torch_path.layer_norm(x, weight, bias, eps, residual=residual)
