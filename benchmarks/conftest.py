"""pytest-benchmark entry points for gptfast's benchmark suites.

    pytest benchmarks/ --benchmark-json out.json            # everything (the GPU grid on CUDA)
    GPTFAST_BENCH_QUICK=1 pytest benchmarks/bench_layer_norm.py
    pytest benchmarks/ --benchmark-compare --benchmark-compare-fail=median:10%   # a regression gate

The cases are those of ``gptfast bench`` (gptfast/bench/suites), so both tools measure
the same shapes and providers; a case that cannot run here (the fused kernels without
CUDA, an optional package that is not installed) is skipped with the reason.

pytest-benchmark times wall clock. On CUDA each round is ``flush L2 -> synchronize``
(untimed setup), then ``call -> synchronize`` (timed), so a round includes one launch
and one synchronisation: for kernels of a few microseconds that overhead matters, and
``gptfast bench`` (CUDA events, CUDA-graph replay) is the precise instrument.
These files are not part of the test suite (``pytest`` alone collects tests/ only).
"""
import itertools
import os
import sys

import pytest

try:
    import gptfast  # noqa: F401
except ImportError:  # a source checkout that is not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from gptfast.bench import harness
from gptfast.bench.results import Row, fill_rates
from gptfast.bench.runner import SkipCase


def pytest_collect_file(file_path, parent):
    """Collect ``bench_*.py`` (pytest's default pattern is ``test_*.py``; files named on the
    command line are collected by pytest itself)."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def bench_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def quick() -> bool:
    return os.environ.get("GPTFAST_BENCH_QUICK", "0") == "1"


def case_id(case) -> str:
    return f"{case.op}-{case.mode}-{case.provider}-{case.shape}-{case.dtype}".replace(" ", "_")


def run_case(benchmark, case, device):
    """Time one suite case with pytest-benchmark; skip it where it cannot run. The warm-up
    and the number of rounds are the harness's (``gptfast.bench.harness``)."""
    try:
        fn, sets = case.build()
    except SkipCase as exc:
        pytest.skip(str(exc))
    cuda = device.type == "cuda"
    flush = harness.l2_flush_buffer(device) if cuda else None
    per_call_ms = harness.warm_up(fn, sets, case.warmup, device)  # JIT compiles, autotuning, torch.compile
    rounds = harness.rep_count(per_call_ms, case.target_ms, case.min_reps, case.max_reps)
    inputs = itertools.cycle(sets)

    def setup():
        if cuda:
            flush.zero_()
        harness.synchronize(device)
        return (next(inputs),), {}

    def target(x):
        out = fn(x)
        harness.synchronize(device)
        return out

    benchmark.pedantic(target, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)
    median_ms = benchmark.stats.stats.median * 1e3
    row = fill_rates(Row(case.op, case.provider, case.mode, case.shape, case.dtype, median_ms, median_ms, median_ms,
                         flops=case.flops, bytes=case.bytes, tokens=case.tokens), {})
    benchmark.extra_info.update({
        "op": case.op, "provider": case.provider, "mode": case.mode, "shape": case.shape, "dtype": case.dtype,
        "tflops": row.tflops, "gbps": row.gbps, "tokens_per_s": row.tokens_per_s,
    })
