"""Where a fused op runs: the Triton kernel on CUDA (or on the CPU under the Triton
interpreter), otherwise the torch path."""
import importlib.util
import os

import torch


# Looked up once at import (a plain constant keeps torch.compile free of cache wrappers).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_INSTALLED


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton kernel serves a tensor on ``t``'s device."""
    if not _TRITON_INSTALLED:
        return False
    if t.is_cuda:  # (the tensor's flags, not t.device: building a device object costs per call)
        return not interpreting()
    return t.is_cpu and interpreting()


def check_same_device_dtype(name: str, names: tuple, *tensors) -> None:
    """Raise a clear error when ``tensors`` (called ``names``) do not share one device and one dtype."""
    first = tensors[0]
    device, dtype = first.device, first.dtype
    for other_name, t in zip(names[1:], tensors[1:]):  # (positional: keywords cost microseconds per eager call)
        if t.device != device:
            raise ValueError(f"{name}: {other_name} is on {t.device} but {names[0]} is on {device}")
        if t.dtype != dtype:
            raise TypeError(f"{name}: {other_name} has dtype {t.dtype} but {names[0]} has dtype {dtype}")


def register_inference_only(op, message: str) -> None:
    """Give a registered op an autograd formula that raises ``RuntimeError(message)`` on
    backward: it runs under autograd (no error until a gradient is asked for) but has no
    derivative."""

    def backward(ctx, grad_out):
        raise RuntimeError(message)

    op.register_autograd(backward, setup_context=lambda ctx, inputs, output: None)
