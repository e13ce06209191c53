"""What the suites share: where the fused kernels can be timed, optional providers,
input sets, and turning a forward function into fwd / bwd / fwd+bwd callables."""
import importlib.util
import math
from dataclasses import dataclass
from typing import Callable, List, Sequence

import torch

from gptfast.bench.runner import SkipCase

GPU_ONLY = "GPU only: timing needs CUDA"
FUSED_GPU_ONLY = ("GPU only: the fused Triton kernels run on CUDA (on the CPU the op falls back to the torch "
                  "path, which the 'torch' row measures; the Triton interpreter's speed means nothing)")

MODES = ("fwd", "bwd", "fwd+bwd")


def is_gpu(device: torch.device) -> bool:
    return torch.device(device).type == "cuda"


def require_gpu(device, reason: str = GPU_ONLY) -> None:
    if not is_gpu(device):
        raise SkipCase(reason)


def require_fused(device) -> None:
    """The fused provider is timed only where its Triton kernel runs natively."""
    from gptfast.ops._dispatch import interpreting, triton_available

    if not is_gpu(device):
        raise SkipCase(FUSED_GPU_ONLY)
    if not triton_available():
        raise SkipCase("triton is not installed")
    if interpreting():
        raise SkipCase("TRITON_INTERPRET=1 is set: the interpreter's timings mean nothing")


def require_module(name: str) -> None:
    if importlib.util.find_spec(name) is None:
        raise SkipCase(f"{name} is not installed")


def input_set_count(bytes_per_set: float, device, cap: int = 32) -> int:
    """Enough distinct input sets to cover twice the L2 cache (at least 2), so that
    repetitions (and the calls inside one CUDA graph) do not find inputs in cache."""
    if not is_gpu(device):
        return 2
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 * 2**20
    return int(min(cap, max(2, math.ceil(2 * l2 / max(bytes_per_set, 1)))))


@dataclass
class GradSet:
    """One input set of a backward benchmark: the graph to differentiate and its seeds."""

    out: torch.Tensor
    leaves: Sequence[torch.Tensor]
    grad_out: torch.Tensor


def _forward_for_capture(forward: Callable, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``forward(*inputs)``, on CUDA run on ``harness.side_stream``: autograd runs each
    backward op on its forward's stream, and a CUDA graph captures one stream's work."""
    if not inputs[0].is_cuda:
        return forward(*inputs)
    from gptfast.bench.harness import side_stream

    stream = side_stream(inputs[0].device)
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = forward(*inputs)
    torch.cuda.current_stream().wait_stream(stream)
    return out


def timed_callable(mode: str, forward: Callable, make_inputs: Callable[[], Sequence[torch.Tensor]],
                   n_sets: int, grad_indices: Sequence[int]):
    """Input sets and the callable that times ``mode`` of ``forward(*inputs)``.

    ``fwd`` times the forward alone on inputs that need no gradient. ``bwd`` runs the
    forward once per input set up front and times only ``torch.autograd.grad`` through
    it (``retain_graph`` keeps the graph for the next repetition; on CUDA that forward runs
    on the harness's capture stream, so the backward can be graph-captured). ``fwd+bwd``
    times both. Gradients go to the inputs at ``grad_indices``.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    sets: List = []
    for _ in range(n_sets):
        inputs = list(make_inputs())
        if mode == "fwd":
            sets.append(inputs)
            continue
        for i in grad_indices:
            inputs[i].requires_grad_(True)
        leaves = [inputs[i] for i in grad_indices]
        if mode == "bwd":
            out = _forward_for_capture(forward, inputs)
            sets.append(GradSet(out, leaves, torch.randn_like(out)))
        else:
            sets.append((inputs, leaves))
    if mode == "fwd":
        def run(inputs):
            with torch.no_grad():
                return forward(*inputs)
    elif mode == "bwd":
        def run(s):
            return torch.autograd.grad(s.out, s.leaves, s.grad_out, retain_graph=True)
    else:
        # Seed gradients are made up front (the output's shape from one untimed forward;
        # with grad enabled, as timed, so torch.compile does not compile a second graph).
        probe = forward(*sets[0][0]).detach()
        seeds = [torch.randn_like(probe) for _ in sets]
        del probe
        sets = [(inputs, leaves, seed) for (inputs, leaves), seed in zip(sets, seeds)]

        def run(s):
            inputs, leaves, seed = s
            return torch.autograd.grad(forward(*inputs), leaves, seed)
    return run, sets
