"""Result rows: what one measurement reports, and the derived columns.

A row is one (op, provider, mode, shape, dtype) measurement. Its work per call --
FLOPs, bytes moved or tokens produced -- turns the median time into TFLOP/s, GB/s or
tokens/s; the device's measured peak turns that into a fraction of peak; the baseline
provider's row with the same op, mode, shape and dtype turns it into a speedup.

Kernel rows carry two times, never one in place of the other: ``kernel_ms`` (CUDA-graph
replay: the GPU's time) and ``eager_ms`` (plain calls: what a caller sees, host launch
cost included); ``time_ms`` (with ``p20_ms``/``p80_ms``), from which rates and speedups
come, is the kernel time where there is one, else the eager (or whole-call) time, and
``method`` says which. A row whose time spread is wide is ``unstable``: it gets no
speedup, and neither does a row compared against it (``speedup_note`` says why).
"""
import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

SCHEMA_VERSION = 1

# Which peak a row is measured against: memory-bound rows against copy bandwidth,
# compute-bound rows against the matmul rate.
PEAK_COPY = "copy_gbps"
PEAK_MATMUL = "matmul_tflops"


@dataclass
class Row:
    op: str
    provider: str
    mode: str  # fwd | bwd | fwd+bwd | step | e2e
    shape: str
    dtype: str
    time_ms: float
    p20_ms: float
    p80_ms: float
    group: str = ""  # rows of one plot: same op, mode, dtype and fixed dimensions
    size: Optional[float] = None  # the x coordinate within the group
    size_name: str = ""
    flops: Optional[float] = None  # work per call
    bytes: Optional[float] = None
    tokens: Optional[float] = None
    tflops: Optional[float] = None
    gbps: Optional[float] = None
    tokens_per_s: Optional[float] = None
    mfu: Optional[float] = None
    fraction_of_peak: Optional[float] = None
    peak: Optional[str] = None  # "copy_gbps" or "matmul_tflops"
    speedup: Optional[float] = None
    baseline: Optional[str] = None
    method: str = ""
    kernel_ms: Optional[float] = None  # CUDA-graph replay, per call
    eager_ms: Optional[float] = None  # plain calls (CUDA events or wall clock), per call
    eager_p20_ms: Optional[float] = None
    eager_p80_ms: Optional[float] = None
    unstable: bool = False  # time_ms's p20-p80 spread is wider than harness.UNSTABLE_SPREAD
    peak_mem_mb: Optional[float] = None  # CUDA: the most memory allocated from the build to the last timed call
    speedup_note: str = ""  # why a speedup was withheld
    note: str = ""
    device: str = ""
    versions: Dict[str, str] = field(default_factory=dict)
    git_commit: str = ""
    timestamp: str = ""

    def key(self):
        """Identifies the same measurement across runs (for --compare)."""
        return (self.op, self.provider, self.mode, self.shape, self.dtype)

    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict) -> "Row":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class Skipped:
    """A row that was not measured, and why (GPU only, not installed, out of budget, error)."""

    op: str
    provider: str
    mode: str
    shape: str
    reason: str

    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)


def throughput(row: Row, time_ms: float) -> Optional[float]:
    """The row's headline rate at a given time per call, in the row's own unit."""
    seconds = time_ms * 1e-3
    if seconds <= 0:
        return None
    if row.flops:
        return row.flops / seconds / 1e12
    if row.bytes:
        return row.bytes / seconds / 1e9
    if row.tokens:
        return row.tokens / seconds
    return None


def unit(row: Row) -> str:
    return "TFLOP/s" if row.flops else "GB/s" if row.bytes else "tokens/s" if row.tokens else "ms"


def fill_rates(row: Row, peaks: Dict[str, float]) -> Row:
    """Derive TFLOP/s, GB/s, tokens/s and the fraction of peak from the work per call
    (no fraction when ``peaks`` is empty)."""
    seconds = row.time_ms * 1e-3
    if row.flops:
        row.tflops = row.flops / seconds / 1e12
    if row.bytes:
        row.gbps = row.bytes / seconds / 1e9
    if row.tokens:
        row.tokens_per_s = row.tokens / seconds
    if row.peak == PEAK_COPY and row.gbps and peaks.get(PEAK_COPY):
        row.fraction_of_peak = row.gbps / peaks[PEAK_COPY]
    elif row.peak == PEAK_MATMUL and row.tflops and peaks.get(PEAK_MATMUL):
        row.fraction_of_peak = row.tflops / peaks[PEAK_MATMUL]
    if row.mfu is None and row.op == "train_step" and row.fraction_of_peak is not None:
        row.mfu = row.fraction_of_peak
    return row


def fill_speedups(rows: List[Row], baseline: Union[str, Dict[str, str]]) -> List[Row]:
    """Set ``speedup = baseline time / row time`` where the baseline provider has the same case.

    ``baseline`` is one provider for every op, or a mapping op -> provider (key ``"*"``
    for the ops not named).
    """
    def baseline_of(op: str) -> Optional[str]:
        return baseline if isinstance(baseline, str) else baseline.get(op, baseline.get("*"))

    base = {(r.op, r.mode, r.shape, r.dtype): r for r in rows if r.provider == baseline_of(r.op)}
    for r in rows:
        b = base.get((r.op, r.mode, r.shape, r.dtype))
        if b is None or r.time_ms <= 0:
            continue
        r.baseline = baseline_of(r.op)
        if r.unstable or b.unstable:  # a ratio of noisy times is no fact
            r.speedup = None
            r.speedup_note = "unstable timing" if r.unstable else f"unstable {r.baseline} timing"
        else:
            r.speedup = b.time_ms / r.time_ms
            r.speedup_note = ""
    return rows
