"""Hugging Face GPT-2 compatibility: load, save, generate, and clear errors on bad checkpoints."""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gptfast import GPT  # noqa: E402
from gptfast.checkpoints.hf_gpt2 import CheckpointError  # noqa: E402

BACKENDS = ["reference", "torch", "fused"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=211, n_positions=64, n_embd=48, n_layer=2, n_head=3, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # HF zero-inits biases and ones LN weights: randomise so every tensor matters
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("hf_gpt2")
    hf.save_pretrained(path)
    return path, hf


def _relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_match_hf(hf_dir, backend):
    path, hf = hf_dir
    model = GPT.from_pretrained(path, backend=backend)
    idx = torch.randint(0, 211, (2, 13))
    with torch.no_grad():
        expected = hf(idx).logits
        got = model(idx)
    assert _relative_error(got, expected) <= 1e-5


def test_greedy_generation_matches_hf(hf_dir):
    path, hf = hf_dir
    model = GPT.from_pretrained(path)
    prompt = torch.randint(0, 211, (1, 7))
    from gptfast import SamplingParams, generate

    new = generate(model, prompt.tolist(), SamplingParams(max_new_tokens=32, temperature=0, ignore_eos=True))
    ours = torch.cat([prompt, torch.tensor([r.token_ids for r in new])], dim=1)
    theirs = hf.generate(prompt, max_new_tokens=32, do_sample=False, min_new_tokens=32, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_round_trip_through_hf(hf_dir, tmp_path):
    path, _ = hf_dir
    model = GPT.from_pretrained(path)
    model.save_pretrained(tmp_path / "out")
    reloaded_hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    idx = torch.randint(0, 211, (1, 9))
    with torch.no_grad():
        assert _relative_error(reloaded_hf(idx).logits, model(idx)) <= 1e-5
        assert torch.equal(GPT.from_pretrained(tmp_path / "out")(idx), model(idx))


def test_sinusoidal_model_exports_its_table(tmp_path):
    from gptfast import GPTConfig

    model = GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=1, n_head=2, n_embd=16, pos_embedding="sinusoidal")).eval()
    model.save_pretrained(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 50, (1, 10))
    with torch.no_grad():
        assert _relative_error(hf(idx).logits, model(idx)) <= 1e-5
        assert GPT.from_pretrained(tmp_path).config.pos_embedding == "sinusoidal"


def test_pytorch_bin_without_prefix(hf_dir, tmp_path):
    path, hf = hf_dir
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    state["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)  # old checkpoints carry the causal mask buffer
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    idx = torch.randint(0, 211, (1, 6))
    with torch.no_grad():
        assert _relative_error(GPT.from_pretrained(tmp_path)(idx), hf(idx).logits) <= 1e-5


def test_bad_checkpoints(hf_dir, tmp_path):
    path, hf = hf_dir
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GPT.from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="config.json"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no weights file"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"definitely not safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        GPT.from_pretrained(tmp_path)
    # A tensor missing, and a shape that does not match the config.
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k not in ("lm_head.weight", "transformer.ln_f.bias")}
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="transformer.ln_f.bias"):
        GPT.from_pretrained(tmp_path)
    state["transformer.ln_f.bias"] = torch.zeros(47)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"transformer.ln_f.bias.*\(47,\)"):
        GPT.from_pretrained(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["activation_function"] = "relu"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="activation_function"):
        GPT.from_pretrained(tmp_path)
    del config["n_layer"]
    config["activation_function"] = "gelu_new"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="n_layer"):
        GPT.from_pretrained(tmp_path)
    assert os.path.exists(tmp_path / "model.safetensors")
