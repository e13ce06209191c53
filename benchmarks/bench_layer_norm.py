"""pytest-benchmark: the layer_norm cases of `gptfast bench` (see gptfast/bench/suites/layer_norm.py)."""
import pytest

from conftest import bench_device, case_id, quick, run_case
from gptfast.bench.suites import layer_norm

DEVICE = bench_device()
CASES, _ = layer_norm.cases(DEVICE, quick=quick())


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_layer_norm(benchmark, case):
    run_case(benchmark, case, DEVICE)
