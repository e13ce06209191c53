"""The CPU's flat model steps for decoding: one loop over operands prepared once.

While ``packed_linears`` holds a GPT's layers packed, a decode step through the model
(``GPT._decode_step``) calls, per layer, eight kernels: layer norm, the QKV product, the
C++ KV-cache write, the C++ decode attention, the output product (residual epilogue),
layer norm, the MLP products (GELU and residual epilogues). Reaching them through the
model's general path, which serves every backend and device (module lookups,
``gptfast.nn.decode_linear``'s dispatch, the public ``decode_attention`` op's check of
every argument, reshapes and views), costs more host time than the kernels at batch 1, and
the gaps between products also slow the weight streams that follow them (BENCHMARKS.md,
"Weight-only int8", measures both).

``decode_step(model, batch, steps=1)`` gathers each block's operands once (norm weights,
the packed layers' kernels, its rows of the KV cache) and returns ``step(tokens, positions,
last=False) -> logits`` that calls the same kernels, in the same order and on the same
operands as ``GPT._decode_step``, with nothing between them but views: the logits are the
same bit for bit (tests/test_cpu_decode.py). A row's T tokens sit at its own consecutive
positions: T = 1 is a decode step, T > 1 a speculative verify or draft step (the C++
decode attention either way: it takes a row's T newest queries, causal among them);
``last`` keeps only each row's last position (a draft step's ``logits_index``). It is the
CPU's counterpart of the replayed CUDA graph (gptfast.generation.cuda_graphs), serving
``generate``'s decode loop and the speculative rounds (gptfast.generation.speculative):
made for one loop, whose inputs the sampler makes (in range by construction), it checks
nothing per step beyond what the C++ ops check; the caches it holds are the model's at the
time it was made.

It returns None, and the caller calls the model instead, unless: every linear layer
of the blocks and the head is packed (``PackedLinear`` / ``PackedInt8Linear``, i.e. inside
``packed_linears``), ``batch * steps`` rows fit their kernel (at most ``CPU_KERNEL_MAX_ROWS``),
``steps`` queries per row fit the attention kernel (at most ``CPU_KERNEL_MAX_QUERIES``, as in
the model's own verify step), the caches are float32 CPU tensors, the extension has the C++
attention and cache write, no gradient is recorded, and the model is not training with dropout.
"""
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from gptfast.generation.cpu_linear import PackedInt8Linear, PackedLinear
from gptfast.model import GPT
from gptfast.ops._validation import resolve_scale
from gptfast.ops.causal_attention import CPU_KERNEL_MAX_QUERIES
from gptfast.ops.int8_linear import CPU_KERNEL_MAX_ROWS
from gptfast.runtime.extension import cpu_op


def _packed(layer) -> bool:
    return isinstance(layer, (PackedLinear, PackedInt8Linear))


def _norm(norm) -> tuple:
    return norm.weight, norm.bias, norm.eps


def decode_step(model, batch: int, steps: int = 1) -> Optional[Callable]:
    """A flat step for ``batch`` rows of ``model`` (a GPT whose layers are packed and whose
    cache a prefill wrote), taking up to ``steps`` tokens per row, or None where it does
    not apply (module docstring)."""
    if not isinstance(model, GPT):
        return None
    blocks, config = model.transformer.h, model.config
    linears = [lin for b in blocks for lin in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]
    linears.append(model.lm_head)
    cache = model.kv_cache
    write, attention = cpu_op("write_kv"), cpu_op("decode_attention")
    if (write is None or attention is None or cache is None or torch.is_grad_enabled()
            or (model.training and config.dropout > 0) or not all(_packed(lin) for lin in linears)
            or batch * steps > CPU_KERNEL_MAX_ROWS or steps > CPU_KERNEL_MAX_QUERIES
            or any(b.attn.kv_cache.rows_prefilled < batch for b in blocks)
            or cache.k.dtype != torch.float32 or not cache.k.is_cpu):
        return None
    write, attention = write.default, attention.default
    heads, head_dim = config.n_head, cache.k.shape[3]
    width = heads * head_dim
    scale = resolve_scale("decode_attention", None, head_dim)
    layers = tuple(
        (_norm(b.ln_1), b.attn.c_attn.bound_kernel(), b.attn.kv_cache.k[:batch], b.attn.kv_cache.v[:batch],
         b.attn.c_proj.bound_kernel(), _norm(b.ln_2), b.mlp.c_fc.bound_kernel(), b.mlp.c_proj.bound_kernel())
        for b in blocks)
    final_norm, head = _norm(model.transformer.ln_f), model.lm_head.bound_kernel()
    wte = model.transformer.wte.weight
    learned = config.pos_embedding == "learned"
    positions_table = model.transformer.wpe.weight if learned else model.pos_table
    shape = (width,)

    def step(tokens: torch.Tensor, positions: torch.Tensor, last: bool = False) -> torch.Tensor:
        """Logits (B, T, V) of ``tokens`` (B, T) at ``positions`` (B, T), each row's T
        consecutive positions (a decode step: T = 1; a verify step: T > 1), written into its
        cache; ``last``: only each row's last position's, (B, 1, V) (a draft step)."""
        t = tokens.shape[1]
        rows = batch * t
        lens = positions[:, -1] + 1  # each row's cache length once its new tokens' keys are written
        pos = positions.reshape(-1)
        pos_emb = F.embedding(pos, positions_table) if learned else positions_table[pos]
        h = F.embedding(tokens.reshape(-1), wte) + pos_emb
        for (w1, b1, eps1), qkv_kernel, k_cache, v_cache, proj, (w2, b2, eps2), fc, fc_proj in layers:
            qkv = qkv_kernel(torch.layer_norm(h, shape, w1, b1, eps1))
            write(qkv.view(batch, t, -1), k_cache, v_cache, positions)
            q = qkv[:, :width].view(batch, t, heads, head_dim).transpose(1, 2)
            y = attention(q, k_cache, v_cache, lens, scale, None)  # (B, H, T, D) over (B, T, H, D) memory
            h = proj(y.transpose(1, 2).reshape(rows, width), h)
            h = fc_proj(fc(torch.layer_norm(h, shape, w2, b2, eps2), None, True), h)
        if last and t > 1:
            h = h.view(batch, t, width)[:, -1]
        w, b, eps = final_norm
        return head(torch.layer_norm(h, shape, w, b, eps)).view(batch, 1 if last else t, -1)

    return step
