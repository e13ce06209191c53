"""Device and dtype names.

Device names as users give them (``auto``, ``cpu``, ``cuda``, ``cuda:1``), checked where
they enter: a name gptfast cannot run on, or a CUDA device this machine does not have,
is a ValueError naming the value, not a torch traceback at the first tensor moved.
Dtype names as reports print them (``dtype_name``: ``torch.bfloat16`` -> ``bfloat16``).
"""
from typing import Optional

import torch

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def check_device_name(name, what: str = "device") -> str:
    """Raise ValueError unless ``name`` is auto, cpu, cuda or cuda:N (syntax only: no CUDA needed)."""
    if not isinstance(name, str):
        raise ValueError(f"{what} must be one of {DEVICE_CHOICES}, got {name!r}")
    if name == "auto":
        return name
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{what} {name!r} is not a device name; use {DEVICE_CHOICES}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{what} {name!r}: gptfast runs on {DEVICE_CHOICES}, not {device.type}")
    return name


def resolve_device(name: Optional[str] = "auto", local_rank: int = 0, what: str = "device") -> torch.device:
    """The device ``name`` stands for on this machine: ``auto`` (or None) is the CUDA device
    of this rank when there is one, else the CPU; a CUDA device that is not here is a
    ValueError naming ``what`` and the value."""
    name = check_device_name("auto" if name is None else name, what)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type != "cuda":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"{what} {name!r} was asked for, but CUDA is not available on this machine "
                         "(no GPU visible, or a CPU-only torch build): use --device cpu")
    count = torch.cuda.device_count()
    if device.index is None:
        return torch.device("cuda", local_rank % count)
    if device.index >= count:
        raise ValueError(f"{what} {name!r} was asked for, but this machine has {count} CUDA device(s)")
    return device


def dtype_name(dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: a dtype as result rows and check results name it."""
    return str(dtype).replace("torch.", "")
