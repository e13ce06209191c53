"""gptfast.checkpoints.loader: one loader of a model (directory or preset) and its tokenizer, with the
one tokenizer-fits-vocabulary check."""
import json

import pytest
import torch

from gptfast.config import GPTConfig
from gptfast.checkpoints.loader import check_vocabulary, load_model_and_tokenizer
from gptfast.model import GPT
from gptfast.tokenizer import ByteTokenizer


def write_bpe(path, extra_tokens: int):
    """A byte-level BPE with 256 byte symbols plus ``extra_tokens`` more (and no merges)."""
    from tokenizers import pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for i in range(extra_tokens):
        vocab[f"<extra{i}>"] = len(vocab)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    return path


def small(**kw):
    return GPTConfig(**{**dict(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=32), **kw})


def test_a_fresh_preset_is_seeded_and_takes_overrides():
    a = load_model_and_tokenizer(preset="tiny", overrides={"n_layer": 1, "block_size": 24, "n_head": None}, seed=3)
    b = load_model_and_tokenizer(preset="tiny", overrides={"n_layer": 1, "block_size": 24}, seed=3)
    assert (a.model.config.n_layer, a.model.config.block_size) == (1, 24)
    assert isinstance(a.tokenizer, ByteTokenizer) and a.tokenizer_path is None
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_vocabulary_from_the_tokenizer(tmp_path):
    tok_dir = write_bpe(tmp_path / "tok", extra_tokens=5)
    loaded = load_model_and_tokenizer(preset="tiny", tokenizer=tok_dir, vocab_from_tokenizer=True)
    assert loaded.model.config.vocab_size == loaded.tokenizer.vocab_size == 261
    assert loaded.tokenizer_path == str(tok_dir)


def test_a_model_directory_and_its_own_tokenizer(tmp_path):
    torch.manual_seed(0)
    model = GPT(small(vocab_size=300))
    model.save_pretrained(tmp_path / "m")
    write_bpe(tmp_path / "m", extra_tokens=10)
    loaded = load_model_and_tokenizer(tmp_path / "m", device="cpu", dtype=torch.float32)
    assert loaded.tokenizer.vocab_size == 266 and loaded.tokenizer_path == str(tmp_path / "m")
    assert all(torch.equal(x, y) for x, y in zip(loaded.model.state_dict().values(), model.state_dict().values()))
    # Only dropout may change in a trained model.
    assert load_model_and_tokenizer(tmp_path / "m", overrides={"dropout": 0.25}).model.config.dropout == 0.25
    with pytest.raises(ValueError, match=r"n_layer=2 cannot be changed"):
        load_model_and_tokenizer(tmp_path / "m", overrides={"n_layer": 2})


def test_a_tokenizer_larger_than_the_vocabulary_is_rejected(tmp_path):
    GPT(small()).save_pretrained(tmp_path / "m")
    tok_dir = write_bpe(tmp_path / "tok", extra_tokens=3)
    for kwargs in (dict(model_dir=tmp_path / "m"), dict(preset="tiny")):
        with pytest.raises(ValueError, match="has 259 tokens but the model's vocabulary is 256"):
            load_model_and_tokenizer(tokenizer=tok_dir, **kwargs)
    with pytest.raises(ValueError, match="259 tokens"):
        check_vocabulary(load_model_and_tokenizer(tokenizer=tok_dir, preset="tiny",
                                                  vocab_from_tokenizer=True).tokenizer, GPT(small()))


def test_bad_model_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_and_tokenizer(tmp_path / "missing")
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="is a file, not a directory"):
        load_model_and_tokenizer(tmp_path / "weights.safetensors")
