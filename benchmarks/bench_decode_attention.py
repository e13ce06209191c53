"""pytest-benchmark: the decode_attention cases of `gptfast bench` (see gptfast/bench/suites/decode_attention.py)."""
import pytest

from conftest import bench_device, case_id, quick, run_case
from gptfast.bench.suites import decode_attention

DEVICE = bench_device()
CASES, _ = decode_attention.cases(DEVICE, quick=quick())


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_decode_attention(benchmark, case):
    run_case(benchmark, case, DEVICE)
