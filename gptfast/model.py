"""The GPT-2 model: a thin composition of ops, in the spirit of nanoGPT.

Parameter names follow Hugging Face's GPT2LMHeadModel (``transformer.h.0.attn.c_attn``
…), so checkpoints map one to one (Conv1D weights transposed; see gptfast.hf).

The residual stream uses layernorm's fused residual-add: each block receives the
stream ``h`` and the previous sublayer's output ``delta`` and computes
``y, h = layer_norm(delta, residual=h)``, i.e. ``h = h + delta; y = LN(h)`` in one pass.
That is GPT-2's pre-LN block, reordered so every add rides along with a norm.

Generation runs over a static KV cache allocated once (``setup_cache``): a forward with
``input_pos`` of shape (T,) is a prefill of positions p..p+T-1 for every row; one with
shape (B, 1) is a decode step, one position per row.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptfast.backends import get_ops, resolve_backend
from gptfast.config import GPTConfig


class LayerNorm(nn.Module):
    """LayerNorm whose implementation follows the model's backend."""

    def __init__(self, ndim: int, eps: float, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.eps = eps
        self.ops = get_ops("torch")

    def forward(self, x, residual=None):
        if residual is not None and x.dtype != residual.dtype:
            # Under autocast a sublayer's output comes in the autocast dtype while the
            # residual stream keeps the parameters' dtype: add in the stream's dtype, as
            # the type promotion of `x + residual` would.
            x = x.to(residual.dtype)
        return self.ops.layer_norm(x, self.weight, self.bias, self.eps, residual=residual)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) whose forward runs through a
    prepacked weight while ``gptfast.cpu_linear.packed_linears`` installs one."""

    prepacked = None  # a gptfast.cpu_linear.PackedLinear during CPU generation

    def forward(self, x):
        if self.prepacked is not None:
            return self.prepacked(x)
        return F.linear(x, self.weight, self.bias)


class KVCache(nn.Module):
    """Keys and values of one attention layer, (max_batch, n_head, max_seq_len, head_dim) each."""

    def __init__(self, max_batch, n_head, max_seq_len, head_dim, device=None, dtype=None):
        super().__init__()
        shape = (max_batch, n_head, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    @property
    def max_batch(self) -> int:
        return self.k.shape[0]

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[2]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.kv_cache = None
        self.ops = get_ops("torch")

    def forward(self, x, input_pos=None, prefill_start=0):
        B, T, C = x.shape
        # One matmul for q, k and v; the split below leaves them as strided views.
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim).unbind(dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)

        if input_pos is None:  # training / full recompute: no cache
            y = self.ops.causal_attention(q, k, v)
        elif input_pos.dim() == 1:  # prefill of positions p..p+T-1, shared by all rows
            cache, end = self.kv_cache, prefill_start + T
            cache.k[:B, :, prefill_start:end] = k
            cache.v[:B, :, prefill_start:end] = v
            y = self.ops.causal_attention(q, cache.k[:B, :, :end], cache.v[:B, :, :end], q_offset=prefill_start)
        else:  # decode: one new token per row, at that row's own position
            cache, pos = self.kv_cache, input_pos[:, 0]
            rows = torch.arange(B, device=x.device)
            cache.k[rows, :, pos] = k[:, :, 0]
            cache.v[rows, :, pos] = v[:, :, 0]
            y = self.ops.decode_attention(q[:, :, 0], cache.k[:B], cache.v[:B], pos + 1).unsqueeze(2)

        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, config.mlp_hidden, bias=config.bias)
        self.c_proj = Linear(config.mlp_hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.ops = get_ops("torch")

    def forward(self, x):
        return self.dropout(self.c_proj(self.ops.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.layer_norm_epsilon, config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, config.layer_norm_epsilon, config.bias)
        self.mlp = MLP(config)

    def forward(self, h, delta, input_pos=None, prefill_start=0):
        """Take the residual stream ``h`` and the last sublayer's output ``delta`` (None
        for the first block); return the new stream and this block's MLP output."""
        if delta is None:
            x = self.ln_1(h)
        else:
            x, h = self.ln_1(delta, residual=h)
        attn_out = self.attn(x, input_pos, prefill_start)
        x, h = self.ln_2(attn_out, residual=h)
        return h, self.mlp(x)


def sinusoidal_table(n_positions: int, dim: int) -> torch.Tensor:
    """The fixed sin/cos position table of "Attention Is All You Need"."""
    position = torch.arange(n_positions, dtype=torch.float64)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)[:, : dim // 2]
    return table.float()


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, backend=None):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, config.layer_norm_epsilon, config.bias),
            )
        )
        if config.pos_embedding == "learned":
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        else:
            self.register_buffer("pos_table", sinusoidal_table(config.block_size, config.n_embd), persistent=False)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as GPT-2
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self.set_backend(backend)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ---- backend and cache -------------------------------------------------------

    def set_backend(self, name=None) -> "GPT":
        """Switch every layernorm / attention / GELU to ``reference``, ``torch`` or ``fused``."""
        self.backend = resolve_backend(name)
        ops = get_ops(self.backend)
        for module in self.modules():
            if hasattr(module, "ops"):
                module.ops = ops
        return self

    def setup_cache(self, max_batch: int, max_seq_len: int = None, device=None, dtype=None) -> None:
        """Allocate the static KV cache once: ``max_batch`` rows of ``max_seq_len`` positions."""
        max_seq_len = self.config.block_size if max_seq_len is None else max_seq_len
        if max_batch < 1 or max_seq_len < 1:
            raise ValueError(f"setup_cache: max_batch ({max_batch}) and max_seq_len ({max_seq_len}) must be >= 1")
        if max_seq_len > self.config.block_size:
            raise ValueError(f"setup_cache: max_seq_len {max_seq_len} exceeds the model's context ({self.config.block_size})")
        weight = self.transformer.wte.weight
        device, dtype = device or weight.device, dtype or weight.dtype
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(max_batch, self.config.n_head, max_seq_len, self.config.head_dim, device, dtype)

    def clear_cache(self) -> None:
        for block in self.transformer.h:
            block.attn.kv_cache = None

    @property
    def kv_cache(self):
        return self.transformer.h[0].attn.kv_cache

    # ---- forward -----------------------------------------------------------------

    def forward(self, idx, targets=None, input_pos=None, logits_index=None):
        """Logits (B, T, vocab), or ``(logits, loss)`` when ``targets`` (ignore_index -100) is given.

        ``input_pos`` (needs ``setup_cache``): shape (T,) prefills positions p..p+T-1 of
        rows 0..B-1; shape (B, 1) decodes one token per row at that row's position.
        ``logits_index`` ((B,) integer tensor): compute the logits of one position per
        row only, ``idx[b, logits_index[b]]``'s, returned as (B, 1, vocab); a prefill
        needs no others, and the LM head is the largest matmul of a small model.
        """
        B, T, prefill_start = self._check_inputs(idx, input_pos)
        if logits_index is not None:
            if targets is not None:
                raise ValueError("logits_index computes one position per row: it cannot be combined with targets")
            if logits_index.shape != (B,) or logits_index.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"logits_index must be a ({B},) integer tensor, got {tuple(logits_index.shape)} "
                                 f"{logits_index.dtype}")
            if logits_index.device.type == "cpu" and ((logits_index < 0).any() or (logits_index >= T).any()):
                raise ValueError(f"logits_index {logits_index.tolist()} outside the sequence length {T}")
        if input_pos is None:
            pos = torch.arange(T, device=idx.device)
        else:
            pos = input_pos
        if self.config.pos_embedding == "learned":
            pos_emb = self.transformer.wpe(pos)
        else:
            pos_emb = self.pos_table[pos].to(self.transformer.wte.weight.dtype)
        h = self.transformer.drop(self.transformer.wte(idx) + pos_emb)
        delta = None
        for block in self.transformer.h:
            h, delta = block(h, delta, input_pos, prefill_start)
        if logits_index is not None:
            rows = torch.arange(B, device=idx.device)
            h, delta = h[rows, logits_index].unsqueeze(1), delta[rows, logits_index].unsqueeze(1)
        x, _ = self.transformer.ln_f(delta, residual=h)
        logits = self.lm_head(x)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def _check_inputs(self, idx, input_pos):
        """Validate shapes (and, where it costs no device sync, values); return B, T and
        the first prefill position."""
        if idx.dim() != 2:
            raise ValueError(f"idx must be (batch, time) token ids, got shape {tuple(idx.shape)}")
        if idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"idx must hold integer token ids, got {idx.dtype}")
        B, T = idx.shape
        if T < 1 or B < 1:
            raise ValueError(f"idx must not be empty, got shape {tuple(idx.shape)}")
        if input_pos is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence length {T} exceeds the model's context of {self.config.block_size} tokens")
            return B, T, 0
        cache = self.kv_cache
        if cache is None:
            raise RuntimeError("input_pos was given but no KV cache is set up: call model.setup_cache(max_batch, max_seq_len)")
        if B > cache.max_batch:
            raise ValueError(f"batch {B} is larger than the KV cache's max_batch {cache.max_batch}")
        if input_pos.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_pos must be an integer tensor, got {input_pos.dtype}")
        limit = cache.max_seq_len
        if input_pos.dim() == 1:  # prefill: one host read of the start, the rest checked against it
            if input_pos.numel() != T:
                raise ValueError(f"prefill input_pos must have shape ({T},) to match idx, got {tuple(input_pos.shape)}")
            start = int(input_pos[0])
            if start < 0 or start + T > limit:
                raise ValueError(
                    f"context overflow: positions {start}..{start + T - 1} do not fit the KV cache of {limit} positions"
                )
            expected = torch.arange(start, start + T, device=input_pos.device, dtype=input_pos.dtype)
            if not torch.equal(input_pos, expected):
                raise ValueError("prefill input_pos must be consecutive positions p, p+1, ..., p+T-1")
            return B, T, start
        if input_pos.shape != (B, 1) or T != 1:
            raise ValueError(
                f"decode expects idx of shape (B, 1) and input_pos of shape (B, 1); got idx {tuple(idx.shape)}, "
                f"input_pos {tuple(input_pos.shape)}"
            )
        # Values are checked only where that needs no device sync (CPU): a CUDA decode
        # step may run inside a captured graph; the generation loop bounds positions.
        if input_pos.device.type == "cpu" and ((input_pos < 0).any() or (input_pos >= limit).any()):
            raise ValueError(f"context overflow: decode positions {input_pos.flatten().tolist()} outside the KV cache of {limit} positions")
        return B, T, 0

    # ---- utilities ---------------------------------------------------------------

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without position embeddings (token embeddings count, being tied to the head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.config.pos_embedding == "learned":
            n -= self.transformer.wpe.weight.numel()
        return n

    @torch.no_grad()
    def generate(self, prompt_ids, max_new_tokens: int, temperature: float = 1.0, top_k=None, seed=None):
        """Continue ``prompt_ids`` ((B, T) tensor or list of ids) by ``max_new_tokens`` tokens
        over the KV cache; returns (B, T + max_new_tokens) ids. ``temperature=0`` is greedy."""
        from gptfast.generation import generate_ids  # the C++ decode loop (or its Python twin)

        return generate_ids(self, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)

    @classmethod
    def from_pretrained(cls, path, backend=None, device=None, dtype=None) -> "GPT":
        """Load a local Hugging Face GPT-2 directory (config.json + model.safetensors or pytorch_model.bin)."""
        from gptfast.hf import load_pretrained

        return load_pretrained(cls, path, backend=backend, device=device, dtype=dtype)

    def save_pretrained(self, path) -> None:
        """Write a directory that ``transformers.GPT2LMHeadModel.from_pretrained`` loads."""
        from gptfast.hf import save_pretrained

        save_pretrained(self, path)
