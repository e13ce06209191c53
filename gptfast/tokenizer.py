"""Tokenizers from local files only: GPT-2 BPE through the `tokenizers` library, or a
byte-level fallback (vocabulary 256) when no files are given."""
import os

ENDOFTEXT = "<|endoftext|>"


class ByteTokenizer:
    """UTF-8 bytes as tokens. Needs no files; decodes invalid sequences with U+FFFD."""

    vocab_size = 256
    eos_token_id = None
    name = "bytes"

    def encode(self, text: str) -> list:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class BPETokenizer:
    """A GPT-2 byte-level BPE loaded from ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``."""

    def __init__(self, tokenizer, name: str):
        self._tok = tokenizer
        self.name = name
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_token_id = tokenizer.token_to_id(ENDOFTEXT)

    def encode(self, text: str) -> list:
        return self._tok.encode(text).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @classmethod
    def from_files(cls, path: str) -> "BPETokenizer":
        try:
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        except ImportError:
            raise RuntimeError(f"loading the tokenizer in {path!r} needs the tokenizers package "
                               "(pip install tokenizers)") from None

        tokenizer_json = os.path.join(path, "tokenizer.json")
        if os.path.isfile(path) or os.path.exists(tokenizer_json):
            file = path if os.path.isfile(path) else tokenizer_json
            return cls(_read(repr(file), lambda: Tokenizer.from_file(file)), file)
        vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
        missing = [p for p in (vocab, merges) if not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(
                f"no tokenizer in {path!r}: expected tokenizer.json, or vocab.json + merges.txt (missing {', '.join(missing)})"
            )
        tok = Tokenizer(_read(f"{vocab!r} + {merges!r}", lambda: models.BPE.from_file(vocab, merges)))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return cls(tok, path)


def _read(what: str, load):
    """``load()``, with the tokenizers library's parse errors (a bare Rust message, or a
    Rust panic, which is a BaseException) turned into a ValueError that names the file."""
    try:
        return load()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        raise ValueError(f"{what} is not a tokenizer the tokenizers library can read ({type(e).__name__}: {e})") from None


def load_tokenizer(path=None):
    """BPE from ``path`` (a tokenizer.json file, or a directory holding tokenizer.json or
    vocab.json + merges.txt); the byte tokenizer when ``path`` is None."""
    if path is None:
        return ByteTokenizer()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer path {path!r} does not exist")
    return BPETokenizer.from_files(path)


def has_tokenizer_files(path) -> bool:
    """Whether a checkpoint directory carries its own tokenizer."""
    return os.path.exists(os.path.join(path, "tokenizer.json")) or (
        os.path.exists(os.path.join(path, "vocab.json")) and os.path.exists(os.path.join(path, "merges.txt"))
    )
