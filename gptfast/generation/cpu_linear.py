"""Prepacked CPU weights for decoding: each linear layer's weight packed once, fp32 for
oneDNN, int8 for gptfast's C++ kernel.

A decode step on a CPU multiplies a few activation rows (the batch) by every weight
matrix of the model, so it is bound by how fast the weights stream through the cores.
``F.linear`` hands MKL a row-major (out, in) weight, which it streams well below memory
bandwidth; the same product on the weight packed once into oneDNN's blocked layout (as
``torch.compile``'s CPU freezing does) streams it much closer to it. BENCHMARKS.md
("Sampling loop (CPU)") measures generation with and without it.

``packed_linears(model, enabled=None)`` is the context ``gptfast.generate`` enters on CPU
float32 models: inside it, every ``nn.Linear`` submodule of ``model`` is swapped for a
``PackedLinear`` holding it, which computes through the packed weight when called
without autograd on a float32 CPU input (anything else takes ``F.linear`` as usual), and
every weight-only int8 layer (``gptfast.nn.Int8Linear`` with float32 scales)
for a ``PackedInt8Linear``: its (N, K) int8 weight reordered once into the C++ kernel's
blocked layout (``torch.ops.gptfast_cpu.int8_pack``, csrc/int8_linear.cpp: blocks of 64
output channels, one cache line per k, so each thread streams one sequential region),
called straight through ``int8_linear_packed`` (no per-call packing, validation or
custom-op dispatch) for float32 CPU inputs of up to ``CPU_KERNEL_MAX_ROWS`` rows; longer
inputs and other dtypes take the layer's own forward (``gptfast.ops.int8_linear``). On
exit the original modules are put back. The model knows nothing of this, and a quantized
checkpoint keeps its public (N, K) layout: the packed copy lives only here. Packs are
cached per layer across calls and rebuilt when the weight changes (an in-place update
bumps its version; a new tensor has a new address; int8 packs are the op's own cache,
``gptfast.ops.int8_linear.cpu_packed_weight``); ``release(model)`` frees them. The
packed products round differently from ``F.linear`` and from the int8 op's torch path
(another summation order): logits agree to float32 rounding, not bit for bit.

The fp32 ops (``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``) are
PyTorch internals: they are probed once, and where they are missing or disagree with
``F.linear`` no fp32 layer is packed. The int8 ops come with the gptfast extension; without
it no int8 layer is packed.

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


def int8_ops():
    """``(pack, int8_linear_packed)`` when the gptfast extension is loaded, else None:
    ``pack(weight_int8)`` is the op's cached blocked copy (``cpu_packed_weight``), shared
    with the layer's own calls so a weight is packed once."""
    from gptfast.ops.int8_linear import cpu_kernel, cpu_packed_weight  # loads the extension (once)

    if cpu_kernel() is None:
        return None
    try:
        return cpu_packed_weight, torch.ops.gptfast_cpu.int8_linear_packed
    except (AttributeError, RuntimeError):  # an extension built before the packed kernel
        return None


def applies_to(model, enabled=None) -> bool:
    """True when ``packed_linears(model, enabled)`` may pack: float32 weights on the CPU,
    packing enabled (None: ``default_enabled()``) and the fp32 or the int8 packing available."""
    if enabled is None:
        enabled = default_enabled()
    # A GPT's embedding (an int8 LM head has no float weight); a module of int8 layers
    # alone has no parameters: its first floating buffer (a scale) stands in.
    weight = next(model.parameters(), None)
    if weight is None:
        weight = next((b for b in model.buffers() if b.is_floating_point()), None)
    if weight is None or not (enabled and weight.device.type == "cpu" and weight.dtype == torch.float32):
        return False
    return available() or (any(_is_int8(m) for m in model.modules()) and int8_ops() is not None)


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


class PackedInt8Linear(nn.Module):
    """A ``gptfast.nn.Int8Linear`` (held as ``linear``, its buffers unchanged)
    whose forward runs the C++ kernel on its packed weight when that applies: a float32
    CPU input of at most ``CPU_KERNEL_MAX_ROWS`` rows, outside autograd. Anything else
    takes the layer's own forward."""

    def __init__(self, linear: nn.Module, packed: torch.Tensor, matmul):
        from gptfast.ops.int8_linear import CPU_KERNEL_MAX_ROWS

        super().__init__()
        self.linear, self.packed, self._matmul = linear, packed, getattr(matmul, "default", matmul)
        self._k, self._n, self._max_rows = linear.in_features, linear.out_features, CPU_KERNEL_MAX_ROWS

    @property
    def weight_int8(self):
        return self.linear.weight_int8

    @property
    def scale(self):
        return self.linear.scale

    @property
    def bias(self):
        return self.linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Kept lean: it runs for every layer of every decode step.
        rows = x.numel() // self._k
        if (rows > self._max_rows or x.dtype != torch.float32 or not x.is_cpu
                or (x.requires_grad and torch.is_grad_enabled())):
            return self.linear(x)  # the op: validation, the inference-only error, the torch path
        buffers = self.linear._buffers
        y = self._matmul(x.reshape(rows, self._k).contiguous(), self.packed, buffers["scale"], buffers["bias"])
        return y.view(*x.shape[:-1], self._n)


def _is_int8(module) -> bool:
    from gptfast.nn import Int8Linear

    return type(module) is Int8Linear


def _int8_packable(module) -> bool:
    """An Int8Linear the C++ kernel serves: CPU buffers, float32 scale and bias."""
    return (_is_int8(module) and module.weight_int8.device.type == "cpu" and module.scale.dtype == torch.float32
            and (module.bias is None or module.bias.dtype == torch.float32))


def _weight_key(weight: torch.Tensor):
    return weight.data_ptr(), weight._version, tuple(weight.shape)


def _packed_for(module, weight: torch.Tensor, pack) -> torch.Tensor:
    """``pack(weight)``, cached per module (fp32 layers; int8 packs are cached by the op)."""
    key = _weight_key(weight)
    with _lock:
        hit = _packs.get(module)
        if hit is not None and hit[0] == key:
            return hit[1]
    packed = pack(weight)
    with _lock:
        _packs[module] = (key, packed)
    return packed


def _wrapped(module):
    """The packed stand-in for ``module``, or None when it is not packed here."""
    if type(module) is nn.Linear:
        return PackedLinear(module, _packed_for(module, module.weight, _pack)) if available() else None
    if _int8_packable(module):
        ops = int8_ops()
        if ops is not None:
            pack, matmul = ops
            return PackedInt8Linear(module, pack(module.weight_int8), matmul)
    return None


def _linear_children(model):
    """(parent, attribute name, layer) for every nn.Linear and Int8Linear submodule of ``model``."""
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if type(child) is nn.Linear or _is_int8(child)]


@contextlib.contextmanager
def packed_linears(model, enabled=None):
    """Within this context every ``nn.Linear`` submodule of ``model`` is a ``PackedLinear``
    and every float32-scaled ``Int8Linear`` a ``PackedInt8Linear``, running on its packed
    weight (when ``applies_to(model, enabled)`` and that kind of packing is available;
    otherwise the layer stays); the original modules are put back on exit, also on an
    error. Yields whether anything was packed."""
    swapped = []
    if applies_to(model, enabled):
        for parent, name, linear in _linear_children(model):
            wrapped = _wrapped(linear)
            if wrapped is not None:
                setattr(parent, name, wrapped)
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
    int8 = [m for m in model.modules() if _is_int8(m)]
    if int8:
        from gptfast.ops.int8_linear import drop_cpu_packed_weight

        for module in int8:
            drop_cpu_packed_weight(module.weight_int8)
