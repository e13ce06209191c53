"""pytest-benchmark: the Hugging Face GPT-2 cases of `gptfast bench` (see gptfast/bench/suites/hf.py)."""
import pytest

from conftest import bench_device, case_id, quick, run_case
from gptfast.bench.suites import hf

DEVICE = bench_device()
CASES, _ = hf.cases(DEVICE, quick=quick())


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_hf(benchmark, case):
    run_case(benchmark, case, DEVICE)
