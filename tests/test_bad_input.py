"""Bad input, each case where it enters: the exception type, and a message naming the
argument (or path) and the value (issue 24)."""
import math

import pytest
import torch

from gptfast import ops


@pytest.mark.parametrize("scale, error", [(float("nan"), ValueError), (float("inf"), ValueError), (0.0, ValueError),
                                          (-0.5, ValueError), ("abc", TypeError), (True, TypeError),
                                          (torch.tensor(0.5), TypeError)])
@pytest.mark.parametrize("op", ["causal_attention", "decode_attention"])
def test_attention_scale_must_be_a_finite_positive_number(op, scale, error):
    q = torch.randn(1, 2, 3, 8)
    call = {"causal_attention": lambda: ops.causal_attention(q, q, q, scale=scale),
            "decode_attention": lambda: ops.decode_attention(q[:, :, 0], q, q, torch.tensor([3]), scale=scale)}[op]
    shown = "str 'abc'" if scale == "abc" else ("tensor" if isinstance(scale, torch.Tensor) else repr(scale))
    with pytest.raises(error, match=rf"{op}: scale must be .*{shown}" if shown != "tensor" else rf"{op}: scale"):
        call()


def test_attention_scale_default_and_numbers_still_work():
    q = torch.randn(1, 2, 3, 8)
    want = ops.causal_attention(q, q, q, scale=1 / math.sqrt(8))
    torch.testing.assert_close(ops.causal_attention(q, q, q), want)
    ops.causal_attention(q, q, q, scale=1)  # an int is a number


# ----------------------------------------------------------------------------- quantization and checkpoints
import copy  # noqa: E402
import os  # noqa: E402

from safetensors.torch import load_file, save_file  # noqa: E402

from gptfast.checkpoints.hf_gpt2 import CheckpointError  # noqa: E402
from gptfast.config import GPTConfig  # noqa: E402
from gptfast.model import GPT  # noqa: E402
from gptfast.quantization import load_quantized, quantize, save_quantized  # noqa: E402


def _tiny():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=16)).eval()


@pytest.mark.parametrize("param", ["transformer.h.0.mlp.c_fc.weight", "transformer.wte.weight", "transformer.h.0.ln_1.bias"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_quantize_refuses_non_finite_weights(param, value):
    model = _tiny()
    with torch.no_grad():
        model.get_parameter(param).view(-1)[3] = value
    with pytest.raises(ValueError, match=rf"quantize: parameter '{param}' holds 1 non-finite"):
        quantize(model)


@pytest.mark.parametrize("scale_dtype, shown", [("float32", "str 'float32'"), (32, "int 32"),
                                                (torch.float64, "torch.float64 is not")])
def test_quantize_scale_dtype_names_the_value(scale_dtype, shown):
    with pytest.raises(TypeError, match=rf"quantize: scale_dtype .*{shown}"):
        quantize(_tiny(), scale_dtype=scale_dtype)


def test_load_quantized_refuses_a_non_finite_scale(tmp_path):
    save_quantized(quantize(_tiny()), tmp_path)
    file = tmp_path / "model.safetensors"
    state = load_file(file)
    key = next(k for k in state if k.endswith("c_proj.scale"))
    state[key][1] = float("nan")
    save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{tmp_path}: tensor '{key}' holds 1 non-finite"):
        load_quantized(tmp_path)


def test_untied_head_and_integer_tensors_are_refused(tmp_path):
    from gptfast.checkpoints.hf_gpt2 import SAFETENSORS

    _tiny().save_pretrained(tmp_path)
    file = tmp_path / SAFETENSORS
    state = load_file(file)
    untied = dict(state, **{"lm_head.weight": state["transformer.wte.weight"] + 1})
    save_file(untied, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="'lm_head.weight' differs from 'transformer.wte.weight'"):
        GPT.from_pretrained(tmp_path)
    tied = dict(state, **{"lm_head.weight": state["transformer.wte.weight"].clone()})
    save_file(tied, file, metadata={"format": "pt"})
    GPT.from_pretrained(tmp_path)  # a stored head equal to wte is the tied head
    key = "transformer.h.0.attn.c_attn.weight"
    integer = dict(state, **{key: state[key].to(torch.int32)})
    save_file(integer, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' is torch.int32"):
        GPT.from_pretrained(tmp_path)


def _save(which, model, path):
    if which == "save_quantized":
        save_quantized(quantize(model), path)
    else:
        model.save_pretrained(path)


@pytest.mark.parametrize("which", ["save_pretrained", "save_quantized"])
def test_save_names_a_bad_destination(which, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(NotADirectoryError, match=rf"{which}: '{afile}' is a file, not a directory"):
        _save(which, _tiny(), afile)
    with pytest.raises(NotADirectoryError, match=rf"{which}: '{afile}' \(a parent of '{afile}/sub'\) is a file"):
        _save(which, _tiny(), afile / "sub")
    with pytest.raises(OSError, match=rf"{which}: (cannot create the directory '/proc/x'|the directory '/proc' "
                                      r"\(where '/proc/x' would be created\) is not writable)"):
        _save(which, _tiny(), "/proc/x")
    target = tmp_path / "out"
    (target / "model.safetensors").mkdir(parents=True)
    with pytest.raises(IsADirectoryError, match=rf"'{target}/model.safetensors' is a directory"):
        _save(which, _tiny(), target)


def test_save_names_an_unwritable_directory(tmp_path, monkeypatch):
    from gptfast.runtime import atomic_files

    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    real_access = os.access  # root writes anywhere: the check is asked as a user would be answered
    monkeypatch.setattr(atomic_files.os, "access", lambda p, mode: os.fspath(p) != str(locked) and real_access(p, mode))
    with pytest.raises(PermissionError, match=rf"save_pretrained: the directory '{locked}' is not writable"):
        _tiny().save_pretrained(locked)
    with pytest.raises(PermissionError, match=rf"the directory '{locked}' \(where '{locked}/sub' would be created\)"):
        _tiny().save_pretrained(locked / "sub")


# ----------------------------------------------------------------------------- speculative decoding's settings
def test_draft_settings_without_a_draft_model_are_refused():
    from gptfast.generation.generate import generate
    from gptfast.tokenizer import ByteTokenizer

    model = _tiny().double()
    with pytest.raises(ValueError, match="num_draft_tokens=99 needs a draft_model"):
        generate(model, [[1, 2]], num_draft_tokens=99)
    with pytest.raises(ValueError, match="draft_tokenizer needs a draft_model"):
        generate(model, [[1, 2]], draft_tokenizer=ByteTokenizer())


def test_draft_tokenizer_needs_the_target_tokenizer():
    from gptfast.generation.generate import generate
    from gptfast.generation.sampling_params import SamplingParams
    from gptfast.tokenizer import ByteTokenizer

    model = _tiny().double()
    with pytest.raises(ValueError, match="draft_tokenizer is checked against the target's tokenizer: pass tokenizer="):
        generate(model, [[1, 2]], SamplingParams(max_new_tokens=4), draft_model=copy.deepcopy(model),
                 draft_tokenizer=ByteTokenizer())


# ----------------------------------------------------------------------------- tuned tables
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from gptfast import tune  # noqa: E402
from gptfast.kernels import _tuned  # noqa: E402

H200 = {"name": "NVIDIA H200", "capability": [9, 0], "triton": "3.6.0"}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("kernel, fields, why", [
    ("causal_attention.fwdd", {"num_warps": 4, "block_m": 64, "block_n": 64}, r"unknown kernel 'causal_attention.fwdd'"),
    ("causal_attention.fwd", {"num_warps": 4, "block_m": 64}, r"needs the fields .*; missing \['block_n'\]"),
    ("decode_attention.split", {"num_warps": 4, "block_n": 64, "block_m": 16}, r"no use for \['block_m'\]"),
    ("causal_attention.fwd", {"num_warps": 4, "block_m": 64, "block_n": 64, "variant": "tmaa"},
     r"variant 'tmaa' is not one of"),
])
def test_tuned_table_entries_are_checked_at_install_and_load(tmp_path, kernel, fields, why):
    source = tmp_path / "from_gpu.json"
    source.write_text(json.dumps({"format": 1, "device": H200, "configs": {kernel: {"d64_16bit": fields}}}))
    with pytest.raises(_tuned.TunedTableError, match=why) as info:
        tune.install(str(source), str(tmp_path / "installed"))
    assert str(source) in str(info.value) and f'configs["{kernel}"]' in str(info.value)
    assert not (tmp_path / "installed").exists()
    loaded = tmp_path / "committed"
    loaded.mkdir()
    (loaded / _tuned.table_file_name(H200)).write_text(source.read_text())
    with pytest.raises(_tuned.TunedTableError, match=why):
        _tuned.find_table(H200, str(loaded))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TRITON_INTERPRET="1"))


def _assert_one_clear_line(run, *names):
    assert run.returncode == 2, (run.returncode, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    for name in names:
        assert str(name) in lines[0], (name, lines[0])


def test_tune_install_of_a_bad_file_is_one_line(tmp_path):
    not_json = tmp_path / "table.txt"
    not_json.write_text("not json")
    _assert_one_clear_line(_cli("gptfast.tune", "--install", str(not_json)), "--install", not_json, "JSON")
    _assert_one_clear_line(_cli("gptfast.tune", "--install", str(tmp_path / "missing.json")), "missing.json")


def test_tune_out_that_cannot_be_written_is_one_line(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    _assert_one_clear_line(_cli("gptfast.tune", "--dry-run", "--out", str(afile / "t.json")), "--out", afile)
    _assert_one_clear_line(_cli("gptfast.tune", "--dry-run", "--out", str(tmp_path)), "--out", tmp_path)


def test_a_directory_where_a_file_is_written_is_named(tmp_path):
    from gptfast.runtime.atomic_files import write_atomically

    (tmp_path / "checkpoint.pt").mkdir()
    with pytest.raises(IsADirectoryError, match=rf"write: '{tmp_path}/checkpoint.pt' is a directory"):
        write_atomically(tmp_path / "checkpoint.pt", lambda f: f.write(b"x"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temp file left
