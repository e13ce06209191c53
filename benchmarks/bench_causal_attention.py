"""pytest-benchmark: the causal_attention cases of `gptfast bench` (see gptfast/bench/suites/causal_attention.py)."""
import pytest

from conftest import bench_device, case_id, quick, run_case
from gptfast.bench.suites import causal_attention

DEVICE = bench_device()
CASES, _ = causal_attention.cases(DEVICE, quick=quick())


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_causal_attention(benchmark, case):
    run_case(benchmark, case, DEVICE)
