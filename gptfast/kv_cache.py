"""The static KV cache of one attention layer: allocated once (``GPT.setup_cache``), written
in place by each step, and the one place that says whether a step fits it.

A step's positions come as a tensor: (T,) for a prefill of rows 0..B-1 at positions
p..p+T-1, (B, 1) for a decode step and (B, T) for a speculative verify step (each row's
own T consecutive positions). Writes index the cache with that tensor on its device
(never a host int), so a step that writes it compiles and captures whole.
``check_step`` validates a step before anything is written: shapes always, position
values where that is free (``gptfast.ops._validation.check_positions``: CPU tensors
outside ``torch.compile``).

Two ways to write a decode / verify step's rows: ``write_rows`` takes projected k and v
(one indexed write per cache), ``project_rows`` (the fused backend's decode step) runs
the layer norm + QKV projection itself and writes k and v from inside that launch
(``gptfast.nn.decode_linear_kv``, i.e. ``gptfast.ops.skinny_linear_kv``): no separate write.
"""
import torch
import torch.nn as nn

from gptfast.nn import decode_linear_kv
from gptfast.ops._validation import check_positions, describe


class KVCache(nn.Module):
    """Keys and values of one attention layer, (max_batch, n_head, max_seq_len, head_dim) each.

    ``rows_prefilled`` (a host int, no device read) counts the rows a prefill has written:
    a decode or verify step of more rows would attend to positions nothing wrote.
    """

    def __init__(self, max_batch, n_head, max_seq_len, head_dim, device=None, dtype=None):
        super().__init__()
        shape = (max_batch, n_head, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.rows_prefilled = 0

    @property
    def max_batch(self) -> int:
        return self.k.shape[0]

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[2]

    def check_step(self, idx: torch.Tensor, input_pos) -> None:
        """Raise unless the tokens ``idx`` (B, T) at positions ``input_pos`` fit this cache."""
        B, T = idx.shape
        if B > self.max_batch:
            raise ValueError(f"batch {B} is larger than the KV cache's max_batch {self.max_batch}")
        if not isinstance(input_pos, torch.Tensor) or input_pos.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_pos must be an integer tensor, got {describe(input_pos)}")
        if input_pos.device != idx.device:
            raise ValueError(f"input_pos is on {input_pos.device} but idx is on {idx.device}")
        if input_pos.dim() == 1 and input_pos.shape != (T,):
            raise ValueError(f"prefill input_pos must have shape ({T},) to match idx, got {tuple(input_pos.shape)}")
        if input_pos.dim() != 1 and input_pos.shape != idx.shape:
            raise ValueError(f"decode expects idx and input_pos of one shape (B, T) (T > 1: a verify step); "
                             f"got idx {tuple(idx.shape)}, input_pos {tuple(input_pos.shape)}")
        if T > self.max_seq_len:
            raise ValueError(f"context overflow: {T} positions do not fit the KV cache of {self.max_seq_len} positions")
        check_positions("input_pos", input_pos, self.max_seq_len, "positions of the KV cache")

    def write_prefill(self, input_pos, k, v):
        """Write ``k``, ``v`` (B, H, T, D) at positions ``input_pos`` (T,) of rows 0..B-1;
        return those rows' whole caches (B, H, S, D) for attention."""
        batch, index = k.shape[0], input_pos.long()
        keys, values = self.k[:batch], self.v[:batch]
        keys.index_copy_(2, index, k)
        values.index_copy_(2, index, v)
        self.rows_prefilled = max(self.rows_prefilled, batch)
        return keys, values

    def write_rows(self, input_pos, k, v):
        """Write T tokens' ``k``, ``v`` (B, H, T, D) per row at that row's positions
        ``input_pos`` (B, T) (a decode step: T = 1; a verify step: T > 1); return the rows'
        caches (B, H, S, D) for attention."""
        batch = k.shape[0]
        self._check_prefilled(batch, k.shape[2])
        if batch == 1:  # one row (most CPU decoding): a plain index copy along positions, a fraction of the cost
            keys, values = self.k[:1], self.v[:1]
            index = input_pos[0].long()
            keys.index_copy_(2, index, k)
            values.index_copy_(2, index, v)
            return keys, values
        rows = torch.arange(batch, device=k.device)[:, None]
        self.k[rows, :, input_pos] = k.transpose(1, 2)
        self.v[rows, :, input_pos] = v.transpose(1, 2)
        return self.k[:batch], self.v[:batch]

    def project_rows(self, x, input_pos, linear, norm):
        """The fused decode / verify write: ``q, k, v = linear(norm(x))`` for x (B, T, C) in
        one launch that stores k and v straight into the cache at ``input_pos`` (B, T).
        ``linear``: the QKV projection (``nn.Linear`` or ``Int8Linear``, columns [q | k | v]);
        ``norm``: its layer norm. Returns q (B, T, Q) and the rows' caches (B, H, S, D)."""
        batch = x.shape[0]
        self._check_prefilled(batch, x.shape[1])
        q = decode_linear_kv(x, linear, norm, self.k, self.v, input_pos)
        return q, self.k[:batch], self.v[:batch]

    def _check_prefilled(self, batch: int, steps: int) -> None:
        if batch > self.rows_prefilled:
            raise RuntimeError(
                f"{'decode' if steps == 1 else 'verify'} step of {batch} rows, but a prefill wrote only "
                f"{self.rows_prefilled} rows of the KV cache: prefill each row's prompt first "
                "(model(idx, input_pos=torch.arange(T)))"
            )
