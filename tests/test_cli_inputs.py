"""Bad input at the CLI verbs train, eval, generate and demo: a clear error naming the flag
and the value, never a silent default, a raw traceback or a ZeroDivisionError."""
import argparse

import pytest
import torch

from gptfast.cli import build_parser, main
from gptfast.commands import eval as eval_command
from gptfast.config import GPTConfig
from gptfast.runtime.devices import resolve_device
from gptfast.training.evaluation import evaluate
from gptfast.model import GPT


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=32)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "t.txt"
    path.write_text("def add(a, b):\n    return a + b\n" * 40)
    return path


def eval_args(model_dir, text, *flags):
    return build_parser().parse_args(["eval", "--model", str(model_dir), "--data", str(text),
                                      "--cache-dir", str(text.parent / "cache"), *flags])


@pytest.mark.parametrize("flags, named", [
    (["--block-size", "0"], "--block-size"),  # was: silently the run's / the model's context
    (["--block-size=-5"], "--block-size"),  # was: ZeroDivisionError
    (["--val-fraction", "0"], "--val-fraction"),  # was: silently 0.05
    (["--val-fraction", "nan"], "--val-fraction"),
    (["--val-fraction", "1.5"], "--val-fraction"),
    (["--batch-size", "0"], "--batch-size"),
    (["--max-batches", "0"], "--max-batches"),
    (["--corpus-max-bytes=-1"], "--corpus-max-bytes"),
])
def test_eval_rejects_out_of_range_flags(model_dir, text, flags, named):
    with pytest.raises(ValueError) as e:
        eval_command.run(eval_args(model_dir, text, *flags))
    assert named in str(e.value) and flags[-1].split("=")[-1] in str(e.value)


def test_eval_block_size_longer_than_the_model(model_dir, text):
    with pytest.raises(ValueError, match=r"block_size 17 is longer than the model's context of 16 tokens \(--block-size\)"):
        eval_command.run(eval_args(model_dir, text, "--block-size", "17"))


def test_eval_honours_explicit_settings(model_dir, text, capsys):
    import json

    from gptfast.training.data import load_dataset
    from gptfast.tokenizer import ByteTokenizer

    def scored(*flags):
        assert eval_command.run(eval_args(model_dir, text, "--json", *flags)) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"]

    val = load_dataset(str(text), ByteTokenizer(), val_fraction=0.5, cache_dir=text.parent / "cache", progress=False).val
    expected = evaluate(GPT.from_pretrained(str(model_dir)), val, block_size=8).tokens
    assert scored("--block-size", "8", "--val-fraction", "0.5") == expected
    assert scored() != expected  # the defaults (0.05, the model's context) score something else


@pytest.mark.parametrize("kwargs, named", [
    (dict(block_size=0), "block_size"), (dict(block_size=-5), "block_size"), (dict(batch_size=0), "batch_size"),
    (dict(max_batches=0), "max_batches"), (dict(batch_size=2.5), "batch_size"),
])
def test_evaluate_rejects_bad_sizes(model_dir, kwargs, named):
    from gptfast.training.data import TokenSplit
    import numpy as np

    model = GPT.from_pretrained(str(model_dir))
    split = TokenSplit(np.arange(100, dtype=np.uint16) % 256, "val")
    with pytest.raises(ValueError, match=named):
        evaluate(model, split, **kwargs)


def test_eval_garbage_run_settings_are_named(model_dir, text, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(model_dir, run_dir)
    (run_dir / "train_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="train_config.json is not a readable JSON file"):
        eval_command.run(eval_args(run_dir, text))


# ---- --device, --dtype, --backend at every verb ----------------------------------------------------


@pytest.mark.parametrize("verb", ["generate", "eval", "demo"])
@pytest.mark.parametrize("device, message", [
    ("cuda", "CUDA is not available"), ("cuda:0", "CUDA is not available"), ("foo", "is not a device name"),
    ("mps", "gptfast runs on"),
])
def test_bad_device_is_a_usage_error_naming_flag_and_value(verb, device, message, monkeypatch, capsys, model_dir):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only machine
    argv = [verb, "--device", device] + (["--model", str(model_dir)] if verb == "eval" else [])
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--device" in err and repr(device) in err and message in err


def test_train_device_cuda_on_a_cpu_machine(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", "--device", "cuda", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--device" in err and "'cuda'" in err and "CUDA is not available" in err
    assert not (tmp_path / "r").exists()  # nothing was started
    assert main(["train", "--device", "cuda:x", "--out", str(tmp_path / "r")]) == 2
    assert "'cuda:x' is not a device name" in capsys.readouterr().err


def test_a_missing_cuda_index_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"'cuda:3' was asked for, but this machine has 1 CUDA device"):
        resolve_device("cuda:3")
    assert resolve_device("cuda", local_rank=3) == torch.device("cuda", 0)


@pytest.mark.parametrize("verb", ["generate", "eval", "train"])
@pytest.mark.parametrize("flag, value", [("--dtype", "float8"), ("--backend", "cuda")])
def test_bad_dtype_and_backend_are_named(verb, flag, value, capsys, model_dir, tmp_path):
    argv = [verb, flag, value] + (["--model", str(model_dir)] if verb == "eval" else [])
    try:
        code = main(argv + (["--out", str(tmp_path / "r")] if verb == "train" else []))
    except SystemExit as e:  # argparse choices
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert flag in err and value in err


# ---- --tokenizer --------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"garbage{", b'{"version": "1.0"}', b"\x00\xff\xfe"])
def test_garbage_tokenizer_file_is_named_not_a_traceback(content, tmp_path, capsys, model_dir):
    bad = tmp_path / "tokenizer.json"
    bad.write_bytes(content)
    assert main(["generate", "--tokenizer", str(bad), "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "is not a tokenizer" in err and "Traceback" not in err
    assert main(["eval", "--model", str(model_dir), "--tokenizer", str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err
    assert main(["train", "--tokenizer", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert str(bad) in capsys.readouterr().err


def test_argparse_device_type_returns_the_device():
    from gptfast.commands import device_arg

    assert device_arg("cpu") == torch.device("cpu")
    with pytest.raises(argparse.ArgumentTypeError, match="'nope'"):
        device_arg("nope")


def _one_line(capsys, *names):
    """The error is one line on stderr naming each of ``names``, with no traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def test_train_out_that_cannot_be_a_directory(capsys, tmp_path, text):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, named in ((afile, "is a file, not a directory"), (afile / "sub", "a parent of")):
        assert main(["train", "--data", str(text), "--out", str(out), "--max-steps", "1"]) == 2
        _one_line(capsys, "--out", afile, named)
    assert main(["train", "--data", str(text), "--out", "/proc/x", "--max-steps", "1"]) == 2
    line = _one_line(capsys, "--out", "/proc")
    assert "cannot create the directory '/proc/x'" in line or "would be created) is not writable" in line  # root or not


def test_train_init_that_does_not_exist_says_so(capsys, tmp_path, text):
    missing = tmp_path / "nonexistent"
    for extra in ([], ["--preset", "small"], ["--n-layer", "2"]):
        assert main(["train", "--init", str(missing), "--data", str(text), "--out", str(tmp_path / "r"), *extra]) == 2
        line = _one_line(capsys, missing, "does not exist")
        assert "cannot be changed" not in line


def test_train_changed_model_settings_and_block_size_are_named(capsys, tmp_path, model_dir, text):
    out = str(tmp_path / "r")
    assert main(["train", "--init", str(model_dir), "--data", str(text), "--out", out, "--n-layer", "2"]) == 2
    _one_line(capsys, "n_layer=2", "cannot be changed", model_dir)
    assert main(["train", "--init", str(model_dir), "--data", str(text), "--out", out, "--overwrite",
                 "--block-size", "64"]) == 2
    _one_line(capsys, "--block-size", "64", model_dir, "16 tokens")


def test_quantize_out_that_cannot_be_a_directory(capsys, tmp_path, model_dir):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in (afile, afile / "sub"):
        assert main(["quantize", "--model", str(model_dir), "--out", str(out)]) == 2
        _one_line(capsys, "--out", afile, "is a file, not a directory")
    assert afile.read_text() == "x"


@pytest.mark.parametrize("argv, flag", [
    (["bench", "--json", "{dir}"], "--json"), (["bench", "--csv", "{file}/x.csv"], "--csv"),
    (["check", "--json", "{dir}"], "--json"), (["profile", "--out", "{file}"], "--out"),
    (["demo", "--out", "{file}/sub"], "--out"),
])
def test_output_paths_are_checked_before_the_work(argv, flag, capsys, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    argv = [a.format(dir=tmp_path, file=afile) for a in argv]
    assert main(argv) == 2
    _one_line(capsys, flag, tmp_path)
