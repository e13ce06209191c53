"""Decode attention benchmark (issue 4): GB/s of KV cache read, one new query per row.

GPU grid: batch {1, 16} x cache length {1k, 8k, 32k}, GPT-2's heads (H=12, D=64), bf16,
every row's cache full (``cache_lens = L``), so that SDPA over the whole cache is the same
computation. Bytes counted: K and V (``2*B*H*L*D`` elements) plus q and the output.

A decode step is a few microseconds at small caches, so calls are timed by replaying a
CUDA graph of many calls (launch overhead removed, as in graph-captured generation);
the graph rotates over enough input sets to exceed the L2 cache.
"""
from functools import partial
from typing import List, Tuple

import torch
import torch.nn.functional as F

from gptfast.bench.results import PEAK_COPY, Skipped
from gptfast.runtime.devices import dtype_name
from gptfast.bench.runner import CORE, EXTRA, Case
from gptfast.bench.suites.common import (input_set_count, is_gpu, require_fused, require_gpu,
                                         require_module)

BATCHES = (1, 16)
CACHE_LENS = (1024, 8192, 32768)
HEADS, HEAD_DIM = 12, 64
CPU_BATCHES, CPU_CACHE_LENS, CPU_HEADS = (1, 4), (256, 1024), 4

PROVIDERS = ("gptfast", "torch", "reference", "flash_attn")
PRIORITY = {"gptfast": CORE, "torch": CORE, "reference": EXTRA, "flash_attn": EXTRA}


def kv_bytes(batch, heads, cache_len, head_dim, itemsize) -> float:
    return (2 * batch * heads * cache_len * head_dim + 2 * batch * heads * head_dim) * itemsize


def _gptfast(q, k, v, lens):
    import gptfast.ops

    return gptfast.ops.decode_attention(q, k, v, lens)


def _torch(q, k, v, lens):  # every row's cache is full: plain SDPA over all of it
    return F.scaled_dot_product_attention(q.unsqueeze(2), k, v).squeeze(2)


def _reference(q, k, v, lens):
    from gptfast import reference

    return reference.decode_attention(q, k, v, lens)


def _flash_attn(q, k, v, lens):  # q (B, 1, H, D), caches (B, L, H, D), lens int32
    from flash_attn import flash_attn_with_kvcache

    return flash_attn_with_kvcache(q, k, v, cache_seqlens=lens)


def _forward(provider, device):
    if provider == "gptfast":
        require_fused(device)
        return _gptfast
    if provider == "torch":
        return _torch
    if provider == "reference":
        return _reference
    if provider == "flash_attn":
        require_gpu(device)
        require_module("flash_attn")
        return _flash_attn
    raise ValueError(f"unknown decode provider {provider!r}")


def _build(provider, batch, heads, cache_len, head_dim, dtype, device):
    forward = _forward(provider, device)
    bhld = provider != "flash_attn"

    def make_inputs():
        q_shape = (batch, heads, head_dim) if bhld else (batch, 1, heads, head_dim)
        cache_shape = (batch, heads, cache_len, head_dim) if bhld else (batch, cache_len, heads, head_dim)
        q = torch.randn(q_shape, device=device, dtype=dtype)
        k = torch.randn(cache_shape, device=device, dtype=dtype)
        v = torch.randn(cache_shape, device=device, dtype=dtype)
        lens = torch.full((batch,), cache_len, device=device, dtype=torch.int32)
        return q, k, v, lens

    n_sets = input_set_count(kv_bytes(batch, heads, cache_len, head_dim, dtype.itemsize), device)
    sets = [make_inputs() for _ in range(n_sets)]

    def run(inputs):
        with torch.no_grad():
            return forward(*inputs)

    return run, sets


# Grouped-query, left-padded rows (GPU only): Llama-3-8B's heads (32 query heads on 8 kv
# heads, D=128), batch 16, each row's cache starting at its own key_start (a random left
# padding of up to half the cache). Bytes counted: the K/V actually read (positions from
# key_start on) plus q and the output. The 32k rows are issue 22's grouped-query target.
GQA_HEADS, GQA_KV_HEADS, GQA_HEAD_DIM, GQA_BATCH, GQA_CACHE_LENS = 32, 8, 128, 16, (1024, 8192, 32768)


def _padded_gptfast(q, k, v, lens, key_start):
    import gptfast.ops

    return gptfast.ops.decode_attention(q, k, v, lens, key_start=key_start)


def _padded_torch(q, k, v, lens, key_start):  # SDPA over the whole cache, padding masked
    visible = torch.arange(k.shape[2], device=k.device)[None, :] >= key_start[:, None]
    return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=visible[:, None, None, :],
                                          enable_gqa=True).squeeze(2)


def _build_padded(provider, cache_len, device):
    if provider == "gptfast":
        require_fused(device)
    forward = _padded_gptfast if provider == "gptfast" else _padded_torch
    dtype, gen = torch.bfloat16, torch.Generator().manual_seed(0)

    def make_inputs():
        q = torch.randn(GQA_BATCH, GQA_HEADS, GQA_HEAD_DIM, device=device, dtype=dtype)
        k = torch.randn(GQA_BATCH, GQA_KV_HEADS, cache_len, GQA_HEAD_DIM, device=device, dtype=dtype)
        v = torch.randn_like(k)
        lens = torch.full((GQA_BATCH,), cache_len, device=device, dtype=torch.int32)
        key_start = torch.randint(0, cache_len // 2, (GQA_BATCH,), generator=gen).to(device)
        return q, k, v, lens, key_start

    n_sets = input_set_count(kv_bytes(GQA_BATCH, GQA_KV_HEADS, cache_len, GQA_HEAD_DIM, 2), device)
    sets = [make_inputs() for _ in range(n_sets)]

    def run(inputs):
        with torch.no_grad():
            return forward(*inputs)
    return run, sets


def padded_gqa_cases(device):
    """The grouped-query, left-padded rows: cases on a GPU, skipped rows on a CPU."""
    out, skipped = [], []
    for cache_len in GQA_CACHE_LENS:
        shape = f"B={GQA_BATCH},H={GQA_HEADS},H_kv={GQA_KV_HEADS},L={cache_len},D={GQA_HEAD_DIM},key_start"
        for provider in ("gptfast", "torch"):
            if not is_gpu(device):
                skipped.append(Skipped("decode_attention", provider, "fwd", shape, "GPU only: bf16 at Llama scale"))
                continue
            out.append(Case(
                op="decode_attention", provider=provider, mode="fwd", shape=shape, dtype="bfloat16",
                build=partial(_build_padded, provider, cache_len, device),
                group=f"decode_attention gqa {GQA_HEADS}/{GQA_KV_HEADS} padded D={GQA_HEAD_DIM} bfloat16",
                size=cache_len, size_name="cache length",
                bytes=kv_bytes(GQA_BATCH, GQA_KV_HEADS, 3 * cache_len // 4, GQA_HEAD_DIM, 2), peak=PEAK_COPY,
                priority=PRIORITY[provider], cuda_graph=True,
            ))
    return out, skipped


def cases(device, quick: bool = False) -> Tuple[List[Case], List[Skipped]]:
    if is_gpu(device):
        dtype, batches, cache_lens, heads = torch.bfloat16, BATCHES, CACHE_LENS, HEADS
        providers = PROVIDERS
    else:
        dtype, batches, cache_lens, heads = torch.float32, CPU_BATCHES, CPU_CACHE_LENS, CPU_HEADS
        if quick:
            batches, cache_lens = batches[:1], cache_lens[:1]
        providers = ("gptfast", "torch", "reference")
    out = []
    for batch in batches:
        for cache_len in cache_lens:
            for provider in providers:
                out.append(Case(
                    op="decode_attention", provider=provider, mode="fwd",
                    shape=f"B={batch},H={heads},L={cache_len},D={HEAD_DIM}", dtype=dtype_name(dtype),
                    build=partial(_build, provider, batch, heads, cache_len, HEAD_DIM, dtype, device),
                    group=f"decode_attention batch={batch} H={heads} D={HEAD_DIM} {dtype_name(dtype)}",
                    size=cache_len, size_name="cache length",
                    bytes=kv_bytes(batch, heads, cache_len, HEAD_DIM, dtype.itemsize), peak=PEAK_COPY,
                    priority=PRIORITY[provider], cuda_graph=True,
                ))
    padded, skipped = padded_gqa_cases(device)
    return out + padded, skipped
