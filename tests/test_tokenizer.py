import json

import pytest

from gptfast.tokenizer import ByteTokenizer, load_tokenizer


def test_byte_tokenizer_round_trip():
    tok = load_tokenizer(None)
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 256
    text = "héllo, wörld — def f(x): return x"
    ids = tok.encode(text)
    assert max(ids) < 256 and tok.decode(ids) == text


def _write_tiny_bpe(path):
    # A byte-level BPE with the 256 byte symbols of GPT-2's byte-to-unicode map and two merges.
    from tokenizers import pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["he"] = len(vocab)
    vocab["hel"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\nh e\nhe l\n")
    return vocab


def test_bpe_from_vocab_and_merges(tmp_path):
    vocab = _write_tiny_bpe(tmp_path)
    tok = load_tokenizer(tmp_path)
    ids = tok.encode("hello")
    assert ids[0] == vocab["hel"] and tok.decode(ids) == "hello"
    assert tok.eos_token_id == vocab["<|endoftext|>"]
    # tokenizer.json written by the library loads too and agrees.
    tok._tok.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(tmp_path / "tokenizer.json").encode("hello hel") == tok.encode("hello hel")


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("content", [b"garbage{", b'{"a": 1}', b"\x00\xff\xfe"])
def test_unreadable_tokenizer_file_is_a_value_error_naming_it(tmp_path, content):
    bad = tmp_path / "tokenizer.json"
    bad.write_bytes(content)
    for path in (bad, tmp_path):  # the file, or the directory holding it
        with pytest.raises(ValueError, match="is not a tokenizer") as e:
            load_tokenizer(path)
        assert str(bad) in str(e.value)


def test_unreadable_vocab_and_merges_are_named(tmp_path):
    (tmp_path / "vocab.json").write_text('{"a": 0}')
    (tmp_path / "merges.txt").write_text("not a merge line at all\n")
    with pytest.raises(ValueError, match="merges.txt"):
        load_tokenizer(tmp_path)
