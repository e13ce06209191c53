"""gptfast.quantize: a tiny GPT quantized to int8 gives logits close to the fp32 model's,
saves and loads to identical logits, refuses bad input (quantizing twice, a mismatched
config, a float checkpoint, wrong scales), generates with identical tokens from the C++
and Python engines, and the ``gptfast quantize`` verb writes a loadable directory."""
import copy
import importlib
import json
import os

import pytest
import torch

import gptfast
from gptfast.runtime import extension
from gptfast.config import GPTConfig
from gptfast.generation.generate import generate
from gptfast.checkpoints.hf_gpt2 import CheckpointError
from gptfast.model import GPT
from gptfast.quantization import (CONFIG_KEY, Int8Linear, is_quantized_checkpoint, load_quantized, quantize,
                              save_quantized)
from gptfast.generation.sampling_params import SamplingParams

CONFIG = GPTConfig(vocab_size=61, block_size=64, n_layer=2, n_head=2, n_embd=32)
LINEARS = ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
           "transformer.h.0.mlp.c_proj", "lm_head"]


@pytest.fixture(autouse=True)
def native_cpu_path(monkeypatch):
    """Run int8 layers as users on a CPU do (C++ kernel or torch path), not through the
    Triton interpreter: the kernels have their own tests in test_int8_linear.py. (The
    dispatch is patched, not TRITON_INTERPRET: triton reads that when a kernel module is
    imported, and a module imported here must still run under the interpreter later.)"""
    monkeypatch.setattr(importlib.import_module("gptfast.ops.int8_linear"), "use_triton", lambda t: False)


@pytest.fixture(scope="module")
def fp32_model():
    torch.manual_seed(0)
    return GPT(CONFIG, backend="torch").eval()


@pytest.fixture
def int8_model(fp32_model):
    return quantize(copy.deepcopy(fp32_model), "int8")


def tokens(batch=2, length=11, seed=0):
    return torch.randint(0, CONFIG.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_every_linear_is_replaced_and_the_embedding_stays_float(int8_model, fp32_model):
    modules = dict(int8_model.named_modules())
    for name in LINEARS:
        assert isinstance(modules[name], Int8Linear), name
    assert not any(isinstance(m, torch.nn.Linear) for m in int8_model.modules())
    assert int8_model.transformer.wte.weight.dtype == torch.float32
    assert torch.equal(int8_model.transformer.wte.weight, fp32_model.transformer.wte.weight)
    # The head's int8 copy dequantises to the (tied) embedding matrix, within half a step.
    head = int8_model.lm_head
    dequant = head.weight_int8.float() * head.scale[:, None]
    assert ((dequant - fp32_model.transformer.wte.weight).abs() <= head.scale[:, None] / 2 + 1e-7).all()


def test_logits_close_to_fp32(int8_model, fp32_model):
    idx = tokens()
    with torch.no_grad():
        ref, out = fp32_model(idx), int8_model(idx)
    rel = (out - ref).abs().max() / ref.abs().max()
    assert rel < 0.02, f"int8 logits differ from fp32 by {rel:.3%} of the largest logit"
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_bfloat16_model_gets_bfloat16_scales(fp32_model):
    model = quantize(copy.deepcopy(fp32_model).to(torch.bfloat16))
    assert model.lm_head.scale.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(tokens())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_save_load_round_trip_identical_logits(int8_model, tmp_path):
    save_quantized(int8_model, tmp_path)
    assert is_quantized_checkpoint(tmp_path)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)[CONFIG_KEY]["scheme"] == "int8"
    loaded = load_quantized(tmp_path, CONFIG)
    idx = tokens(seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(idx), int8_model(idx))
    for key, t in int8_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], t), key


def test_quantizing_twice_is_refused(int8_model):
    with pytest.raises(ValueError, match="already quantized"):
        quantize(int8_model, "int8")


def test_bad_arguments(fp32_model):
    with pytest.raises(ValueError, match="unknown scheme 'int4'"):
        quantize(copy.deepcopy(fp32_model), "int4")
    with pytest.raises(TypeError, match="must be a gptfast.GPT"):
        quantize(torch.nn.Linear(3, 4))
    with pytest.raises(TypeError, match="scale_dtype torch.int8"):
        quantize(copy.deepcopy(fp32_model), scale_dtype=torch.int8)
    with pytest.raises(ValueError, match="not quantized"):
        save_quantized(fp32_model, "/nonexistent/never-written")


def test_loading_into_a_mismatched_config_is_refused(int8_model, tmp_path):
    save_quantized(int8_model, tmp_path)
    wider = GPTConfig(vocab_size=61, block_size=64, n_layer=2, n_head=2, n_embd=64)
    with pytest.raises(CheckpointError, match="n_embd: checkpoint 32, given 64"):
        load_quantized(tmp_path, wider)


def test_edited_config_or_tensors_are_refused(int8_model, tmp_path):
    save_quantized(int8_model, tmp_path)
    with open(tmp_path / "config.json") as f:
        config = json.load(f)
    config["n_layer"] = 3
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(CheckpointError, match="missing"):
        load_quantized(tmp_path)


def test_wrong_dtype_scales_in_a_checkpoint_are_refused(int8_model, tmp_path):
    from safetensors.torch import load_file, save_file

    save_quantized(int8_model, tmp_path)
    path = str(tmp_path / "model.safetensors")
    state = load_file(path)
    state["transformer.h.1.mlp.c_fc.scale"] = state["transformer.h.1.mlp.c_fc.scale"].to(torch.int32)
    save_file(state, path)
    with pytest.raises(CheckpointError, match="c_fc.scale"):
        load_quantized(tmp_path)


def test_float_checkpoint_is_not_a_quantized_one(fp32_model, tmp_path):
    fp32_model.save_pretrained(tmp_path)
    assert not is_quantized_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="not a quantized checkpoint"):
        load_quantized(tmp_path)


def test_generate_on_a_quantized_model_engines_agree(int8_model):
    engines = ["python"] + (["cpp"] if extension.load_extension() is not None else [])
    prompts = [[1, 2, 3, 4], [5, 6]]
    params = [SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True),
              SamplingParams(max_new_tokens=12, temperature=0.9, top_k=20, seed=7, ignore_eos=True)]
    results = {e: [r.token_ids for r in generate(int8_model, prompts, params, engine=e)] for e in engines}
    assert all(len(ids) == 12 for ids in results["python"])
    for e in engines:
        assert results[e] == results["python"], e
    # Greedy decoding over the cache agrees with a full recompute of the quantized model.
    seq = list(prompts[0])
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(int8_model(torch.tensor([seq]))[0, -1].argmax()))
    assert results["python"][0] == seq[len(prompts[0]):]


def test_public_name():
    assert gptfast.quantize is quantize


def test_quantize_command(fp32_model, tmp_path, capsys):
    from gptfast.cli import main

    src, out = tmp_path / "fp32", tmp_path / "int8"
    fp32_model.save_pretrained(src)
    assert main(["quantize", "--model", str(src), "--out", str(out)]) == 0
    assert "int8 weights" in capsys.readouterr().out
    loaded = load_quantized(out)
    assert isinstance(loaded.lm_head, Int8Linear)
    assert main(["quantize", "--model", str(out), "--out", str(tmp_path / "again")]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "again")
