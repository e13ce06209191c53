"""Prepacked CPU weights for decoding: each linear layer's weight packed once into the
blocked layout of gptfast's C++ kernels (csrc/cpu_linear.cpp), fp32 or int8.

A decode step on a CPU multiplies a few activation rows (the batch) by every weight
matrix of the model, so it is bound by how fast the weights stream through the cores.
``F.linear`` hands MKL a row-major (out, in) weight, which it streams well below memory
bandwidth beyond one row; oneDNN's blocked layout streams it better but not at the
memory's speed. The C++ kernels read a weight packed into blocks of 64 output channels,
one sequential region per thread, prefetched ahead, with every activation row of a tile
multiplied into each line as it passes (BENCHMARKS.md, "Sampling loop (CPU)", measures them).

``packed_linears(model, enabled=None)`` is the context ``gptfast.generate`` enters on CPU
float32 models: inside it, every ``nn.Linear`` submodule of ``model`` is swapped for a
``PackedLinear`` holding it, which computes through its packed fp32 weight
(``torch.ops.gptfast_cpu.fp32_pack`` / ``fp32_linear_packed``) when called without
autograd on a float32 CPU input of at most ``CPU_KERNEL_MAX_ROWS`` rows (anything else
takes ``F.linear`` as usual), and every weight-only int8 layer (``gptfast.nn.Int8Linear``
with float32 scales) for a ``PackedInt8Linear``: its (N, K) int8 weight reordered once
(``torch.ops.gptfast_cpu.int8_pack``), called straight through ``int8_linear_packed`` (no
per-call packing, validation or custom-op dispatch) for float32 CPU inputs of up to
``CPU_KERNEL_MAX_ROWS`` rows; longer inputs and other dtypes take the layer's own forward
(``gptfast.ops.int8_linear``). On exit the original modules are put back. The model knows
nothing of this, and a checkpoint keeps its public (N, K) layout: the packed copy lives
only here. Packs are cached per layer across calls and rebuilt when the weight changes
(an in-place update bumps its version; a new tensor has a new address; int8 packs are the
op's own cache, ``gptfast.ops.int8_linear.cpu_packed_weight``); ``release(model)`` frees
them. The packed products sum in another order than ``F.linear``: logits agree to float32
rounding, not bit for bit.

A decode step is a few rows through every layer, so what surrounds the matmuls counts
too. Both packed layers have a ``decode(x, norm, activation, residual)`` method, which
``gptfast.nn.decode_linear`` calls: the layer norm (``F.layer_norm``), then the kernel
with the GELU and the residual add as its epilogue (applied to each block of outputs while
it is in L1: no extra pass, no extra op). While the layers are packed, a ``GPT``'s
``fused_decode`` is set, so its decode and verify steps take ``GPT._decode_step`` instead
of the modules' many small ops: per layer, layer norm + QKV + cache write (``decode_kv``,
the write being the C++ ``write_kv`` of csrc/cpu_attention.cpp), attention through
``gptfast.ops.decode_attention`` (its C++ kernel on the CPU), the output projection +
residual, layer norm + MLP up-projection + GELU, down-projection + residual.
``gptfast.generate``'s decode loop calls the same kernels (the layers' ``kernel``) from
the flat step of ``gptfast.generation.cpu_decode`` instead.

Both kinds come with the gptfast extension; without it nothing is packed.

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

from gptfast.ops import torch_path

ENV_VAR = "GPTFAST_CPU_PACKED_LINEAR"

_packs = weakref.WeakKeyDictionary()  # nn.Linear -> (weight key, packed weight)
_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def fp32_ops():
    """``(fp32_pack, fp32_linear_packed)`` of the loaded gptfast extension, or None (no
    extension, or one built before the fp32 kernel)."""
    from gptfast.runtime.extension import cpu_op  # loads the extension

    pack, matmul = cpu_op("fp32_pack"), cpu_op("fp32_linear_packed")
    return None if pack is None or matmul is None else (pack.default, matmul.default)


def available() -> bool:
    """Whether fp32 layers can be packed here (the gptfast extension is loaded)."""
    return fp32_ops() is not None


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


def _decode(layer, x: torch.Tensor, norm=None, activation=None, residual=None) -> torch.Tensor:
    """``act(layer(norm(x))) + residual``: a decode step's linear layer with its neighbours
    (``gptfast.nn.decode_linear`` calls it for the packed layers). ``norm``: a layer norm
    module (weight, bias, eps) or None; ``activation``: None or ``"gelu"`` (GPT-2's tanh
    approximation); ``residual``: like the output, added last. Where the layer's kernel
    serves x, the GELU and the residual are its epilogue; elsewhere they are torch ops."""
    if activation not in (None, "gelu"):
        raise ValueError(f"decode: activation must be None or 'gelu', got {activation!r}")
    if norm is not None:
        x = F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps)
    gelu = activation == "gelu"
    rows = x.numel() // layer._k
    if layer._serves(x, rows) and (residual is None or (residual.dtype == torch.float32 and residual.is_cpu)):
        residual2 = None if residual is None else residual.reshape(rows, layer._n).contiguous()
        y = layer.kernel(x.reshape(rows, layer._k).contiguous(), residual2, gelu)
        return y.view(*x.shape[:-1], layer._n)
    y = layer(x)
    if gelu:
        y = F.gelu(y, approximate="tanh")
    return y if residual is None else y + residual


@functools.lru_cache(maxsize=None)
def _write_kv_op():
    """``torch.ops.gptfast_cpu.write_kv`` of the loaded extension (csrc/cpu_attention.cpp), or None."""
    from gptfast.runtime.extension import cpu_op

    op = cpu_op("write_kv")
    return None if op is None else op.default


def _decode_kv(layer, x: torch.Tensor, norm, k_cache: torch.Tensor, v_cache: torch.Tensor,
               positions: torch.Tensor) -> torch.Tensor:
    """The QKV projection of a decode / verify step (``gptfast.nn.decode_linear_kv`` calls it
    for the packed layers): ``layer(norm(x))``, its k and v columns written into the caches
    at ``positions`` (B, T) (the C++ write for float32 CPU caches, else
    ``torch_path.write_kv``, the same semantics); returns q (B, T, Q)."""
    qkv = _decode(layer, x, norm)
    write = _write_kv_op()
    if write is None or k_cache.dtype != torch.float32 or not k_cache.is_cpu or qkv.dtype != torch.float32:
        return torch_path.write_kv(qkv, k_cache, v_cache, positions)
    write(qkv, k_cache, v_cache, positions)
    return qkv[..., :qkv.shape[-1] - 2 * k_cache.shape[1] * k_cache.shape[3]]


class PackedLinear(nn.Module):
    """An ``nn.Linear`` (held as ``linear``, its parameters unchanged) whose forward runs
    the C++ kernel on its packed weight when that applies: a float32 CPU input of at most
    ``CPU_KERNEL_MAX_ROWS`` rows, outside autograd."""

    def __init__(self, linear: nn.Linear, packed: torch.Tensor, matmul):
        from gptfast.ops.int8_linear import CPU_KERNEL_MAX_ROWS

        super().__init__()
        self.linear, self.packed, self._matmul = linear, packed, getattr(matmul, "default", matmul)
        self._k, self._n, self._max_rows = linear.in_features, linear.out_features, CPU_KERNEL_MAX_ROWS

    @property
    def weight(self):
        return self.linear.weight

    @property
    def bias(self):
        return self.linear.bias

    def _serves(self, x: torch.Tensor, rows: int) -> bool:
        """Whether the kernel computes this call: few float32 CPU rows, no autograd."""
        return not (torch.is_grad_enabled() or rows > self._max_rows or x.dtype != torch.float32 or not x.is_cpu
                    or self.linear.weight.dtype != torch.float32)

    def kernel(self, x2: torch.Tensor, residual2=None, gelu: bool = False) -> torch.Tensor:
        """``gelu(x2 @ W^T + b) + residual2`` on the packed weight, for what ``_serves``:
        x2 (M, K) float32 contiguous; residual2 (M, N) float32 contiguous or None."""
        return self._matmul(x2, self.packed, self._n, self.linear.bias, -1, residual2, gelu)

    def bound_kernel(self):
        """``kernel`` with its operands looked up now, not per call (a flat decode step's,
        gptfast.generation.cpu_decode, made for one generate call)."""
        matmul, packed, n, bias = self._matmul, self.packed, self._n, self.linear.bias
        return lambda x2, residual2=None, gelu=False: matmul(x2, packed, n, bias, -1, residual2, gelu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Kept lean: it runs for every layer of every decode step.
        rows = x.numel() // self._k
        if not self._serves(x, rows):
            m = self.linear
            return F.linear(x, m.weight, m.bias)
        return self.kernel(x.reshape(rows, self._k).contiguous()).view(*x.shape[:-1], self._n)

    decode, decode_kv = _decode, _decode_kv


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

    def _serves(self, x: torch.Tensor, rows: int) -> bool:
        """Whether the kernel computes this call: few float32 CPU rows that need no gradient."""
        return not (rows > self._max_rows or x.dtype != torch.float32 or not x.is_cpu
                    or (x.requires_grad and torch.is_grad_enabled()))

    def kernel(self, x2: torch.Tensor, residual2=None, gelu: bool = False) -> torch.Tensor:
        """``gelu(x2 @ (scale * W)^T + b) + residual2`` on the packed int8 weight (see
        ``PackedLinear.kernel``)."""
        buffers = self.linear._buffers
        return self._matmul(x2, self.packed, buffers["scale"], buffers["bias"], -1, residual2, gelu)

    def bound_kernel(self):
        """``kernel`` with its operands looked up now (see ``PackedLinear.bound_kernel``)."""
        matmul, packed, scale, bias = self._matmul, self.packed, self.linear.scale, self.linear.bias
        return lambda x2, residual2=None, gelu=False: matmul(x2, packed, scale, bias, -1, residual2, gelu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Kept lean: it runs for every layer of every decode step.
        rows = x.numel() // self._k
        if not self._serves(x, rows):
            return self.linear(x)  # the op: validation, the inference-only error, the torch path
        return self.kernel(x.reshape(rows, self._k).contiguous()).view(*x.shape[:-1], self._n)

    decode, decode_kv = _decode, _decode_kv


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
    if module.in_features == 0:  # nothing to stream (and no rows to count by in_features)
        return None
    if type(module) is nn.Linear:
        ops = fp32_ops()
        if ops is None or module.weight.dtype != torch.float32 or module.weight.device.type != "cpu":
            return None
        pack, matmul = ops
        return PackedLinear(module, _packed_for(module, module.weight, lambda w: pack(w.detach())), matmul)
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
    fused_decode = getattr(model, "fused_decode", None)  # a GPT: its steps take the fused decode path
    if swapped and fused_decode is not None:
        model.fused_decode = True
    try:
        yield bool(swapped)
    finally:
        for parent, name, linear in swapped:
            setattr(parent, name, linear)
        if swapped and fused_decode is not None:
            model.fused_decode = fused_decode


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
