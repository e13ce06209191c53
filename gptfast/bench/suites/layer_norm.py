"""Layernorm benchmark (issue 3): GB/s and fraction of measured copy bandwidth.

GPU grid: 16384 rows x hidden {768, 1024, 1600, 4096, 8192}, bf16, forward, backward and
forward+backward, against ``F.layer_norm``, the reference twin, ``torch.compile`` of the
twin (inductor's fused kernel) and ``liger_kernel`` if installed. Bytes counted: the
forward reads x and writes y, the backward reads x and dy and writes dx; weights and
per-row statistics are left out (they are < 1% at these sizes).
"""
from functools import partial
from typing import List, Tuple

import torch
import torch.nn.functional as F

from gptfast.bench.results import PEAK_COPY, Skipped
from gptfast.runtime.devices import dtype_name
from gptfast.bench.runner import CORE, EXTRA, SLOW, Case
from gptfast.bench.suites.common import (MODES, input_set_count, is_gpu, require_fused,
                                         require_module, timed_callable)

ROWS = 16384
HIDDENS = (768, 1024, 1600, 4096, 8192)
QUICK_HIDDENS = (768, 1600, 4096)
CPU_ROWS, CPU_HIDDENS = 1024, (768, 1600)
EPS = 1e-5

# Elements of x-sized traffic per mode (see the module docstring).
TRAFFIC = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}


def _gptfast(x, w, b):
    import gptfast.ops

    return gptfast.ops.layer_norm(x, w, b, EPS)


def _torch(x, w, b):
    return F.layer_norm(x, x.shape[-1:], w, b, EPS)


def _reference(x, w, b):
    from gptfast import reference

    return reference.layer_norm(x, w, b, EPS)


def _compiled_reference():
    # A fresh dynamo state per case: one compile per shape and mode would otherwise
    # exceed dynamo's recompile limit and silently fall back to eager.
    torch._dynamo.reset()
    return torch.compile(_reference, dynamic=False)


def _liger(x, w, b):
    from liger_kernel.ops.layer_norm import LigerLayerNormFunction

    return LigerLayerNormFunction.apply(x, w, b, EPS)


def _provider(name, device):
    """The forward function of a provider; raises SkipCase where it cannot run."""
    if name == "gptfast":
        require_fused(device)
        return _gptfast
    if name == "torch":
        return _torch
    if name == "reference":
        return _reference
    if name == "torch.compile":
        return _compiled_reference()
    if name == "liger_kernel":
        require_module("liger_kernel")
        return _liger
    raise ValueError(f"unknown layernorm provider {name!r}")


PROVIDERS = ("gptfast", "torch", "reference", "torch.compile", "liger_kernel")
PRIORITY = {"gptfast": CORE, "torch": CORE, "reference": EXTRA, "torch.compile": SLOW, "liger_kernel": EXTRA}


def _build(provider, mode, rows, hidden, dtype, device):
    forward = _provider(provider, device)

    def make_inputs():
        x = torch.randn(rows, hidden, device=device, dtype=dtype)
        w = 1.0 + 0.1 * torch.randn(hidden, device=device, dtype=dtype)
        b = 0.1 * torch.randn(hidden, device=device, dtype=dtype)
        return x, w, b

    n_sets = input_set_count(TRAFFIC[mode] * rows * hidden * dtype.itemsize, device, cap=8)
    return timed_callable(mode, forward, make_inputs, n_sets, grad_indices=(0, 1, 2))


def cases(device, quick: bool = False) -> Tuple[List[Case], List[Skipped]]:
    if is_gpu(device):
        rows, hiddens, dtype, providers = ROWS, (QUICK_HIDDENS if quick else HIDDENS), torch.bfloat16, PROVIDERS
        if quick:
            providers = ("gptfast", "torch", "reference")
    else:  # wall clock on small shapes; torch.compile's CPU codegen is not what this suite is about
        rows, hiddens, dtype, providers = CPU_ROWS, CPU_HIDDENS, torch.float32, ("gptfast", "torch", "reference")
        if quick:
            rows, hiddens = 256, CPU_HIDDENS[:1]
    out = []
    for mode in MODES:
        for hidden in hiddens:
            for provider in providers:
                out.append(Case(
                    op="layer_norm", provider=provider, mode=mode, shape=f"{rows}x{hidden}", dtype=dtype_name(dtype),
                    build=partial(_build, provider, mode, rows, hidden, dtype, device),
                    group=f"layer_norm {mode} {rows} rows {dtype_name(dtype)}", size=hidden, size_name="hidden",
                    bytes=TRAFFIC[mode] * rows * hidden * dtype.itemsize, peak=PEAK_COPY,
                    priority=PRIORITY[provider], warmup=5 if provider == "torch.compile" else 3,
                    cuda_graph=True,
                ))
    return out, []
