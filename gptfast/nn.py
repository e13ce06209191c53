"""``torch.nn`` modules backed by gptfast's fused ops: ``LayerNorm`` (a drop-in for
``torch.nn.LayerNorm``) and ``Int8Linear`` (a weight-only int8 ``nn.Linear`` for inference;
``gptfast.quantize`` puts it in a model), ``replace_linears``, which swaps a model's
linear layers, and ``decode_linear`` / ``decode_linear_kv``, which run one linear layer
(an ``nn.Linear`` or an ``Int8Linear``: the int8 weight and its scales go to the kernel
as they are) of a decode step as one ``skinny_linear`` launch with its layer norm and
epilogue fused in. A layer whose class has ``decode(x, norm, activation, residual)`` and
``decode_kv(x, norm, k_cache, v_cache, positions)`` methods (the CPU's packed layers,
``gptfast.generation.cpu_linear``) runs those instead."""
import numbers

import torch
from torch import Tensor, nn

from gptfast.ops.int8_linear import int8_linear, quantize_weight
from gptfast.ops.layer_norm import layer_norm
from gptfast.ops.skinny_linear import skinny_linear, skinny_linear_kv


class LayerNorm(nn.Module):
    """Drop-in for ``torch.nn.LayerNorm`` running ``gptfast.ops.layer_norm``.

    Same constructor, attributes (``normalized_shape``, ``eps``, ``elementwise_affine``)
    and state-dict keys (``weight``, ``bias``). ``forward(x, residual=None)`` returns
    ``y``, or ``(y, h)`` with ``h = x + residual`` when given a residual (the fused
    pre-LN pattern). A multi-dimensional ``normalized_shape`` is normalised as one
    flattened hidden dimension, exactly as torch does.
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if isinstance(normalized_shape, numbers.Integral):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(int(n) for n in normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        factory = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(self.normalized_shape, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, residual: Tensor = None):
        dims = len(self.normalized_shape)
        if dims == 1 and x.dim() >= 1 and x.shape[-1] == self.normalized_shape[0]:  # the common case, checked cheaply
            return layer_norm(x, self.weight, self.bias, self.eps, residual=residual)
        if x.dim() < dims or tuple(x.shape[x.dim() - dims:]) != self.normalized_shape:
            raise ValueError(
                f"LayerNorm: input of shape {tuple(x.shape)} does not end in normalized_shape {self.normalized_shape}"
            )
        # Normalise the trailing dims as one flattened hidden dimension.
        if residual is not None and residual.shape != x.shape:
            raise ValueError(f"LayerNorm: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        lead = x.shape[: x.dim() - dims]
        weight = None if self.weight is None else self.weight.reshape(-1)
        bias = None if self.bias is None else self.bias.reshape(-1)
        out = layer_norm(x.reshape(*lead, -1), weight, bias, self.eps,
                         residual=None if residual is None else residual.reshape(*lead, -1))
        if residual is None:
            return out.reshape(x.shape)
        y, h = out
        return y.reshape(x.shape), h.reshape(x.shape)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
                f"bias={self.bias is not None}")


class Int8Linear(nn.Module):
    """A linear layer with an int8 (out, in) weight and one scale per output channel.

    Buffers ``weight_int8`` (int8), ``scale`` (float32 or the model's bfloat16) and
    ``bias`` (or None). Forward runs ``gptfast.ops.int8_linear`` (inference-only).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, scale_dtype=torch.float32,
                 dtype=torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=scale_dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scale_dtype=None) -> "Int8Linear":
        """Quantize ``linear`` (its weight is copied, not shared)."""
        weight = linear.weight
        scale_dtype = default_scale_dtype(weight.dtype) if scale_dtype is None else scale_dtype
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, scale_dtype=scale_dtype,
                     dtype=weight.dtype, device=weight.device)
        module.weight_int8, module.scale = quantize_weight(weight, scale_dtype)
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone()
        return module

    def forward(self, x):
        return int8_linear(x, self.weight_int8, self.scale, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scale_dtype={self.scale.dtype}")


def default_scale_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """bfloat16 scales for a bfloat16 model, float32 otherwise."""
    return torch.bfloat16 if weight_dtype == torch.bfloat16 else torch.float32


def replace_linears(model: nn.Module, make) -> None:
    """Replace every ``nn.Linear`` submodule of ``model`` (in module order) by ``make(linear)``."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(getattr(parent, child)))


def linear_operands(linear: nn.Module):
    """``(weight, scale, bias)`` of a linear layer as ``skinny_linear`` takes them: an
    ``Int8Linear``'s int8 weight with its per-channel scales, else the float weight and None."""
    weight = getattr(linear, "weight_int8", None)
    if weight is not None:
        return weight, linear.scale, linear.bias
    return linear.weight, None, linear.bias


def _norm_args(norm) -> dict:
    return {} if norm is None else {"ln_weight": norm.weight, "ln_bias": norm.bias, "eps": norm.eps}


def decode_linear(x: Tensor, linear: nn.Module, norm=None, *, activation=None, residual=None) -> Tensor:
    """``linear(norm(x))``, then ``activation`` and ``+ residual``, in one ``skinny_linear``
    launch (a decode or verify step's few rows). ``norm``: a layer norm module (its
    ``weight``, ``bias``, ``eps``) or None."""
    own = getattr(type(linear), "decode", None)
    if own is not None:  # a layer with its own decode kernel (the CPU's packed layers)
        return own(linear, x, norm, activation, residual)
    weight, scale, bias = linear_operands(linear)
    return skinny_linear(x, weight, bias, scale=scale, activation=activation, residual=residual, **_norm_args(norm))


def decode_linear_kv(x: Tensor, linear: nn.Module, norm, k_cache: Tensor, v_cache: Tensor, positions: Tensor) -> Tensor:
    """The QKV projection ``linear(norm(x))`` writing its k and v columns into the caches at
    ``positions`` (B, T) inside its launch (``skinny_linear_kv``); returns q (B, T, Q)."""
    own = getattr(type(linear), "decode_kv", None)
    if own is not None:  # a layer with its own decode kernels: its projection and cache write
        return own(linear, x, norm, k_cache, v_cache, positions)
    weight, scale, bias = linear_operands(linear)
    return skinny_linear_kv(x, weight, bias, k_cache, v_cache, positions, scale=scale, **_norm_args(norm))
