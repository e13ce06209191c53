"""``torch.nn`` modules backed by gptfast's fused ops."""
import numbers

import torch
from torch import Tensor, nn

from gptfast.ops.layer_norm import layer_norm


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
