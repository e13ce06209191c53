"""Pure-PyTorch reference twins of gptfast's fused ops.

These are the judges: written for clarity and exactness, never for speed, and they
never import the kernels they judge. Each works in the dtype it is given (pass float64
tensors for a high-precision answer); softmax and layernorm statistics are taken in at
least float32.
"""
import math

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything narrower is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU, the tanh approximation ("gelu_new" in Hugging Face)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def layer_norm(x, weight=None, bias=None, eps: float = 1e-5, residual=None):
    """LayerNorm over the last dimension.

    With ``residual``, first forms ``h = x + residual`` and returns ``(layer_norm(h), h)``:
    ``h`` is the running residual stream the next block adds to.
    """
    h = x if residual is None else x + residual
    hc = h.to(_compute_dtype(h.dtype))
    mean = hc.mean(dim=-1, keepdim=True)
    var = ((hc - mean) ** 2).mean(dim=-1, keepdim=True)  # biased variance, as torch.nn.LayerNorm
    y = (hc - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.to(hc.dtype)
    if bias is not None:
        y = y + bias.to(hc.dtype)
    y = y.to(h.dtype)
    return y if residual is None else (y, h)


def causal_attention(q, k, v, scale=None, q_offset: int = 0, q_positions=None):
    """Causal multi-head attention with explicit scores, mask and softmax.

    q: (B, H, Tq, D); k, v: (B, H, Tk, D) with ``Tk == q_offset + Tq``. Query ``i`` sits
    at absolute position ``q_offset + i`` and sees keys ``0 .. q_offset + i``. With
    ``q_offset == 0`` this is ``F.scaled_dot_product_attention(q, k, v, is_causal=True)``.
    ``q_positions`` ((Tq,) integer tensor) places the queries at those positions instead,
    against keys of any length (a whole KV cache; keys past every query are never read).
    """
    tq, tk = q.shape[-2], k.shape[-2]
    key_pos = torch.arange(tk, device=q.device)[None, :]
    if q_positions is None:
        if tk != q_offset + tq:
            raise ValueError(f"causal_attention: keys length {tk} must equal q_offset ({q_offset}) + queries length ({tq})")
        query_pos = torch.arange(tq, device=q.device)[:, None] + q_offset
    else:
        query_pos = q_positions[:, None]
        v = _zero_unseen(v, key_pos[0] <= q_positions.max())
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    scores = scores.masked_fill(key_pos > query_pos, float("-inf"))
    probs = torch.softmax(scores.to(_compute_dtype(scores.dtype)), dim=-1).to(q.dtype)
    return probs @ v


def _zero_unseen(v, seen):
    """``v`` (..., S, D) with the positions where ``seen`` (S,) is False set to 0: their
    probability is 0, but 0 * NaN (a stale cache slot) is NaN."""
    return torch.where(seen[:, None], v, 0)


def decode_attention(q, k_cache, v_cache, cache_lens, scale=None):
    """One new query per row against a KV cache whose valid length differs per row.

    q: (B, H, D); k_cache, v_cache: (B, H, S, D); cache_lens: (B,) integers in [1, S],
    the number of valid cache positions of each row (the new token's key included).
    Positions past a row's length may hold anything, even NaN: they are never read.
    Returns (B, H, D).
    """
    s = k_cache.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("bhd,bhsd->bhs", q, k_cache) * scale
    valid = torch.arange(s, device=q.device)[None, :] < cache_lens.to(q.device)[:, None]  # (B, S)
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores.to(_compute_dtype(scores.dtype)), dim=-1).to(q.dtype)
    return torch.einsum("bhs,bhsd->bhd", probs, torch.where(valid[:, None, :, None], v_cache, 0))
