"""pytest-benchmark: the decode_attention cases of `gptfast bench` (see gptfast/bench/suites/decode.py)."""
import pytest

from conftest import bench_device, case_id, quick, run_case
from gptfast.bench.suites import decode

DEVICE = bench_device()
CASES, _ = decode.cases(DEVICE, quick=quick())


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_decode(benchmark, case):
    run_case(benchmark, case, DEVICE)
