"""The GPU suite's summary: one markdown page, short enough for the last 12,000
characters of a run's output (what comes back from a GPU lease besides a few files).

    python -m gptfast.bench.suite_summary RESULTS_DIR --stages STAGES_TSV --out SUMMARY_MD \
        [--tuned TUNED_JSON] [--title TEXT]

Order, most needed first: what failed (stages that failed or timed out, failed check
rows, the tests stage's failed tests -- read from its log as pytest printed them, so a
stage cut short still names the failures seen so far -- benchmark cases that raised), the targets of BENCHMARKS.md (met / missed / not
measured), the check's pass counts per op and dtype, the stage table, the profile's host
syncs, the tests stage's counts, then the ``gptfast`` benchmark rows (kernel and eager
time in separate columns; unstable rows give no speedup), cut to fit (every row is in the results
archive). Reads what the stages wrote into RESULTS_DIR: ``check.json``, every bench
results file (``*.json`` with rows), ``profile/summary.json``.
"""
import argparse
import csv
import glob
import json
import os
import re
from collections import Counter
from typing import Dict, List, Optional, Sequence

from gptfast.bench import report, targets
from gptfast.bench.results import Row, Skipped, fill_speedups
from gptfast.bench.suites import BASELINES

LIMIT_CHARS = 11_000  # of the 12,000 the reply carries; the stage lines printed before it take the rest
LIST_AT_MOST = 15  # failed rows listed per kind


def read_stages(path: str) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _load_bench(results_dir: str):
    rows: List[Row] = []
    skipped: List[Skipped] = []
    metas = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as f:
            doc = json.load(f)
        if not isinstance(doc, dict) or "rows" not in doc:
            continue
        more, meta = report.load_json(path)
        rows += more
        metas.append(meta)
        skipped += [Skipped(**s) for s in doc.get("skipped", [])]
    return rows, skipped, metas


def _load(path: str) -> Optional[Dict]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


# pytest -v progress lines: "[gw3] [ 12%] FAILED tests/x.py::t" (xdist) or "tests/x.py::t FAILED [ 12%]";
# "-rf" summary lines: "FAILED tests/x.py::t - reason".
_XDIST_LINE = re.compile(r"^\[gw\d+\] \[\s*\d+%\] (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+)")
_PLAIN_LINE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_SHORT_LINE = re.compile(r"^(FAILED|ERROR) (\S+::\S+|\S+\.py)(?: - (.*))?$")
_FINAL_LINE = re.compile(r"^=+ (.*(?:passed|failed|error|skipped|no tests ran).*) in [\d.]+s")


def read_tests_log(path: str) -> Optional[Dict]:
    """What the tests stage's pytest printed (``-v -rfE``, as it went): outcome counts, the
    failed / errored test ids with a reason where the final summary gave one, and the
    final line (absent when the stage was cut short). None when there is no log."""
    if not os.path.exists(path):
        return None
    counts: Counter = Counter()
    failed: Dict[str, str] = {}
    final = None
    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            m = _XDIST_LINE.match(line)
            outcome, test = (m.group(1), m.group(2)) if m else (None, None)
            if m is None and (m := _PLAIN_LINE.match(line)):
                test, outcome = m.group(1), m.group(2)
            if outcome:
                counts[outcome] += 1
                if outcome in ("FAILED", "ERROR"):
                    failed.setdefault(f"{outcome} {test}", "")
                continue
            if m := _SHORT_LINE.match(line):
                failed[f"{m.group(1)} {m.group(2)}"] = (m.group(3) or "")[:160]
            elif m := _FINAL_LINE.match(line):
                final = m.group(1)
    return {"counts": dict(counts), "failed": failed, "final": final}


def _tests_section(tests) -> List[str]:
    if tests is None:
        return ["not run (no logs/tests.log)"]
    c = tests["counts"]
    seen = ", ".join(f"{n} {k.lower()}" for k, n in sorted(c.items())) or "no test reported"
    return [f"pytest: {tests['final']}" if tests["final"] else
            f"pytest was stopped before its end (time limit?): seen so far {seen}"]


def _failures(stages, check, skipped, tests=None) -> List[str]:
    lines = [f"- stage **{s['stage']}**: {s['status']}" + (f" ({s['note']})" if s.get("note") else "")
             for s in stages if s["status"] not in ("ok", "not available")]
    failed_tests = list((tests or {}).get("failed", {}).items())
    for test, why in failed_tests[:LIST_AT_MOST]:
        lines.append(f"- test {test}" + (f": {why}" if why else ""))
    if len(failed_tests) > LIST_AT_MOST:
        lines.append(f"- … {len(failed_tests) - LIST_AT_MOST} more failed tests (results.tar.gz: logs/tests.log)")
    failed = [r for r in (check or {}).get("results", []) if not r["passed"]]
    for r in failed[:LIST_AT_MOST]:
        lines.append(f"- check FAIL {r['op']} {r['variant']} [{r['shape']}] {r['dtype']} {r['direction']}: "
                     f"ratio {r['ratio']} {r['detail']}".rstrip())
    errors = [s for s in skipped if s.reason.startswith(("error:", "not run: STOPPED"))]
    for s in errors[:LIST_AT_MOST]:
        lines.append(f"- bench {s.op} {s.mode} {s.provider} [{s.shape}]: {s.reason}")
    hidden = max(len(failed) - LIST_AT_MOST, 0) + max(len(errors) - LIST_AT_MOST, 0)
    if hidden:
        lines.append(f"- … {hidden} more (results.tar.gz: check.json, *.json)")
    return lines


def _targets_section(rows, profile) -> List[str]:
    evaluated = targets.evaluate(rows, {"profile": profile} if profile else {})
    counts = Counter(status for _, _, status in evaluated)
    lines = [f"{counts[targets.MET]} met, {counts[targets.MISSED]} missed, "
             f"{counts[targets.NOT_MEASURED]} not measured", "", targets.markdown(rows, {"profile": profile} if profile else {})]
    return lines


def _check_section(check) -> List[str]:
    if check is None:
        return ["not run (no check.json)"]
    results = check["results"]
    passed = sum(r["passed"] and not r.get("skipped") for r in results)
    skipped = sum(bool(r.get("skipped")) for r in results)
    lines = [f"{passed}/{len(results)} passed, {len(results) - passed - skipped} failed, {skipped} skipped "
             f"on {check['device']} (error ratio limit {check['max_ratio']:g})", "",
             "| op | dtype | passed | failed |", "|---|---|---|---|"]
    groups: Dict[tuple, List[int]] = {}
    for r in results:
        counts = groups.setdefault((r["op"], r["dtype"]), [0, 0])
        counts[0 if r["passed"] else 1] += 1
    lines += [f"| {op} | {dtype} | {ok} | {bad} |" for (op, dtype), (ok, bad) in groups.items()]
    return lines


def _stages_section(stages) -> List[str]:
    lines = ["| stage | status | seconds | limit s | note |", "|---|---|---|---|---|"]
    lines += [f"| {s['stage']} | {s['status']} | {s['seconds']} | {s['limit_s']} | {s.get('note', '')} |"
              for s in stages]
    return lines


def _profile_section(profile) -> List[str]:
    if profile is None:
        return ["not run (no profile/summary.json)"]
    def ms(key):
        value = profile.get(key)
        return "n/a" if value is None else f"{value:.1f} ms"

    per_token = profile.get("host_syncs_per_token")
    return [f"{profile['what']} on {profile['device']}: wall {ms('wall_ms')}, kernels {ms('kernel_ms')}, "
            f"host gaps {ms('host_gap_ms')}, host syncs {profile['host_syncs']} "
            f"({'n/a' if per_token is None else f'{per_token:.3f}'} per generated token)"]


def _rows_section(rows, room: int) -> List[str]:
    """The gptfast rows (the others are in the archive), as many as fit in ``room`` characters."""
    ours = [r for r in rows if r.provider == "gptfast"]
    if not ours:
        return ["no gptfast rows were measured"]
    lines = ["kernel ms: CUDA-graph replay; eager ms: plain calls (whole calls for end-to-end rows); "
             "rate, % of peak and speedup from the kernel time where there is one", "",
             "| op | mode | shape | dtype | kernel ms | eager ms | rate | % of peak | speedup |",
             "|---|---|---|---|---|---|---|---|---|"]
    used = sum(len(x) + 1 for x in lines)
    for i, r in enumerate(sorted(ours, key=lambda r: (r.op, r.mode, r.shape))):
        peak = "" if r.fraction_of_peak is None else f"{r.fraction_of_peak:.0%}"
        line = (f"| {r.op} | {r.mode} | {r.shape} | {r.dtype} | {report.kernel_cell(r)} | {report.eager_cell(r)} | "
                f"{report.rate_text(r)} | {peak} | {report.speedup_text(r, ' ')} |")
        if used + len(line) + 80 > room:
            lines.append(f"\n… {len(ours) - i} more gptfast rows, and all other providers, in results.tar.gz")
            break
        lines.append(line)
        used += len(line) + 1
    return lines


def build(results_dir: str, stages_path: str, tuned_path: Optional[str] = None, title: str = "gptfast GPU suite",
          notes: Sequence[str] = ()) -> str:
    stages = read_stages(stages_path)
    rows, skipped, metas = _load_bench(results_dir)
    check = _load(os.path.join(results_dir, "check.json"))
    profile = _load(os.path.join(results_dir, "profile", "summary.json"))
    fill_speedups(rows, BASELINES)
    meta = metas[0] if metas else {}
    parts = [f"# {title}", ""] + [f"**{note}**" for note in notes] + ([""] if notes else [])
    if meta:
        parts += [report.meta_text(meta), ""]
    tuned = _load(tuned_path) if tuned_path else None
    parts += [f"Tuned table: {'written (tuned.json)' if tuned is not None else 'not written'}", ""]
    tests = read_tests_log(os.path.join(results_dir, "logs", "tests.log"))
    failures = _failures(stages, check, skipped, tests)
    parts += ["## Failures", ""] + (failures or ["none"]) + [""]
    parts += ["## Targets (BENCHMARKS.md)", ""] + _targets_section(rows, profile) + [""]
    parts += ["## Check", ""] + _check_section(check) + [""]
    parts += ["## Tests", ""] + _tests_section(tests) + [""]
    parts += ["## Stages", ""] + _stages_section(stages) + [""]
    parts += ["## Profile", ""] + _profile_section(profile) + [""]
    text = "\n".join(parts)
    rows_part = "\n".join(["## gptfast rows", ""] + _rows_section(rows, LIMIT_CHARS - len(text) - 40))
    return (text + "\n" + rows_part + "\n")[: LIMIT_CHARS + 200]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results_dir")
    parser.add_argument("--stages", required=True, help="the suite's stages.tsv")
    parser.add_argument("--out", required=True, help="where to write summary.md")
    parser.add_argument("--tuned", help="the tune stage's table, if written")
    parser.add_argument("--title", default="gptfast GPU suite")
    parser.add_argument("--note", action="append", default=[], help="a line shown under the title (repeatable)")
    args = parser.parse_args(argv)
    text = build(args.results_dir, args.stages, args.tuned, args.title, args.note)
    with open(args.out, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
