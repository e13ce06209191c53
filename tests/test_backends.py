"""Backends are modules with the same four functions; the model holds one backend; the
torch path exists once and is NaN-safe on stale KV-cache slots."""
import importlib

import pytest
import torch

import gptfast.ops
import gptfast.reference
from gptfast import GPT, GPTConfig
from gptfast.backends import BACKENDS, backend_module
from gptfast.ops import registry, torch_path
from gptfast.ops._dispatch import use_triton

FUNCTIONS = ("layer_norm", "causal_attention", "decode_attention", "gelu")
CONFIG = GPTConfig(vocab_size=53, block_size=32, n_layer=2, n_head=2, n_embd=32)
TRITON_HERE = use_triton(torch.empty(0))
ALL = [pytest.param(b, marks=pytest.mark.skipif(b == "fused" and not TRITON_HERE, reason="needs TRITON_INTERPRET=1"))
       for b in BACKENDS]


def test_each_backend_is_a_module_with_the_four_functions():
    assert backend_module("reference") is gptfast.reference
    assert backend_module("torch") is torch_path
    assert backend_module("fused") is gptfast.ops
    for name in BACKENDS:
        module = backend_module(name)
        assert all(callable(getattr(module, f)) for f in FUNCTIONS), name


def test_registry_torch_entries_are_the_torch_path():
    for op in registry.OPS:
        assert op.resolve("torch") is getattr(torch_path, op.name)


@pytest.mark.parametrize("op,args", [
    ("layer_norm", lambda: (torch.randn(3, 8, dtype=torch.float64), None, None, 1e-5)),
    ("causal_attention", lambda: tuple(torch.randn(1, 2, 5, 8) for _ in range(3))),
    ("decode_attention", lambda: (torch.randn(2, 2, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8),
                                  torch.tensor([3, 6]))),
])
def test_the_fused_ops_fall_back_to_the_one_torch_path(monkeypatch, op, args):
    """Where Triton does not run (float64; the CPU without the interpreter) each op calls
    gptfast.ops.torch_path: one torch path per op."""
    calls = []
    real = getattr(torch_path, op)
    monkeypatch.setattr(torch_path, op, lambda *a, **k: calls.append(op) or real(*a, **k))
    if op != "layer_norm":  # float64 takes the torch path for layernorm; attention needs Triton off
        monkeypatch.setattr(importlib.import_module(f"gptfast.ops.{op}"), "use_triton", lambda t: False)
    if op == "decode_attention":  # and its C++ CPU kernel off (no extension): the fall-back is under test
        monkeypatch.setattr(importlib.import_module("gptfast.ops.decode_attention"), "_cpu_kernel", [None])
    out = getattr(gptfast.ops, op)(*args())
    assert calls == [op] and torch.isfinite(out).all()


def test_one_backend_object_per_model_and_set_backend_switches_it_live():
    model = GPT(CONFIG, backend="torch")
    holders = {id(m._backend) for m in model.modules() if hasattr(m, "_backend")}
    assert len(holders) == 1  # every layer reads the model's one backend
    assert not any(hasattr(m, "ops") for m in model.modules())  # no per-module placeholders
    model.set_backend("reference")
    assert model.backend == "reference"
    assert model.transformer.h[1].attn._backend.ops is gptfast.reference
    assert model.transformer.ln_f._backend.ops is gptfast.reference


def test_the_model_pickles_with_its_backend(tmp_path):
    model = GPT(CONFIG, backend="reference").eval()
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    idx = torch.randint(0, 53, (1, 6))
    assert loaded.backend == "reference" and loaded.transformer.h[0].mlp._backend is loaded._backend
    torch.testing.assert_close(loaded(idx), model(idx))


def test_torch_decode_ignores_nan_in_stale_cache_slots():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 16), torch.randn(3, 2, 10, 16), torch.randn(3, 2, 10, 16)
    lens = torch.tensor([1, 4, 10])
    want = gptfast.reference.decode_attention(q, k, v, lens)
    stale = torch.arange(10)[None, :] >= lens[:, None]  # (B, S)
    k_nan = k.masked_fill(stale[:, None, :, None], float("nan"))
    v_nan = v.masked_fill(stale[:, None, :, None], float("nan"))
    for name in BACKENDS if TRITON_HERE else ("reference", "torch"):
        got = backend_module(name).decode_attention(q, k_nan, v_nan, lens)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", ALL)
@torch.no_grad()
def test_model_ignores_nan_in_stale_cache_slots(backend):
    """An uninitialised (NaN) cache: prefill and decode read only what they wrote."""
    torch.manual_seed(0)
    model = GPT(CONFIG, backend=backend).eval()
    idx = torch.randint(0, 53, (2, 12))
    full = model(idx)
    model.setup_cache(2, 24)
    for block in model.transformer.h:
        block.attn.kv_cache.k.fill_(float("nan"))
        block.attn.kv_cache.v.fill_(float("nan"))
    prefill = model(idx[:, :8], input_pos=torch.arange(8))
    torch.testing.assert_close(prefill, full[:, :8], rtol=1e-4, atol=1e-4)
    for t in range(8, 12):
        step = model(idx[:, t:t + 1], input_pos=torch.full((2, 1), t))
        torch.testing.assert_close(step[:, 0], full[:, t], rtol=1e-4, atol=1e-4, msg=f"position {t}")
