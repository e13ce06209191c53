"""``int8_linear``: a linear layer whose weight is stored as int8 with per-channel scales.

    y = int8_linear(x, weight_int8, scale, bias=None)
      = x @ (weight_int8 * scale[:, None])^T + bias

x (..., K) fp16/bf16/fp32, any strides; weight_int8 (N, K) int8; scale (N,) in float32
or x's dtype (symmetric per-output-channel scales, as ``quantize_weight`` makes them);
bias (N,) in x's dtype, or None. Returns (..., N) in x's dtype. Weight-only: x is not
quantised, products accumulate in fp32.

Where it runs:

- the Triton kernel (``gptfast.kernels.int8_linear``) on CUDA, or on CPU tensors under
  the Triton interpreter (TRITON_INTERPRET=1);
- on other CPU float32 inputs, the C++ kernel of the gptfast extension
  (``torch.ops.gptfast_cpu.int8_linear_packed``, csrc/cpu_linear.cpp: AVX-512 / AVX2 /
  scalar, chosen at run time) for up to ``CPU_KERNEL_MAX_ROWS`` rows, when the
  extension is loaded; longer prompts are compute-bound and go to the torch path. The
  kernel reads the weight in a blocked layout (``cpu_packed_weight``): made on a weight's
  first call, kept while that tensor lives (a weak reference) and remade when it changes
  in place; generation calls the packed kernel directly (``gptfast.generation.cpu_linear``);
- otherwise the torch path: dequantise to x's dtype, then ``F.linear``.

The op is registered as ``torch.ops.gptfast.int8_linear`` with a fake implementation,
so ``torch.compile(fullgraph=True)`` sees one op and CUDA graphs can capture it. Eager
calls that need no gradient run its implementation (``_linear``) directly, skipping the
registered op's dispatch cost.
Inference-only: calling ``backward`` through it raises a RuntimeError.
"""
import threading
from typing import Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

from gptfast.ops import torch_path
from gptfast.ops._dispatch import register_inference_only, use_triton

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
QMAX = 127  # symmetric int8: -127..127 (-128 is never produced)
# The C++ kernel serves decode batches up to this many rows; longer inputs (prefill) are
# compute-bound and go to dequantise + F.linear. The crossover has not been measured yet.
CPU_KERNEL_MAX_ROWS = 64

_cpu_kernel = []  # [op or None] once looked up
_cpu_packs = WeakIdKeyDictionary()  # weight_int8 tensor (by identity) -> (its version, its blocked copy)
_cpu_packs_lock = threading.Lock()


def _fail(arg, message, error=ValueError):
    raise error(f"int8_linear: {arg} {message}")


def _validate(x, weight, scale, bias) -> None:
    """Types, shapes, dtypes and devices (static facts only, so torch.compile traces them)."""
    for arg, t in (("x", x), ("weight_int8", weight), ("scale", scale)):
        if not isinstance(t, torch.Tensor):
            _fail(arg, f"must be a torch.Tensor, got {type(t).__name__}", TypeError)
    if bias is not None and not isinstance(bias, torch.Tensor):
        _fail("bias", f"must be a torch.Tensor or None, got {type(bias).__name__}", TypeError)
    if x.dtype not in SUPPORTED_DTYPES:
        _fail("x", f"has dtype {x.dtype}; supported: float16, bfloat16, float32", TypeError)
    if weight.dtype != torch.int8:
        _fail("weight_int8", f"must be int8, got {weight.dtype} (quantize it with quantize_weight)", TypeError)
    if weight.dim() != 2:
        _fail("weight_int8", f"must have shape (N, K), got {tuple(weight.shape)}")
    n, k = weight.shape
    if x.dim() < 1 or x.shape[-1] != k:
        _fail("x", f"of shape {tuple(x.shape)} does not end in the weight's K = {k} (weight_int8 {tuple(weight.shape)})")
    if scale.dtype not in (torch.float32, x.dtype):
        _fail("scale", f"has dtype {scale.dtype}; it must be float32 or x's dtype {x.dtype}", TypeError)
    if tuple(scale.shape) != (n,):
        _fail("scale", f"must have shape ({n},) (one per output channel), got {tuple(scale.shape)}")
    if bias is not None:
        if bias.dtype != x.dtype:
            _fail("bias", f"has dtype {bias.dtype} but x has {x.dtype}", TypeError)
        if tuple(bias.shape) != (n,):
            _fail("bias", f"must have shape ({n},), got {tuple(bias.shape)}")
    for arg, t in (("weight_int8", weight), ("scale", scale), ("bias", bias)):
        if t is not None and t.device != x.device:
            _fail(arg, f"is on {t.device} but x is on {x.device}")


def quantize_weight(weight: torch.Tensor, scale_dtype: torch.dtype = torch.float32):
    """Symmetric per-output-channel int8 of a (N, K) weight: ``(weight_int8, scale)``.

    ``scale[n] = max|weight[n]| / 127`` (1 for an all-zero row), stored in
    ``scale_dtype``; ``weight_int8 = round(weight / scale)`` with the stored (rounded)
    scale, so dequantising gives the nearest int8 multiple of the scale actually used.
    """
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() != 2:
        raise ValueError(f"quantize_weight: weight must be a 2-D floating tensor, got "
                         f"{getattr(weight, 'dtype', type(weight).__name__)} {tuple(getattr(weight, 'shape', ()))}")
    if scale_dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"quantize_weight: scale_dtype {scale_dtype} is not one of float16, bfloat16, float32")
    w = weight.detach().to(torch.float32)
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax)).to(scale_dtype)
    q = torch.round(w / scale.to(torch.float32)[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def cpu_kernel():
    """``torch.ops.gptfast_cpu.int8_linear`` of the loaded gptfast extension, or None
    (no extension, or one built before csrc/cpu_linear.cpp). Looked up once."""
    if not _cpu_kernel:
        from gptfast.runtime.extension import cpu_op  # builds or loads gptfast._C (and registers the op)

        _cpu_kernel.append(cpu_op("int8_linear"))
    return _cpu_kernel[0]


def cpu_packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """The C++ kernel's blocked copy of ``weight`` ((N, K) int8 on the CPU;
    ``torch.ops.gptfast_cpu.int8_pack``): made once per weight tensor and kept while that
    tensor lives, remade when it changes in place (its version)."""
    with _cpu_packs_lock:
        hit = _cpu_packs.get(weight)
    if hit is not None and hit[0] == weight._version:
        return hit[1]
    packed = torch.ops.gptfast_cpu.int8_pack(weight)
    with _cpu_packs_lock:
        _cpu_packs[weight] = (weight._version, packed)
    return packed


def drop_cpu_packed_weight(weight: torch.Tensor) -> None:
    """Free ``weight``'s blocked copy now (it goes anyway when the weight does)."""
    with _cpu_packs_lock:
        _cpu_packs.pop(weight, None)


def _cpu_int8_linear(x2, weight, scale, bias):
    return torch.ops.gptfast_cpu.int8_linear_packed(x2.contiguous(), cpu_packed_weight(weight), scale.contiguous(),
                                                    None if bias is None else bias.contiguous())


def _use_cpu_kernel(x2) -> bool:
    return (x2.device.type == "cpu" and x2.dtype == torch.float32 and x2.shape[0] <= CPU_KERNEL_MAX_ROWS
            and cpu_kernel() is not None)


_kernel_module = []


def _kernels():
    # Imported on first use so that the CPU paths never import triton.
    if not _kernel_module:
        from gptfast.kernels import int8_linear as kernels

        _kernel_module.append(kernels)
    return _kernel_module[0]


def _linear(x2, weight, scale, bias):
    """The op's implementation (registered op and eager path alike)."""
    if use_triton(x2):
        return _kernels().int8_linear(x2, weight, scale.contiguous(), None if bias is None else bias.contiguous())
    if _use_cpu_kernel(x2):
        return _cpu_int8_linear(x2, weight, scale, bias)
    return torch_path.int8_linear(x2, weight, scale, bias)


@torch.library.custom_op("gptfast::int8_linear", mutates_args=())
def _int8_linear_op(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                    bias: Optional[torch.Tensor]) -> torch.Tensor:
    return _linear(x2, weight, scale, bias)


@_int8_linear_op.register_fake
def _(x2, weight, scale, bias):
    return x2.new_empty((x2.shape[0], weight.shape[0]))


register_inference_only(
    _int8_linear_op,
    "int8_linear is inference-only and has no backward; train the floating-point model "
    "and quantize it afterwards (gptfast.quantize)",
)


def int8_linear(x, weight_int8, scale, bias=None):
    """``x @ (weight_int8 * scale[:, None])^T + bias``; see the module docstring.

    x (..., K) fp16/bf16/fp32; weight_int8 (N, K) int8; scale (N,) float32 or x's dtype;
    bias (N,) in x's dtype or None. Returns (..., N) in x's dtype. Inference-only.
    """
    _validate(x, weight_int8, scale, bias)
    n, k = weight_int8.shape
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (
            x.requires_grad or scale.requires_grad or (bias is not None and bias.requires_grad))):
        # compiled: one opaque node; gradients asked for: the op's backward raises its clear error
        y = _int8_linear_op(x2, weight_int8, scale, bias)
    else:
        y = _linear(x2, weight_int8, scale, bias)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], n)
