"""Sticky CUDA errors: after an illegal address (or a device-side assert, a launch
failure ...) the CUDA context is broken, and every later kernel in the same process
fails with the same message. A run of many cases (``gptfast check``, ``gptfast bench``,
the warm-up) must stop at the first one and name it, instead of reporting every later
case as failed; the next stage of the GPU suite starts a fresh process.

Out-of-memory is not such an error: the allocator recovers, and the runs go on.
"""
from typing import Optional

import torch

# Text CUDA errors carry through torch ("CUDA error: an illegal memory access was
# encountered"), Triton ("Triton Error [CUDA]: ...") and the driver API names.
_MARKERS = ("cuda error", "triton error [cuda]", "cudaerror", "cuda_error_", "illegal memory access",
            "device-side assert", "unspecified launch failure", "misaligned address", "illegal instruction")


STOPPED = "STOPPED at the first CUDA error"


def is_cuda_error(exc: BaseException) -> bool:
    """True for an error that leaves the CUDA context unusable (not for out-of-memory)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return False
    text = str(exc).lower()
    if "out of memory" in text:
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)  # torch >= 2.8 raises it for CUDA errors
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return any(marker in text for marker in _MARKERS)


def short_error(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message``, cut to ``limit`` characters."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:limit] if text else ''}"


def stop_message(case_label: str, exc: BaseException, not_run: Optional[int] = None) -> str:
    """The line a run prints when it stops at a CUDA error."""
    rest = "" if not_run is None else f"; {not_run} later case(s) not run"
    return (f"{STOPPED}, in case {case_label}: {short_error(exc)}{rest} "
            "(the CUDA context is broken: later cases in this process would fail with the same error)")
