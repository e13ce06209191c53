"""Warm Triton's cache before a GPU run: compile every kernel the check and benchmark
stages will launch, in parallel processes, into one ``TRITON_CACHE_DIR``.

    python -m gptfast.bench.warm --jobs 16 [--device cuda] [--e2e] [--tune] [--compile]

A kernel compiles the first time it is launched with a new specialisation (dtype,
constexprs, divisibility of its integer arguments), a second or more of CPU each; the
quick check grid alone launches about 60. Run one after another inside the check and
benchmark stages, those compiles would eat the stages' time limits. Here the tasks --
every case of ``gptfast check --quick`` (all dtypes) and one call of every ``gptfast``
case of the kernel suite (and, with ``--e2e``, of the end-to-end suite) -- are dealt
round-robin to ``--jobs`` worker processes, which run each once: the compiled kernels
land in the shared cache (``TRITON_CACHE_DIR``, which the caller sets for every
stage), and the later stages find them there. The shapes are the stages' own, so the
cache keys match. ``--tune`` adds every tuning candidate of ``gptfast.tune`` (on its
``--quick`` shapes, ``gptfast.tune.warm_tasks``), so the tune stage only times;
``--compile`` adds the end-to-end suite's compiled cases (``torch.compile``, ``gptfast+compile``) (one build and two
calls each), whose compiled graphs land in inductor's cache (``TORCHINDUCTOR_CACHE_DIR``)
for the benchmark stages. Those take longest, so they are dealt first.

Timings and results here mean nothing and are not kept. A worker stops at its first
CUDA error (the context is broken); the others go on. The exit status is 1 when any
task failed, so the suite's table shows it; the later stages run regardless.
"""
import argparse
import os
import subprocess
import sys
import time
from typing import Callable, List, Tuple

Task = Tuple[str, Callable[[], object]]


def _check_tasks(device) -> List[Task]:
    from gptfast import checker

    return [(f"check {c.label()}", c.run) for c in checker.build_cases(device, quick=True) if c.op != "sampler"]


def _bench_tasks(device, suite: str) -> List[Task]:
    from gptfast.bench import suites
    from gptfast.bench.harness import synchronize

    def once(case):
        def run():
            fn, sets = case.build()
            fn(sets[0])
            synchronize(device)
        return run

    cases, _ = suites.collect(suite, device, quick=True)
    return [(f"bench {c.label()}", once(c)) for c in cases if c.provider == "gptfast"]


def _compile_tasks(device) -> List[Task]:
    from gptfast.bench import suites
    from gptfast.bench.harness import synchronize

    def twice(case):
        def run():
            fn, sets = case.build()
            for i in range(2):
                fn(sets[i % len(sets)])
            synchronize(device)
        return run

    cases, _ = suites.collect("e2e", device, quick=True)
    return [(f"compile {c.label()}", twice(c)) for c in cases if c.provider in ("torch.compile", "gptfast+compile")]


def _tune_tasks(device) -> List[Task]:
    from gptfast import tune

    import torch

    # On the CPU, the tune stage's dry run: its tiny shapes and two candidates.
    return tune.warm_tasks(device, dry_run=torch.device(device).type != "cuda")


def tasks(device, e2e: bool = False, tune: bool = False, compile: bool = False) -> List[Task]:
    """Every warm-up task, in the same order in every process: the long compiles first."""
    return ((_compile_tasks(device) if compile else []) + _check_tasks(device) + (_tune_tasks(device) if tune else [])
            + _bench_tasks(device, "kernels") + (_bench_tasks(device, "e2e") if e2e else []))


def run_worker(device, index: int, jobs: int, e2e: bool, tune: bool = False, compile: bool = False) -> int:
    """Run tasks ``index``, ``index + jobs``, ...; one line per task. Returns the failures."""
    from gptfast.runtime.cuda_errors import is_cuda_error, short_error, stop_message
    from gptfast.bench.runner import SkipCase

    mine = tasks(device, e2e, tune, compile)[index::jobs]
    failed = 0
    for i, (label, run) in enumerate(mine):
        started = time.perf_counter()
        try:
            run()
            verdict = "ok"
        except SkipCase as exc:
            verdict = f"skipped ({exc})"
        except Exception as exc:
            failed += 1
            if is_cuda_error(exc):
                print(f"warm[{index}] {stop_message(label, exc, len(mine) - i - 1)}", flush=True)
                return failed
            verdict = f"FAILED {short_error(exc)}"
        print(f"warm[{index}] {verdict} {label} ({time.perf_counter() - started:.1f} s)", flush=True)
    return failed


def run_parallel(device: str, jobs: int, e2e: bool, tune: bool = False, compile: bool = False) -> int:
    """Start ``jobs`` worker processes (each its own CUDA context) and wait for all."""
    started = time.perf_counter()
    flags = [flag for flag, on in (("--e2e", e2e), ("--tune", tune), ("--compile", compile)) if on]
    command = [sys.executable, "-m", "gptfast.bench.warm", "--device", device] + flags
    # The workers share this process group: `timeout` and Ctrl-C reach them as well.
    workers = [subprocess.Popen(command + ["--jobs", str(jobs), "--worker", str(i)]) for i in range(jobs)]
    codes = [w.wait() for w in workers]
    bad = sum(code != 0 for code in codes)
    print(f"warm: {jobs} worker(s), {bad} with failures, {time.perf_counter() - started:.0f} s; "
          f"TRITON_CACHE_DIR={os.environ.get('TRITON_CACHE_DIR', '(triton default)')}", flush=True)
    return 1 if bad else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes (default: CPU count)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--e2e", action="store_true", help="also the fused end-to-end cases (model compiles)")
    parser.add_argument("--tune", action="store_true", help="also every tuning candidate of gptfast.tune")
    parser.add_argument("--compile", action="store_true", help="also the end-to-end torch.compile cases")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":  # the check cases run the interpreter there, as `gptfast check` does
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.worker is None:
        return run_parallel(device, args.jobs, args.e2e, args.tune, args.compile)
    return 1 if run_worker(torch.device(device), args.worker, args.jobs, args.e2e, args.tune, args.compile) else 0


if __name__ == "__main__":
    sys.exit(main())
