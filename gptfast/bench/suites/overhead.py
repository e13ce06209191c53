"""Host overhead of an eager call (issue 20): microseconds per call of each fused op against
its torch counterpart and a trivial torch op, at shapes small enough that the host is
what is timed.

Every row has op ``overhead``; ``shape`` names the op and its shape, ``mode`` is ``fwd``
(inputs that need no gradient), ``fwd+grad`` (inputs that require grad: the autograd
graph is built) or ``bwd`` (``torch.autograd.grad`` through a graph built up front).
One repetition runs ``CALLS`` calls back to back (launches queued, no synchronisation
between them) and synchronises once at the end, so ``time_ms`` of a row is the time of
``CALLS`` calls: with ``CALLS = 1000`` it reads as **microseconds per call**.

Providers: ``gptfast`` (the public op), ``torch`` (``F.layer_norm``, SDPA, ``F.linear``),
``x.add(1)`` (a trivial torch op on 8 x 768, repeated under every key: the speedup
column of every row reads as the row's time in multiples of ``x.add(1)``'s) and, for the
modes with gradients, ``autograd floor``: the same call made through an
``autograd.Function`` that does nothing (its forward allocates the output, its backward
hands back gradients made up front) on the same inputs. That is what autograd itself
costs any op, fused or not: a backward row's dispatch minus the floor is what gptfast adds.

- On CUDA the rows are the real figures: the target is gptfast within 2x of torch's host
  time (compare the ``gptfast`` and ``torch`` rows of one key).
- On the CPU the fused kernels only run under the Triton interpreter, whose speed means
  nothing. There, with ``TRITON_INTERPRET=1``, the ``gptfast dispatch only`` rows time
  every layer above the kernel (validation, autograd, launcher, config lookup, allocation)
  with each Triton launch replaced by a no-op (``gptfast.kernels._common.launches_skipped``),
  beside ``x.add(1)`` in the same run: the CPU target is each op's dispatch within 6x of
  ``x.add(1)`` (a speedup of at least 1/6). The ``torch`` rows there time torch's CPU
  kernels (real work, not dispatch). Without ``TRITON_INTERPRET=1`` the gptfast rows are
  skipped.
"""
import contextlib
from functools import partial
from typing import List, Tuple

import torch
import torch.nn.functional as F

from gptfast.bench.results import Skipped
from gptfast.runtime.devices import dtype_name
from gptfast.bench.runner import SkipCase, Case
from gptfast.bench.suites.common import is_gpu

CALLS = 1000
TRIVIAL = "x.add(1)"
DISPATCH_ONLY = "gptfast dispatch only"
FLOOR = "autograd floor"

# (op, shape label, modes): the shapes of the measurements.
OPS = (
    ("layer_norm", "8x768", ("fwd", "fwd+grad", "bwd")),
    ("causal_attention", "B1 H12 T128 D64", ("fwd", "fwd+grad", "bwd")),
    ("decode_attention", "B1 H12 L1024 D64", ("fwd",)),
    ("int8_linear", "8x768 -> 768", ("fwd",)),
)


def _inputs(op: str, device, dtype):
    """(gptfast callable, torch callable, tensors that take gradients) of one op."""
    from gptfast import ops
    from gptfast.ops.int8_linear import quantize_weight

    def rand(*shape, dt=dtype):
        return torch.randn(*shape, device=device, dtype=dt)

    if op == "layer_norm":
        x, w, b = rand(8, 768), rand(768), rand(768)
        return (lambda: ops.layer_norm(x, w, b), lambda: F.layer_norm(x, (768,), w, b), (x, w, b))
    if op == "causal_attention":
        q, k, v = rand(1, 12, 128, 64), rand(1, 12, 128, 64), rand(1, 12, 128, 64)
        return (lambda: ops.causal_attention(q, k, v),
                lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v))
    if op == "decode_attention":
        q, k, v = rand(1, 12, 64), rand(1, 12, 1024, 64), rand(1, 12, 1024, 64)
        lens = torch.full((1,), 1024, device=device, dtype=torch.int32)
        return (lambda: ops.decode_attention(q, k, v, lens),
                lambda: F.scaled_dot_product_attention(q[:, :, None], k, v), ())
    if op == "int8_linear":
        x, weight, bias = rand(8, 768), rand(768, 768), rand(768)
        w8, scale = quantize_weight(weight)
        return (lambda: ops.int8_linear(x, w8, scale, bias), lambda: F.linear(x, weight, bias), ())
    raise ValueError(f"unknown op {op!r}")


class _NoOp(torch.autograd.Function):
    """``apply(grads, *inputs)``: an output like ``inputs[0]`` (allocated, never written);
    backward returns ``grads`` (the floor's gradients, made up front)."""

    @staticmethod
    def forward(ctx, grads, *inputs):
        ctx.grads = grads
        return inputs[0].new_empty(inputs[0].shape)

    @staticmethod
    def backward(ctx, grad_out):
        return (None, *ctx.grads)


def _loop(call, device, skip_launches: bool):
    """``CALLS`` calls of ``call()`` and one synchronisation."""
    def run(_):
        context = contextlib.nullcontext()
        if skip_launches:
            from gptfast.kernels._common import launches_skipped

            context = launches_skipped()
        with context:
            for _ in range(CALLS):
                call()
        if is_gpu(device):
            torch.cuda.synchronize(device)
    return run


def _build(op: str, provider: str, mode: str, dtype, device):
    if provider == TRIVIAL:
        x = torch.randn(8, 768, device=device, dtype=dtype)
        return _loop(lambda: x.add(1), device, False), [None]
    skip_launches = provider == DISPATCH_ONLY
    if provider not in ("torch", FLOOR):
        _require_fused(device)
    fused, plain, grad_tensors = _inputs(op, device, dtype)
    call = plain if provider == "torch" else fused
    if provider == FLOOR:
        floor_grads = tuple(torch.zeros_like(t) for t in grad_tensors)
        call = partial(_NoOp.apply, floor_grads, *grad_tensors)
    if mode == "fwd":
        def forward():
            with torch.no_grad():
                return call()
        return _loop(forward, device, skip_launches), [None]
    for t in grad_tensors:
        t.requires_grad_(True)
    if mode == "fwd+grad":
        return _loop(call, device, skip_launches), [None]
    # bwd: one graph built up front, differentiated CALLS times (retain_graph keeps it)
    context = contextlib.nullcontext()
    if skip_launches:
        from gptfast.kernels._common import launches_skipped

        context = launches_skipped()
    with context:
        out = call()
    seed = torch.randn_like(out)
    return _loop(lambda: torch.autograd.grad(out, grad_tensors, seed, retain_graph=True), device,
                 skip_launches), [None]


def _require_fused(device) -> None:
    from gptfast.ops._dispatch import interpreting, triton_available

    if not triton_available():
        raise SkipCase("triton is not installed")
    if is_gpu(device) and interpreting():
        raise SkipCase("TRITON_INTERPRET=1 is set on a CUDA device: the interpreter's timings mean nothing")
    if not is_gpu(device) and not interpreting():
        raise SkipCase("on a CPU the dispatch-only rows need TRITON_INTERPRET=1 (the fused path off CUDA)")


def cases(device, quick: bool = False) -> Tuple[List[Case], List[Skipped]]:
    gpu = is_gpu(device)
    dtype = torch.bfloat16 if gpu else torch.float32
    providers = ("gptfast" if gpu else DISPATCH_ONLY, "torch", TRIVIAL)
    out = []
    for op, shape, modes in OPS:
        for mode in modes:
            for provider in providers + ((FLOOR,) if mode != "fwd" else ()):
                out.append(Case(
                    op="overhead", provider=provider, mode=mode, shape=f"{op} {shape}", dtype=dtype_name(dtype),
                    build=partial(_build, op, provider, mode, dtype, device),
                    group=f"overhead {mode}", note=f"time of {CALLS} calls: ms read as us per call",
                    warmup=1, min_reps=3, max_reps=5 if quick else 10, target_ms=50.0 if quick else 200.0,
                    timing_options={} if not gpu else {"flush_l2": False},
                ))
    return out, []
