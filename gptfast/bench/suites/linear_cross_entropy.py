"""Linear + cross-entropy benchmark (issue 23): the LM head and loss of a GPT-2 training step.

GPU: 8 x 1024 rows (GPT-2 124M's batch), hidden 768, vocabulary 50,257, bf16, forward
(loss only) and forward+backward (loss, d hidden, d weight), against the unfused
``F.cross_entropy(F.linear(h, W).float())`` (the torch path: the model's loss today),
``torch.compile`` of it and ``liger_kernel``'s fused linear cross-entropy if installed.
FLOPs counted: 2·N·V·C for the logits, twice that again for the two gradient matmuls
(fwd+bwd); the softmax is left out; fractions are of the measured matmul peak.

CPU (wall clock, float32, small shapes): the op (its chunked loop with the row step in
PyTorch) against the torch path. Peak memory, not time, is what the op is for on the CPU:
``benchmarks/bench_linear_cross_entropy.py`` measures it.
"""
from functools import partial
from typing import List, Tuple

import torch

from gptfast.bench.results import PEAK_MATMUL, Skipped
from gptfast.runtime.devices import dtype_name
from gptfast.bench.runner import CORE, EXTRA, SLOW, Case, SkipCase
from gptfast.bench.suites.common import is_gpu, require_fused, require_module, timed_callable

GPU_SHAPE = (8192, 50257, 768)  # rows, vocab, hidden
CPU_SHAPE, CPU_QUICK_SHAPE = (1024, 50257, 768), (256, 8192, 256)
MODES = ("fwd", "fwd+bwd")  # the op computes its gradients in the forward: a separate bwd is a scaling


def _gptfast(h, w, t):
    from gptfast.ops import linear_cross_entropy

    return linear_cross_entropy(h, w, t)


def _torch(h, w, t):
    from gptfast.ops import torch_path

    return torch_path.linear_cross_entropy(h, w, t)


def _compiled_torch():
    torch._dynamo.reset()  # a fresh dynamo state per case (see the layernorm suite)
    return torch.compile(_torch, dynamic=False)


def _liger(h, w, t):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(h, w, t, ignore_index=-100)


def _provider(name, device):
    if name == "gptfast":
        from gptfast.ops._dispatch import interpreting

        if is_gpu(device):
            require_fused(device)
        elif interpreting():
            raise SkipCase("TRITON_INTERPRET=1 is set: the interpreter's timings mean nothing")
        return _gptfast
    if name == "torch":
        return _torch
    if name == "torch.compile":
        if not is_gpu(device):
            raise SkipCase("GPU only: torch.compile's CPU codegen is not what this suite is about")
        return _compiled_torch()
    if name == "liger_kernel":
        if not is_gpu(device):
            raise SkipCase("GPU only: liger_kernel runs Triton on CUDA")
        require_module("liger_kernel")
        return _liger
    raise ValueError(f"unknown linear_cross_entropy provider {name!r}")


PROVIDERS = ("gptfast", "torch", "torch.compile", "liger_kernel")
PRIORITY = {"gptfast": CORE, "torch": CORE, "torch.compile": SLOW, "liger_kernel": EXTRA}


def _build(provider, mode, rows, vocab, hidden, dtype, device):
    forward = _provider(provider, device)

    def make_inputs():
        targets = torch.randint(0, vocab, (rows,), device=device)
        return (torch.randn(rows, hidden, device=device, dtype=dtype),
                0.02 * torch.randn(vocab, hidden, device=device, dtype=dtype), targets)

    # Inputs are small next to the logits; two sets are enough to leave no logits in L2.
    return timed_callable(mode, forward, make_inputs, 2, grad_indices=(0, 1))


def cases(device, quick: bool = False) -> Tuple[List[Case], List[Skipped]]:
    gpu = is_gpu(device)
    rows, vocab, hidden = GPU_SHAPE if gpu else (CPU_QUICK_SHAPE if quick else CPU_SHAPE)
    dtype = torch.bfloat16 if gpu else torch.float32
    providers = PROVIDERS if gpu and not quick else ("gptfast", "torch")
    out = []
    for mode in MODES:
        flops = 2 * rows * vocab * hidden * (3 if mode == "fwd+bwd" else 1)
        for provider in providers:
            out.append(Case(
                op="linear_cross_entropy", provider=provider, mode=mode, shape=f"{rows}x{hidden}->{vocab}",
                dtype=dtype_name(dtype), build=partial(_build, provider, mode, rows, vocab, hidden, dtype, device),
                group=f"linear_cross_entropy {mode} {dtype_name(dtype)}", size=rows, size_name="rows",
                flops=flops, peak=PEAK_MATMUL if gpu else None, priority=PRIORITY[provider],
                warmup=5 if provider == "torch.compile" else 2,
            ))
    return out, []
