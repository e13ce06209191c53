"""``gptfast bench``: run a benchmark suite and report it (table, JSON, CSV, plots, Δ%)."""
import sys

from gptfast.commands import sigterm_as_interrupt


def register(subparsers):
    p = subparsers.add_parser(
        "bench", help="run the kernel / end-to-end benchmark suites",
        description="Time gptfast's fused ops and end-to-end paths against torch, the reference twins, "
                    "torch.compile and HF transformers. Without CUDA it runs what is meaningful on the CPU "
                    "and lists the GPU-only rows it skipped.",
    )
    p.add_argument("--suite", choices=["kernels", "e2e", "hf", "overhead", "all"], default="kernels")
    p.add_argument("--quick", action="store_true", help="a smaller grid (minutes on a GPU)")
    p.add_argument("--json", metavar="FILE", help="write rows, skipped rows and run metadata as JSON")
    p.add_argument("--csv", metavar="FILE", help="write rows as CSV")
    p.add_argument("--plot", metavar="DIR", help="write one PNG per op/mode/shape family")
    p.add_argument("--compare", metavar="OLD_JSON", help="add a Δ%% column against an earlier --json file")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--ops", help="comma-separated ops to keep (e.g. layer_norm,decode_attention)")
    p.add_argument("--providers", help="comma-separated providers to keep (e.g. gptfast,torch)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting new cases after this many seconds (least important cases are cut first)")
    p.add_argument("--from-json", nargs="+", metavar="FILE",
                   help="do not run anything: report rows from earlier --json files (with the targets table)")
    p.add_argument("--profile-summary", metavar="FILE",
                   help="with --from-json: a `gptfast profile` summary JSON for the host-syncs target")
    p.add_argument("-v", "--verbose", action="store_true", help="print each case as it is measured")
    p.set_defaults(func=run)


def _keep(items, csv_names):
    if not csv_names:
        return items
    wanted = {name.strip() for name in csv_names.split(",") if name.strip()}
    return [c for c in items if c.op in wanted or c.provider in wanted]


def report_saved(paths, profile_summary=None) -> int:
    """Print the tables and the targets of earlier result files."""
    import json

    from gptfast.bench import report, targets

    all_rows = []
    for path in paths:
        rows, meta = report.load_json(path)
        print(f"\n## {path}\n\n{report.meta_text(meta)}\n")
        print(report.markdown_table(rows))
        all_rows += rows
    extra = {}
    if profile_summary:
        with open(profile_summary) as f:
            extra["profile"] = json.load(f)
    print("\n## Targets\n")
    print(targets.markdown(all_rows, extra))
    return 0


def _measure(args, device):
    """Measure the suite's cases: (run metadata, rows, skipped rows). With ``--json`` the
    file is rewritten after every case, so a run killed outright still leaves its rows."""
    from gptfast.bench import environment, report, runner, suites

    # `timeout` sends SIGTERM: stop measuring and still write what was measured.
    with sigterm_as_interrupt():
        print(f"measuring {device} peaks (copy bandwidth, matmul rate)...", file=sys.stderr)
        meta = environment.run_metadata(device, environment.measure_peaks(device))
        cases, skipped = suites.collect(args.suite, device, args.quick)
        cases = _keep(_keep(cases, args.ops), args.providers)
        skipped = _keep(_keep(skipped, args.ops), args.providers)
        if not cases and (args.ops or args.providers or not skipped):  # all skipped here (GPU only): a report
            raise ValueError("no benchmark case matches --ops/--providers")
        log = (lambda line: print(line, file=sys.stderr, flush=True)) if args.verbose else None
        print(f"{len(cases)} cases on {meta['device']}"
              + (f", budget {args.budget_s:.0f} s" if args.budget_s else "") + "...", file=sys.stderr)
        save = None
        if args.json:
            def save(rows, more_skipped):
                report.write_json(args.json, report.results_document(rows, skipped + more_skipped, meta))
        rows, more_skipped = runner.run_cases(cases, device, meta, budget_s=args.budget_s, log=log, progress=save)
    return meta, rows, skipped + more_skipped


def _print_report(args, device, meta, rows, skipped, deltas) -> None:
    from gptfast.bench import report, targets

    print(f"\n# gptfast bench --suite {args.suite}{' --quick' if args.quick else ''}\n")
    print(report.meta_text(meta) + "\n")
    print(report.markdown_table(rows, deltas) if rows else "(no rows were measured)")
    if device.type == "cuda":
        print("\n## Targets\n\n" + targets.markdown(rows))
    if skipped:
        print(f"\n## Skipped ({len(skipped)} rows)\n")
        print(report.skipped_text(skipped))
        if device.type != "cuda":
            print("\n(no CUDA device here: the rows marked 'GPU only' need one; see BENCHMARKS.md)")


def _write_files(args, meta, rows, skipped, deltas) -> None:
    from gptfast.bench import report

    if args.json:
        report.write_json(args.json, report.results_document(rows, skipped, meta, deltas, args.compare))
        print(f"\nwrote {args.json}")
    if args.csv:
        report.write_csv(args.csv, rows)
        print(f"wrote {args.csv}")
    if args.plot:
        paths = report.write_plots(rows, args.plot)
        print(f"wrote {len(paths)} plot(s) to {args.plot}")


def run(args) -> int:
    from gptfast.runtime.atomic_files import check_output_file

    for flag, path in (("--json", args.json), ("--csv", args.csv)):
        if path:
            check_output_file(path, flag)  # before hours of measuring, not after
    if args.from_json:
        return report_saved(args.from_json, args.profile_summary)

    import torch

    from gptfast.bench import environment, report, results, suites
    from gptfast.runtime.cuda_errors import STOPPED

    device = torch.device(args.device) if args.device else environment.default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but CUDA is not available")
    if args.budget_s is not None and args.budget_s <= 0:
        raise ValueError(f"--budget-s must be positive, got {args.budget_s}")
    old_rows = report.load_json(args.compare)[0] if args.compare else None  # fail early on a bad file
    meta, rows, skipped = _measure(args, device)
    results.fill_speedups(rows, suites.BASELINES)
    deltas = report.compare(rows, old_rows) if old_rows is not None else None
    _print_report(args, device, meta, rows, skipped, deltas)
    _write_files(args, meta, rows, skipped, deltas)
    stopped = next((s for s in skipped if STOPPED in s.reason), None)
    if stopped is not None:
        print(f"\ngptfast bench: {stopped.reason}", file=sys.stderr)
    errors = [s for s in skipped if s.reason.startswith("error:")]
    if errors:
        print(f"\n{len(errors)} case(s) failed with an error (listed under Skipped)", file=sys.stderr)
    return 1 if errors else 0
