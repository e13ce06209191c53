"""`gptfast profile`: a Perfetto-readable trace with the named ranges, a table and a summary."""
import json

import pytest
import torch

from gptfast import cli, profiling
from gptfast.ops import registry


def _trace_names(path):
    with open(path) as f:
        trace = json.load(f)  # Chrome trace format: what Perfetto and chrome://tracing read
    assert isinstance(trace["traceEvents"], list)
    return {event.get("name") for event in trace["traceEvents"]}


def test_profile_generate_writes_a_trace_with_the_generation_ranges(tmp_path, capsys):
    out = tmp_path / "prof"
    code = cli.main(["profile", "generate", "--device", "cpu", "--prompt-len", "4", "--new-tokens", "6",
                     "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert {"prefill", "decode", "sample"} <= _trace_names(out / "trace.json")
    assert (out / "key_averages.txt").read_text().strip()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["generated_tokens"] == 6 and summary["active_steps"] == 1
    assert summary["phases"]["prefill"]["count"] == 1 and summary["phases"]["decode"]["host_ms"] > 0
    assert summary["host_syncs_per_token"] == pytest.approx(summary["host_syncs"] / 6)
    assert summary["kernel_ms"] is None  # CPU: no device kernels to set against host gaps
    assert "host syncs per generated token" in printed and "time per phase" in printed


def test_profile_op_records_forward_and_backward(tmp_path):
    summary = profiling.profile_op("layer_norm", str(tmp_path), device="cpu", warmup=1, active=2)
    assert summary.phases["forward"].count == 2 and summary.phases["backward"].count == 2
    assert {"forward", "backward"} <= _trace_names(summary.trace)


def test_union_of_kernel_intervals():
    assert profiling._union_ms([]) == 0.0
    # [0, 10] and [5, 20] overlap into 20 us; [30, 35] adds 5 us; times are in us, result in ms.
    assert profiling._union_ms([(5, 20), (0, 10), (30, 35)]) == pytest.approx(0.025)


def test_a_failing_step_stops_the_profiler_and_propagates(tmp_path):
    def step():
        raise RuntimeError("step failed")

    with pytest.raises(RuntimeError, match="step failed"):
        profiling.profile_steps(step, what="x", device="cpu", out_dir=str(tmp_path))
    assert not torch.autograd.profiler._is_profiler_enabled


def test_profile_rejects_bad_arguments(capsys):
    assert cli.main(["profile", "op"]) == 2
    assert "needs an op name" in capsys.readouterr().err
    assert cli.main(["profile", "op", "softmax"]) == 2
    assert "unknown op" in capsys.readouterr().err
    assert cli.main(["profile", "generate", "layer_norm"]) == 2
    assert cli.main(["profile", "generate", "--new-tokens", "0"]) == 2


@pytest.mark.parametrize("name", registry.NAMES)
def test_every_registry_op_can_be_profiled(name, tmp_path):
    summary = profiling.profile_op(name, str(tmp_path), device="cpu", warmup=0, active=1)
    assert summary.phases["forward"].count == 1
    assert ("backward" in summary.phases) == bool(registry.get(name).grad_inputs)
