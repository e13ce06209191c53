"""Prepacked CPU weights for decoding: each linear layer's weight packed once for oneDNN.

A decode step on a CPU multiplies a few activation rows (the batch) by every weight
matrix of the model, so it is bound by how fast the weights stream through the cores.
``F.linear`` hands MKL a row-major (out, in) weight, which it streams well below memory
bandwidth: on the 2-core VM of BENCHMARKS.md, the 51 MB LM head of a 256-wide GPT-2
(vocabulary × width) took 7.6 ms for one row and 17 ms for eight, where summing the same
bytes took 2.2 ms. The same product on the weight packed once into oneDNN's blocked
layout (as ``torch.compile``'s CPU freezing does) took about 3.5 ms and 5 ms.
BENCHMARKS.md ("Sampling loop (CPU)") measures generation with and without it.

``packed_linears(model, enabled=None)`` is the context ``gptfast.generate`` enters on CPU
float32 models: inside it, every ``nn.Linear`` submodule of ``model`` is swapped for a
``PackedLinear`` holding it, which computes through the packed weight when called
without autograd on a float32 CPU input (anything else takes ``F.linear`` as usual); on
exit the original modules are put back. The model knows nothing of this. Packs are
cached per layer across calls and rebuilt when the weight changes (an in-place update
bumps its version; a new tensor has a new address); ``release(model)`` frees them. The
packed product rounds differently from ``F.linear`` (another summation order): logits
agree to float32 rounding, not bit for bit.

The ops used (``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``) are
PyTorch internals: they are probed once, and where they are missing or disagree with
``F.linear`` nothing is packed.

Switching it: the ``enabled`` argument (True / False). Left at None it takes the
user-facing default, read from the environment once per call where it is resolved
(``default_enabled``): packing is on unless ``GPTFAST_CPU_PACKED_LINEAR`` is 0 / false /
no / off.
"""
import contextlib
import functools
import os
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn

ENV_VAR = "GPTFAST_CPU_PACKED_LINEAR"
# oneDNN picks its blocked layout for an expected number of rows; 64 serves decode
# (1-8 rows) and prefill alike on the CPUs measured.
ROWS_HINT = 64

_packs = weakref.WeakKeyDictionary()  # nn.Linear -> (weight key, packed weight)
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


def default_enabled() -> bool:
    """The default of ``enabled``: on unless $GPTFAST_CPU_PACKED_LINEAR is 0 / false / no / off."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def applies_to(model, enabled=None) -> bool:
    """True when ``packed_linears(model, enabled)`` would pack: float32 weights on the CPU,
    packing enabled (None: ``default_enabled()``) and available."""
    if enabled is None:
        enabled = default_enabled()
    weight = next(model.parameters())  # a GPT's embedding (an int8 LM head has no float weight)
    return bool(enabled) and weight.device.type == "cpu" and weight.dtype == torch.float32 and available()


class PackedLinear(nn.Module):
    """An ``nn.Linear`` (held as ``linear``, its parameters unchanged) whose forward runs
    through the packed weight when that applies: no autograd, a float32 CPU input."""

    def __init__(self, linear: nn.Linear, packed: torch.Tensor):
        super().__init__()
        self.linear, self.packed = linear, packed

    @property
    def weight(self):
        return self.linear.weight

    @property
    def bias(self):
        return self.linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.linear
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


def _linear_children(model):
    """(parent, attribute name, nn.Linear) for every nn.Linear submodule of ``model``."""
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if type(child) is nn.Linear]


@contextlib.contextmanager
def packed_linears(model, enabled=None):
    """Within this context every ``nn.Linear`` submodule of ``model`` is a ``PackedLinear``
    running on its packed weight (when ``applies_to(model, enabled)``; otherwise this does
    nothing); the original modules are put back on exit, also on an error. Yields whether
    anything was packed."""
    swapped = []
    if applies_to(model, enabled):
        for parent, name, linear in _linear_children(model):
            setattr(parent, name, PackedLinear(linear, _packed_for(linear)))
            swapped.append((parent, name, linear))
    try:
        yield bool(swapped)
    finally:
        for parent, name, linear in swapped:
            setattr(parent, name, linear)


def release(model) -> None:
    """Free the packed copies of ``model``'s weights."""
    with _lock:
        for module in model.modules():
            _packs.pop(module, None)
