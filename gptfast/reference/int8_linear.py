"""Reference twin of ``gptfast.ops.int8_linear``: dequantise the weight, then ``F.linear``.

Written for exactness, never for speed. It computes in x's dtype: pass float64 tensors
(x, and a float64 copy of the scale or the original) for the high-precision answer the
tests compare against. It never imports the kernels it judges.
"""
import torch
import torch.nn.functional as F


def int8_linear(x, weight_int8, scale, bias=None):
    """``x @ (weight_int8 * scale[:, None])^T + bias`` in ``x.dtype``.

    weight_int8 (N, K) int8; scale (N,) per-output-channel; bias (N,) or None.
    """
    weight = weight_int8.to(x.dtype) * scale.to(x.dtype)[:, None]
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
