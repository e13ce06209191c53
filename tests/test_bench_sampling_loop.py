"""benchmarks/bench_sampling_loop.py runs end to end on a small shape (numbers not judged)."""
import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from gptfast.runtime.extension import load_extension  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_sampling_loop.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_sampling_loop", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(load_extension() is None, reason="the C++ sampling extension is not built")
def test_end_to_end_rows_cover_every_engine_with_identical_greedy_tokens(bench):
    hf, ours = bench.build_models("4x256-bytes", torch.device("cpu"), torch.float32)
    rows = bench.measure_end_to_end(hf, ours, batch=2, prompt_len=5, new_tokens=4, device=torch.device("cpu"),
                                    repeats=1)  # asserts identical greedy tokens itself
    names = [name for name, *_ in rows]
    assert names[:2] == ["gptfast C++ loop", "gptfast Python loop"] and names[-1] == "HF generate"
    for _, tokens_per_s, ms_per_step, overhead in rows:
        assert tokens_per_s > 0 and ms_per_step > 0 and overhead == overhead  # finite, not NaN


@pytest.mark.skipif(load_extension() is None, reason="the C++ sampling extension is not built")
def test_stub_overhead_reports_both_loops(bench):
    cost = bench.measure_stub_overhead(batch=2, new_tokens=4, device=torch.device("cpu"), sampled=True, repeats=1)
    assert set(cost) == {"cpp", "python"} and all(v > 0 for v in cost.values())
