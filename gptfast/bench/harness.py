"""Timing: warm-up, then repeated measurements summarised as median, p20 and p80.

Three ways to time one call of ``fn(inputs)``:

* **CUDA events + L2 flush** (the default on a GPU). Before every repetition a buffer
  twice the size of the L2 cache is overwritten, so no repetition finds its inputs in
  L2; each repetition is bracketed by its own pair of CUDA events and all are read
  after a single synchronisation at the end (no host sync between repetitions).
* **CUDA-graph replay** (``cuda_graph=True``, for kernels of a few microseconds, whose
  launch overhead would otherwise dominate): up to ``graph_calls`` calls (enough for
  about a millisecond of work) are captured into one CUDA graph on the harness's side
  stream (``side_stream``), each replay is timed with events and divided by the calls.
  If capture fails (an op that syncs with the host), the events method is used and
  the result says so.
* **Wall clock** on the CPU: ``time.perf_counter`` around each call.

``time_kernel_and_eager`` times one callable both ways on CUDA: the *kernel* time
(graph replay: what the GPU spends, host launch cost removed) and the *eager* time
(events around plain calls: what a caller of the op sees, host-bound for small
kernels); a report keeps the two in separate columns, never one as the other.

A timing whose p20-p80 spread exceeds ``UNSTABLE_SPREAD`` of its median is *unstable*
(a loaded machine, clock changes): reports mark it and give no speedup from it.

Repetitions rotate over several input sets, so that a later repetition does not find
data an earlier one left in a cache. The number of repetitions adapts to the speed of
the call: enough to fill ``target_ms`` of measurement, within ``[min_reps, max_reps]``.
"""
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

# Methods, as recorded in each result row.
WALL_CLOCK = "wall-clock"
CUDA_EVENTS = "cuda-events+l2-flush"
CUDA_GRAPH = "cuda-graph"

# (p80 - p20) / median above this: the timing is too noisy to compare.
UNSTABLE_SPREAD = 0.25
# A CUDA graph holds enough calls for about this much GPU work (at least one call).
GRAPH_WORK_MS = 1.0


@dataclass
class Timing:
    """Per-call times of one benchmark, in milliseconds."""

    samples_ms: List[float]
    method: str
    note: str = ""
    median_ms: float = field(init=False)
    p20_ms: float = field(init=False)
    p80_ms: float = field(init=False)

    def __post_init__(self):
        if not self.samples_ms:
            raise ValueError("Timing needs at least one sample")
        self.median_ms = percentile(self.samples_ms, 50)
        self.p20_ms = percentile(self.samples_ms, 20)
        self.p80_ms = percentile(self.samples_ms, 80)

    @property
    def spread(self) -> float:
        """(p80 - p20) / median: the relative width of the middle of the samples."""
        return (self.p80_ms - self.p20_ms) / self.median_ms if self.median_ms > 0 else math.inf

    @property
    def unstable(self) -> bool:
        return self.spread > UNSTABLE_SPREAD


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _as_device(device) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def rep_count(estimate_ms: float, target_ms: float, min_reps: int, max_reps: int) -> int:
    """Repetitions to fill ``target_ms`` at ``estimate_ms`` per call, within ``[min_reps, max_reps]``."""
    if estimate_ms <= 0:
        return max_reps
    return int(min(max_reps, max(min_reps, round(target_ms / estimate_ms))))


def time_call(
    fn: Callable[[Any], Any],
    input_sets: Optional[Sequence[Any]] = None,
    *,
    device="cpu",
    warmup: int = 3,
    target_ms: float = 200.0,
    min_reps: int = 5,
    max_reps: int = 100,
    flush_l2: bool = True,
    cuda_graph: bool = False,
    graph_calls: int = 20,
) -> Timing:
    """Time ``fn(input_set)``, rotating over ``input_sets`` (``[None]`` when omitted).

    ``warmup`` calls come first (they also absorb JIT compilation and autotuning).
    """
    input_sets = list(input_sets) if input_sets is not None else [None]
    if not input_sets:
        raise ValueError("time_call: input_sets must not be empty")
    if warmup < 1 or min_reps < 1 or max_reps < min_reps:
        raise ValueError(f"time_call: need warmup >= 1 and 1 <= min_reps <= max_reps (got {warmup}, {min_reps}, {max_reps})")
    device = _as_device(device)
    if device.type == "cuda":
        if cuda_graph:
            try:
                return _time_cuda_graph(fn, input_sets, device, warmup, target_ms, min_reps, max_reps, flush_l2, graph_calls)
            except Exception as exc:  # capture is not possible for every callable
                torch.cuda.synchronize(device)
                timing = _time_cuda_events(fn, input_sets, device, warmup, target_ms, min_reps, max_reps, flush_l2)
                timing.note = f"graph capture failed ({type(exc).__name__}); timed with events"
                return timing
        return _time_cuda_events(fn, input_sets, device, warmup, target_ms, min_reps, max_reps, flush_l2)
    return _time_wall_clock(fn, input_sets, warmup, target_ms, min_reps, max_reps)


def time_kernel_and_eager(
    fn: Callable[[Any], Any],
    input_sets: Optional[Sequence[Any]] = None,
    *,
    device="cpu",
    warmup: int = 3,
    target_ms: float = 200.0,
    min_reps: int = 5,
    max_reps: int = 100,
    flush_l2: bool = True,
    graph_calls: int = 20,
) -> Tuple[Optional[Timing], Timing]:
    """``(kernel, eager)`` timings of ``fn``: on CUDA the kernel time by CUDA-graph replay
    (None when capture fails: the eager timing's note says why) and the eager time by
    events around plain calls, each with half of ``target_ms``; elsewhere ``(None,
    wall clock)``."""
    options = dict(device=device, warmup=warmup, min_reps=min_reps, max_reps=max_reps, flush_l2=flush_l2)
    if _as_device(device).type != "cuda":
        return None, time_call(fn, input_sets, target_ms=target_ms, **options)
    graph = time_call(fn, input_sets, target_ms=target_ms / 2, cuda_graph=True, graph_calls=graph_calls, **options)
    if graph.method != CUDA_GRAPH:  # capture failed: what was measured is the eager time
        return None, graph
    return graph, time_call(fn, input_sets, target_ms=target_ms / 2, **options)


def host_timed_ms(fn: Callable[[Any], Any], arg: Any = None, device="cpu") -> Tuple[float, Any]:
    """One call ``fn(arg)`` on the host clock, the device synchronised before and after:
    (milliseconds, result). The wall-clock method's timer, and the one for whole loops
    (a generate call, a decode loop) whose host work is part of what is measured."""
    synchronize(device)
    start = time.perf_counter()
    result = fn(arg)
    synchronize(device)
    return (time.perf_counter() - start) * 1e3, result


def warm_up(fn: Callable[[Any], Any], input_sets: Sequence[Any], warmup: int, device="cpu") -> float:
    """``warmup`` calls rotating over ``input_sets`` (absorbing JIT compiles, autotuning,
    lazy initialisation); returns the host-clock milliseconds per call."""
    total_ms, _ = host_timed_ms(lambda _: [fn(input_sets[i % len(input_sets)]) for i in range(warmup)], None, device)
    return total_ms / warmup


def _time_wall_clock(fn, input_sets, warmup, target_ms, min_reps, max_reps) -> Timing:
    n = len(input_sets)
    estimate_ms = warm_up(fn, input_sets, warmup)
    samples = [host_timed_ms(fn, input_sets[i % n])[0]
               for i in range(rep_count(estimate_ms, target_ms, min_reps, max_reps))]
    return Timing(samples, WALL_CLOCK)


def l2_flush_buffer(device: torch.device) -> torch.Tensor:
    """A buffer twice the L2 size (at least 64 MiB): writing it evicts everything from L2."""
    props = torch.cuda.get_device_properties(device)
    l2_bytes = getattr(props, "L2_cache_size", 0) or 128 * 2**20
    return torch.empty(max(2 * l2_bytes, 64 * 2**20), dtype=torch.int8, device=device)


def _event_timed_reps(run, reps, flush) -> list:
    """Milliseconds of ``run(i)`` for i in range(reps), each bracketed by CUDA events and
    preceded (outside the brackets) by overwriting ``flush`` when given."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        if flush is not None:
            flush.zero_()
        starts[i].record()
        run(i)
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def _time_cuda_events(fn, input_sets, device, warmup, target_ms, min_reps, max_reps, flush_l2) -> Timing:
    n = len(input_sets)
    flush = l2_flush_buffer(device) if flush_l2 else None
    with torch.cuda.device(device):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(warmup):
            fn(input_sets[i % n])
        end.record()
        torch.cuda.synchronize()
        reps = rep_count(start.elapsed_time(end) / warmup, target_ms, min_reps, max_reps)
        samples = _event_timed_reps(lambda i: fn(input_sets[i % n]), reps, flush)
    return Timing(samples, CUDA_EVENTS)


_SIDE_STREAMS = {}


def side_stream(device) -> "torch.cuda.Stream":
    """The one non-default stream per device on which graphs are warmed up and captured.
    Work whose autograd backward is captured later (a forward run before timing) runs
    its forward here too: backward ops run on their forward's stream, and capture
    cannot record work on another stream."""
    device = _as_device(device)
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device=key)
    return _SIDE_STREAMS[key]


def _time_cuda_graph(fn, input_sets, device, warmup, target_ms, min_reps, max_reps, flush_l2, graph_calls) -> Timing:
    n = len(input_sets)
    flush = l2_flush_buffer(device) if flush_l2 else None
    with torch.cuda.device(device):
        # Capture needs the callable warmed up on the capture stream first (lazy init, JIT).
        side = side_stream(device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(warmup - 1):
                fn(input_sets[i % n])
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(input_sets[(warmup - 1) % n])  # the last warm-up call (past any compile): the estimate
            end.record()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        # Enough calls per graph to amortise the replay's own launch, no more.
        graph_calls = max(1, min(graph_calls, math.ceil(GRAPH_WORK_MS / max(start.elapsed_time(end), 1e-3))))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            for i in range(graph_calls):
                fn(input_sets[i % n])
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        reps = rep_count(start.elapsed_time(end), target_ms, min_reps, max_reps)
        samples = _event_timed_reps(lambda i: graph.replay(), reps, flush)
    del graph
    return Timing([ms / graph_calls for ms in samples], CUDA_GRAPH)


def synchronize(device) -> None:
    """Wait for the device (a no-op on the CPU)."""
    device = _as_device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
