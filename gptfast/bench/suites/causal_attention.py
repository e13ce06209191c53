"""Causal attention benchmark (issue 4): forward, backward and forward+backward TFLOP/s.

GPU grid: T in {512, 1k, 2k, 4k, 8k, 16k} and head size D in {64, 128}, with B*T = 16k
tokens and H*D = 2048 (so every point does the same work per token), bf16.
FLOPs: the forward's two matmuls are ``4*B*H*T^2*D`` dense, halved for the causal mask;
the backward has five matmuls to the forward's two, i.e. 2.5x the forward; fwd+bwd 3.5x.

Providers: gptfast (the fused Triton op), torch (SDPA, default backend choice),
torch-flash (SDPA forced to its flash backend, where this build has it), reference
(the twin: it materialises T x T, so only up to T = 4k), torch.compile (FlexAttention
with a causal block mask: compiling is slow, so it runs last) and flash_attn if
installed (its (B, T, H, D) layout is produced when the inputs are made, untimed).
"""
from functools import partial
from typing import List, Tuple

import torch
import torch.nn.functional as F

from gptfast.bench.results import PEAK_MATMUL, Skipped
from gptfast.runtime.devices import dtype_name
from gptfast.bench.runner import CORE, EXTRA, SLOW, Case, SkipCase
from gptfast.bench.suites.common import (MODES, input_set_count, is_gpu, require_fused,
                                         require_gpu, require_module, timed_callable)

SEQ_LENS = (512, 1024, 2048, 4096, 8192, 16384)
QUICK_SEQ_LENS = (1024, 4096, 16384)
HEAD_DIMS = (64, 128)
TOKENS, MODEL_WIDTH = 16384, 2048
REFERENCE_MAX_T = 4096
CPU_SEQ_LENS, CPU_HEADS, CPU_HEAD_DIM = (64, 256), 4, 64

MATMUL_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
PROVIDERS = ("gptfast", "torch", "torch-flash", "reference", "flash_attn", "torch.compile")
PRIORITY = {"gptfast": CORE, "torch": CORE, "torch-flash": EXTRA, "reference": EXTRA, "flash_attn": EXTRA,
            "torch.compile": SLOW}


def causal_flops(batch: int, heads: int, seq_len: int, head_dim: int, mode: str = "fwd") -> float:
    """Matmul FLOPs of causal attention: half of the dense ``4*B*H*T^2*D`` per forward."""
    return MATMUL_FACTOR[mode] * 4 * batch * heads * seq_len * seq_len * head_dim / 2


def _gptfast(q, k, v):
    import gptfast.ops

    return gptfast.ops.causal_attention(q, k, v)


def _torch(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _torch_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _reference(q, k, v):
    from gptfast import reference

    return reference.causal_attention(q, k, v)


def _flash_attn(q, k, v):  # inputs already (B, T, H, D)
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v, causal=True)


def _flex(seq_len, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    torch._dynamo.reset()  # one compile per shape; keep clear of dynamo's recompile limit
    mask = create_block_mask(causal, None, None, seq_len, seq_len, device=device)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, block_mask=mask)


def _forward(provider, seq_len, device):
    if provider == "gptfast":
        require_fused(device)
        return _gptfast
    if provider == "torch":
        return _torch
    if provider == "torch-flash":
        require_gpu(device)
        return _torch_flash
    if provider == "reference":
        if is_gpu(device) and seq_len > REFERENCE_MAX_T:
            raise SkipCase(f"the reference materialises T x T scores; run only up to T={REFERENCE_MAX_T}")
        return _reference
    if provider == "flash_attn":
        require_gpu(device)
        require_module("flash_attn")
        return _flash_attn
    if provider == "torch.compile":
        require_gpu(device, "GPU only: FlexAttention compiles Triton kernels for CUDA")
        return _flex(seq_len, device)
    raise ValueError(f"unknown attention provider {provider!r}")


def _build(provider, mode, batch, heads, seq_len, head_dim, dtype, device):
    forward = _forward(provider, seq_len, device)
    layout = (batch, seq_len, heads, head_dim) if provider == "flash_attn" else (batch, heads, seq_len, head_dim)

    def make_inputs():
        return [torch.randn(layout, device=device, dtype=dtype) for _ in range(3)]

    if provider == "torch-flash":  # fail here, untimed, when this build or GPU has no flash backend
        with torch.no_grad():
            forward(*make_inputs())
    n_sets = input_set_count(3 * batch * heads * seq_len * head_dim * dtype.itemsize, device, cap=4)
    return timed_callable(mode, forward, make_inputs, n_sets, grad_indices=(0, 1, 2))


# Grouped-query, left-padded rows (GPU only): 32 query heads on 8 kv heads, D=128,
# B*T = 16k tokens, each row left-padded by a random key_start of up to T/4. FLOPs are
# counted as for the unpadded shape (an upper bound on the work done).
GQA_HEADS, GQA_KV_HEADS, GQA_HEAD_DIM, GQA_SEQ_LENS = 32, 8, 128, (1024, 4096)


def _padded_gptfast(q, k, v, key_start):
    import gptfast.ops

    return gptfast.ops.causal_attention(q, k, v, key_start=key_start)


def _padded_torch(q, k, v, key_start):  # SDPA with the causal-and-padding mask
    pos = torch.arange(q.shape[2], device=q.device)
    visible = (pos[None, :] <= pos[:, None])[None] & (pos[None, None, :] >= key_start[:, None, None])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None], enable_gqa=True)


def _build_padded(provider, mode, batch, seq_len, device):
    if provider == "gptfast":
        require_fused(device)
    forward = _padded_gptfast if provider == "gptfast" else _padded_torch
    gen = torch.Generator().manual_seed(0)

    def make_inputs():
        def randn(heads):
            return torch.randn(batch, heads, seq_len, GQA_HEAD_DIM, device=device, dtype=torch.bfloat16)
        return [randn(GQA_HEADS), randn(GQA_KV_HEADS), randn(GQA_KV_HEADS),
                torch.randint(0, seq_len // 4, (batch,), generator=gen).to(device)]

    n_sets = input_set_count(3 * batch * GQA_HEADS * seq_len * GQA_HEAD_DIM * 2, device, cap=4)
    return timed_callable(mode, forward, make_inputs, n_sets, grad_indices=(0, 1, 2))


def padded_gqa_cases(device):
    """The grouped-query, left-padded rows: cases on a GPU, skipped rows on a CPU."""
    out, skipped = [], []
    for mode in ("fwd", "fwd+bwd"):
        for seq_len in GQA_SEQ_LENS:
            batch = TOKENS // seq_len
            shape = f"B={batch},H={GQA_HEADS},H_kv={GQA_KV_HEADS},T={seq_len},D={GQA_HEAD_DIM},key_start"
            for provider in ("gptfast", "torch"):
                if not is_gpu(device):
                    skipped.append(Skipped("causal_attention", provider, mode, shape, "GPU only: bf16 at Llama scale"))
                    continue
                out.append(Case(
                    op="causal_attention", provider=provider, mode=mode, shape=shape, dtype="bfloat16",
                    build=partial(_build_padded, provider, mode, batch, seq_len, device),
                    group=f"causal_attention {mode} gqa {GQA_HEADS}/{GQA_KV_HEADS} padded D={GQA_HEAD_DIM} bfloat16",
                    size=seq_len, size_name="T", flops=causal_flops(batch, GQA_HEADS, seq_len, GQA_HEAD_DIM, mode),
                    peak=PEAK_MATMUL, priority=PRIORITY[provider], cuda_graph=True,
                ))
    return out, skipped


def cases(device, quick: bool = False) -> Tuple[List[Case], List[Skipped]]:
    if is_gpu(device):
        dtype = torch.bfloat16
        shapes = [(TOKENS // t, MODEL_WIDTH // d, t, d) for d in HEAD_DIMS for t in (QUICK_SEQ_LENS if quick else SEQ_LENS)]
        providers = ("gptfast", "torch", "torch-flash", "reference", "flash_attn") if quick else PROVIDERS
    else:
        dtype = torch.float32
        shapes = [(1, CPU_HEADS, t, CPU_HEAD_DIM) for t in (CPU_SEQ_LENS[:1] if quick else CPU_SEQ_LENS)]
        providers = ("gptfast", "torch", "reference")
    out = []
    for mode in MODES:
        for batch, heads, seq_len, head_dim in shapes:
            for provider in providers:
                out.append(Case(
                    op="causal_attention", provider=provider, mode=mode,
                    shape=f"B={batch},H={heads},T={seq_len},D={head_dim}", dtype=dtype_name(dtype),
                    build=partial(_build, provider, mode, batch, heads, seq_len, head_dim, dtype, device),
                    group=f"causal_attention {mode} D={head_dim} {dtype_name(dtype)}", size=seq_len, size_name="T",
                    flops=causal_flops(batch, heads, seq_len, head_dim, mode), peak=PEAK_MATMUL,
                    priority=PRIORITY[provider], warmup=5 if provider == "torch.compile" else 3,
                    cuda_graph=True,
                ))
    padded, skipped = padded_gqa_cases(device)
    return out + padded, skipped
