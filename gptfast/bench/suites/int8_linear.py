"""Weight-only int8 linear benchmark (issue 14): GB/s of weights read at decode shapes.

The weight matrices of GPT-2 124M, (out, in) = (2304, 768) c_attn, (768, 768) attention
c_proj, (3072, 768) c_fc, (768, 3072) MLP c_proj and (50257, 768) the LM head, times 1,
16 and 64 activation rows. Bytes counted: the weights read (1 byte per element for
int8, the dtype's size for floating weights); activations and outputs are left out,
below 3% at these shapes. The fraction of peak is against the measured copy bandwidth.

GPU: gptfast's Triton kernel (bf16 activations) against bf16 ``F.linear``. CPU (float32
activations): the C++ kernel (``gptfast.ops.int8_linear`` without the interpreter), the
op's torch path (dequantise + ``F.linear``), torch's own ``aten._weight_int8pack_mm``
and fp32 ``F.linear``.
"""
from functools import partial
from typing import List, Tuple

import torch
import torch.nn.functional as F

from gptfast.bench.results import PEAK_COPY, Skipped
from gptfast.runtime.devices import dtype_name
from gptfast.bench.runner import CORE, EXTRA, Case, SkipCase
from gptfast.bench.suites.common import input_set_count, is_gpu, require_fused

WEIGHTS = {"c_attn": (2304, 768), "attn.c_proj": (768, 768), "c_fc": (3072, 768), "mlp.c_proj": (768, 3072),
           "lm_head": (50257, 768)}
ROWS, QUICK_ROWS = (1, 16, 64), (1,)
QUICK_WEIGHTS = ("c_fc", "lm_head")
GPU_PROVIDERS = ("gptfast", "torch")
CPU_PROVIDERS = ("gptfast", "torch-path", "aten-int8pack", "torch")
PRIORITY = {"gptfast": CORE, "torch": CORE, "torch-path": EXTRA, "aten-int8pack": EXTRA}


def _int8_inputs(rows, n, k, dtype, device):
    from gptfast.ops.int8_linear import quantize_weight

    weight_int8, scale = quantize_weight(torch.randn(n, k, device=device) * 0.02)
    return torch.randn(rows, k, device=device, dtype=dtype), weight_int8, scale


def _provider(name, device):
    """(forward, make_inputs(rows, n, k, dtype)) of a provider; raises SkipCase where it cannot run."""
    from gptfast.ops import int8_linear as op_module  # noqa: F401  (registers the op)
    from gptfast.ops.int8_linear import cpu_kernel, int8_linear
    from gptfast.ops.torch_path import int8_linear as _int8_linear_torch

    if name == "gptfast":
        if is_gpu(device):
            require_fused(device)
        elif cpu_kernel() is None:
            raise SkipCase("the gptfast C++ extension is not loaded")
        return (lambda x, w, s: int8_linear(x, w, s)), partial(_int8_inputs, device=device)
    if name == "torch-path":
        return (lambda x, w, s: _int8_linear_torch(x, w, s, None)), partial(_int8_inputs, device=device)
    if name == "aten-int8pack":
        return (lambda x, w, s: torch.ops.aten._weight_int8pack_mm(x, w, s)), partial(_int8_inputs, device=device)
    if name == "torch":
        def floating(rows, n, k, dtype):
            return torch.randn(rows, k, device=device, dtype=dtype), torch.randn(n, k, device=device, dtype=dtype)
        return (lambda x, w: F.linear(x, w)), floating
    raise ValueError(f"unknown int8_linear provider {name!r}")


def _build(provider, rows, n, k, dtype, device):
    forward, make = _provider(provider, device)
    weight_bytes = n * k * (dtype.itemsize if provider == "torch" else 1)
    sets = [make(rows, n, k, dtype) for _ in range(input_set_count(weight_bytes, device, cap=8))]

    def run(inputs):
        with torch.no_grad():
            return forward(*inputs)
    return run, sets


def cases(device, quick: bool = False) -> Tuple[List[Case], List[Skipped]]:
    gpu = is_gpu(device)
    dtype = torch.bfloat16 if gpu else torch.float32
    providers = GPU_PROVIDERS if gpu else CPU_PROVIDERS
    weights = QUICK_WEIGHTS if quick else tuple(WEIGHTS)
    out = []
    for rows in (QUICK_ROWS if quick else ROWS):
        for name in weights:
            n, k = WEIGHTS[name]
            for provider in providers:
                itemsize = dtype.itemsize if provider == "torch" else 1
                out.append(Case(
                    op="int8_linear", provider=provider, mode="fwd", shape=f"{rows}x{k}->{n} ({name})",
                    dtype=dtype_name(dtype) if provider == "torch" else f"int8/{dtype_name(dtype)}",
                    build=partial(_build, provider, rows, n, k, dtype, device),
                    group=f"int8_linear {rows} rows {dtype_name(dtype)}", size=n * k, size_name="weights",
                    bytes=n * k * itemsize, peak=PEAK_COPY, priority=PRIORITY[provider],
                    cuda_graph=gpu,
                ))
    return out, []
