"""Model FLOPs utilisation: the training FLOPs a model needs per token, against a device's peak.

Per token, a training step (forward + backward) costs about ``6 N`` FLOPs for the N
parameters that take part in matmuls (the tied token embedding counts, as the output
head; learned position embeddings are a lookup and do not) plus ``12 L d T`` for
attention's two matmuls (scores and values) over a context of T in L layers of width d
(PaLM, appendix B). The attention term counts the full T x T square, as is the
convention, although causal masking lets kernels skip half of it.

The peak is the dense bf16 tensor-core rate from the vendor's datasheet for GPUs we
know, else measured with a large matmul; on a CPU MFU is reported only when asked for.
"""
import time
from typing import Optional

import torch

# Dense (non-sparse) bf16 tensor-core peaks, TFLOPS, from NVIDIA datasheets. Matched
# against torch.cuda.get_device_name() in order, so more specific names come first.
KNOWN_BF16_PEAK_TFLOPS = (
    ("H200", 989.4),
    ("GH200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM5
    ("H800", 989.4),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
)


def flops_per_token(n_params: int, n_layer: int, n_embd: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 N + 12 L d T."""
    return 6.0 * n_params + 12.0 * n_layer * n_embd * seq_len


def known_peak_tflops(device_name: str) -> Optional[float]:
    for key, tflops in KNOWN_BF16_PEAK_TFLOPS:
        if key in device_name:
            return tflops
    return None


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, size: Optional[int] = None, iters: int = 10) -> float:
    """The matmul rate (TFLOPS) this device reaches on square ``size`` x ``size`` products."""
    size = size or (8192 if device.type == "cuda" else 512)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):  # warm up (cuBLAS heuristics, clocks)
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    elapsed = time.perf_counter() - start
    return 2.0 * size**3 * iters / elapsed / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_peak_tflops(setting: str, device: torch.device, dtype: torch.dtype) -> Optional[float]:
    """The per-device peak MFU is measured against, or None when MFU is not reported.

    ``setting``: ``auto`` (datasheet bf16 peak for known GPUs training in bf16, else a
    measurement on CUDA, None on CPU), ``measured``, ``off``, or a number of TFLOPS.
    """
    if setting == "off":
        return None
    if setting not in ("auto", "measured"):
        return float(setting)
    if setting == "auto":
        if device.type != "cuda":
            return None
        if dtype == torch.bfloat16:
            known = known_peak_tflops(torch.cuda.get_device_name(device))
            if known is not None:
                return known
    return measure_matmul_tflops(device, dtype)


def mfu(tokens_per_s: float, flops_per_tok: float, peak_tflops: Optional[float], n_devices: int = 1) -> Optional[float]:
    """Achieved model FLOPs over the peak of ``n_devices`` devices (a fraction), or None without a peak."""
    if peak_tflops is None or tokens_per_s <= 0:
        return None
    return tokens_per_s * flops_per_tok / (peak_tflops * 1e12 * n_devices)
