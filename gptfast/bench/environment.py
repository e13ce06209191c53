"""Where a benchmark ran: device, versions, git commit, time, and the device's peaks.

The peaks are *measured*, once per run and per device, not taken from a data sheet:
``copy_gbps`` is a large device-to-device copy (bytes read plus bytes written per
second) and ``matmul_tflops`` a large matmul in bf16 on a GPU (fp32 on the CPU, where
bf16 matmul is not what the hardware is built for). Memory-bound rows report their
fraction of ``copy_gbps``, compute-bound rows their fraction of ``matmul_tflops``.
"""
import datetime
import functools
import importlib.metadata
import os
import platform
import subprocess
from typing import Dict, Optional

import torch

from gptfast.bench.harness import time_call

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@functools.lru_cache(maxsize=None)
def versions() -> Dict[str, str]:
    """Versions of what the numbers depend on (triton's without importing it)."""
    from gptfast import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _package_version("triton"),
        "cuda": str(torch.version.cuda),
        "gptfast": __version__,
    }


@functools.lru_cache(maxsize=None)
def git_commit() -> str:
    """HEAD of the checkout gptfast runs from, with ``-dirty`` for local changes; ``unknown`` outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def timestamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


_PEAKS: Dict[str, Dict[str, float]] = {}


def measure_peaks(device) -> Dict[str, float]:
    """Copy bandwidth (GB/s) and matmul rate (TFLOP/s) of ``device``, measured once per process."""
    device = torch.device(device)
    key = str(device)
    if key not in _PEAKS:
        if device.type == "cuda":
            copy_bytes, matmul_n, matmul_dtype = 2**30, 8192, torch.bfloat16
        else:
            copy_bytes, matmul_n, matmul_dtype = 64 * 2**20, 1024, torch.float32
        src = torch.empty(copy_bytes, dtype=torch.uint8, device=device).fill_(1)
        dst = torch.empty_like(src)
        copy = time_call(lambda _: dst.copy_(src), device=device, warmup=3, target_ms=100, max_reps=30, flush_l2=False)
        del src, dst
        a = torch.randn(matmul_n, matmul_n, device=device, dtype=matmul_dtype)
        b = torch.randn(matmul_n, matmul_n, device=device, dtype=matmul_dtype)
        matmul = time_call(lambda _: a @ b, device=device, warmup=3, target_ms=100, max_reps=30, flush_l2=False)
        del a, b
        _PEAKS[key] = {
            # The fastest repetitions approach the peak; the median would understate it.
            "copy_gbps": 2 * copy_bytes / (copy.p20_ms * 1e-3) / 1e9,
            "matmul_tflops": 2 * matmul_n**3 / (matmul.p20_ms * 1e-3) / 1e12,
            "matmul_dtype": str(matmul_dtype).replace("torch.", ""),
        }
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return dict(_PEAKS[key])


def load_average() -> Optional[float]:
    """The host's 1-minute load average (None where the OS does not report one)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def run_metadata(device, peaks: Dict[str, float]) -> Dict:
    """The header of a result file: shared by all its rows. ``load_avg_1m`` is the host's
    load when measuring starts (``report.load_warning`` warns when it exceeds the cores)."""
    return {
        "load_avg_1m": load_average(),
        "cpu_count": os.cpu_count(),
        "device": device_name(device),
        "device_type": torch.device(device).type,
        "versions": versions(),
        "git_commit": git_commit(),
        "timestamp": timestamp(),
        "peaks": peaks,
        "host": platform.node(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
