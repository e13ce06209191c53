"""The GPT-2 model: a thin composition of ops, in the spirit of nanoGPT.

Parameter names follow Hugging Face's GPT2LMHeadModel (``transformer.h.0.attn.c_attn``
…), so checkpoints map one to one (Conv1D weights transposed; see gptfast.checkpoints.hf_gpt2).

The residual stream uses layernorm's fused residual-add: each block receives the
stream ``h`` and the previous sublayer's output ``delta`` and computes
``y, h = layer_norm(delta, residual=h)``, i.e. ``h = h + delta; y = LN(h)`` in one pass.
That is GPT-2's pre-LN block, reordered so every add rides along with a norm.

Generation runs over a static KV cache allocated once (``setup_cache``): a forward with
``input_pos`` of shape (T,) is a prefill of positions p..p+T-1 for every row; one with
shape (B, 1) is a decode step, one position per row, and (B, T) a speculative verify step
(each row's own T consecutive positions: one ``causal_attention(..., q_positions=input_pos)``
call over each row's cache). Attention reads top-down: project, write the cache
(``KVCache.write_prefill`` / ``write_decode`` / ``write_rows``), attend, project. Neither
step reads a position on the host: a prefill attends over the whole cache with each
query masked at its position (``causal_attention(..., q_positions=input_pos)``), so
prefill and decode steps compile with ``torch.compile(fullgraph=True)`` and the CUDA
steps never wait on the device. The backend (gptfast.backends) is one ``Backend`` object
per model, which every layer reads.

The model imports nothing above it: generation lives in ``gptfast.generate`` and CPU
weight packing in ``gptfast.generation.cpu_linear``.
"""
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptfast.backends import backend_module, resolve_backend
from gptfast.config import GPTConfig

IGNORE_INDEX = -100  # targets equal to this add nothing to the loss


def _host_checks(t: torch.Tensor) -> bool:
    """Whether value checks on ``t`` run: only where reading it costs no device sync and
    no graph break, i.e. a CPU tensor outside ``torch.compile``. On CUDA a check would
    block the host on every step (and cannot run inside a captured graph), so out-of-range
    ids or positions there meet torch's device-side assert; gptfast.generate validates
    prompt ids and bounds positions on the host before they reach the device.

    How "no sync on the CUDA steps" is checked: every value read in the forward (token
    ids, targets, positions, logits_index, the all-ignored loss warning) goes through this
    gate, and nothing else reads a tensor on the host (the cache writes index with the
    position tensor; the prefill start is never read). tests/test_model_compile.py
    compiles the prefill and decode steps with fullgraph=True, which fails on any host
    read of a tensor value (a graph break), for the torch and fused backends."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


class Backend:
    """The backend a model's modules share: one per model, made by ``GPT`` and handed to
    every layer it builds, switched in place by ``GPT.set_backend``. ``ops`` is the
    backend's module (see gptfast.backends)."""

    def __init__(self, name=None):
        self.set(name)

    def set(self, name=None) -> None:
        self.name = resolve_backend(name)
        self.ops = backend_module(self.name)

    def __getstate__(self):  # modules do not pickle: keep the name, look the module up again
        return {"name": self.name}

    def __setstate__(self, state):
        self.set(state["name"])


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
            # Under autocast a sublayer's output comes in the autocast dtype while the
            # residual stream keeps the parameters' dtype: add in the stream's dtype, as
            # the type promotion of `x + residual` would.
            x = x.to(residual.dtype)
        return self._backend.ops.layer_norm(x, self.weight, self.bias, self.eps, residual=residual)


class KVCache(nn.Module):
    """Keys and values of one attention layer, (max_batch, n_head, max_seq_len, head_dim) each,
    and the two ways they are written. Writes index the cache with the position tensor on
    its device (never a host int), so a step that writes it compiles and captures whole.

    ``rows_prefilled`` (a host int, no device read) counts the rows a prefill has written:
    a decode step of more rows would attend to positions nothing wrote.
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

    def write_prefill(self, input_pos, k, v):
        """Write ``k``, ``v`` (B, H, T, D) at positions ``input_pos`` (T,) of rows 0..B-1;
        return those rows' whole caches (B, H, S, D) for attention."""
        batch, index = k.shape[0], input_pos.long()
        keys, values = self.k[:batch], self.v[:batch]
        keys.index_copy_(2, index, k)
        values.index_copy_(2, index, v)
        self.rows_prefilled = max(self.rows_prefilled, batch)
        return keys, values

    def write_decode(self, input_pos, k, v):
        """Write one token's ``k``, ``v`` (B, H, 1, D) per row at that row's position
        ``input_pos`` (B, 1); return the rows' caches (B, H, S, D) for attention."""
        batch = k.shape[0]
        if batch > self.rows_prefilled:
            raise RuntimeError(
                f"decode step of {batch} rows, but a prefill wrote only {self.rows_prefilled} rows of the KV cache: "
                "prefill each row's prompt first (model(idx, input_pos=torch.arange(T)))"
            )
        rows, pos = torch.arange(batch, device=k.device), input_pos[:, 0]
        self.k[rows, :, pos] = k[:, :, 0]
        self.v[rows, :, pos] = v[:, :, 0]
        return self.k[:batch], self.v[:batch]

    def write_rows(self, input_pos, k, v):
        """Write T tokens' ``k``, ``v`` (B, H, T, D) per row at that row's positions
        ``input_pos`` (B, T) (a speculative verify step); return the rows' caches."""
        batch = k.shape[0]
        if batch > self.rows_prefilled:
            raise RuntimeError(f"verify step of {batch} rows, but a prefill wrote only {self.rows_prefilled} rows "
                               "of the KV cache: prefill each row's prompt first")
        rows = torch.arange(batch, device=k.device)[:, None]
        self.k[rows, :, input_pos] = k.transpose(1, 2)
        self.v[rows, :, input_pos] = v.transpose(1, 2)
        return self.k[:batch], self.v[:batch]


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
        if input_pos is None:  # training / full recompute
            y = ops.causal_attention(q, k, v)
        elif input_pos.dim() == 1:  # prefill: the whole cache, each query seeing up to its position
            keys, values = self.kv_cache.write_prefill(input_pos, k, v)
            y = ops.causal_attention(q, keys, values, q_positions=input_pos)
        elif T == 1:  # decode: one new token per row, at that row's own position
            keys, values = self.kv_cache.write_decode(input_pos, k, v)
            y = ops.decode_attention(q[:, :, 0], keys, values, input_pos[:, 0] + 1).unsqueeze(2)
        else:  # verify: T tokens per row at its own positions, one attention call over each row's cache
            keys, values = self.kv_cache.write_rows(input_pos, k, v)
            y = ops.causal_attention(q, keys, values, q_positions=input_pos)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig, backend: Backend):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_hidden, bias=config.bias)
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self._backend = backend

    def forward(self, x):
        return self.dropout(self.c_proj(self._backend.ops.gelu(self.c_fc(x))))


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
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

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

    def forward(self, idx, targets=None, input_pos=None, logits_index=None):
        """Logits (B, T, vocab), or ``(logits, loss)`` when ``targets`` (B, T) is given.

        ``input_pos`` (needs ``setup_cache``): shape (T,) prefills positions p..p+T-1 of
        rows 0..B-1; shape (B, 1) decodes one token per row at that row's position; shape
        (B, T), T > 1, verifies T tokens per row at that row's consecutive positions
        (speculative decoding: causal within the block, over the row's cache).
        ``logits_index`` ((B,) integer tensor): compute the logits of one position per
        row only, ``idx[b, logits_index[b]]``'s, returned as (B, 1, vocab); a prefill
        needs no others, and the LM head is the largest matmul of a small model.

        The loss is the mean cross-entropy over the targets that are not -100 (ignored).
        When every target is -100 the loss is 0 (a zero gradient), not the NaN of an
        empty mean, and on CPU a RuntimeWarning says so (on CUDA that check would block
        the host every step).

        Shapes and dtypes are always checked; values (token ids, targets, positions)
        where that costs no device sync and traces: CPU tensors outside torch.compile.
        """
        B, T = self._check_inputs(idx, input_pos, logits_index)
        if targets is not None:
            self._check_targets(idx, targets, logits_index)
        pos = torch.arange(T, device=idx.device) if input_pos is None else input_pos
        if self.config.pos_embedding == "learned":
            pos_emb = self.transformer.wpe(pos)
        else:
            pos_emb = self.pos_table[pos].to(self.transformer.wte.weight.dtype)
        h = self.transformer.drop(self.transformer.wte(idx) + pos_emb)
        delta = None
        for block in self.transformer.h:
            h, delta = block(h, delta, input_pos)
        if logits_index is not None:
            rows = torch.arange(B, device=idx.device)
            h, delta = h[rows, logits_index].unsqueeze(1), delta[rows, logits_index].unsqueeze(1)
        x, _ = self.transformer.ln_f(delta, residual=h)
        logits = self.lm_head(x)
        if targets is None:
            return logits
        return logits, _loss(logits, targets)

    def _check_inputs(self, idx, input_pos, logits_index):
        """Validate idx, input_pos and logits_index (see forward); return B and T."""
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
            raise ValueError(f"idx must be a (batch, time) tensor of token ids, got {_describe(idx)}")
        if idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"idx must hold integer token ids, got {idx.dtype}")
        B, T = idx.shape
        if T < 1 or B < 1:
            raise ValueError(f"idx must not be empty, got shape {tuple(idx.shape)}")
        if _host_checks(idx):
            _check_ids("token id", idx, self.config.vocab_size)
        if logits_index is not None:
            _check_logits_index(logits_index, B, T)
        if input_pos is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence length {T} exceeds the model's context of {self.config.block_size} tokens")
            return B, T
        cache = self.kv_cache
        if cache is None:
            raise RuntimeError("input_pos was given but no KV cache is set up: call model.setup_cache(max_batch, max_seq_len)")
        if B > cache.max_batch:
            raise ValueError(f"batch {B} is larger than the KV cache's max_batch {cache.max_batch}")
        if not isinstance(input_pos, torch.Tensor) or input_pos.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_pos must be an integer tensor, got {_describe(input_pos)}")
        if input_pos.device != idx.device:
            raise ValueError(f"input_pos is on {input_pos.device} but idx is on {idx.device}")
        if input_pos.dim() == 1:
            _check_prefill_positions(input_pos, T, cache.max_seq_len)
        else:
            _check_row_positions(input_pos, idx, cache.max_seq_len)
        return B, T

    def _check_targets(self, idx, targets, logits_index):
        if logits_index is not None:
            raise ValueError("logits_index computes one position per row: it cannot be combined with targets")
        if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"targets must be an integer tensor of token ids, got {_describe(targets)}")
        if targets.shape != idx.shape:
            raise ValueError(f"targets must have idx's shape {tuple(idx.shape)}, got {tuple(targets.shape)}")
        if _host_checks(targets):
            _check_ids("target", targets, self.config.vocab_size, ignore=IGNORE_INDEX)

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
        from gptfast.checkpoints.hf_gpt2 import load_pretrained

        return load_pretrained(cls, path, backend=backend, device=device, dtype=dtype)

    def save_pretrained(self, path) -> None:
        """Write a directory that ``transformers.GPT2LMHeadModel.from_pretrained`` loads."""
        from gptfast.checkpoints.hf_gpt2 import save_pretrained

        save_pretrained(self, path)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"


def _check_ids(what: str, ids, vocab_size: int, ignore=None) -> None:
    """Raise naming the first id outside [0, vocab_size) (``ignore`` allowed), its (row, position)."""
    bad = (ids < 0) | (ids >= vocab_size)
    if ignore is not None:
        bad &= ids != ignore
    if bool(bad.any()):
        row, col = bad.nonzero()[0].tolist()
        allowed = f" (or {ignore})" if ignore is not None else ""
        raise ValueError(f"{what} {int(ids[row, col])} at row {row}, position {col} is outside the vocabulary: "
                         f"ids must be in [0, {vocab_size}){allowed}")


def _check_logits_index(logits_index, B: int, T: int) -> None:
    if not isinstance(logits_index, torch.Tensor) or logits_index.shape != (B,) \
            or logits_index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"logits_index must be a ({B},) integer tensor, got {_describe(logits_index)}")
    if _host_checks(logits_index) and bool(((logits_index < 0) | (logits_index >= T)).any()):
        raise ValueError(f"logits_index {logits_index.tolist()} outside the sequence length {T}")


def _check_prefill_positions(input_pos, T: int, limit: int) -> None:
    """A prefill's positions: T consecutive ones p..p+T-1 inside the cache (values on CPU only)."""
    if input_pos.shape != (T,):
        raise ValueError(f"prefill input_pos must have shape ({T},) to match idx, got {tuple(input_pos.shape)}")
    if T > limit:
        raise ValueError(f"context overflow: a prefill of {T} positions does not fit the KV cache of {limit} positions")
    if not _host_checks(input_pos):
        return
    start = int(input_pos[0])
    if start < 0 or start + T > limit:
        raise ValueError(f"context overflow: positions {start}..{start + T - 1} do not fit the KV cache of {limit} positions")
    if not torch.equal(input_pos, torch.arange(start, start + T, dtype=input_pos.dtype)):
        raise ValueError(f"prefill input_pos must be consecutive positions p, p+1, ..., p+T-1, got {input_pos.tolist()}")


def _check_row_positions(input_pos, idx, limit: int) -> None:
    """Per-row positions of a decode (B, 1) or verify (B, T) step: idx's shape, inside the
    cache, consecutive within a row (values on CPU only: a CUDA step may run inside a
    captured graph; the generation loop bounds positions)."""
    if input_pos.dim() != 2 or input_pos.shape != idx.shape:
        raise ValueError(
            f"decode expects idx and input_pos of one shape (B, T) (T > 1: a verify step); got idx {tuple(idx.shape)}, "
            f"input_pos {tuple(input_pos.shape)}"
        )
    if not _host_checks(input_pos):
        return
    if bool(((input_pos < 0) | (input_pos >= limit)).any()):
        raise ValueError(f"context overflow: decode positions {input_pos.flatten().tolist()} outside the KV cache of "
                         f"{limit} positions")
    if input_pos.shape[1] > 1 and not bool((input_pos[:, 1:] - input_pos[:, :-1] == 1).all()):
        raise ValueError(f"verify input_pos must hold consecutive positions per row, got {input_pos.tolist()}")


def _loss(logits, targets):
    """Mean cross-entropy over the targets that are not IGNORE_INDEX; 0 when there are none
    (the sum over no targets divided by a count clamped to 1: no NaN and no host read)."""
    flat = targets.reshape(-1).long()
    counted = (flat != IGNORE_INDEX).sum()
    if _host_checks(flat) and int(counted) == 0:
        warnings.warn("every target is -100 (ignored): the loss is 0 and so is its gradient", RuntimeWarning,
                      stacklevel=3)
    total = F.cross_entropy(logits.float().view(-1, logits.size(-1)), flat, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / counted.clamp(min=1)
