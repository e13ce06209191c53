"""Numerics helpers shared by the tests, ``gptfast check`` and the benchmarks.

The error-ratio rule: a fused op's error against a float64 reference may be at most a
small multiple of the error that plain PyTorch makes in the same dtype.
"""
import contextlib

import torch

# Fill value written into outputs before a kernel runs, so unwritten elements show up.
POISON = float("nan")


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN (or the max integer) in place and return it."""
    if t.is_floating_point():
        return t.fill_(POISON)
    return t.fill_(torch.iinfo(t.dtype).max)


@contextlib.contextmanager
def poisoned_kernel_outputs():
    """While active, every output and scratch buffer the Triton launchers allocate
    (``gptfast.kernels._common.empty``) is poisoned first, so a finite result proves the
    kernels wrote each element. Imports the kernels (and triton) when entered."""
    from gptfast.kernels import _common

    with _common.fill_outputs(poison_):
        yield


def randn(*shape, dtype: torch.dtype = torch.float32, seed: int = 0, scale: float = 1.0, shift: float = 0.0,
          device="cpu", generator: torch.Generator = None) -> torch.Tensor:
    """Seeded standard normal values times ``scale`` plus ``shift``, in ``dtype`` on
    ``device``: drawn and scaled in float64 on the CPU, so the same on every device.
    ``generator`` (a CPU generator) draws from a running stream instead of ``seed``."""
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    t = torch.randn(*(shape or ((),)), generator=g, dtype=torch.float64) * scale + shift  # () : a scalar
    return t.to(device=device, dtype=dtype)


def max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0


def error_ratio(fused: torch.Tensor, plain: torch.Tensor, exact: torch.Tensor, floor: float = 1e-6) -> float:
    """max|fused - exact| / max(max|plain - exact|, floor). NaN anywhere gives inf.

    ``exact`` is the float64 reference; ``plain`` is plain PyTorch in the fused op's
    dtype. ``floor`` keeps the ratio meaningful when plain PyTorch happens to be exact.
    """
    if not torch.isfinite(fused.double()).all():
        return float("inf")
    return max_abs_error(fused, exact) / max(max_abs_error(plain, exact), floor)


def assert_error_ratio(fused, plain, exact, max_ratio: float = 3.0, floor: float = 1e-6, what: str = "") -> float:
    """Assert the error-ratio rule and return the ratio."""
    ratio = error_ratio(fused, plain, exact, floor)
    assert ratio <= max_ratio, (
        f"{what}: fused error {max_abs_error(fused, exact):.3e} is {ratio:.2f}x plain PyTorch's "
        f"{max_abs_error(plain, exact):.3e} (allowed {max_ratio}x)"
    )
    return ratio
