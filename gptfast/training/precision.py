"""Mixed precision for training and evaluation: which autocast dtype a setting means on a device."""
import contextlib
from typing import Optional

import torch

AUTOCAST_SETTINGS = ("auto", "float32", "bfloat16")


def autocast_dtype(setting: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``setting`` (``--dtype``): bfloat16 on CUDA for auto (when the
    GPU supports it), None (plain float32) on the CPU and for float32."""
    if setting not in AUTOCAST_SETTINGS:
        raise ValueError(f"dtype must be one of {AUTOCAST_SETTINGS}, got {setting!r} (--dtype)")
    if setting == "float32":
        return None
    if setting == "bfloat16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"--dtype bfloat16 was requested but {torch.cuda.get_device_name(device)} does not support it")
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """``torch.autocast`` to ``dtype`` on ``device``, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
