"""The torch path: every op written with PyTorch's own functions, one place for all of them.

This is the ``torch`` backend of a model (``gptfast.backends``) and what each fused op of
``gptfast.ops`` runs where Triton does not (a CPU without ``TRITON_INTERPRET=1``, float64).
Same signatures as the fused ops and the reference twins:

- ``layer_norm(x, weight, bias, eps, residual=None)``: ``F.layer_norm`` after the residual
  add; parameters are cast to the input's dtype (fp32 parameters on bf16 activations).
- ``causal_attention(q, k, v, scale=None, q_offset=0, q_positions=None)``: SDPA.
- ``decode_attention(q, k_cache, v_cache, cache_lens, scale=None)``: SDPA of one query per
  row, masked by ``cache_lens`` (clamped into [1, S]); stale cache slots may hold NaN.
- ``gelu(x)``: GPT-2's tanh GELU.
- ``int8_linear(x, weight_int8, scale, bias=None)``: dequantise to x's dtype, then ``F.linear``.

Inputs are not validated here: the ops of ``gptfast.ops`` validate before they dispatch,
and the model passes only shapes it built. Nothing here reads a tensor's value on the
host, so every function traces under ``torch.compile(fullgraph=True)``.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def layer_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, eps: float = 1e-5,
               residual: Optional[Tensor] = None):
    """``F.layer_norm`` over the last dim of ``x`` (or of ``h = x + residual``, returning ``(y, h)``)."""
    h = x if residual is None else x + residual
    weight = weight if weight is None or weight.dtype == h.dtype else weight.to(h.dtype)
    bias = bias if bias is None or bias.dtype == h.dtype else bias.to(h.dtype)
    y = F.layer_norm(h, h.shape[-1:], weight, bias, eps)
    return y if residual is None else (y, h)


def _zero_unseen(t: Tensor, seen: Tensor) -> Tensor:
    """``t`` (B, H, S, D) with the positions no query may see set to 0: a mask alone still
    lets a NaN there through (0 * NaN in the probabilities' product, NaN + -inf in the scores)."""
    return torch.where(seen, t, 0)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None, q_offset: int = 0,
                     q_positions: Optional[Tensor] = None) -> Tensor:
    """Causal SDPA. q (B, H, Tq, D); k, v (B, H, Tk, D).

    Queries sit at absolute positions ``q_offset + i`` (then ``Tk == q_offset + Tq``), or,
    when ``q_positions`` ((Tq,) integer tensor) is given, at those positions: ``k``/``v``
    may then be a whole static cache, each query seeing the keys at or before its
    position, and the keys past every query (stale cache slots) are never read. SDPA's
    ``is_causal`` aligns its mask to the top-left corner, so an offset takes an explicit mask.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    key_pos = torch.arange(k.shape[2], device=q.device)
    if q_positions is not None:
        visible = key_pos[None, :] <= q_positions[:, None]  # (Tq, Tk)
        seen = (key_pos <= q_positions.max())[:, None]  # (Tk, 1): what any query sees
        return F.scaled_dot_product_attention(q, _zero_unseen(k, seen), _zero_unseen(v, seen), attn_mask=visible,
                                              scale=scale)
    if q_offset == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    visible = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(diagonal=q_offset)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor,
                     scale: Optional[float] = None) -> Tensor:
    """SDPA of q (B, H, D) against the first ``cache_lens[b]`` positions of each row's cache
    (B, H, S, D); lengths are clamped into [1, S], as the kernel does. Returns (B, H, D)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    seq_len = k_cache.shape[2]
    lens = cache_lens.clamp(1, seq_len)
    valid = (torch.arange(seq_len, device=q.device)[None, :] < lens[:, None])[:, None, :, None]  # (B, 1, S, 1)
    out = F.scaled_dot_product_attention(q.unsqueeze(2), _zero_unseen(k_cache, valid), _zero_unseen(v_cache, valid),
                                         attn_mask=valid.transpose(-1, -2), scale=scale)
    return out.squeeze(2)


def gelu(x: Tensor) -> Tensor:
    """GPT-2's GELU, the tanh approximation ("gelu_new" in Hugging Face)."""
    return F.gelu(x, approximate="tanh")


def int8_linear(x: Tensor, weight_int8: Tensor, scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ (weight_int8 * scale[:, None])^T + bias``: the weight dequantised to x's dtype."""
    return F.linear(x, weight_int8.to(x.dtype) * scale.to(x.dtype)[:, None], bias)
