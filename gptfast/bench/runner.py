"""Run benchmark cases one by one, within a time budget, never letting one failure stop the rest.

A ``Case`` describes one row before it is measured. Its ``build()`` allocates the
inputs and returns the callable to time, so memory is held for one case at a time; it
raises ``SkipCase`` when the provider cannot run here (not installed, GPU only ...).

A CUDA error stops the run (see ``gptfast.runtime.cuda_errors``). Cases carry a priority: when the budget runs out, the least important cases (higher
numbers: optional providers, torch.compile with its long compile times) are the ones
left unmeasured. Rows come back in the order the suite listed the cases.
"""
import gc
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from gptfast.bench.environment import load_average
from gptfast.runtime.cuda_errors import STOPPED, is_cuda_error, short_error, stop_message
from gptfast.bench.harness import time_call, time_kernel_and_eager
from gptfast.bench.results import Row, Skipped, fill_rates

# Priorities: the rows issue targets are judged on, the other providers, then the
# providers that compile for a long time.
CORE, EXTRA, SLOW = 0, 1, 2


class SkipCase(Exception):
    """Raised by ``Case.build`` when the case cannot run here; the message says why."""


@dataclass
class Case:
    op: str
    provider: str
    mode: str
    shape: str
    dtype: str
    build: Callable[[], Tuple[Callable[[Any], Any], Sequence[Any]]]
    group: str = ""
    size: Optional[float] = None
    size_name: str = ""
    flops: Optional[float] = None
    bytes: Optional[float] = None
    tokens: Optional[float] = None
    peak: Optional[str] = None
    priority: int = CORE
    cuda_graph: bool = False  # a kernel row: on CUDA, time graph replay (kernel) and plain calls (eager)
    warmup: int = 3
    target_ms: float = 100.0
    min_reps: int = 5
    max_reps: int = 100
    note: str = ""
    timing_options: Dict[str, Any] = field(default_factory=dict)

    def label(self) -> str:
        return f"{self.op} {self.mode} {self.provider} [{self.shape}] {self.dtype}"

    def skipped(self, reason: str) -> Skipped:
        return Skipped(self.op, self.provider, self.mode, self.shape, reason)


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _measure(case: Case, device: torch.device, meta: Dict) -> Row:
    """Build ``case``, time it and return its row (with rates; fractions of peak on CUDA only:
    on a CPU small inputs live in caches and the measured peaks say little)."""
    fn = inputs = None
    options = dict(device=device, warmup=case.warmup, target_ms=case.target_ms, min_reps=case.min_reps,
                   max_reps=case.max_reps, **case.timing_options)
    cuda = device.type == "cuda"
    if cuda:  # the row's peak memory: what the build allocated and the timed calls reached
        torch.cuda.reset_peak_memory_stats(device)
    try:
        fn, inputs = case.build()
        if case.cuda_graph:  # a kernel row: the graph-replay and the eager time, each in its column
            kernel, eager = time_kernel_and_eager(fn, inputs, **options)
        else:
            kernel, eager = None, time_call(fn, inputs, **options)
        peak_mem_mb = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    finally:
        del fn, inputs
        _release_memory(device)
    timing = kernel or eager  # the headline time: the kernel's where there is one
    row = Row(op=case.op, provider=case.provider, mode=case.mode, shape=case.shape, dtype=case.dtype,
              time_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, group=case.group,
              size=case.size, size_name=case.size_name, flops=case.flops, bytes=case.bytes, tokens=case.tokens,
              peak=case.peak, method=timing.method, kernel_ms=None if kernel is None else kernel.median_ms,
              eager_ms=eager.median_ms, eager_p20_ms=eager.p20_ms, eager_p80_ms=eager.p80_ms,
              unstable=timing.unstable, peak_mem_mb=peak_mem_mb, note="; ".join(n for n in (case.note, eager.note) if n),
              device=meta["device"], versions=meta["versions"], git_commit=meta["git_commit"],
              timestamp=meta["timestamp"])
    return fill_rates(row, meta.get("peaks", {}) if meta.get("device_type") == "cuda" else {})


def _failure(case: Case, exc: Exception, later: int) -> Tuple[str, Optional[str], Optional[str]]:
    """What a case that raised becomes: (skip reason, log message or None, stop reason or None)."""
    if isinstance(exc, SkipCase):
        return str(exc), None, None
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "out of memory", None, None
    reason = f"error: {short_error(exc)}"
    if is_cuda_error(exc):
        return reason, stop_message(case.label(), exc, later), f"not run: {STOPPED} (in {case.label()})"
    return reason, f"FAILED {short_error(exc)}", None


def run_cases(
    cases: Sequence[Case],
    device,
    meta: Dict,
    *,
    budget_s: Optional[float] = None,
    log: Optional[Callable[[str], None]] = None,
    progress: Optional[Callable[[List[Row], List[Skipped]], None]] = None,
) -> Tuple[List[Row], List[Skipped]]:
    """Measure every case (most important first) until ``budget_s`` seconds have passed.

    ``meta`` (see ``environment.run_metadata``) supplies the device, versions, commit,
    timestamp and peaks stamped on every row. A case that raises becomes a skipped row
    with the error; Ctrl-C (or SIGTERM turned into KeyboardInterrupt by the caller) and a
    CUDA error (the context is broken, so later cases would fail too: the log line names
    the case) stop the run, and the cases not run are skipped rows saying why. At the end
    ``meta["load_avg_1m_end"]`` is set to the host's load average.
    ``progress(rows, skipped)`` is called after every measured or failed case (to save
    what is done, should the process be killed outright).
    """
    device = torch.device(device)
    start = time.monotonic()
    order = sorted(range(len(cases)), key=lambda i: (cases[i].priority, i))
    measured: Dict[int, Row] = {}
    skipped: List[Skipped] = []
    stop_reason = None
    for done, index in enumerate(order):
        case = cases[index]
        if stop_reason is None and budget_s is not None and time.monotonic() - start > budget_s:
            stop_reason = f"time budget of {budget_s:.0f} s spent"
        if stop_reason is not None:
            skipped.append(case.skipped(stop_reason))
            continue
        try:
            measured[index] = _measure(case, device, meta)
            message = f"{measured[index].time_ms:.4g} ms"
        except KeyboardInterrupt:
            stop_reason = "run interrupted"
            skipped.append(case.skipped(stop_reason))
            continue
        except Exception as exc:  # one broken provider must not lose the other rows
            reason, message, stop = _failure(case, exc, len(order) - done - 1)
            skipped.append(case.skipped(reason))
            stop_reason = stop
            if message is None:
                continue
        if log:
            log(f"[{done + 1}/{len(cases)}] {case.label()}: {message}")
        if progress:
            progress([measured[i] for i in sorted(measured)], skipped)
    meta["load_avg_1m_end"] = load_average()  # with the start's: report.load_warning
    return [measured[i] for i in sorted(measured)], skipped
