"""Tuned configuration tables (gptfast.kernels._tuned), the launch-config type, the tuning
candidates, and the tuning run (gptfast.tune) rehearsed on a CPU with --dry-run.

That every candidate compiles for sm_90 without spills (and with HGMMA where required)
is checked by tests/test_compile_report.py, whose report visits ``candidate_configs()``.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from gptfast import tune
from gptfast.kernels import _tuned
from gptfast.kernels._common import LaunchConfig

attention_kernels = pytest.importorskip("gptfast.kernels.causal_attention")
from gptfast.kernels import decode_attention as decode_kernels  # noqa: E402
from gptfast.kernels import layer_norm as ln_kernels  # noqa: E402
from gptfast.kernels import skinny_linear as skinny_kernels  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = torch.device("cuda")
H200 = {"name": "NVIDIA H200", "capability": [9, 0], "triton": "3.6.0"}
TUNED = {
    ("causal_attention.fwd", "d64_16bit"): LaunchConfig(block_m=64, block_n=64, num_warps=4, num_stages=3),
    ("causal_attention.fwd", "d64_16bit_short"): LaunchConfig(block_m=64, block_n=64, num_warps=4, num_stages=2,
                                                              variant="tma_persistent_x2"),
    ("causal_attention.dq", "d128_16bit"): LaunchConfig(block_m=64, block_n=32, num_warps=4, num_stages=2),
    ("decode_attention.split", "d64_16bit"): LaunchConfig(block_n=128, num_warps=8),
    ("layer_norm.fwd", "n1024_16bit"): LaunchConfig(block_rows=2, num_warps=4),
    ("layer_norm.bwd", "n1024_16bit"): LaunchConfig(num_warps=8),
}


@pytest.fixture
def tuned_dir(tmp_path, monkeypatch):
    """A table directory holding one H200 table; the launchers see it for 'cuda'."""
    directory = tmp_path / "tuned"
    directory.mkdir()
    table = _tuned.table_json(H200, TUNED, results=[{"note": "kept, not read"}])
    (directory / _tuned.table_file_name(H200)).write_text(json.dumps(table))
    monkeypatch.setattr(_tuned, "TUNED_DIR", str(directory))
    return directory


def _on_device(monkeypatch, identity):
    monkeypatch.setattr(_tuned, "device_identity", lambda device: identity if device.type == "cuda" else None)


def _selected():
    return {
        ("causal_attention.fwd", "d64_16bit"): attention_kernels.forward_config(64, torch.bfloat16, CUDA),
        ("causal_attention.fwd", "d64_16bit_short"): attention_kernels.forward_config(64, torch.bfloat16, CUDA, 1024),
        ("causal_attention.dq", "d128_16bit"): attention_kernels.dq_config(128, torch.float16, CUDA),
        ("decode_attention.split", "d64_16bit"): decode_kernels.split_config(64, torch.bfloat16, CUDA),
        ("layer_norm.fwd", "n1024_16bit"): ln_kernels.fwd_config(768, torch.bfloat16, CUDA),
        ("layer_norm.bwd", "n1024_16bit"): ln_kernels.bwd_config(1024, torch.bfloat16, CUDA),
    }


def test_matching_device_uses_the_table(tuned_dir, monkeypatch):
    _on_device(monkeypatch, dict(H200))
    assert _selected() == TUNED
    # A key the table lacks falls back to the built-in config.
    assert attention_kernels.forward_config(128, torch.bfloat16, CUDA) == attention_kernels.shipped_config(
        "fwd", 128, torch.bfloat16)
    # Past SHORT_MAX_LEN the long key; a short key the table lacks takes the long key's config.
    assert attention_kernels.forward_config(64, torch.bfloat16, CUDA, 1025) == TUNED[("causal_attention.fwd",
                                                                                      "d64_16bit")]
    assert attention_kernels.forward_config(128, torch.bfloat16, CUDA, 512) == attention_kernels.shipped_config(
        "fwd", 128, torch.bfloat16)


def test_a_table_without_short_keys_serves_short_sequences_its_long_keys(tmp_path, monkeypatch):
    """The first H200 table (no short keys) keeps serving every length its d64 forward config."""
    long_only = {k: v for k, v in TUNED.items() if not k[1].endswith("_short")}
    directory = tmp_path / "tuned"
    directory.mkdir()
    (directory / _tuned.table_file_name(H200)).write_text(json.dumps(_tuned.table_json(H200, long_only, [])))
    monkeypatch.setattr(_tuned, "TUNED_DIR", str(directory))
    _on_device(monkeypatch, dict(H200))
    for q_len in (1, 512, 1024, 1025, 8192):
        assert attention_kernels.forward_config(64, torch.bfloat16, CUDA, q_len) == long_only[
            ("causal_attention.fwd", "d64_16bit")], q_len


@pytest.mark.parametrize("field,value", [("name", "NVIDIA H100 80GB HBM3"), ("capability", [8, 0]),
                                         ("triton", "3.5.0")])
def test_other_device_uses_the_builtin_table(tuned_dir, monkeypatch, field, value):
    _on_device(monkeypatch, {**H200, field: value})
    builtin = {
        ("causal_attention.fwd", "d64_16bit"): attention_kernels.shipped_config("fwd", 64, torch.bfloat16),
        ("causal_attention.fwd", "d64_16bit_short"): attention_kernels.shipped_config("fwd", 64, torch.bfloat16),
        ("causal_attention.dq", "d128_16bit"): attention_kernels.shipped_config("dq", 128, torch.float16),
        ("decode_attention.split", "d64_16bit"): decode_kernels._builtin_split(64),
        ("layer_norm.fwd", "n1024_16bit"): ln_kernels._builtin_fwd(768),
        ("layer_norm.bwd", "n1024_16bit"): ln_kernels._builtin_bwd(1024),
    }
    assert _selected() == builtin
    for key, cfg in builtin.items():
        assert cfg != TUNED[key], key  # so the comparison above can tell the tables apart


def test_cpu_never_reads_tables(tuned_dir, monkeypatch):
    _on_device(monkeypatch, dict(H200))
    (tuned_dir / "broken.json").write_text("{")
    cpu = torch.device("cpu")
    assert attention_kernels.forward_config(64, torch.bfloat16, cpu) == attention_kernels._INTERPRETER["fwd"]
    assert ln_kernels.fwd_config(768, torch.bfloat16, cpu) == ln_kernels._builtin_fwd(768)


@pytest.mark.parametrize("text,why", [
    ("{not json", "cannot be read as JSON"),
    (json.dumps({"format": 99}), "format must be 1"),
    (json.dumps({"format": 1, "device": {"name": "x"}, "configs": {}}), '"device" must be'),
    (json.dumps(_tuned.table_json(H200, {}, [])).replace('"configs": {}', '"configs": []'), '"configs" must be'),
    (json.dumps({"format": 1, "device": H200, "configs": {"layer_norm.fwd": {"n1024_16bit": {"num_warps": 3}}}}),
     r'configs\["layer_norm.fwd"\]\["n1024_16bit"\]: LaunchConfig.num_warps must be a power of two'),
    (json.dumps({"format": 1, "device": H200, "configs": {"layer_norm.fwd": {"n1024_16bit": {"warps": 4}}}}),
     "unknown launch config fields"),
])
def test_malformed_table_raises_naming_the_file(tuned_dir, monkeypatch, text, why):
    bad = tuned_dir / "zz_bad.json"
    bad.write_text(text)
    _on_device(monkeypatch, dict(H200))
    with pytest.raises(_tuned.TunedTableError, match=why) as info:
        attention_kernels.forward_config(64, torch.bfloat16, CUDA)
    assert str(bad) in str(info.value)


def test_two_tables_for_one_device_are_refused(tuned_dir, monkeypatch):
    (tuned_dir / "copy.json").write_text((tuned_dir / _tuned.table_file_name(H200)).read_text())
    _on_device(monkeypatch, dict(H200))
    with pytest.raises(_tuned.TunedTableError, match="keep one"):
        attention_kernels.forward_config(64, torch.bfloat16, CUDA)


def test_launch_config_round_trip_and_validation():
    cfg = LaunchConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)
    assert LaunchConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict() == {
        "num_warps": 8, "num_stages": 3, "block_m": 128, "block_n": 64}
    assert cfg.tag() == "m128_n64_w8_s3"
    for bad in ({"num_warps": 0}, {"num_warps": 6}, {"num_warps": 4, "block_n": 48}, {"num_warps": True},
                {"num_warps": 4, "num_stages": 1.5}):
        with pytest.raises(ValueError, match="LaunchConfig"):
            LaunchConfig(**bad)


def test_candidate_lists():
    """At most 8 candidates per kernel and key, the built-in config first, no repeats,
    covering attention (fwd, dK/dV, dQ at D 64 and 128), decode and layernorm."""
    lists = {("causal_attention", k, key): c for k, by in attention_kernels.CANDIDATES.items() for key, c in by.items()}
    lists.update({("decode_attention", k, key): c for k, by in decode_kernels.CANDIDATES.items()
                  for key, c in by.items()})
    lists.update({("layer_norm", k, key): c for k, by in ln_kernels.CANDIDATES.items() for key, c in by.items()})
    for kernel in ("fwd", "dkdv", "dq"):
        for d in (64, 128):
            assert ("causal_attention", kernel, f"d{d}_16bit") in lists
            assert lists[("causal_attention", kernel, f"d{d}_16bit")][0] == attention_kernels.shipped_config(
                kernel, d, torch.bfloat16)
    for key, configs in lists.items():
        assert 2 <= len(configs) <= 8 and len(set(configs)) == len(configs), key
    for key, configs in decode_kernels.CANDIDATES["split"].items():
        assert configs[0] == decode_kernels._builtin_split(int(key[1:].split("_")[0]))
    for kind, builtin in (("fwd", ln_kernels._builtin_fwd), ("bwd", ln_kernels._builtin_bwd)):
        for key, configs in ln_kernels.CANDIDATES[kind].items():
            assert configs[0] == builtin(int(key[1:].split("_")[0])), (kind, key)


def test_dry_run_writes_a_valid_table(tmp_path):
    """The GPU suite's rehearsal: the whole tuning plumbing through the interpreter."""
    out = tmp_path / "out" / "tuned.json"
    # A rehearsal is a CPU run even on a CUDA machine: hide the GPU from it.
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get(
        "PYTHONPATH")])))
    run = subprocess.run([sys.executable, "-m", "gptfast.tune", "--out", str(out), "--dry-run",
                          "--device-name", "rehearsal-gpu"], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = _tuned.read_table(str(out))
    assert table["device"]["name"] == "rehearsal-gpu"
    kernels = {kernel for kernel, _ in table["configs"]}
    assert kernels == {"causal_attention.fwd", "causal_attention.dkdv", "causal_attention.dq",
                       "decode_attention.split", "layer_norm.fwd", "layer_norm.bwd", "skinny_linear.fwd"}
    assert {key for kernel, key in table["configs"] if kernel.startswith("causal_attention")} == {
        "d64_16bit", "d128_16bit", "d64_16bit_short", "d128_16bit_short"}
    assert {key for kernel, key in table["configs"] if kernel == "causal_attention.dq"} == {"d64_16bit", "d128_16bit"}
    results = json.loads(out.read_text())["results"]
    assert results and all(r["ok"] and r["error_ratio"] <= tune.MAX_RATIO and r["median_ms"] > 0 for r in results)
    for (kernel, key), cfg in table["configs"].items():  # each winner is one of its measured candidates
        assert cfg.to_dict() in [r["config"] for r in results if (r["kernel"], r["key"]) == (kernel, key)]


def test_a_failing_candidate_is_dropped(monkeypatch):
    """A candidate whose result breaks the error-ratio rule never wins, whatever its time."""
    good, bad = LaunchConfig(num_warps=4), LaunchConfig(num_warps=8)
    exact = torch.linspace(-1, 1, 64, dtype=torch.float64)
    plain = exact.float() + 1e-3
    tunable = tune.Tunable(
        "layer_norm.fwd", "n64_16bit", [bad, good], [{"n": 64}], make=lambda shape: {},
        run=lambda x, cfg: [plain if cfg == good else plain + 1.0], references=lambda x: ([plain], [exact]),
        check_slice=lambda x: x)
    ctx = tune.Context(torch.device("cpu"), torch.float32, quick=False, dry_run=True)
    results = []
    assert tune.tune_one(ctx, tunable, results) == good
    assert [r["ok"] for r in results] == [False, True] and results[0]["error_ratio"] > tune.MAX_RATIO


def test_install_copies_a_valid_table(tmp_path, tuned_dir):
    source = tmp_path / "from_gpu.json"
    source.write_text(json.dumps(_tuned.table_json(H200, TUNED, [])))
    target = tune.install(str(source), str(tmp_path / "kernels_tuned"))
    assert os.path.basename(target) == "nvidia-h200_sm90_triton3.6.0.json"
    assert _tuned.find_table(H200, str(tmp_path / "kernels_tuned"))["configs"] == TUNED
    source.write_text("[]")
    with pytest.raises(_tuned.TunedTableError, match=str(source)):
        tune.install(str(source), str(tmp_path / "kernels_tuned"))


def test_most_valuable_keys_come_first_and_every_key_is_ordered():
    ctx = tune.Context(CUDA, torch.bfloat16, quick=True, dry_run=False)
    names = [(t.kernel, t.key) for t in tune.all_tunables(ctx)]
    assert names[:4] == list(tune.ORDER[:4]) and set(names) <= set(tune.ORDER)
    assert {k for k, _ in names} == {"causal_attention.fwd", "causal_attention.dkdv", "causal_attention.dq",
                                     "decode_attention.split", "layer_norm.fwd", "layer_norm.bwd",
                                     "skinny_linear.fwd"}
    skinny = {t.key for t in tune.all_tunables(ctx) if t.kernel == "skinny_linear.fwd"}
    assert skinny == set(skinny_kernels.CANDIDATES["fwd"])  # every GPT-2 weight key, 16-bit and int8
    tunable = tune.all_tunables(ctx)[0]
    assert ctx.candidates(tunable) == tunable.candidates  # --quick: every candidate, the first shape


def test_a_spent_budget_leaves_a_valid_table_of_the_first_keys(tmp_path):
    out = tmp_path / "tuned.json"
    # A rehearsal is a CPU run even on a CUDA machine: hide the GPU from it.
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get(
        "PYTHONPATH")])))
    run = subprocess.run([sys.executable, "-m", "gptfast.tune", "--out", str(out), "--dry-run", "--budget-s", "0.001",
                          "--kernels", "decode_attention,layer_norm"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "time budget of 0.001 s spent: not tuned" in run.stdout
    table = _tuned.read_table(str(out))
    assert list(table["configs"]) == [("decode_attention.split", "d64_16bit")]  # the first in ORDER, only
    bad = subprocess.run([sys.executable, "-m", "gptfast.tune", "--out", str(out), "--dry-run", "--budget-s", "0"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "--budget-s must be positive, got 0" in bad.stderr
