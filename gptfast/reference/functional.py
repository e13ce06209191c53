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


def _repeat_kv(t, heads: int):
    """(B, H_kv, T, D) -> (B, heads, T, D): query head h reads kv head h // (heads // H_kv)."""
    return t.repeat_interleave(heads // t.shape[1], dim=1)


def _softmax_rows(scores, visible):
    """Softmax of ``scores`` over the last dim where ``visible``; a row with no visible
    entry (a padded query) gets probabilities 0 (its scores are filled with 0 first, so
    neither the forward nor the backward meets a NaN)."""
    empty = ~visible.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~visible, float("-inf")).masked_fill(empty, 0.0)
    probs = torch.softmax(scores.to(_compute_dtype(scores.dtype)), dim=-1)
    return probs.masked_fill(empty, 0.0)


def causal_attention(q, k, v, scale=None, q_offset: int = 0, q_positions=None, key_start=None):
    """Causal multi-head attention with explicit scores, mask and softmax.

    q: (B, H, Tq, D); k, v: (B, H_kv, Tk, D) with ``Tk == q_offset + Tq`` and H_kv dividing
    H (grouped-query attention; K/V are repeated here, for clarity). Query ``i`` sits at
    absolute position ``q_offset + i`` and sees keys ``0 .. q_offset + i``. With
    ``q_offset == 0`` this is ``F.scaled_dot_product_attention(q, k, v, is_causal=True)``.
    ``q_positions`` ((Tq,) integer tensor, or (B, Tq): each row's own) places the queries
    at those positions instead, against keys of any length (a whole KV cache; keys past a
    row's last query are never read: they may hold NaN).
    ``key_start`` ((B,) integers): row b's keys before it are hidden, and its queries
    before it see nothing and output 0.
    """
    tq, tk = q.shape[-2], k.shape[-2]
    key_pos = torch.arange(tk, device=q.device)[None, :]
    if q_positions is None:
        if tk != q_offset + tq:
            raise ValueError(f"causal_attention: keys length {tk} must equal q_offset ({q_offset}) + queries length ({tq})")
        query_pos = torch.arange(tq, device=q.device)[:, None] + q_offset
    else:
        query_pos = q_positions.reshape(-1, 1, tq, 1)  # (B or 1, 1, Tq, 1)
        seen = key_pos <= query_pos.amax(dim=2)  # (B or 1, 1, Tk): keys some query of the row sees
        k, v = _zero_unseen(k, seen), _zero_unseen(v, seen)
    k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    visible = key_pos <= query_pos  # (Tq, Tk), or (B or 1, 1, Tq, Tk) by position tensor
    if key_start is not None:
        visible = visible & (key_pos >= key_start.to(q.device)[:, None, None, None])
        v = torch.where((key_pos[0] >= key_start.to(q.device)[:, None])[:, None, :, None], v, 0)
    return _softmax_rows(scores, visible).to(q.dtype) @ v


def _zero_unseen(v, seen):
    """``v`` (..., S, D) with the positions where ``seen`` (..., S) is False set to 0: their
    probability is 0, but 0 * NaN (a stale cache slot) is NaN."""
    return torch.where(seen[..., None], v, 0)


def decode_attention(q, k_cache, v_cache, cache_lens, scale=None, key_start=None):
    """One new query per row against a KV cache whose valid length differs per row.

    q: (B, H, D); k_cache, v_cache: (B, H_kv, S, D), H_kv dividing H; cache_lens: (B,)
    integers in [1, S], the number of valid cache positions of each row (the new token's
    key included); ``key_start`` ((B,), optional): the first valid position of each row
    (left padding). Positions outside a row's range may hold anything, even NaN: they are
    never read. A row with no valid position outputs 0. Returns (B, H, D).
    """
    s = k_cache.shape[-2]
    k_cache, v_cache = _repeat_kv(k_cache, q.shape[1]), _repeat_kv(v_cache, q.shape[1])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    positions = torch.arange(s, device=q.device)[None, :]
    valid = positions < cache_lens.to(q.device)[:, None]  # (B, S)
    if key_start is not None:
        valid = valid & (positions >= key_start.to(q.device)[:, None])
    scores = torch.einsum("bhd,bhsd->bhs", q, k_cache) * scale
    probs = _softmax_rows(scores, valid[:, None, :]).to(q.dtype)
    return torch.einsum("bhs,bhsd->bhd", probs, torch.where(valid[:, None, :, None], v_cache, 0))
