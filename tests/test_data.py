"""gptfast.training.data: token caches, splits, random windows, fine-tuning masks, bad input."""
import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from gptfast.training import data as D
from gptfast.tokenizer import ByteTokenizer

SEP = list(b"\n\n")  # the byte tokenizer has no end-of-text token: documents are joined by a blank line


class WideTokenizer(ByteTokenizer):
    """Byte ids shifted past 65535: needs uint32 storage."""

    vocab_size = 70_000
    eos_token_id = 69_999

    def encode(self, text):
        return [66_000 + b for b in text.encode("utf-8")]


class EosTokenizer(ByteTokenizer):
    """Bytes plus an end-of-text token 256."""

    vocab_size = 257
    eos_token_id = 256


@pytest.fixture
def tok():
    return ByteTokenizer()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(path: Path, records) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


def tokens_of(source, tokenizer, cache):
    return np.asarray(D.load_tokens(D.tokenize_to_memmap(source, tokenizer, cache, progress=False)))


# ---- the embedded corpus ---------------------------------------------------------------


def test_stdlib_corpus_is_sorted_capped_and_skips_tests():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = D.stdlib_source_files(max_bytes=300_000)
    rel = [p.relative_to(root).as_posix() for p in files]
    assert rel == sorted(rel) and all(r.endswith(".py") for r in rel)
    assert not any(part in D._STDLIB_SKIP_DIRS for r in rel for part in r.split("/")[:-1])
    assert sum(p.stat().st_size for p in files) <= 300_000
    # A larger cap extends the same list: the order does not depend on the cap.
    more = D.stdlib_source_files(max_bytes=600_000)
    assert more[: len(files)] == files and len(more) > len(files)


def test_default_corpus_tokenises_to_the_file_bytes(tmp_path, tok):
    ds = D.load_dataset(None, tok, cache_dir=tmp_path, corpus_max_bytes=50_000, progress=False)
    files = D.stdlib_source_files(50_000)
    joined = []
    for i, p in enumerate(files):
        joined += (SEP if i else []) + list(p.read_bytes())
    whole = np.concatenate([np.asarray(ds.train.tokens), np.asarray(ds.val.tokens)])
    assert whole.dtype == np.uint16
    np.testing.assert_array_equal(whole, np.asarray(joined))
    assert ds.kind == "pretrain" and len(ds.val) == round(len(joined) * 0.05)


# ---- token cache -----------------------------------------------------------------------


def test_cache_hit_skips_tokenising_and_changed_content_misses(tmp_path, tok, monkeypatch):
    f = write(tmp_path / "a.txt", "hello world")
    source = D.resolve_text_source(str(f))
    first = D.tokenize_to_memmap(source, tok, tmp_path / "cache", progress=False)

    encoded = []
    plain_encode = tok.encode
    monkeypatch.setattr(tok, "encode", lambda text: encoded.append(text) or plain_encode(text))
    assert D.tokenize_to_memmap(source, tok, tmp_path / "cache", progress=False) == first
    assert "hello world" not in encoded  # only the tokenizer's fingerprint probe was encoded
    monkeypatch.undo()
    write(f, "hello there")
    second = D.tokenize_to_memmap(D.resolve_text_source(str(f)), tok, tmp_path / "cache", progress=False)
    assert second != first
    assert bytes(np.asarray(D.load_tokens(second)).tolist()) == b"hello there"
    # A different tokenizer is a different cache entry too.
    assert D.tokenize_to_memmap(source, EosTokenizer(), tmp_path / "cache", progress=False) not in (first, second)


def test_incomplete_cache_entry_is_rebuilt(tmp_path, tok):
    f = write(tmp_path / "a.txt", "abcdef")
    path = D.tokenize_to_memmap(D.resolve_text_source(str(f)), tok, tmp_path, progress=False)
    path.write_bytes(path.read_bytes()[:3])  # a torn write
    with pytest.raises(D.DataError, match="incomplete"):
        D.load_tokens(path)
    again = D.tokenize_to_memmap(D.resolve_text_source(str(f)), tok, tmp_path, progress=False)
    assert bytes(np.asarray(D.load_tokens(again)).tolist()) == b"abcdef"


def test_large_vocabulary_uses_uint32_and_eos_separates_documents(tmp_path):
    folder = tmp_path / "docs"
    write(folder / "b.txt", "B")
    write(folder / "a.txt", "A")
    toks = tokens_of(D.resolve_text_source(str(folder)), WideTokenizer(), tmp_path / "c")
    assert toks.dtype == np.uint32
    assert toks.tolist() == [66_000 + ord("A"), 69_999, 66_000 + ord("B")]


def test_folder_reads_text_files_in_order_skipping_binary_and_hidden(tmp_path, tok):
    folder = tmp_path / "corpus"
    write(folder / "z.py", "zz")
    write(folder / "sub" / "m.md", "mm")
    write(folder / "a.txt", "aa")
    write(folder / ".hidden" / "x.txt", "hidden")
    (folder / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    source = D.resolve_text_source(str(folder))
    assert [p.relative_to(folder).as_posix() for p in source.paths] == ["a.txt", "sub/m.md", "z.py"]
    assert bytes(tokens_of(source, tok, tmp_path / "c").tolist()) == b"aa\n\nmm\n\nzz"


def test_jsonl_text_records(tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "one"}, {"text": "two", "id": 3}])
    assert D.jsonl_kind(f) == "text"
    toks = tokens_of(D.resolve_text_source(str(f)), EosTokenizer(), tmp_path / "c")
    assert toks.tolist() == list(b"one") + [256] + list(b"two")


# ---- bad input ---------------------------------------------------------------------------


def test_missing_empty_and_unreadable_data_raise_clear_errors(tmp_path, tok, monkeypatch):
    with pytest.raises(D.DataError, match="does not exist"):
        D.load_dataset(str(tmp_path / "nope.txt"), tok, cache_dir=tmp_path)
    empty = write(tmp_path / "empty.txt", "")
    with pytest.raises(D.DataError, match="zero tokens"):
        D.load_dataset(str(empty), tok, cache_dir=tmp_path, progress=False)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(D.DataError, match="no text files"):
        D.load_dataset(str(tmp_path / "emptydir"), tok, cache_dir=tmp_path)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    with pytest.raises(D.DataError, match="not UTF-8"):
        D.load_dataset(str(latin1), tok, cache_dir=tmp_path, progress=False)
    empty_jsonl = write(tmp_path / "e.jsonl", "\n\n")
    with pytest.raises(D.DataError, match="empty"):
        D.load_dataset(str(empty_jsonl), tok, cache_dir=tmp_path)

    locked = write(tmp_path / "locked.txt", "secret")

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(D.DataError, match="cannot read data file .*locked.txt.*Permission denied"):
        D.load_dataset(str(locked), tok, cache_dir=tmp_path)


def test_malformed_jsonl_names_the_line(tmp_path, tok):
    bad_json = write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{not json}\n')
    with pytest.raises(D.DataError, match=r"bad.jsonl:2: not valid JSON"):
        D.load_dataset(str(bad_json), tok, cache_dir=tmp_path, progress=False)
    missing_text = write_jsonl(tmp_path / "t.jsonl", [{"text": "ok"}, {"body": "no"}])
    with pytest.raises(D.DataError, match=r"t.jsonl:2: expected a string field 'text'"):
        D.load_dataset(str(missing_text), tok, cache_dir=tmp_path, progress=False)
    unknown = write_jsonl(tmp_path / "u.jsonl", [{"question": "?"}])
    with pytest.raises(D.DataError, match=r"u.jsonl:1: unrecognised JSONL record with keys \['question'\]"):
        D.load_dataset(str(unknown), tok, cache_dir=tmp_path)


def test_context_longer_than_the_data_is_rejected(tmp_path, tok):
    f = write(tmp_path / "short.txt", "x" * 100)
    ds = D.load_dataset(str(f), tok, cache_dir=tmp_path, val_fraction=0.2, progress=False)
    ds.check_block_size(19)  # 20 validation tokens hold one window of 19 + 1
    with pytest.raises(D.DataError, match="validation data has 20 tokens, fewer than one window of block_size"):
        ds.check_block_size(20)
    with pytest.raises(D.DataError, match="training data"):
        D.BatchSampler(ds.train, 2, 80, seed=0)


# ---- splits, windows, sampler state ---------------------------------------------------------


def test_random_windows_are_shifted_slices_and_reproducible(tmp_path, tok):
    tokens = np.arange(1000, dtype=np.uint16)
    split = D.TokenSplit(tokens, "training")
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    x, y = split.random_batch(4, 16, g1)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(y, x + 1)  # consecutive tokens: target = next token
    assert torch.equal(x, split.random_batch(4, 16, g2)[0])
    assert int(x.max()) + 1 <= 999  # the last target is inside the data


def test_sampler_state_resumes_the_same_batch_sequence():
    split = D.TokenSplit(np.arange(5000, dtype=np.uint16) % 256, "training")
    a = D.BatchSampler(split, 3, 8, seed=1)
    for _ in range(3):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(3)]
    b = D.BatchSampler(split, 3, 8, seed=999)
    b.load_state_dict(state)
    for (xe, ye), (xb, yb) in zip(expected, [b.next_batch() for _ in range(3)]):
        assert torch.equal(xe, xb) and torch.equal(ye, yb)
    assert b.batches_drawn == a.batches_drawn == 6


def test_split_and_rank_shards():
    tokens = np.arange(1000, dtype=np.uint16)
    train, val = D.split_tokens(tokens, 0.1)
    assert len(train) == 900 and len(val) == 100 and val.tokens[0] == 900
    shards = [train.shard(r, 3) for r in range(3)]
    assert [int(s.tokens[0]) for s in shards] == [0, 300, 600] and all(len(s) == 300 for s in shards)
    with pytest.raises(ValueError, match="val_fraction"):
        D.split_tokens(tokens, 1.0)


def test_eval_batches_cover_windows_once_and_equally_per_rank():
    split = D.TokenSplit(np.arange(101, dtype=np.uint16), "validation")
    (x, y), = list(split.eval_batches(batch_size=10, block_size=10, max_batches=None))
    assert x[:, 0].tolist() == list(range(0, 100, 10)) and torch.equal(y, x + 1)
    per_rank = [list(split.eval_batches(2, 10, None, rank=r, world_size=3)) for r in range(3)]
    assert [sum(len(b[0]) for b in batches) for batches in per_rank] == [3, 3, 3]
    starts = sorted(int(s) for batches in per_rank for xb, _ in batches for s in xb[:, 0])
    assert starts == list(range(0, 90, 10))  # disjoint across ranks
    assert len(list(split.eval_batches(2, 10, max_batches=1))) == 1


# ---- fine-tuning ------------------------------------------------------------------------------


def test_prompt_completion_masks_the_prompt(tmp_path):
    f = write_jsonl(tmp_path / "ft.jsonl", [{"prompt": "ab", "completion": "cd"}, {"prompt": "x", "completion": "yz"}])
    assert D.jsonl_kind(f) == "finetune"
    ds = D.load_dataset(str(f), EosTokenizer(), val_fraction=0.5)
    assert ds.kind == "finetune" and len(ds.train) == 1 and len(ds.val) == 1
    a, c, d, eos = ord("a"), ord("c"), ord("d"), 256
    ex = ds.train.examples[0]
    assert ex.ids.tolist() == [a, ord("b"), c, d, eos]
    inputs, targets = ex.inputs_and_targets()
    # Position 0 predicts "b" (prompt): ignored. Position 1 predicts "c": the first completion token.
    assert inputs.tolist() == [a, ord("b"), c, d] and targets.tolist() == [-100, c, d, eos]
    x, y = D.ExampleSplit(ds.whole.examples, "all").collate([0, 1])
    assert x.tolist() == [[a, ord("b"), c, d], [ord("x"), ord("y"), ord("z"), 0]]  # right-padded with 0
    assert y.tolist() == [[-100, c, d, eos], [ord("y"), ord("z"), eos, -100]]


def test_chat_messages_learn_only_assistant_turns(tmp_path, tok):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "?"}]
    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": msgs}])
    (ex,) = D.load_finetune_examples(f, tok)
    text = bytes(ex.ids.tolist()).decode()
    assert text == "user: hi\nassistant: yo\nuser: ?\n"
    learned = bytes(ex.ids[ex.is_target].tolist()).decode()
    assert learned == "yo\n"


def test_finetune_bad_records(tmp_path, tok):
    cases = [
        ([{"prompt": "p"}], r"f.jsonl:1: missing string field\(s\) \['completion'\]"),
        ([{"prompt": "p", "completion": "c"}, {"completion": "c"}], r"f.jsonl:2: missing string field\(s\) \['prompt'\]"),
        ([{"prompt": "p", "completion": ""}], r"f.jsonl:1: the example has no completion tokens"),
        ([{"messages": [{"role": "user", "content": "q"}]}], r"no message has role 'assistant'"),
        ([{"messages": [{"role": "user"}]}], r"messages\[0\] must be an object with string fields"),
        ([{"messages": []}], r"'messages' must be a non-empty list"),
    ]
    for records, message in cases:
        f = write_jsonl(tmp_path / "f.jsonl", records)
        with pytest.raises(D.DataError, match=message):
            D.load_dataset(str(f), tok)


def test_finetune_example_longer_than_block_size_is_rejected(tmp_path, tok):
    f = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "p" * 30, "completion": "c" * 10}] * 2)
    ds = D.load_dataset(str(f), tok)
    ds.check_block_size(39)
    with pytest.raises(D.DataError, match=r"1 training example\(s\) are longer than block_size 38 \(longest: 39 tokens\)"):
        ds.check_block_size(38)


def test_finetune_shards_split_examples_between_ranks(tmp_path, tok):
    f = write_jsonl(tmp_path / "ft.jsonl", [{"prompt": str(i), "completion": "x"} for i in range(3)])
    split = D.load_dataset(str(f), tok, val_fraction=0.3).whole
    shards = [split.shard(r, 2) for r in range(2)]
    assert [len(s) for s in shards] == [2, 1]
    with pytest.raises(D.DataError, match="holds no examples"):
        split.shard(3, 4).check_block_size(8)


def test_finetune_flag_on_plain_text_is_rejected(tmp_path, tok):
    f = write(tmp_path / "a.txt", "abc")
    with pytest.raises(D.DataError, match="fine-tuning data must be a .jsonl"):
        D.load_dataset(str(f), tok, finetune=True)


def test_finetune_random_batches_pad_to_block_when_asked(tmp_path, tok):
    f = write_jsonl(tmp_path / "ft.jsonl", [{"prompt": "ab", "completion": "cd"}] * 4)
    split = D.load_dataset(str(f), tok, val_fraction=0.25).train
    sampler = D.BatchSampler(split, 2, 16, seed=0, pad_to_block=True)
    x, y = sampler.next_batch()
    assert x.shape == y.shape == (2, 16) and (y[:, 3:] == -100).all() and (x[:, 3:] == 0).all()


def test_tokenising_removes_partial_files_of_killed_tokenisers(tmp_path, tok):
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    cache = tmp_path / "cache"
    cache.mkdir()
    stale = cache / f".0123456789abcdef.bin.{child.pid}.tmp"
    stale.write_bytes(b"\x01\x02")
    text = tmp_path / "t.txt"
    text.write_text("hello world\n")
    D.load_dataset(str(text), tok, cache_dir=cache, progress=False)
    assert not stale.exists()
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]
