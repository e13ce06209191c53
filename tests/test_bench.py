"""The benchmark harness, result rows, reports and `gptfast bench` (CPU; no speed targets asserted)."""
import csv
import json
import time

import pytest
import torch

from gptfast import cli
from gptfast.bench import environment, harness, report, results, runner, suites, targets
from gptfast.bench.results import Row, Skipped

REQUIRED_ROW_FIELDS = {
    "op": str, "provider": str, "mode": str, "shape": str, "dtype": str, "time_ms": float, "p20_ms": float,
    "p80_ms": float, "device": str, "versions": dict, "git_commit": str, "timestamp": str, "method": str,
}
OPTIONAL_NUMBER_FIELDS = ("tflops", "gbps", "tokens_per_s", "fraction_of_peak", "speedup", "mfu")


# ---- timing statistics --------------------------------------------------------------------


def test_percentile_interpolates_between_order_statistics():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert harness.percentile(values, 50) == 3.0
    assert harness.percentile(values, 0) == 1.0 and harness.percentile(values, 100) == 5.0
    assert harness.percentile(values, 20) == pytest.approx(1.8)
    assert harness.percentile(values, 80) == pytest.approx(4.2)
    with pytest.raises(ValueError, match="empty"):
        harness.percentile([], 50)
    with pytest.raises(ValueError, match="q must be in"):
        harness.percentile(values, 120)


def test_sleep_is_timed_within_generous_bounds_and_input_sets_rotate():
    calls = []

    def sleep_10ms(inputs):
        calls.append(inputs)
        time.sleep(0.010)

    timing = harness.time_call(sleep_10ms, ["a", "b", "c"], device="cpu", warmup=2, target_ms=60, min_reps=5,
                               max_reps=8)
    assert timing.method == harness.WALL_CLOCK
    assert 5 <= len(timing.samples_ms) <= 8
    # A sleep never returns early; a loaded machine may make it late, but not by seconds.
    assert 9.5 <= timing.median_ms <= 500
    assert timing.p20_ms <= timing.median_ms <= timing.p80_ms
    assert min(timing.samples_ms) >= 9.5
    assert {"a", "b", "c"} <= set(calls)  # every input set was used


def test_repetitions_adapt_to_the_call_duration():
    fast = harness.time_call(lambda _: None, device="cpu", warmup=1, target_ms=5, min_reps=3, max_reps=40)
    slow = harness.time_call(lambda _: time.sleep(0.02), device="cpu", warmup=1, target_ms=5, min_reps=3, max_reps=40)
    assert len(fast.samples_ms) == 40 and len(slow.samples_ms) == 3


def test_time_call_rejects_bad_arguments():
    with pytest.raises(ValueError, match="input_sets must not be empty"):
        harness.time_call(lambda _: None, [], device="cpu")
    with pytest.raises(ValueError, match="warmup"):
        harness.time_call(lambda _: None, device="cpu", warmup=0)


# ---- rows, rates, speedups, budget ------------------------------------------------------


def _row(provider="gptfast", time_ms=2.0, **kw):
    base = dict(op="layer_norm", provider=provider, mode="fwd", shape="16384x768", dtype="bfloat16", time_ms=time_ms,
                p20_ms=time_ms * 0.9, p80_ms=time_ms * 1.1, group="layer_norm fwd", size=768, size_name="hidden")
    base.update(kw)
    return Row(**base)


def test_rates_fraction_of_peak_and_speedup():
    peaks = {"copy_gbps": 1000.0, "matmul_tflops": 100.0}
    bw = results.fill_rates(_row(time_ms=1.0, bytes=5e8, peak=results.PEAK_COPY), peaks)
    assert bw.gbps == pytest.approx(500.0) and bw.fraction_of_peak == pytest.approx(0.5)
    fl = results.fill_rates(_row(time_ms=2.0, flops=1e11, peak=results.PEAK_MATMUL, op="train_step", tokens=1000), peaks)
    assert fl.tflops == pytest.approx(50.0) and fl.fraction_of_peak == pytest.approx(0.5) and fl.mfu == pytest.approx(0.5)
    assert fl.tokens_per_s == pytest.approx(5e5)
    rows = results.fill_speedups([_row("gptfast", 1.0), _row("torch", 3.0), _row("reference", 6.0)], "torch")
    assert [r.speedup for r in rows] == pytest.approx([3.0, 1.0, 0.5])
    assert {r.baseline for r in rows} == {"torch"}


def test_runner_skips_errors_and_budget_without_losing_other_rows():
    meta = {"device": "cpu", "versions": {}, "git_commit": "x", "timestamp": "t", "peaks": {}}

    def ok():
        return (lambda _: None), [None]

    def skip():
        raise runner.SkipCase("not here")

    def broken():
        raise RuntimeError("kernel exploded\nsecond line")

    def case(provider, build, priority=runner.CORE):
        return runner.Case("op", provider, "fwd", "s", "float32", build, priority=priority, target_ms=1, max_reps=5)

    cases = [case("a", ok), case("b", skip), case("c", broken), case("d", ok, runner.SLOW)]
    rows, skipped = runner.run_cases(cases, "cpu", meta)
    assert [r.provider for r in rows] == ["a", "d"]
    reasons = {s.provider: s.reason for s in skipped}
    assert reasons["b"] == "not here"
    assert reasons["c"] == "error: RuntimeError: kernel exploded"
    # A spent budget skips what is left, least important cases last in line.
    def sleepy():
        return (lambda _: time.sleep(0.05)), [None]

    rows, skipped = runner.run_cases([case("slow", ok, runner.SLOW), case("core", sleepy)], "cpu", meta, budget_s=0.02)
    assert [r.provider for r in rows] == ["core"]
    assert "time budget" in skipped[0].reason and skipped[0].provider == "slow"


def test_runner_stops_at_the_first_cuda_error_naming_the_case():
    meta = {"device": "cpu", "versions": {}, "git_commit": "x", "timestamp": "t", "peaks": {}}
    built = []

    def ok(name):
        def build():
            built.append(name)
            return (lambda _: None), [None]
        return build

    def illegal_address():
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors ...")

    cases = [runner.Case("op", p, "fwd", "s", "float32", b, target_ms=1, max_reps=5)
             for p, b in (("a", ok("a")), ("bad", illegal_address), ("c", ok("c")), ("d", ok("d")))]
    lines, saved = [], []
    rows, skipped = runner.run_cases(cases, "cpu", meta, log=lines.append,
                                     progress=lambda r, s: saved.append(([x.provider for x in r], len(s))))
    assert [r.provider for r in rows] == ["a"] and built == ["a"]  # nothing ran after the error
    assert saved == [(["a"], 0), (["a"], 1)]  # saved after each case that ran
    reasons = {s.provider: s.reason for s in skipped}
    assert reasons["bad"].startswith("error: RuntimeError: CUDA error: an illegal memory access")
    assert reasons["c"] == reasons["d"] == "not run: STOPPED at the first CUDA error (in op fwd bad [s] float32)"
    assert "STOPPED at the first CUDA error, in case op fwd bad [s] float32" in lines[-1]
    assert "2 later case(s) not run" in lines[-1]


def test_bench_command_reports_the_cuda_error_it_stopped_at(monkeypatch, capsys):
    from gptfast.bench.suites import layer_norm

    real_build = layer_norm._build

    def broken(provider, mode, *args):
        if provider == "reference" and mode == "fwd":
            raise RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered")
        return real_build(provider, mode, *args)

    monkeypatch.setattr(layer_norm, "_build", broken)
    code = cli.main(["bench", "--suite", "kernels", "--quick", "--device", "cpu", "--ops", "layer_norm",
                     "--providers", "reference,torch"])
    err = capsys.readouterr().err
    assert code == 1
    assert "gptfast bench: not run: STOPPED at the first CUDA error (in layer_norm fwd reference" in err


# ---- reports ---------------------------------------------------------------------------------


def _meta():
    return {"device": "cpu", "device_type": "cpu", "versions": environment.versions(), "git_commit": "abc",
            "timestamp": environment.timestamp(), "peaks": {"copy_gbps": 10.0, "matmul_tflops": 1.0}}


def test_compare_delta_percent():
    old = [_row("gptfast", 2.0), _row("torch", 4.0), _row("reference", 1.0, shape="other")]
    new = [_row("gptfast", 1.0), _row("torch", 5.0), _row("liger_kernel", 1.0)]
    deltas = report.compare(new, old)
    assert deltas[new[0].key()]["delta_pct"] == pytest.approx(-50.0)
    assert deltas[new[1].key()]["delta_pct"] == pytest.approx(25.0)
    assert new[2].key() not in deltas  # no earlier row: no delta
    table = report.markdown_table(new, deltas)
    assert "Δ% time" in table and "-50.0" in table and "+25.0" in table and "| new |" in table


def test_json_round_trip_and_bad_files(tmp_path):
    rows = [results.fill_rates(_row("gptfast", 1.0, bytes=1e9, peak=results.PEAK_COPY), _meta()["peaks"])]
    path = tmp_path / "r.json"
    report.write_json(str(path), report.results_document(rows, [Skipped("x", "y", "fwd", "s", "GPU only")], _meta()))
    loaded, meta = report.load_json(str(path))
    assert loaded[0].to_dict() == rows[0].to_dict() and meta["git_commit"] == "abc"
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        report.load_json(str(tmp_path / "bad.json"))
    (tmp_path / "other.json").write_text(json.dumps({"benchmarks": []}))
    with pytest.raises(ValueError, match="not a gptfast bench results file"):
        report.load_json(str(tmp_path / "other.json"))
    (tmp_path / "future.json").write_text(json.dumps({"schema_version": 99, "rows": []}))
    with pytest.raises(ValueError, match="schema_version 99"):
        report.load_json(str(tmp_path / "future.json"))
    with pytest.raises(FileNotFoundError, match="not found"):
        report.load_json(str(tmp_path / "missing.json"))


def test_plots_are_written_one_per_group(tmp_path):
    rows = []
    for provider, base in (("gptfast", 1.0), ("torch", 2.0)):
        for hidden in (768, 1600, 4096):
            r = _row(provider, base * hidden / 768, size=hidden, bytes=2 * 16384 * hidden * 2, peak=results.PEAK_COPY)
            rows.append(results.fill_rates(r, {}))
    rows.append(_row("torch", 1.0, group="", size=None))  # no group: not plotted
    paths = report.write_plots(rows, str(tmp_path / "plots"))
    assert len(paths) == 1
    with open(paths[0], "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_targets_report_met_missed_and_not_measured():
    rows = [
        _row("gptfast", 1.0, mode="fwd", shape="16384x4096", fraction_of_peak=0.9),
        _row("gptfast", 1.0, mode="fwd", shape="16384x768", fraction_of_peak=0.5),
    ]
    status = {t.text: s for t, _, s in targets.evaluate(rows)}
    assert status["layernorm fwd ≥ 85% of copy bandwidth, hidden 4096"] == targets.MET
    assert status["layernorm fwd ≥ 70% of copy bandwidth, hidden 768"] == targets.MISSED
    assert status["causal fwd D=64 T=16k ≥ 400 TFLOP/s"] == targets.NOT_MEASURED
    assert "not measured" in targets.markdown([])


# ---- suites and the command -----------------------------------------------------------------


def test_cpu_suites_list_cases_and_name_the_gpu_only_rows():
    cases, skipped = suites.collect("all", torch.device("cpu"), quick=True)
    ops = {c.op for c in cases}
    assert {"layer_norm", "causal_attention", "decode_attention", "sampler_step", "prefill", "decode",
            "train_step"} <= ops
    assert all(c.size is None or c.group for c in cases)
    assert any("GPU only" in s.reason for s in skipped)
    with pytest.raises(ValueError, match="unknown suite"):
        suites.collect("nope", "cpu")


def test_parameter_count_matches_the_model():
    from gptfast.bench.suites.e2e import CPU_MODEL, count_params
    from gptfast.config import GPTConfig
    from gptfast.model import GPT

    for config in (GPTConfig.from_preset("tiny"), GPTConfig(**CPU_MODEL), GPTConfig(**{**CPU_MODEL, "bias": False})):
        assert count_params(config) == GPT(config).num_params()


def test_bench_command_writes_json_csv_plots_and_compares(tmp_path, capsys):
    old = tmp_path / "old.json"
    old_row = _row("torch", 1000.0, op="layer_norm", mode="fwd", shape="256x768", dtype="float32")
    report.write_json(str(old), report.results_document([old_row], [], _meta()))
    out_json, out_csv, plots = tmp_path / "new.json", tmp_path / "new.csv", tmp_path / "plots"
    # On the CPU (also on a CUDA machine): the fused rows are GPU-only there, which this test checks.
    code = cli.main(["bench", "--quick", "--device", "cpu", "--ops", "layer_norm", "--providers", "torch,gptfast",
                     "--json", str(out_json),
                     "--csv", str(out_csv), "--plot", str(plots), "--compare", str(old)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "GPU only" in printed  # the fused rows cannot be timed here, and the output says so
    assert "Δ% time" in printed

    doc = json.loads(out_json.read_text())
    assert doc["schema_version"] == results.SCHEMA_VERSION
    assert {"device", "versions", "git_commit", "timestamp", "peaks"} <= set(doc["meta"])
    assert doc["meta"]["peaks"]["copy_gbps"] > 0 and doc["meta"]["peaks"]["matmul_tflops"] > 0
    assert len(doc["rows"]) == 3  # torch: fwd, bwd, fwd+bwd at 256x768
    for row in doc["rows"]:
        for name, kind in REQUIRED_ROW_FIELDS.items():
            assert isinstance(row[name], kind), (name, row[name])
        for name in OPTIONAL_NUMBER_FIELDS:
            assert row[name] is None or isinstance(row[name], float)
        assert row["p20_ms"] <= row["time_ms"] <= row["p80_ms"]
        assert row["gbps"] > 0 and row["eager_ms"] == row["time_ms"] and row["kernel_ms"] is None  # CPU: no graph
        if row["unstable"]:  # a loaded CPU: no ratio given as a fact
            assert row["speedup"] is None and row["speedup_note"] == "unstable timing"
        else:
            assert row["speedup"] == pytest.approx(1.0)
        assert row["fraction_of_peak"] is None  # reported on CUDA only
    assert {s["provider"] for s in doc["skipped"]} == {"gptfast"}
    compared = {(c["mode"], c["provider"]): c["delta_pct"] for c in doc["compare"]["rows"]}
    assert list(compared) == [("fwd", "torch")] and compared[("fwd", "torch")] < 0  # 1000 ms before: faster now

    with open(out_csv) as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 3 and set(report.CSV_COLUMNS) == set(csv_rows[0])
    pngs = list(plots.glob("*.png"))
    assert len(pngs) == 3 and all(p.stat().st_size > 0 for p in pngs)


def test_bench_command_rejects_bad_input(tmp_path, capsys):
    assert cli.main(["bench", "--ops", "no_such_op"]) == 2
    assert "no benchmark case matches" in capsys.readouterr().err
    assert cli.main(["bench", "--compare", str(tmp_path / "missing.json")]) == 2
    assert "not found" in capsys.readouterr().err
    assert cli.main(["bench", "--budget-s", "-1"]) == 2


def test_every_target_finds_its_rows_in_the_gpu_grid():
    """The targets read rows by op/provider/shape: a GPU run's rows must all be found
    (listing the GPU grid builds no tensors, so this runs on the CPU)."""
    cases = [c for suite in ("all", "overhead") for c in suites.collect(suite, torch.device("cuda"), quick=False)[0]]
    peaks = {"copy_gbps": 4000.0, "matmul_tflops": 800.0}
    rows = [results.fill_rates(Row(c.op, c.provider, c.mode, c.shape, c.dtype, 1.0, 0.9, 1.1, flops=c.flops,
                                   bytes=c.bytes, tokens=c.tokens, peak=c.peak, peak_mem_mb=1000.0), peaks)
            for c in cases]
    profile = {"device_type": "cuda", "host_syncs_per_token": 0.05}
    evaluated = targets.evaluate(rows, {"profile": profile})
    assert len(evaluated) == len(targets.TARGETS)
    assert all(status != targets.NOT_MEASURED for _, _, status in evaluated), evaluated
    # The quick e2e grid still measures the issue-5 decode shape (256 new tokens).
    quick_cases, _ = suites.collect("e2e", torch.device("cuda"), quick=True)
    assert any(c.op == "decode" and c.shape == "gpt2-124M B=1 new=256" for c in quick_cases)


# ---- kernel vs eager time, unstable rows, the machine's load --------------------------------


def test_a_wide_spread_is_unstable_and_gives_no_speedup():
    assert not harness.Timing([1.0, 1.02, 0.99, 1.01, 1.0], harness.WALL_CLOCK).unstable
    noisy = harness.Timing([2.1, 213.0, 3.0, 150.0, 6.7], harness.WALL_CLOCK)
    assert noisy.unstable and noisy.spread > harness.UNSTABLE_SPREAD
    rows = [_row("gptfast", 1.0), _row("torch", 6.747, unstable=True), _row("reference", 2.0, shape="other"),
            _row("torch", 4.0, shape="other")]
    results.fill_speedups(rows, "torch")
    assert rows[0].speedup is None and rows[0].speedup_note == "unstable torch timing"
    assert rows[1].speedup is None and rows[1].speedup_note == "unstable timing"
    assert rows[2].speedup == pytest.approx(2.0) and rows[2].speedup_note == ""
    table = report.markdown_table(rows)
    assert "none: unstable torch timing" in table and "6.747" in table and "unstable" in table
    assert "6.75×" not in table and "0.15×" not in table  # no ratio printed for the unstable pair


def test_kernel_and_eager_times_have_their_own_columns(tmp_path):
    kernel = _row("gptfast", 0.02, kernel_ms=0.02, eager_ms=0.126, method=harness.CUDA_GRAPH)
    whole = _row("gptfast", 180.7, op="decode", mode="e2e", eager_ms=180.7)
    table = report.markdown_table([kernel, whole])
    header = table.splitlines()[0]
    assert "| kernel ms | eager ms |" in header and "median ms" not in header
    assert "| 0.02 | 0.126 |" in table and "|  | 180.7 |" in table  # no eager time shown as a kernel time
    report.write_csv(str(tmp_path / "r.csv"), [kernel])
    with open(tmp_path / "r.csv") as f:
        row = next(csv.DictReader(f))
    assert row["kernel_ms"] == "0.02" and row["eager_ms"] == "0.126" and row["unstable"] == "False"


def test_cpu_kernel_and_eager_timing_is_the_wall_clock():
    kernel, eager = harness.time_kernel_and_eager(lambda _: None, device="cpu", warmup=1, target_ms=1, max_reps=5)
    assert kernel is None and eager.method == harness.WALL_CLOCK


def test_runner_rows_carry_the_eager_time_and_the_load_average():
    meta = {"device": "cpu", "versions": {}, "git_commit": "x", "timestamp": "t", "peaks": {}}
    case = runner.Case("op", "a", "fwd", "s", "float32", lambda: ((lambda _: None), [None]), cuda_graph=True,
                       target_ms=1, max_reps=5)
    rows, _ = runner.run_cases([case], "cpu", meta)
    assert rows[0].kernel_ms is None and rows[0].eager_ms == rows[0].time_ms
    assert "load_avg_1m_end" in meta


def test_a_loaded_machine_is_warned_about_with_its_load_average():
    meta = {**_meta(), "load_avg_1m": 5.68, "load_avg_1m_end": 7.89, "cpu_count": 2}
    text = report.meta_text(meta)
    assert "1-min load average 5.68 (start), 7.89 (end) on 2 cores" in text
    assert "WARNING: the machine was loaded while measuring (1-minute load average 7.89 > 2 cores)" in text
    quiet = {**meta, "load_avg_1m": 0.3, "load_avg_1m_end": 0.5, "cpu_count": 16}
    assert "WARNING" not in report.meta_text(quiet) and report.load_warning(quiet) == ""
    assert environment.run_metadata("cpu", {})["cpu_count"] >= 1
