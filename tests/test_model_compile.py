"""Prefill and decode steps compile whole (``torch.compile(fullgraph=True)``) and equal eager.

A graph break anywhere in a step (a host read of a position, a data-dependent check)
makes ``fullgraph=True`` raise. The torch backend runs on the CPU; the fused backend where
it runs Triton (CUDA, or the CPU under the interpreter; its ops are opaque to dynamo).
``aot_eager`` traces through dynamo and AOTAutograd (functionalising the cache writes)
without inductor's C++ build.
"""
import copy

import pytest
import torch

from gptfast import GPT, GPTConfig
from gptfast.ops._dispatch import use_triton

CONFIG = GPTConfig(vocab_size=67, block_size=40, n_layer=2, n_head=2, n_embd=32)
FUSED_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = [
    pytest.param("torch", torch.device("cpu"), id="torch-cpu"),
    pytest.param("fused", FUSED_DEVICE, id=f"fused-{FUSED_DEVICE.type}", marks=pytest.mark.skipif(
        not use_triton(torch.empty(0, device=FUSED_DEVICE)), reason="needs CUDA or TRITON_INTERPRET=1")),
]


def _setup(backend, device, length):
    """A fresh dynamo cache, two identical models (eager, to compile) and (2, length) ids."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = GPT(CONFIG, backend=backend).to(device).eval()
    return eager, copy.deepcopy(eager), torch.randint(0, 67, (2, length)).to(device)


def _compile(fn):
    return torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=False)


def _run(model, prefill, decode, idx, prompt_len, device):
    """A prefill of ``prompt_len`` tokens (logits at each row's chosen position), then one
    decode step per remaining token; returns every step's logits."""
    B, T = idx.shape
    model.setup_cache(B, 32)
    last = torch.tensor([prompt_len - 1, prompt_len - 3], device=device)
    outs = [prefill(idx[:, :prompt_len], torch.arange(prompt_len, device=device), last)]
    for t in range(prompt_len, T):
        outs.append(decode(idx[:, t:t + 1], torch.full((B, 1), t, device=device)))
    return outs


@pytest.mark.parametrize("backend,device", CASES)
@torch.no_grad()
def test_compiled_prefill_and_decode_equal_eager(backend, device):
    eager, twin, idx = _setup(backend, device, 12)

    def prefill_of(model):
        return lambda ids, pos, last: model(ids, input_pos=pos, logits_index=last)

    def decode_of(model):
        return lambda ids, pos: model(ids, input_pos=pos)

    want = _run(eager, prefill_of(eager), decode_of(eager), idx, 7, device)
    got = _run(twin, _compile(prefill_of(twin)), _compile(decode_of(twin)), idx, 7, device)
    assert len(got) == len(want) == 6
    for step, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=f"step {step}")
    # The compiled steps wrote the same cache as the eager ones.
    torch.testing.assert_close(twin.kv_cache.k, eager.kv_cache.k, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", CASES)
@torch.no_grad()
def test_compiled_chunked_prefill_equals_eager(backend, device):
    """A prefill that starts past 0 (its start is a tensor value the graph never reads on the host)."""
    eager, twin, idx = _setup(backend, device, 14)
    compiled = _compile(lambda ids, pos: twin(ids, input_pos=pos))
    for model, step in ((eager, lambda ids, pos: eager(ids, input_pos=pos)), (twin, compiled)):
        model.setup_cache(2, 32)
        step(idx[:, :7], torch.arange(7, device=device))
    want = eager(idx[:, 7:], input_pos=torch.arange(7, 14, device=device))
    got = compiled(idx[:, 7:], torch.arange(7, 14, device=device))  # same shapes: the same graph, start 7
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, eager(idx)[:, 7:], rtol=1e-5, atol=1e-5)
