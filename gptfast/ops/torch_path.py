"""The torch path: every op written with PyTorch's own functions, one place for all of them.

This is the ``torch`` backend of a model (``gptfast.backends``) and what each fused op of
``gptfast.ops`` runs where Triton does not (a CPU without ``TRITON_INTERPRET=1``, float64).
Same signatures as the fused ops and the reference twins:

- ``layer_norm(x, weight, bias, eps, residual=None)``: ``F.layer_norm`` after the residual
  add; parameters are cast to the input's dtype (fp32 parameters on bf16 activations).
- ``causal_attention(q, k, v, scale=None, q_offset=0, q_positions=None, key_start=None)``:
  SDPA (``enable_gqa`` for grouped-query k/v, an explicit mask for offsets, positions
  (shared (Tq,) or per-row (B, Tq)) and key ranges).
- ``decode_attention(q, k_cache, v_cache, cache_lens, scale=None, key_start=None)``: SDPA of
  one query per row, masked by ``cache_lens`` (clamped into [1, S]) and ``key_start``;
  stale cache slots may hold NaN.
- ``gelu(x)``: GPT-2's tanh GELU.
- ``int8_linear(x, weight_int8, scale, bias=None)``: dequantise to x's dtype, then ``F.linear``.
- ``skinny_linear(x, weight, bias=None, *, scale=None, ln_weight=None, ln_bias=None, eps=1e-5,
  activation=None, residual=None)``: ``F.layer_norm``, ``F.linear`` (int8 dequantised), GELU, add;
  ``skinny_linear_kv(...)``: the same projection, its k and v columns written into the caches
  with one index write each (``write_kv``, which the CPU's packed decode layers share).
- ``linear_cross_entropy(hidden, weight, targets, ignore_index=-100)``: ``F.linear`` (all the
  logits), then ``F.cross_entropy`` in float32, summed and divided by the counted targets
  clamped to 1. The fused op's own fallback is its chunked loop with the per-row step in
  PyTorch (it must not hold the logits); this is the unfused composition it replaces.

Inputs are not validated here: the ops of ``gptfast.ops`` validate before they dispatch,
and the model passes only shapes it built. Nothing here reads a tensor's value on the
host, so every function traces under ``torch.compile(fullgraph=True)``.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from gptfast.ops._validation import host_readable


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


def _padded_rows(visible: Tensor, key_pos: Tensor, key_start: Optional[Tensor]):
    """``(mask, padded)``: the (B or 1, 1, Tq, Tk) visibility with keys before each row's
    ``key_start`` hidden, and the (B or 1, 1, Tq, 1) queries left with no key. A padded
    query is given key 0 to look at (SDPA would return NaN for an empty row, and NaN
    gradients), and its output is then set to 0, so its gradients are 0 too."""
    if key_start is None:
        return visible, None
    mask = visible & (key_pos >= key_start.clamp(min=0)[:, None, None, None])
    padded = ~mask.any(dim=-1, keepdim=True)
    return mask | (padded & (key_pos == 0)), padded


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None, q_offset: int = 0,
                     q_positions: Optional[Tensor] = None, key_start: Optional[Tensor] = None) -> Tensor:
    """Causal SDPA. q (B, H, Tq, D); k, v (B, H_kv, Tk, D), H_kv dividing H (``enable_gqa``).

    Queries sit at absolute positions ``q_offset + i`` (then ``Tk == q_offset + Tq``), or,
    when ``q_positions`` ((Tq,) integer tensor, or (B, Tq): each row's own) is given, at
    those positions: ``k``/``v`` may then be a whole static cache, each query seeing the
    keys at or before its position, and the keys past a row's last query (stale cache
    slots) are never read (they are zeroed: a mask alone lets their NaN through; where the
    positions are host-readable the caches are cut after the last one first). SDPA's
    ``is_causal`` aligns its mask to the top-left corner, so an offset takes an explicit mask.
    ``key_start`` ((B,)): row b's keys before it are hidden and its queries before it output 0.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    gqa = dict(enable_gqa=True) if k.shape[1] != q.shape[1] else {}
    if q_positions is not None and host_readable(q_positions) and host_readable(q):
        # No query sees past the last position: cut the caches there (a CPU prefill or verify
        # step then reads the positions written so far, not the whole preallocated cache).
        last = min(max(int(q_positions.max()), 0) + 1, k.shape[2])
        k, v = k[:, :, :last], v[:, :, :last]
    key_pos = torch.arange(k.shape[2], device=q.device)
    if q_positions is not None:
        rows = q_positions.reshape(-1, q.shape[2])  # (B or 1, Tq)
        visible = (key_pos <= rows[:, :, None])[:, None]  # (B or 1, 1, Tq, Tk)
        seen = (key_pos <= rows.amax(dim=1, keepdim=True))[:, None, :, None]  # (B or 1, 1, Tk, 1): what the row sees
        k, v = _zero_unseen(k, seen), _zero_unseen(v, seen)
    elif q_offset == 0 and key_start is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, **gqa)
    else:
        visible = torch.ones(1, 1, q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(diagonal=q_offset)
    mask, padded = _padded_rows(visible, key_pos, key_start)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **gqa)
    return out if padded is None else out.masked_fill(padded, 0)


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor,
                     scale: Optional[float] = None, key_start: Optional[Tensor] = None) -> Tensor:
    """Attention of q (B, H, D) over the first ``cache_lens[b]`` positions of each row's cache
    (B, H_kv, S, D), from ``key_start[b]`` on when given; lengths are clamped into [1, S], as
    the kernel does. A row whose key_start is at or past its length outputs 0. Returns (B, H, D).

    Stale cache slots may hold NaN. A masked SDPA would let it through (NaN + -inf in the
    scores, 0 * NaN in the probabilities' product), so in general the scores of unseen
    positions are masked after ``q·K`` and V is copied with those positions zeroed; grouped-
    query heads fold into the query dimension (K and V are never repeated). Copying V each
    step is the cost of that safety: in eager mode on the CPU, where reading a value needs
    no device sync, the masked SDPA runs first and its (B, H, D) output is kept when finite
    (a stale NaN would have made it NaN); only a non-finite one is recomputed the safe way.

    Where the lengths are host-readable (CPU, eager) the caches are first cut to the longest
    row's length, so a decode step reads only the positions written so far, not the whole
    preallocated cache; when every row has that length (batch 1 always) and no key_start,
    no position in reach is stale and the unmasked SDPA over the cut caches is the answer."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    batch, heads, head_dim = q.shape
    kv_heads, seq_len = k_cache.shape[1], k_cache.shape[2]
    gqa = dict(enable_gqa=True) if kv_heads != heads else {}
    if host_readable(cache_lens) and host_readable(q) and batch > 0:
        lengths = [min(max(n, 1), seq_len) for n in cache_lens.tolist()]
        seq_len = max(lengths)
        k_cache, v_cache = k_cache[:, :, :seq_len], v_cache[:, :, :seq_len]
        if key_start is None and min(lengths) == seq_len:
            return F.scaled_dot_product_attention(q.unsqueeze(2), k_cache, v_cache, scale=scale, **gqa).squeeze(2)
    lens = cache_lens.clamp(1, seq_len)
    key_pos = torch.arange(seq_len, device=q.device)[None, :]
    valid = key_pos < lens[:, None]  # (B, S); lens >= 1, so every row sees key 0 ...
    empty = None
    if key_start is not None:  # ... unless key_start hides it
        valid = valid & (key_pos >= key_start[:, None])
        empty = ~valid.any(dim=1)  # (B,): rows with no visible key; key 0 keeps their softmax defined
        valid = valid | (empty[:, None] & (key_pos == 0))
    out = None
    if host_readable(q):
        out = F.scaled_dot_product_attention(q.unsqueeze(2), k_cache, v_cache, attn_mask=valid[:, None, None, :],
                                             scale=scale, **gqa).squeeze(2)
        out = out if bool(torch.isfinite(out.sum())) else None  # a finite sum: no NaN or inf anywhere
    if out is None:
        grouped = q.reshape(batch, kv_heads, heads // kv_heads, 1, head_dim)  # (B, H_kv, G, 1, D)
        scores = torch.matmul(grouped, k_cache.unsqueeze(2).transpose(-1, -2)) * scale  # (B, H_kv, G, 1, S)
        scores = scores.masked_fill(~valid[:, None, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, _zero_unseen(v_cache, valid[:, None, :, None]).unsqueeze(2))
    out = out.reshape(batch, heads, head_dim)
    return out if empty is None else out.masked_fill(empty[:, None, None], 0)


def gelu(x: Tensor) -> Tensor:
    """GPT-2's GELU, the tanh approximation ("gelu_new" in Hugging Face)."""
    return F.gelu(x, approximate="tanh")


def int8_linear(x: Tensor, weight_int8: Tensor, scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ (weight_int8 * scale[:, None])^T + bias``: the weight dequantised to x's dtype."""
    return F.linear(x, weight_int8.to(x.dtype) * scale.to(x.dtype)[:, None], bias)


def skinny_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, scale: Optional[Tensor] = None,
                  ln_weight: Optional[Tensor] = None, ln_bias: Optional[Tensor] = None, eps: float = 1e-5,
                  activation: Optional[str] = None, residual: Optional[Tensor] = None) -> Tensor:
    """``act(LN(x) @ (weight * scale)^T + bias) + residual``, each step one PyTorch call."""
    h = x if ln_weight is None else layer_norm(x, ln_weight, ln_bias, eps)
    y = F.linear(h, weight, bias) if scale is None else int8_linear(h, weight, scale, bias)
    if activation == "gelu":
        y = gelu(y)
    return y if residual is None else y + residual


def skinny_linear_kv(x: Tensor, weight: Tensor, bias: Optional[Tensor], k_cache: Tensor, v_cache: Tensor,
                     positions: Tensor, *, scale: Optional[Tensor] = None, ln_weight: Optional[Tensor] = None,
                     ln_bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """x (B, T, K) projected to ``[q | k | v]``; k and v written into the (B_max, H_kv, S, D)
    caches at ``positions`` (B, T) (clamped into [0, S), as the kernel does); returns q."""
    y = skinny_linear(x, weight, bias, scale=scale, ln_weight=ln_weight, ln_bias=ln_bias, eps=eps)
    return write_kv(y, k_cache, v_cache, positions)


def write_kv(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, positions: Tensor) -> Tensor:
    """The KV-cache write of a projection's ``[q | k | v]`` output qkv (B, T, N): its k and v
    columns into the (B_max, H_kv, S, D) caches at ``positions`` (B, T) (clamped into [0, S),
    as the kernel does); returns the q columns (B, T, Q), a view of qkv."""
    batch, tokens = positions.shape
    kv_heads, seq_len, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    q_cols = qkv.shape[-1] - 2 * kv_heads * head_dim
    kv = qkv[..., q_cols:].view(batch, tokens, 2, kv_heads, head_dim)
    rows = torch.arange(batch, device=qkv.device)[:, None]
    pos = positions.clamp(0, seq_len - 1)
    k_cache[rows, :, pos] = kv[:, :, 0]  # (B, T, H_kv, D) into (B, T) slots of (H_kv, D)
    v_cache[rows, :, pos] = kv[:, :, 1]
    return qkv[..., :q_cols]
def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy of ``F.linear(hidden, weight)`` over the targets that are not
    ``ignore_index`` (``cross_entropy`` of the whole logits)."""
    return cross_entropy(F.linear(hidden, weight), targets, ignore_index)


def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy of ``logits`` (..., V) (in float32, float64 kept) over the targets
    that are not ``ignore_index``; 0 when there are none (the sum over no targets divided by
    a count clamped to 1: no NaN and no host read)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)).reshape(-1, logits.shape[-1])
    flat = targets.reshape(-1).long()
    total = F.cross_entropy(logits, flat, ignore_index=ignore_index, reduction="sum")
    return total / (flat != ignore_index).sum().clamp(min=1)
