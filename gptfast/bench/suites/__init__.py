"""The benchmark suites. Each module's ``cases(device, quick)`` returns the cases to
measure and the rows it skips outright (with the reason). The kernel suite has one
module per op of ``gptfast.ops.registry`` (named after the op), plus the sampler step."""
import importlib
from typing import List, Tuple

from gptfast.bench.results import Skipped
from gptfast.bench.runner import Case
from gptfast.ops import registry

SUITES = {
    "kernels": registry.NAMES + ("sampler",),
    "e2e": ("e2e",),
    "hf": ("hf",),
    "overhead": ("overhead",),
}
SUITES["all"] = SUITES["kernels"] + SUITES["e2e"] + SUITES["hf"]  # overhead: its own run (host time)

# Speedups are reported against these providers (see results.fill_speedups).
BASELINES = {"*": "torch", "decode": "hf", "sampler_step": "python-twin", "hf_gpt2": "sdpa", "overhead": "x.add(1)"}


def collect(suite: str, device, quick: bool = False) -> Tuple[List[Case], List[Skipped]]:
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose one of {sorted(SUITES)}")
    cases: List[Case] = []
    skipped: List[Skipped] = []
    for name in SUITES[suite]:
        module = importlib.import_module(f"gptfast.bench.suites.{name}")
        more_cases, more_skipped = module.cases(device, quick)
        cases += more_cases
        skipped += more_skipped
    return cases, skipped
