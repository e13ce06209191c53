"""The tuned configuration tables committed under kernels/tuned/: each one reads through
the loader (gptfast.kernels._tuned), is filed under its device's name, and its entries are
what the launchers pick on that device (faked here: torch's CUDA device lookups report an
H200) and only there.

The loader's rules on made-up tables are tested in tests/test_tune.py."""
import json
import os

import pytest
import torch

from gptfast.kernels import _tuned

attention_kernels = pytest.importorskip("gptfast.kernels.causal_attention")
from gptfast.kernels import decode_attention as decode_kernels  # noqa: E402
from gptfast.kernels import layer_norm as ln_kernels  # noqa: E402

H200_TABLE = os.path.join(_tuned.TUNED_DIR, "nvidia-h200_sm90_triton3.6.0.json")
CUDA0 = torch.device("cuda", 0)


def committed_tables():
    return sorted(n for n in os.listdir(_tuned.TUNED_DIR) if n.endswith(".json"))


def fake_device(monkeypatch, name, capability, triton_version):
    """Make torch report one CUDA device ``name`` of ``capability``, and triton report
    ``triton_version``: what ``_tuned.device_identity`` reads."""
    import triton

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: tuple(capability))
    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(_tuned, "_picked", {})  # launchers cache their pick per device: a new device here


# The launchers' config functions, by the table's (kernel, key) of a 64-wide bf16 head.
SELECTED = {
    ("causal_attention.fwd", "d64_16bit"): lambda: attention_kernels.forward_config(64, torch.bfloat16, CUDA0),
    ("causal_attention.dkdv", "d64_16bit"): lambda: attention_kernels.dkdv_config(64, torch.bfloat16, CUDA0),
    ("causal_attention.dq", "d64_16bit"): lambda: attention_kernels.dq_config(64, torch.bfloat16, CUDA0),
}
BUILTIN = {
    ("causal_attention.fwd", "d64_16bit"): attention_kernels.shipped_config("fwd", 64, torch.bfloat16),
    ("causal_attention.dkdv", "d64_16bit"): attention_kernels.shipped_config("dkdv", 64, torch.bfloat16),
    ("causal_attention.dq", "d64_16bit"): attention_kernels.shipped_config("dq", 64, torch.bfloat16),
}


@pytest.mark.parametrize("name", committed_tables())
def test_committed_table_reads_and_is_filed_under_its_device(name):
    path = os.path.join(_tuned.TUNED_DIR, name)
    table = _tuned.read_table(path)
    assert _tuned.table_file_name(table["device"]) == name
    assert table["configs"], f"{name} has no configs"
    with open(path) as f:
        raw = json.load(f)
    # Every chosen config is one the tuner measured and passed on that device.
    for kernel, by_key in raw["configs"].items():
        for key, fields in by_key.items():
            measured = [r for r in raw["results"] if r["kernel"] == kernel and r["key"] == key and r["ok"]]
            assert fields in [r["config"] for r in measured], (kernel, key)


def test_h200_table_is_committed_with_the_attention_entries():
    table = _tuned.read_table(H200_TABLE)
    assert table["device"] == {"name": "NVIDIA H200", "capability": [9, 0], "triton": "3.6.0"}
    assert set(table["configs"]) == set(SELECTED)
    for entry, cfg in table["configs"].items():
        assert cfg != BUILTIN[entry], entry  # so the tests below can tell the two apart


def test_launchers_pick_the_h200_entries_on_an_h200(monkeypatch):
    table = _tuned.read_table(H200_TABLE)
    fake_device(monkeypatch, "NVIDIA H200", (9, 0), "3.6.0")
    assert _tuned.device_identity(CUDA0) == table["device"]
    assert {entry: select() for entry, select in SELECTED.items()} == table["configs"]
    # Keys the table lacks keep their built-in configs.
    assert attention_kernels.forward_config(128, torch.bfloat16, CUDA0) == attention_kernels.shipped_config(
        "fwd", 128, torch.bfloat16)
    assert ln_kernels.fwd_config(768, torch.bfloat16, CUDA0) == ln_kernels._builtin_fwd(768)
    assert decode_kernels.split_config(64, torch.bfloat16, CUDA0) == decode_kernels._builtin_split(64)


@pytest.mark.parametrize("name,capability,triton_version", [
    ("NVIDIA H100 80GB HBM3", (9, 0), "3.6.0"),
    ("NVIDIA H200", (9, 0), "3.7.0"),
])
def test_launchers_ignore_the_h200_table_elsewhere(monkeypatch, name, capability, triton_version):
    fake_device(monkeypatch, name, capability, triton_version)
    assert {entry: select() for entry, select in SELECTED.items()} == BUILTIN
