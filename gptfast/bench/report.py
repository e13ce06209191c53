"""Presenting result rows: markdown tables, JSON and CSV files, PNG plots, and Δ% against an earlier run."""
import csv
import json
import math
import os
import re
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from gptfast.bench.results import SCHEMA_VERSION, Row, Skipped, throughput, unit

# ---------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------

CSV_COLUMNS = (
    "op", "provider", "mode", "shape", "dtype", "time_ms", "p20_ms", "p80_ms", "kernel_ms", "eager_ms",
    "eager_p20_ms", "eager_p80_ms", "unstable", "peak_mem_mb", "tflops", "gbps", "tokens_per_s", "mfu", "fraction_of_peak",
    "peak", "speedup", "baseline", "speedup_note", "method", "note", "device", "versions", "git_commit",
    "timestamp",
)


def results_document(rows: Sequence[Row], skipped: Sequence[Skipped], meta: Dict,
                     deltas: Optional[Dict] = None, compared_with: Optional[str] = None) -> Dict:
    doc = {
        "schema_version": SCHEMA_VERSION,
        "meta": meta,
        "rows": [r.to_dict() for r in rows],
        "skipped": [s.to_dict() for s in skipped],
    }
    if deltas is not None:
        doc["compare"] = {
            "against": compared_with,
            "rows": [
                {"op": k[0], "provider": k[1], "mode": k[2], "shape": k[3], "dtype": k[4], **v}
                for k, v in deltas.items()
            ],
        }
    return doc


def _ensure_parent(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)


def write_json(path: str, doc: Dict) -> None:
    _ensure_parent(path)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False)
    os.replace(tmp, path)  # a reader never sees half a file


def load_json(path: str) -> Tuple[List[Row], Dict]:
    """Rows and meta of a file written by ``write_json``; clear errors for anything else."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"benchmark results file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise ValueError(f"{path} is not a gptfast bench results file (no 'rows' list)")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path} has schema_version {doc.get('schema_version')!r}; this gptfast reads {SCHEMA_VERSION}")
    return [Row.from_dict(r) for r in doc["rows"]], doc.get("meta", {})


def write_csv(path: str, rows: Sequence[Row]) -> None:
    _ensure_parent(path)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            d = r.to_dict()
            d["versions"] = " ".join(f"{k}={v}" for k, v in r.versions.items())
            writer.writerow({k: ("" if d.get(k) is None else d.get(k)) for k in CSV_COLUMNS})


# ---------------------------------------------------------------------------------
# Comparison with an earlier run
# ---------------------------------------------------------------------------------


def compare(rows: Sequence[Row], old_rows: Sequence[Row]) -> "OrderedDict":
    """For every row also present in ``old_rows``: old and new median time and
    ``delta_pct = (new / old - 1) * 100`` (negative: faster now)."""
    old = {r.key(): r for r in old_rows}
    deltas = OrderedDict()
    for r in rows:
        before = old.get(r.key())
        if before is None or not before.time_ms or before.time_ms <= 0:
            continue
        deltas[r.key()] = {
            "old_time_ms": before.time_ms,
            "new_time_ms": r.time_ms,
            "delta_pct": (r.time_ms / before.time_ms - 1.0) * 100.0,
        }
    return deltas


# ---------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------


def _fmt(value, spec: str = ".3g") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return format(value, spec)


def _rate(value: float, unit_name: str) -> str:
    return f"{value:,.1f} {unit_name}" if value >= 100 else f"{value:.3g} {unit_name}"


def rate_text(row: Row) -> str:
    """The row's headline rate; tokens/s as well when a row has both (training steps)."""
    rate = throughput(row, row.time_ms)
    if rate is None:
        return ""
    text = _rate(rate, unit(row))
    if row.tokens and unit(row) != "tokens/s":
        text = _rate(row.tokens / (row.time_ms * 1e-3), "tokens/s") + ", " + text
    return text


def kernel_cell(row: Row) -> str:
    """The kernel (CUDA-graph replay) time, or empty: never the eager time in its place."""
    return _fmt(row.kernel_ms, ".4g")


def eager_cell(row: Row) -> str:
    """The eager (plain calls) time; rows timed only as whole calls (no kernel time) show
    their time here."""
    return _fmt(row.eager_ms if row.eager_ms is not None else (row.time_ms if row.kernel_ms is None else None),
                ".4g")


def speedup_text(row: Row, vs: str = " vs ") -> str:
    """The speedup, or why there is none (an unstable timing: no ratio printed as a fact)."""
    if row.speedup is not None:
        if row.op == "overhead":  # a cost in units of the trivial op's: "7.1× x.add(1)"
            return f"{1 / row.speedup:.1f}× {row.baseline}"
        return f"{row.speedup:.2f}×{vs}{row.baseline}"
    return f"none: {row.speedup_note}" if row.speedup_note else ""


def markdown_table(rows: Sequence[Row], deltas: Optional[Dict] = None) -> str:
    """One table of all rows, grouped by op and mode, providers side by side per shape.

    ``kernel ms``: CUDA-graph replay; ``eager ms``: plain calls (or the whole call, for
    rows with no kernel time); ``p20–p80`` belongs to the time the rate comes from (the
    kernel time where there is one); ``unstable`` marks a wide spread."""
    header = ["op", "mode", "shape", "dtype", "provider", "kernel ms", "eager ms", "p20–p80 ms", "rate",
              "% of peak", "speedup"]
    memory = any(r.peak_mem_mb is not None for r in rows)  # CUDA rows only
    if memory:
        header.append("peak MiB")
    if deltas is not None:
        header.append("Δ% time")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    order = sorted(rows, key=lambda r: (r.op, r.mode, r.group, r.size if r.size is not None else 0, r.shape, r.dtype, r.provider))
    for r in order:
        spread = f"{_fmt(r.p20_ms, '.4g')}–{_fmt(r.p80_ms, '.4g')}" + (" unstable" if r.unstable else "")
        cells = [
            r.op, r.mode, r.shape, r.dtype, r.provider, kernel_cell(r), eager_cell(r), spread, rate_text(r),
            _fmt(None if r.fraction_of_peak is None else 100 * r.fraction_of_peak, ".1f"), speedup_text(r),
        ]
        if memory:
            cells.append(_fmt(r.peak_mem_mb, ",.0f"))
        if deltas is not None:
            d = deltas.get(r.key())
            cells.append("new" if d is None else f"{d['delta_pct']:+.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def skipped_text(skipped: Sequence[Skipped]) -> str:
    """Skipped rows, one line per reason with the cases it covers (so 80 GPU-only rows are one line)."""
    by_reason: "OrderedDict[str, List[Skipped]]" = OrderedDict()
    for s in skipped:
        by_reason.setdefault(s.reason, []).append(s)
    lines = []
    for reason, items in by_reason.items():
        what = sorted({f"{s.op} {s.mode} {s.provider}" for s in items})
        shown = ", ".join(what[:6]) + (f", … ({len(what) - 6} more)" if len(what) > 6 else "")
        lines.append(f"- {len(items)} row(s) skipped — {reason}: {shown}")
    return "\n".join(lines)


def meta_text(meta: Dict) -> str:
    peaks = meta.get("peaks", {})
    v = meta.get("versions", {})
    parts = [
        f"device: {meta.get('device', '?')}",
        " ".join(f"{k} {val}" for k, val in v.items()),
        f"commit {meta.get('git_commit', '?')}",
        meta.get("timestamp", ""),
    ]
    if peaks:
        parts.append(
            f"measured peaks: copy {peaks.get('copy_gbps', 0):,.0f} GB/s, "
            f"{peaks.get('matmul_dtype', '')} matmul {peaks.get('matmul_tflops', 0):.4g} TFLOP/s"
        )
    if meta.get("load_avg_1m") is not None:
        end = meta.get("load_avg_1m_end")
        parts.append(f"1-min load average {meta['load_avg_1m']:.2f}"
                     + (f" (start), {end:.2f} (end)" if end is not None else "")
                     + f" on {meta.get('cpu_count', '?')} cores")
    text = " | ".join(p for p in parts if p)
    warning = load_warning(meta)
    return text + ("\n\n" + warning if warning else "")


def load_warning(meta: Dict) -> str:
    """A warning line when the host was loaded while measuring (the 1-minute load average,
    at the start or the end of the run, above the core count), else empty."""
    cores = meta.get("cpu_count")
    loads = [meta.get(k) for k in ("load_avg_1m", "load_avg_1m_end") if meta.get(k) is not None]
    if not cores or not loads or max(loads) <= cores:
        return ""
    return (f"WARNING: the machine was loaded while measuring (1-minute load average {max(loads):.2f} > "
            f"{cores} cores): host-side times are unreliable; rows marked unstable give no speedup")


# ---------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------


def _file_name(group: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", group).strip("_") or "plot"


def plot_groups(rows: Iterable[Row]) -> "OrderedDict[str, List[Row]]":
    groups: "OrderedDict[str, List[Row]]" = OrderedDict()
    for r in rows:
        if r.group and r.size is not None and throughput(r, r.time_ms) is not None:
            groups.setdefault(r.group, []).append(r)
    return groups


def write_plots(rows: Sequence[Row], directory: str) -> List[str]:
    """One PNG per row group: rate against size, a line per provider with its p20–p80 band."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    written = []
    for group, members in plot_groups(rows).items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        providers = OrderedDict()
        for r in sorted(members, key=lambda r: r.size):
            providers.setdefault(r.provider, []).append(r)
        for provider, series in providers.items():
            xs = [r.size for r in series]
            mid = [throughput(r, r.time_ms) for r in series]
            # A shorter time is a higher rate: p20 time gives the band's top.
            high = [throughput(r, r.p20_ms) for r in series]
            low = [throughput(r, r.p80_ms) for r in series]
            (line,) = ax.plot(xs, mid, marker="o", label=provider)
            ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        sizes = sorted({r.size for r in members})
        if len(sizes) > 1 and sizes[0] > 0 and sizes[-1] / sizes[0] >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xticks(sizes)
        ax.set_xticklabels([f"{s:g}" for s in sizes])
        ax.set_xlabel(members[0].size_name or "size")
        ax.set_ylabel(unit(members[0]))
        ax.set_title(group)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(directory, _file_name(group) + ".png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
