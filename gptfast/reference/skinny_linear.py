"""Reference twins of ``gptfast.ops.skinny_linear`` and ``skinny_linear_kv``: each step spelled out.

Layer norm (``gptfast.reference.layer_norm``), dequantise, ``F.linear``, GELU
(``gptfast.reference.gelu``), residual add; and for the KV variant the cache writes as
plain index assignments. Written for exactness, never for speed: everything runs in x's
dtype (pass float64 tensors for the high-precision answer). Never imports the kernels.
"""
import torch
import torch.nn.functional as F

from gptfast.reference.functional import gelu, layer_norm


def skinny_linear(x, weight, bias=None, *, scale=None, ln_weight=None, ln_bias=None, eps=1e-5, activation=None,
                  residual=None):
    """``act(LN(x) @ (weight * scale)^T + bias) + residual`` in ``x.dtype``; every part optional.

    weight (N, K) floating, or int8 with ``scale`` (N,); ``activation`` None or ``"gelu"``
    (GPT-2's tanh approximation); ``ln_weight`` turns the layer norm on.
    """
    h = x if ln_weight is None else layer_norm(x, ln_weight, ln_bias, eps)
    w = weight.to(x.dtype) if scale is None else weight.to(x.dtype) * scale.to(x.dtype)[:, None]
    y = F.linear(h, w, None if bias is None else bias.to(x.dtype))
    if activation == "gelu":
        y = gelu(y)
    return y if residual is None else y + residual.to(x.dtype)


def skinny_linear_kv(x, weight, bias, k_cache, v_cache, positions, *, scale=None, ln_weight=None, ln_bias=None,
                     eps=1e-5):
    """The QKV projection of x (B, T, K) whose k and v columns are written into the caches.

    The output columns are ``[q | k | v]``, k and v head-major, ``H_kv * D`` each for caches
    (B_max, H_kv, S, D); ``k_cache[b, h, positions[b, t], d]`` (and v) receive token t of
    row b. Returns q (B, T, Q).
    """
    y = skinny_linear(x, weight, bias, scale=scale, ln_weight=ln_weight, ln_bias=ln_bias, eps=eps)
    batch, tokens = positions.shape
    kv_heads, head_dim = k_cache.shape[1], k_cache.shape[3]
    kv_cols = kv_heads * head_dim
    q_cols = y.shape[-1] - 2 * kv_cols
    for b in range(batch):
        for t in range(tokens):
            p = int(positions[b, t])
            k_cache[b, :, p, :] = y[b, t, q_cols:q_cols + kv_cols].reshape(kv_heads, head_dim).to(k_cache.dtype)
            v_cache[b, :, p, :] = y[b, t, q_cols + kv_cols:].reshape(kv_heads, head_dim).to(v_cache.dtype)
    return y[..., :q_cols]
