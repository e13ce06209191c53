"""benchmarks/gpu_suite.sh: the dry run (every stage's plumbing on the CPU) produces what the
narrow channel back from a GPU lease can carry, and the summary puts failures first.

The dry run takes a minute or two on a small CPU: it runs once per test session.
"""
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from gptfast import checker
from gptfast.bench import report, suite_summary, targets, warm
from gptfast.bench.results import Row

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_suite.sh"
STAGES = ("build", "env", "warm", "check", "tune", "tests", "attention", "decode", "layernorm", "e2e_decode", "train",
          "hf", "overhead", "profile", "summary")
STATUS = re.compile(r"^(ok|timed out|failed \(exit \d+\)|not available)$")
ALLOWED_FILES = {"summary.md", "stages.tsv", "tuned.json", "results.tar.gz"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite") / "out"
    env = dict(os.environ, PY=sys.executable)
    env.pop("TRITON_CACHE_DIR", None)
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    return out, done


def _extension_imports() -> bool:
    code = "import torch, gptfast._C"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True).returncode == 0


def test_dry_run_leaves_only_what_the_channel_carries(dry_run):
    out, done = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 2 <= len(files) <= 8
    assert all(len(p.relative_to(out).parts) <= 3 for p in files)  # at most two folders below OUT_DIR
    assert {p.name for p in files} <= ALLOWED_FILES and {"summary.md", "stages.tsv", "results.tar.gz"} <= {
        p.name for p in files}
    assert all(p.stat().st_size <= 16 * 2**20 for p in files)


def test_every_stage_has_a_status_and_the_main_ones_ran(dry_run):
    out, _ = dry_run
    lines = (out / "stages.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["stage", "status", "seconds", "limit_s", "note"]
    rows = {fields[0]: fields for fields in (line.split("\t") for line in lines[1:])}
    assert tuple(rows) == STAGES
    for name, fields in rows.items():
        assert STATUS.match(fields[1]), (name, fields[1])
    for name in ("check", "tests", "summary", "hf"):
        assert rows[name][1] == "ok", rows[name]
    overhead_present = (REPO / "gptfast" / "bench" / "suites" / "overhead.py").exists()
    assert (rows["overhead"][1] == "not available") == (not overhead_present)
    tune_present = (REPO / "gptfast" / "tune.py").exists() or (REPO / "gptfast" / "tune" / "__main__.py").exists()
    assert (rows["tune"][1] == "not available") == (not tune_present)


def test_summary_lists_every_stage_failures_first_and_the_extension_state(dry_run):
    out, done = dry_run
    summary = (out / "summary.md").read_text()
    assert len(summary) <= 12_000
    assert summary.index("## Failures") < summary.index("## Targets") < summary.index("## Check")
    assert "DRY RUN" in summary and f"{len(targets.TARGETS)} not measured" in summary  # no H200 number on a CPU
    for name in STAGES[:-1]:
        assert f"| {name} |" in summary, name
    built = _extension_imports()
    assert ("C++ extension: import gptfast._C works" in summary) == built
    assert ("every later stage ran with GPTFAST_NO_EXT=1" in summary) == (not built)
    assert done.stdout.rstrip().endswith(summary.rstrip()[-200:])  # printed last


def test_the_archive_holds_every_log_and_result(dry_run):
    out, _ = dry_run
    with tarfile.open(out / "results.tar.gz") as tar:
        names = set(tar.getnames())
    for name in STAGES:
        if name not in ("tune", "overhead") or f"results/logs/{name}.log" in names:
            assert f"results/logs/{name}.log" in names, name
    assert {"results/check.json", "results/profile/summary.json", "results/stages.tsv"} <= names
    assert {f"results/{n}.json" for n in ("attention", "decode", "layernorm", "e2e_decode", "train", "hf")} <= names


def test_the_tests_stage_ran_and_the_summary_counts_it(dry_run):
    out, _ = dry_run
    with tarfile.open(out / "results.tar.gz") as tar:
        log = tar.extractfile("results/logs/tests.log").read().decode()
    assert re.search(r"\[gw\d\] \[\s*\d+%\] PASSED tests/test_train_config.py::", log)  # -n 2 -v: as they come
    summary = (out / "summary.md").read_text()
    assert "## Tests" in summary and re.search(r"pytest: \d+ passed", summary)


def test_warm_up_compiles_every_tuning_candidate_first_compiles_dealt_first():
    from gptfast import tune

    labels = [label for label, _ in warm.tasks("cuda", e2e=True, tune=True, compile=True)]
    compiles = [label for label in labels if label.startswith("compile ")]
    assert compiles and labels[:len(compiles)] == compiles  # the longest tasks start first
    assert any("train_step" in label for label in compiles)
    ctx = tune.Context(torch.device("cuda"), torch.bfloat16, quick=True, dry_run=False)
    wanted = {f"tune {t.kernel} {t.key} {cfg.tag()}" for t in tune.all_tunables(ctx) for cfg in ctx.candidates(t)}
    assert len(wanted) >= 16 and wanted <= set(labels)


def test_stage_limits_with_kill_grace_fit_in_eight_minutes():
    """build runs alongside env and warm; every other stage after the one before."""
    text = SCRIPT.read_text()
    limits = {k.lower(): int(v) for k, v in re.findall(r"^LIMIT_(\w+)=\$\{LIMIT_\w+:-(\d+)\}", text, flags=re.M)}
    grace = int(re.search(r"^GRACE=\$\{GRACE:-(\d+)\}", text, flags=re.M).group(1))
    assert set(limits) == set(STAGES)
    first = max(limits["build"] + grace, limits["env"] + limits["warm"] + 2 * grace)
    rest = sum(v + grace for k, v in limits.items() if k not in ("build", "env", "warm"))
    assert first + rest <= 480
    assert limits["tests"] <= 150 and 50 <= limits["tune"] <= 70


# ---- the summary on its own: failures first, cut to fit -----------------------------------


def _row(i):
    return Row(op="causal_attention", provider="gptfast", mode="fwd", shape=f"B=1,H=32,T={i},D=64", dtype="bfloat16",
               time_ms=1.0 + i, p20_ms=1.0, p80_ms=2.0, flops=1e12, peak="matmul_tflops", device="H200",
               versions={}, git_commit="x", timestamp="t")


def test_summary_puts_failures_first_and_fits_the_reply(tmp_path):
    stages = tmp_path / "stages.tsv"
    stages.write_text("stage\tstatus\tseconds\tlimit_s\tnote\ncheck\tok\t30\t45\t\nattention\ttimed out\t43\t40\t\n")
    check = {"device": "NVIDIA H200", "max_ratio": 3.0, "results": [
        {"op": "sampler", "variant": "greedy", "shape": "", "dtype": "float32", "direction": "tokens", "passed": True,
         "ratio": None, "detail": "1/1 rows identical"},
        {"op": "layer_norm", "variant": "plain", "shape": "(3, 7, 1000)", "dtype": "bfloat16", "direction": "bwd",
         "passed": False, "ratio": 7.5, "detail": ""}]}
    (tmp_path / "check.json").write_text(json.dumps(check))
    meta = {"device": "NVIDIA H200", "device_type": "cuda", "versions": {}, "git_commit": "x", "timestamp": "t",
            "peaks": {}}
    report.write_json(str(tmp_path / "attention.json"), report.results_document([_row(i) for i in range(600)], [],
                                                                               meta))
    text = suite_summary.build(str(tmp_path), str(stages), notes=["C++ extension: import gptfast._C works"])
    assert len(text) <= 12_000
    failures = text[text.index("## Failures"):text.index("## Targets")]
    assert "stage **attention**: timed out" in failures
    assert "check FAIL layer_norm plain [(3, 7, 1000)] bfloat16 bwd: ratio 7.5" in failures
    assert "1/2 passed, 1 failed" in text and "| layer_norm | bfloat16 | 0 | 1 |" in text
    assert "more gptfast rows" in text and "| causal_attention | fwd | B=1,H=32,T=0,D=64 |" in text


# ---- the warm-up stage --------------------------------------------------------------------


def test_warm_up_covers_the_check_grid_and_the_fused_bench_cases():
    labels = [label for label, _ in warm.tasks("cuda", e2e=True)]
    check_labels = [f"check {c.label()}" for c in checker.build_cases("cuda", quick=True) if c.op != "sampler"]
    assert labels[:len(check_labels)] == check_labels
    bench = labels[len(check_labels):]
    assert bench and all(" gptfast [" in label for label in bench)
    for op in ("causal_attention", "decode_attention", "layer_norm", "decode", "train_step"):
        assert any(label.startswith(f"bench {op} ") for label in bench), op


def test_a_warm_worker_stops_at_its_first_cuda_error(monkeypatch, capsys):
    ran = []

    def fails():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    fake = [("a", lambda: ran.append("a")), ("bad", fails), ("c", lambda: ran.append("c"))]
    monkeypatch.setattr(warm, "tasks", lambda device, *flags: fake)
    assert warm.run_worker("cpu", 0, 1, False) == 1
    out = capsys.readouterr().out
    assert ran == ["a"] and "warm[0] STOPPED at the first CUDA error, in case bad" in out
    assert "1 later case(s) not run" in out


def test_the_summary_names_failed_tests_even_when_pytest_was_cut_short(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "tests.log").write_text(
        "[gw0] [  1%] PASSED tests/test_a.py::test_ok \n"
        "[gw3] [  2%] FAILED tests/test_layer_norm.py::test_bwd[bfloat16] \n"
        "tests/test_b.py::test_plain FAILED [  3%]\n"
        "[gw1] [  4%] ERROR tests/test_c.py::test_fixture \n"
        "[gw2] [  5%] SKIPPED tests/test_d.py::test_cpu_only \n")
    stages = tmp_path / "stages.tsv"
    stages.write_text("stage\tstatus\tseconds\tlimit_s\tnote\ntests\ttimed out\t136\t134\t\n")
    text = suite_summary.build(str(tmp_path), str(stages))
    failures = text[text.index("## Failures"):text.index("## Targets")]
    assert "stage **tests**: timed out" in failures
    for test in ("FAILED tests/test_layer_norm.py::test_bwd[bfloat16]", "FAILED tests/test_b.py::test_plain",
                 "ERROR tests/test_c.py::test_fixture"):
        assert f"- test {test}" in failures, test
    assert "stopped before its end" in text and "1 passed" in text and "1 skipped" in text
    # A finished run: the -rf lines add the reason, the final line the counts.
    with open(tmp_path / "logs" / "tests.log", "a") as f:
        f.write("FAILED tests/test_layer_norm.py::test_bwd[bfloat16] - AssertionError: ratio 7.5\n"
                "============ 2 failed, 1 passed, 1 skipped, 1 error in 130.20s (0:02:10) ============\n")
    text = suite_summary.build(str(tmp_path), str(stages))
    assert "- test FAILED tests/test_layer_norm.py::test_bwd[bfloat16]: AssertionError: ratio 7.5" in text
    assert "pytest: 2 failed, 1 passed, 1 skipped, 1 error" in text
