"""The GPT-2 model: a thin composition of ops, in the spirit of nanoGPT.

Parameter names follow Hugging Face's GPT2LMHeadModel (``transformer.h.0.attn.c_attn``
…), so checkpoints map one to one (Conv1D weights transposed; see
gptfast.checkpoints.hf_gpt2, which ``from_pretrained`` / ``save_pretrained`` call).

The residual stream uses layernorm's fused residual-add: each block receives the
stream ``h`` and the previous sublayer's output ``delta`` and computes
``y, h = layer_norm(delta, residual=h)``, i.e. ``h = h + delta; y = LN(h)`` in one pass.
That is GPT-2's pre-LN block, reordered so every add rides along with a norm.

Generation runs over a static KV cache allocated once (``setup_cache``): ``input_pos`` of
shape (T,) prefills positions p..p+T-1 of every row; (B, 1) is a decode step, one position
per row; (B, T) a speculative verify step (each row's own T consecutive positions). The
last two run ``GPT._decode_step`` on the fused backend and while ``fused_decode`` is set
(the CPU's packed layers, during ``gptfast.generate``). No step reads a position on the host
(a prefill attends over the whole cache, each query masked at its position), so the steps
compile with ``torch.compile(fullgraph=True)`` and CUDA steps never wait on the device.
Values (token ids, targets, positions) are checked where that is free: CPU tensors outside
``torch.compile``; shapes always.

The backend (gptfast.backends) is one ``Backend`` object per model, which every layer
reads. The model imports nothing above it: generation lives in ``gptfast.generate``.
"""
import math
import warnings

import torch
import torch.nn as nn

from gptfast import ops as fused_ops
from gptfast.backends import Backend
from gptfast.checkpoints import hf_gpt2
from gptfast.config import GPTConfig
from gptfast.kv_cache import KVCache
from gptfast.nn import decode_linear
from gptfast.ops import torch_path
from gptfast.ops._validation import check_ids, describe, host_readable

IGNORE_INDEX = -100  # targets equal to this add nothing to the loss


class LayerNorm(nn.Module):
    """LayerNorm whose implementation follows the model's backend."""

    def __init__(self, ndim: int, eps: float, bias: bool, backend: Backend):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.eps = eps
        self._backend = backend

    def forward(self, x, residual=None):
        if residual is not None and x.dtype != residual.dtype:
            # Under autocast a sublayer's output comes in the autocast dtype while the residual
            # stream keeps the parameters' dtype: add in the stream's dtype, as `x + residual` would.
            x = x.to(residual.dtype)
        return self._backend.ops.layer_norm(x, self.weight, self.bias, self.eps, residual=residual)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, backend: Backend):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.kv_cache = None
        self._backend = backend

    def forward(self, x, input_pos=None):
        """Project, write the cache, attend, project. ``input_pos``: None (no cache), (T,)
        (a prefill: every row at positions p..p+T-1), (B, 1) (a decode step) or (B, T)
        (a verify step: each row's own T consecutive positions)."""
        B, T, C = x.shape
        ops = self._backend.ops
        # One matmul for q, k and v; the split below leaves them as strided views.
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim).unbind(dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if input_pos is not None and input_pos.dim() == 2:  # decode (T = 1) / verify (T > 1): per-row positions
            y = self.attend_rows(q, *self.kv_cache.write_rows(input_pos, k, v), input_pos)
        else:  # training (no cache) or a prefill (the whole cache, each query seeing up to its position)
            keys, values = (k, v) if input_pos is None else self.kv_cache.write_prefill(input_pos, k, v)
            y = ops.causal_attention(q, keys, values, q_positions=input_pos).transpose(1, 2).reshape(B, T, C)
        y = self.c_proj(y)
        return self.resid_dropout(y) if self.training else y  # eval: no dropout call per layer and step

    def attend_rows(self, q, keys, values, input_pos, cache_lens=None, ops=None):
        """Decode (T = 1) / verify attention of q (B, H, T, D) over the rows' caches, by ``ops`` (or the backend)."""
        B, H, T, D = q.shape
        if T == 1:
            lens = input_pos[:, 0] + 1 if cache_lens is None else cache_lens
            y = (ops or self._backend.ops).decode_attention(q[:, :, 0], keys, values, lens).unsqueeze(2)
        else:
            y = (ops or self._backend.ops).causal_attention(q, keys, values, q_positions=input_pos)
        return y.transpose(1, 2).reshape(B, T, H * D)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig, backend: Backend):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_hidden, bias=config.bias)
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self._backend = backend

    def forward(self, x):
        y = self.c_proj(self._backend.ops.gelu(self.c_fc(x)))
        return self.dropout(y) if self.training else y


class Block(nn.Module):
    def __init__(self, config: GPTConfig, backend: Backend):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.layer_norm_epsilon, config.bias, backend)
        self.attn = CausalSelfAttention(config, backend)
        self.ln_2 = LayerNorm(config.n_embd, config.layer_norm_epsilon, config.bias, backend)
        self.mlp = MLP(config, backend)

    def forward(self, h, delta, input_pos=None):
        """Take the residual stream ``h`` and the last sublayer's output ``delta`` (None
        for the first block); return the new stream and this block's MLP output."""
        if delta is None:
            x = self.ln_1(h)
        else:
            x, h = self.ln_1(delta, residual=h)
        x, h = self.ln_2(self.attn(x, input_pos), residual=h)
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
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT: config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        self._backend = Backend(backend)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, self._backend) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, config.layer_norm_epsilon, config.bias, self._backend),
            )
        )
        if config.pos_embedding == "learned":
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        else:
            self.register_buffer("pos_table", sinusoidal_table(config.block_size, config.n_embd), persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as GPT-2
        self.fused_decode = False  # decode / verify steps take _decode_step outside the fused backend too
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # ---- backend and cache -------------------------------------------------------

    @property
    def backend(self) -> str:
        """The backend's name: ``reference``, ``torch`` or ``fused`` (see gptfast.backends)."""
        return self._backend.name

    def set_backend(self, name=None) -> "GPT":
        """Switch every layernorm / attention / GELU to ``reference``, ``torch`` or ``fused``
        (None: $GPTFAST_BACKEND, else the device default). Every layer reads the one
        backend object the model made, so this switches a live model in place."""
        self._backend.set(name)
        return self

    def setup_cache(self, max_batch: int, max_seq_len: int = None, device=None, dtype=None) -> None:
        """Allocate the static KV cache once: ``max_batch`` rows of ``max_seq_len`` positions
        (default: the model's context), on the model's device and in its dtype."""
        max_seq_len = self.config.block_size if max_seq_len is None else max_seq_len
        for name, value in (("max_batch", max_batch), ("max_seq_len", max_seq_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"setup_cache: {name} must be an int >= 1, got {value!r}")
        if max_seq_len > self.config.block_size:
            raise ValueError(f"setup_cache: max_seq_len {max_seq_len} exceeds the model's context ({self.config.block_size})")
        weight = self.transformer.wte.weight
        device = weight.device if device is None else torch.device(device)
        dtype = weight.dtype if dtype is None else dtype
        if dtype != weight.dtype:  # attention takes q from the model and k/v from the cache: one dtype
            raise TypeError(f"setup_cache: cache dtype {dtype} differs from the model's dtype {weight.dtype}; "
                            f"convert the model (model.to({dtype})) or leave dtype unset")
        if device.type != weight.device.type or (device.index is not None and device != weight.device):
            raise ValueError(f"setup_cache: cache device {device} differs from the model's device {weight.device}")
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(max_batch, self.config.n_head, max_seq_len, self.config.head_dim,
                                          weight.device, dtype)

    def clear_cache(self) -> None:
        for block in self.transformer.h:
            block.attn.kv_cache = None

    @property
    def kv_cache(self):
        return self.transformer.h[0].attn.kv_cache

    # ---- forward -----------------------------------------------------------------

    def forward(self, idx, targets=None, input_pos=None, logits_index=None, return_logits=True):
        """Logits (B, T, vocab), or ``(logits, loss)`` when ``targets`` (B, T) is given.

        ``return_logits=False`` (with ``targets``; training and evaluation pass it) returns
        ``(None, loss)``: head and loss are one op, the backend's ``linear_cross_entropy``,
        which in the fused backend never holds all the logits. The loss is the same.

        ``input_pos`` (needs ``setup_cache``): shape (T,) prefills positions p..p+T-1 of
        rows 0..B-1; shape (B, 1) decodes one token per row at that row's position; shape
        (B, T), T > 1, verifies T tokens per row at that row's consecutive positions
        (speculative decoding: causal within the block, over the row's cache).
        ``logits_index`` ((B,) integer tensor): compute the logits of one position per
        row only, ``idx[b, logits_index[b]]``'s, returned as (B, 1, vocab); a prefill
        needs no others, and the LM head is the largest matmul of a small model.

        The loss is the mean cross-entropy over the targets that are not -100; 0 when
        every target is -100 (a zero gradient, not an empty mean's NaN; a RuntimeWarning
        says so where reading the targets is free). Shapes and dtypes are always checked,
        values (ids, targets, positions) where free: CPU tensors outside torch.compile.
        """
        B, T = self._check_inputs(idx, input_pos, logits_index)
        if targets is not None:
            self._check_targets(idx, targets, logits_index)
        elif not return_logits:
            raise ValueError("return_logits=False returns only the loss: it needs targets")
        pos = torch.arange(T, device=idx.device) if input_pos is None else input_pos
        if self.config.pos_embedding == "learned":
            pos_emb = self.transformer.wpe(pos)
        else:
            pos_emb = self.pos_table[pos].to(self.transformer.wte.weight.dtype)
        h = self.transformer.wte(idx) + pos_emb
        h = self.transformer.drop(h) if self.training else h
        if targets is None and input_pos is not None and input_pos.dim() == 2 \
                and (self._backend.name == "fused" or self.fused_decode) \
                and not (self.training and self.config.dropout > 0):  # a fused decode / verify step
            return self._decode_step(h, input_pos, logits_index)
        delta = None
        for block in self.transformer.h:
            h, delta = block(h, delta, input_pos)
        if logits_index is not None:
            rows = torch.arange(B, device=idx.device)
            h, delta = h[rows, logits_index].unsqueeze(1), delta[rows, logits_index].unsqueeze(1)
        x, _ = self.transformer.ln_f(delta, residual=h)
        if not return_logits:  # the training step: the head inside the loss, no logits held
            _warn_if_nothing_counted(targets)
            return None, self._backend.ops.linear_cross_entropy(x, self.lm_head.weight, targets, IGNORE_INDEX)
        logits = self.lm_head(x)
        if targets is None:
            return logits
        _warn_if_nothing_counted(targets)
        return logits, torch_path.cross_entropy(logits, targets, IGNORE_INDEX)

    def _decode_step(self, h, input_pos, logits_index):
        """Fused decode / verify, per block: LN + QKV + cache write, attention (1-2 launches), out-proj +
        residual, LN + up-proj + GELU, down-proj + residual (gptfast.nn.decode_linear); then LN + LM head."""
        (B, T, C), ops = h.shape, fused_ops  # gptfast.ops' attention whatever the backend (CPU: its C++ kernel)
        cache_lens = input_pos[:, 0] + 1 if T == 1 else None  # once for every layer
        for block in self.transformer.h:
            attn, mlp = block.attn, block.mlp
            q, keys, values = attn.kv_cache.project_rows(h, input_pos, attn.c_attn, block.ln_1)
            y = attn.attend_rows(q.view(B, T, attn.n_head, -1).transpose(1, 2), keys, values, input_pos, cache_lens, ops)
            h = decode_linear(y, attn.c_proj, residual=h)
            h = decode_linear(decode_linear(h, mlp.c_fc, block.ln_2, activation="gelu"), mlp.c_proj, residual=h)
        if logits_index is not None:
            h = h[torch.arange(h.shape[0], device=h.device), logits_index].unsqueeze(1)
        return decode_linear(h, self.lm_head, self.transformer.ln_f)

    def _check_inputs(self, idx, input_pos, logits_index):
        """Validate idx, input_pos and logits_index (see forward); return B and T."""
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
            raise ValueError(f"idx must be a (batch, time) tensor of token ids, got {describe(idx)}")
        if idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"idx must hold integer token ids, got {idx.dtype}")
        B, T = idx.shape
        if T < 1 or B < 1:
            raise ValueError(f"idx must not be empty, got shape {tuple(idx.shape)}")
        check_ids("token id", idx, self.config.vocab_size)
        if logits_index is not None:
            if not isinstance(logits_index, torch.Tensor) or logits_index.shape != (B,) \
                    or logits_index.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"logits_index must be a ({B},) integer tensor, got {describe(logits_index)}")
            if host_readable(logits_index) and bool(((logits_index < 0) | (logits_index >= T)).any()):
                raise ValueError(f"logits_index {logits_index.tolist()} outside the sequence length {T}")
        if input_pos is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence length {T} exceeds the model's context of {self.config.block_size} tokens")
            return B, T
        if self.kv_cache is None:
            raise RuntimeError("input_pos was given but no KV cache is set up: call model.setup_cache(max_batch, max_seq_len)")
        self.kv_cache.check_step(idx, input_pos)
        return B, T

    def _check_targets(self, idx, targets, logits_index):
        if logits_index is not None:
            raise ValueError("logits_index computes one position per row: it cannot be combined with targets")
        if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"targets must be an integer tensor of token ids, got {describe(targets)}")
        if targets.shape != idx.shape:
            raise ValueError(f"targets must have idx's shape {tuple(idx.shape)}, got {tuple(targets.shape)}")
        check_ids("target", targets, self.config.vocab_size, ignore=IGNORE_INDEX)

    # ---- utilities ---------------------------------------------------------------

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without position embeddings (token embeddings count, being tied to the head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.config.pos_embedding == "learned":
            n -= self.transformer.wpe.weight.numel()
        return n

    @classmethod
    def from_pretrained(cls, path, backend=None, device=None, dtype=None) -> "GPT":
        """Load a local Hugging Face GPT-2 directory (config.json + model.safetensors or pytorch_model.bin)."""
        model = cls(hf_gpt2.read_config(path), backend=backend)
        model.load_state_dict(hf_gpt2.read_weights(path, model.state_dict()))
        return model.to(device=device, dtype=dtype).eval()

    def save_pretrained(self, path) -> None:
        """Write a directory that ``transformers.GPT2LMHeadModel.from_pretrained`` loads."""
        table = self.pos_table if self.config.pos_embedding == "sinusoidal" else None
        hf_gpt2.write(path, self.config, self.state_dict(), pos_table=table)


def _warn_if_nothing_counted(targets):
    """Warn (where reading targets is free: see host_readable) when every one is ignored."""
    if host_readable(targets) and not bool((targets != IGNORE_INDEX).any()):
        warnings.warn("every target is -100 (ignored): the loss is 0 and so is its gradient", RuntimeWarning,
                      stacklevel=4)
