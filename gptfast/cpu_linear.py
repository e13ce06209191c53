"""Prepacked CPU weights for decoding: each linear layer's weight packed once for oneDNN.

A decode step on a CPU multiplies a few activation rows (the batch) by every weight
matrix of the model, so it is bound by how fast the weights stream through the cores.
``F.linear`` hands MKL a row-major (out, in) weight, which it streams well below memory
bandwidth: on the 2-core VM of BENCHMARKS.md, the 51 MB LM head of a 256-wide GPT-2
(vocabulary × width) took 7.6 ms for one row and 17 ms for eight, where summing the same
bytes took 2.2 ms. The same product on the weight packed once into oneDNN's blocked
layout (as ``torch.compile``'s CPU freezing does) took about 3.5 ms and 5 ms.
BENCHMARKS.md ("Sampling loop (CPU)") measures generation with and without it.

``packed_linears(model)`` is the context ``gptfast.generate`` enters on CPU float32
models: inside it, every ``gptfast.model.Linear`` of ``model`` computes through its
packed weight when called without autograd on a float32 CPU input (anything else takes
``F.linear`` as usual). Packs are cached per layer across calls and rebuilt when the
weight changes (an in-place update bumps its version; a new tensor has a new address);
``release(model)`` frees them. The packed product rounds differently from ``F.linear``
(another summation order): logits agree to float32 rounding, not bit for bit.

The ops used (``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``) are
PyTorch internals: they are probed once, and where they are missing or disagree with
``F.linear`` nothing is packed. ``GPTFAST_CPU_PACKED_LINEAR=0`` turns packing off.
"""
import contextlib
import functools
import os
import threading
import weakref

import torch
import torch.nn.functional as F

ENV_VAR = "GPTFAST_CPU_PACKED_LINEAR"
# oneDNN picks its blocked layout for an expected number of rows; 64 serves decode
# (1-8 rows) and prefill alike on the CPUs measured.
ROWS_HINT = 64

_packs = weakref.WeakKeyDictionary()  # Linear -> (weight key, packed weight)
_lock = threading.Lock()


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ROWS_HINT)


def _packed_matmul(x: torch.Tensor, packed: torch.Tensor, bias) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether this PyTorch build packs linear weights for oneDNN and gets F.linear's answer."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        gen = torch.Generator().manual_seed(0)
        weight, bias = torch.randn(40, 24, generator=gen), torch.randn(40, generator=gen)
        x = torch.randn(3, 5, 24, generator=gen)
        out = _packed_matmul(x, _pack(weight), bias)
        return bool(torch.allclose(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5))
    except Exception:  # an op missing or refusing these shapes: no packing on this build
        return False


def enabled() -> bool:
    """Packing is on unless $GPTFAST_CPU_PACKED_LINEAR is 0 (read on every call)."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def applies_to(model) -> bool:
    """True when ``packed_linears(model)`` would pack: float32 weights on the CPU, packing
    enabled and available."""
    weight = next(model.parameters())  # a GPT's embedding (an int8 LM head has no float weight)
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and enabled() and available()


class PackedLinear:
    """A Linear layer's forward through its packed weight (set as ``Linear.prepacked``)."""

    def __init__(self, module, packed):
        self.module, self.packed = module, packed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != torch.float32:
            return F.linear(x, m.weight, m.bias)
        return _packed_matmul(x, self.packed, m.bias)


def _weight_key(weight: torch.Tensor):
    return weight.data_ptr(), weight._version, tuple(weight.shape)


def _packed_for(module) -> torch.Tensor:
    key = _weight_key(module.weight)
    with _lock:
        hit = _packs.get(module)
        if hit is not None and hit[0] == key:
            return hit[1]
    packed = _pack(module.weight)
    with _lock:
        _packs[module] = (key, packed)
    return packed


@contextlib.contextmanager
def packed_linears(model):
    """Within this context every ``gptfast.model.Linear`` of ``model`` runs on its packed
    weight (when ``applies_to(model)``; otherwise this does nothing)."""
    from gptfast.model import Linear

    installed = []
    if applies_to(model):
        for module in model.modules():
            if isinstance(module, Linear) and module.prepacked is None:
                module.prepacked = PackedLinear(module, _packed_for(module))
                installed.append(module)
    try:
        yield bool(installed)
    finally:
        for module in installed:
            module.prepacked = None


def release(model) -> None:
    """Free the packed copies of ``model``'s weights."""
    with _lock:
        for module in model.modules():
            _packs.pop(module, None)
