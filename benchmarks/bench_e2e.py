"""pytest-benchmark: the end-to-end (prefill, decode, training step) cases of `gptfast bench` (see gptfast/bench/suites/e2e.py)."""
import pytest

from conftest import bench_device, case_id, quick, run_case
from gptfast.bench.suites import e2e

DEVICE = bench_device()
CASES, _ = e2e.cases(DEVICE, quick=quick())


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_e2e(benchmark, case):
    run_case(benchmark, case, DEVICE)
