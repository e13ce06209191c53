"""Training data: token memmaps for pretraining, masked examples for fine-tuning.

Pretraining text (a file, a folder of files, a JSONL of ``{"text": ...}`` lines, or the
embedded default corpus: the Python standard library's own ``.py`` sources) is
tokenised once into a flat ``uint16``/``uint32`` file that is memory-mapped afterwards.
The file is named by a hash of the source contents and the tokenizer, so a changed file
or a different tokenizer makes a new cache entry and an unchanged one is never
tokenised twice. Batches are random windows of ``block_size + 1`` tokens drawn with an
explicit ``torch.Generator``, whose state a checkpoint stores so a resumed run draws
exactly the batches the uninterrupted run would have drawn.

Fine-tuning data is a JSONL of ``{"prompt", "completion"}`` or ``{"messages": [...]}``
lines. Each example becomes one sequence whose targets are ``-100`` (ignored by the
loss) everywhere except on completion (assistant) tokens.

Under torch.distributed every rank samples from its own contiguous shard of the
training split; validation batches are spread over the ranks in equal numbers.
"""
import dataclasses
import hashlib
import json
import os
import sysconfig
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from gptfast.model import IGNORE_INDEX  # loss targets with this value are ignored
from gptfast.runtime import paths
from gptfast.runtime.atomic_files import remove_stale_temp_files, write_atomically

# Bump when the on-disk token format or the document separator changes.
TOKEN_CACHE_VERSION = 1
# Directories of the standard library that hold tests or third-party code, not the library.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
# Separator between documents when the tokenizer has no end-of-text token.
_FALLBACK_SEPARATOR = "\n\n"


class DataError(ValueError):
    """The training data is missing, empty, unreadable or malformed."""


# ---------------------------------------------------------------------------------------
# Sources: where pretraining text comes from
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class TextSource:
    """An ordered list of text documents: files read whole, or the lines of a JSONL."""

    kind: str  # "files" (each file one document) or "jsonl" (each line's "text" one document)
    paths: List[Path]
    description: str

    def fingerprint(self) -> str:
        """sha256 over every document's bytes, in order (length-prefixed, so boundaries count)."""
        digest = hashlib.sha256(self.kind.encode())
        for path in self.paths:
            try:
                digest.update(path.stat().st_size.to_bytes(8, "little"))
                with open(path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        digest.update(chunk)
            except OSError as e:
                raise DataError(f"cannot read data file {path}: {e.strerror or e}") from None
        return digest.hexdigest()

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.paths)

    def documents(self) -> Iterator[Tuple[str, int]]:
        """Yield ``(text, bytes consumed)`` per document."""
        for path in self.paths:
            if self.kind == "files":
                data = _read_bytes(path)
                yield _decode_utf8(data, path), len(data)
                continue
            for line_no, line, nbytes in _jsonl_lines(path):
                record = _parse_json_line(line, path, line_no)
                text = record.get("text")
                if not isinstance(text, str):
                    raise DataError(f"{path}:{line_no}: expected a string field 'text' (found keys {sorted(record)})")
                yield text, nbytes


def _jsonl_lines(path: Path) -> Iterator[Tuple[int, str, int]]:
    """``(line number, text, bytes)`` of each non-blank line, read lazily."""
    try:
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                line = raw.decode("utf-8", errors="replace")
                if line.strip():
                    yield line_no, line, len(raw)
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e.strerror or e}") from None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e.strerror or e}") from None


def _decode_utf8(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _parse_json_line(line: str, path, line_no: int) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
    return record


def stdlib_source_files(max_bytes: Optional[int] = None) -> List[Path]:
    """The standard library's ``.py`` files in sorted path order, up to ``max_bytes`` in total.

    Test suites and site-packages are skipped, so the corpus is the library itself and
    is the same on every machine with the same Python version.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(f"the Python standard library was not found at {root} (sysconfig 'stdlib' path)")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        files.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    chosen, total = [], 0
    for path in files:
        size = path.stat().st_size
        if size == 0:
            continue
        if max_bytes is not None and total + size > max_bytes and chosen:
            break
        chosen.append(path)
        total += size
    if not chosen:
        raise DataError(f"no .py files found under the standard library at {root}")
    return chosen


def _is_text_file(path: Path) -> bool:
    """A file is text when its first 8 KiB hold no NUL byte and decode as UTF-8."""
    try:
        with open(path, "rb") as f:
            head = f.read(8192)
    except OSError:
        return True  # let the read fail later with a clear message
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 3  # a multi-byte character cut at the 8 KiB boundary
    return True


def resolve_text_source(data: Optional[str], corpus_max_bytes: Optional[int] = None) -> TextSource:
    """A pretraining source from a path (file, folder, .jsonl), or the embedded corpus for None."""
    if data is None:
        files = stdlib_source_files(corpus_max_bytes)
        return TextSource("files", files, f"Python standard library sources ({len(files)} files)")
    path = Path(data)
    if not path.exists():
        raise DataError(f"data path {str(path)!r} does not exist")
    if path.is_dir():
        candidates = sorted(
            (p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        files = [p for p in candidates if _is_text_file(p)]
        if not files:
            raise DataError(f"data folder {str(path)!r} holds no text files")
        return TextSource("files", files, f"{path} ({len(files)} files)")
    if path.suffix == ".jsonl":
        return TextSource("jsonl", [path], str(path))
    return TextSource("files", [path], str(path))


def jsonl_kind(path) -> str:
    """'finetune' when the first record has prompt/completion or messages, 'text' when it has text."""
    path = Path(path)
    for line_no, line, _ in _jsonl_lines(path):
        record = _parse_json_line(line, path, line_no)
        if "messages" in record or "prompt" in record or "completion" in record:
            return "finetune"
        if "text" in record:
            return "text"
        raise DataError(
            f"{path}:{line_no}: unrecognised JSONL record with keys {sorted(record)}; expected 'text' "
            "(pretraining), 'prompt' + 'completion', or 'messages' (fine-tuning)"
        )
    raise DataError(f"data file {str(path)!r} is empty")


# ---------------------------------------------------------------------------------------
# Tokenising into a cached memmap
# ---------------------------------------------------------------------------------------


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every token id."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def tokenizer_fingerprint(tokenizer) -> str:
    """Identify a tokenizer by its vocabulary size, end-of-text id and how it encodes a probe text."""
    probe = "def f(x):\n    return x ** 2  # café, 東京, \t<|endoftext|> 0123456789"
    parts = [type(tokenizer).__name__, str(tokenizer.vocab_size), str(tokenizer.eos_token_id), str(tokenizer.encode(probe))]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def _separator_ids(tokenizer) -> List[int]:
    if tokenizer.eos_token_id is not None:
        return [tokenizer.eos_token_id]
    return list(tokenizer.encode(_FALLBACK_SEPARATOR))


def tokenize_to_memmap(source: TextSource, tokenizer, cache_dir=None, progress: bool = True) -> Path:
    """Tokenise ``source`` into ``<cache_dir>/<hash>.bin`` (skipped when already cached); return its path.

    Documents are joined with the tokenizer's end-of-text token (or a blank line when
    it has none). The .bin is written to a temporary name and renamed, and its .json
    sidecar (dtype, token count) is written last, so a crash never leaves an entry
    that looks complete.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else paths.cache_dir("tokens")
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(
        f"v{TOKEN_CACHE_VERSION}|{source.fingerprint()}|{tokenizer_fingerprint(tokenizer)}".encode()
    ).hexdigest()[:24]
    bin_path, meta_path = cache_dir / f"{key}.bin", cache_dir / f"{key}.json"
    if _cache_entry_valid(bin_path, meta_path):
        return bin_path

    dtype = token_dtype(tokenizer.vocab_size)
    separator = np.asarray(_separator_ids(tokenizer), dtype=np.int64)
    count = 0

    def write(out) -> None:
        nonlocal count
        for text, nbytes in source.documents():
            ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
            if ids.size:
                if ids.min() < 0 or ids.max() >= tokenizer.vocab_size:
                    raise DataError(f"tokenizer produced ids outside [0, {tokenizer.vocab_size})")
                # Separators go between documents: the first document starts the file bare.
                if count:
                    ids = np.concatenate([separator, ids])
                ids.astype(dtype).tofile(out)
                count += ids.size
            bar.update(nbytes)
        if count == 0:
            raise DataError(f"no text found in {source.description}: it tokenises to zero tokens")

    remove_stale_temp_files(cache_dir)  # what tokenisers killed mid-write left behind
    bar = _progress_bar(total=source.total_bytes(), desc=f"tokenising {source.description}", enabled=progress)
    try:
        write_atomically(bin_path, write)
    finally:
        bar.close()
    meta = {"version": TOKEN_CACHE_VERSION, "dtype": dtype.name, "num_tokens": count, "source": source.description}
    write_atomically(meta_path, lambda f: f.write(json.dumps(meta).encode()))
    return bin_path


def _cache_entry_valid(bin_path: Path, meta_path: Path) -> bool:
    if not (bin_path.exists() and meta_path.exists()):
        return False
    try:
        meta = json.loads(meta_path.read_text())
        return bin_path.stat().st_size == meta["num_tokens"] * np.dtype(meta["dtype"]).itemsize
    except (OSError, ValueError, KeyError, TypeError):
        return False


def load_tokens(bin_path) -> np.ndarray:
    """The read-only memmap of a cached token file."""
    bin_path = Path(bin_path)
    meta_path = bin_path.with_suffix(".json")
    if not _cache_entry_valid(bin_path, meta_path):
        raise DataError(f"token cache {bin_path} is missing or incomplete")
    meta = json.loads(meta_path.read_text())
    return np.memmap(bin_path, dtype=np.dtype(meta["dtype"]), mode="r", shape=(meta["num_tokens"],))


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled, leave=False)


# ---------------------------------------------------------------------------------------
# Pretraining splits and random-window batches
# ---------------------------------------------------------------------------------------


class TokenSplit:
    """A contiguous run of tokens (one split, possibly one rank's shard of it)."""

    def __init__(self, tokens: np.ndarray, name: str):
        self.tokens = tokens
        self.name = name

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def check_block_size(self, block_size: int) -> None:
        if len(self.tokens) < block_size + 1:
            raise DataError(
                f"the {self.name} data has {len(self.tokens)} tokens, fewer than one window of block_size + 1 = "
                f"{block_size + 1}; use more data, a smaller block_size, or a different val_fraction"
            )

    def shard(self, rank: int, world_size: int) -> "TokenSplit":
        """Rank ``rank``'s contiguous 1/world_size of the tokens."""
        if world_size == 1:
            return self
        per_rank = len(self.tokens) // world_size
        return TokenSplit(self.tokens[rank * per_rank : (rank + 1) * per_rank], f"{self.name} shard {rank}/{world_size}")

    def _windows(self, starts: Sequence[int], block_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([np.asarray(self.tokens[s : s + block_size + 1], dtype=np.int64) for s in starts])
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]

    def random_batch(self, batch_size: int, block_size: int, generator: torch.Generator):
        """``batch_size`` windows at uniformly random starts: inputs and next-token targets, (B, T) int64."""
        self.check_block_size(block_size)
        starts = torch.randint(0, len(self.tokens) - block_size, (batch_size,), generator=generator)
        return self._windows(starts.tolist(), block_size)

    def eval_batches(self, batch_size: int, block_size: int, max_batches: Optional[int], rank: int = 0, world_size: int = 1):
        """Consecutive non-overlapping windows from the start, the same number on every rank."""
        self.check_block_size(block_size)
        starts = list(range(0, len(self.tokens) - block_size, block_size))
        for batch in _equal_rank_batches(starts, batch_size, max_batches, rank, world_size):
            yield self._windows(batch, block_size)


def _equal_rank_batches(items: list, batch_size: int, max_batches: Optional[int], rank: int, world_size: int):
    """Split ``items`` into batches so every rank gets the same number of batches
    (FSDP needs every rank in every forward). With fewer items than ranks, ranks repeat items."""
    per_rank = len(items) // world_size
    if max_batches is not None:
        per_rank = min(per_rank, max_batches * batch_size)
    if per_rank == 0:
        mine = [items[rank % len(items)]]
    else:
        mine = items[rank * per_rank : (rank + 1) * per_rank]
    for i in range(0, len(mine), batch_size):
        yield mine[i : i + batch_size]


def split_tokens(tokens: np.ndarray, val_fraction: float) -> Tuple[TokenSplit, TokenSplit]:
    """The first ``1 - val_fraction`` of the tokens train, the rest validate."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = max(1, int(round(len(tokens) * val_fraction)))
    n_train = len(tokens) - n_val
    return TokenSplit(tokens[:n_train], "training"), TokenSplit(tokens[n_train:], "validation")


# ---------------------------------------------------------------------------------------
# Fine-tuning examples with masked prompts
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Example:
    """One fine-tuning sequence: token ids and which of them the loss is computed on."""

    ids: np.ndarray  # (L,) int64
    is_target: np.ndarray  # (L,) bool: True on completion / assistant tokens

    def inputs_and_targets(self) -> Tuple[np.ndarray, np.ndarray]:
        """Next-token pairs: input ids[:-1]; target ids[1:] where that token is a completion token, else -100."""
        targets = np.where(self.is_target[1:], self.ids[1:], IGNORE_INDEX)
        return self.ids[:-1], targets


def _encode_example(pieces: List[Tuple[str, bool]], tokenizer, eos: bool) -> Example:
    """Tokenise ``(text, is_target)`` pieces separately so the mask falls on token boundaries."""
    ids, mask = [], []
    for text, is_target in pieces:
        piece = tokenizer.encode(text) if text else []
        ids.extend(piece)
        mask.extend([is_target] * len(piece))
    if eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        mask.append(True)  # learning where to stop is part of the completion
    return Example(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool))


def format_chat(messages, path, line_no) -> List[Tuple[str, bool]]:
    """Render chat messages as ``"role: content\\n"`` lines; only assistant content is a target."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{path}:{line_no}: 'messages' must be a non-empty list")
    pieces = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise DataError(f"{path}:{line_no}: messages[{i}] must be an object with string fields 'role' and 'content'")
        is_assistant = message["role"] == "assistant"
        pieces.append((f"{message['role']}: ", False))
        pieces.append((message["content"] + "\n", is_assistant))
    if not any(target for _, target in pieces):
        raise DataError(f"{path}:{line_no}: no message has role 'assistant', so there is nothing to learn")
    return pieces


def load_finetune_examples(path, tokenizer) -> List[Example]:
    """Parse a fine-tuning JSONL (``prompt``/``completion`` or ``messages`` per line)."""
    path = Path(path)
    examples = []
    for line_no, line, _ in _jsonl_lines(path):
        record = _parse_json_line(line, path, line_no)
        if "messages" in record:
            pieces = format_chat(record["messages"], path, line_no)
        else:
            missing = [k for k in ("prompt", "completion") if not isinstance(record.get(k), str)]
            if missing:
                raise DataError(
                    f"{path}:{line_no}: missing string field(s) {missing}; each line needs 'prompt' and 'completion' "
                    f"(or 'messages'), found keys {sorted(record)}"
                )
            pieces = [(record["prompt"], False), (record["completion"], True)]
        example = _encode_example(pieces, tokenizer, eos=True)
        if len(example.ids) < 2 or not example.is_target[1:].any():
            raise DataError(f"{path}:{line_no}: the example has no completion tokens to learn (empty completion?)")
        examples.append(example)
    if not examples:
        raise DataError(f"data file {str(path)!r} is empty: no fine-tuning examples")
    return examples


class ExampleSplit:
    """Fine-tuning examples; batches are right-padded (inputs with 0, targets with -100)."""

    def __init__(self, examples: List[Example], name: str):
        self.examples = examples
        self.name = name

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def num_tokens(self) -> int:
        return sum(len(e.ids) for e in self.examples)

    def check_block_size(self, block_size: int) -> None:
        if not self.examples:
            raise DataError(f"the {self.name} data holds no examples (fewer fine-tuning examples than ranks?)")
        too_long = [i for i, e in enumerate(self.examples) if len(e.ids) - 1 > block_size]
        if too_long:
            longest = max(len(self.examples[i].ids) - 1 for i in too_long)
            raise DataError(
                f"{len(too_long)} {self.name} example(s) are longer than block_size {block_size} "
                f"(longest: {longest} tokens); shorten them or raise block_size (up to the model's context)"
            )

    def shard(self, rank: int, world_size: int) -> "ExampleSplit":
        if world_size == 1:
            return self
        return ExampleSplit(self.examples[rank::world_size], f"{self.name} shard {rank}/{world_size}")

    def collate(self, indices, pad_to: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.examples[i].inputs_and_targets() for i in indices]
        length = pad_to or max(len(x) for x, _ in pairs)
        x = torch.zeros(len(pairs), length, dtype=torch.long)
        y = torch.full((len(pairs), length), IGNORE_INDEX, dtype=torch.long)
        for row, (inputs, targets) in enumerate(pairs):
            x[row, : len(inputs)] = torch.from_numpy(inputs)
            y[row, : len(targets)] = torch.from_numpy(targets)
        return x, y

    def random_batch(self, batch_size: int, block_size: int, generator: torch.Generator, pad_to_block: bool = False):
        self.check_block_size(block_size)
        indices = torch.randint(0, len(self.examples), (batch_size,), generator=generator).tolist()
        return self.collate(indices, block_size if pad_to_block else None)

    def eval_batches(self, batch_size: int, block_size: int, max_batches: Optional[int], rank: int = 0, world_size: int = 1):
        self.check_block_size(block_size)
        for batch in _equal_rank_batches(list(range(len(self.examples))), batch_size, max_batches, rank, world_size):
            yield self.collate(batch)


def split_examples(examples: List[Example], val_fraction: float) -> Tuple[ExampleSplit, ExampleSplit]:
    """The last ``val_fraction`` of the examples (at least one) validate; a single example does both."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(examples) == 1:
        return ExampleSplit(examples, "training"), ExampleSplit(examples, "validation")
    n_val = min(len(examples) - 1, max(1, int(round(len(examples) * val_fraction))))
    return ExampleSplit(examples[:-n_val], "training"), ExampleSplit(examples[-n_val:], "validation")


# ---------------------------------------------------------------------------------------
# Putting it together
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Dataset:
    """Train and validation splits of one data source."""

    train: object  # TokenSplit or ExampleSplit
    val: object
    kind: str  # "pretrain" or "finetune"
    description: str
    whole: object = None  # train + val as one split (for evaluating a model on all of the data)

    def split(self, name: str):
        """``train``, ``val`` or ``all``."""
        splits = {"train": self.train, "val": self.val, "all": self.whole}
        if name not in splits:
            raise ValueError(f"unknown split {name!r}; choose train, val or all")
        return splits[name]

    def check_block_size(self, block_size: int) -> None:
        self.train.check_block_size(block_size)
        self.val.check_block_size(block_size)


def load_dataset(
    data: Optional[str],
    tokenizer,
    *,
    val_fraction: float = 0.05,
    cache_dir=None,
    corpus_max_bytes: Optional[int] = None,
    finetune: Optional[bool] = None,
    progress: bool = True,
) -> Dataset:
    """Load ``data`` (None for the embedded stdlib corpus) into train/val splits.

    ``finetune=None`` detects fine-tuning data from the first record of a JSONL.
    """
    if data is not None and not Path(data).exists():
        raise DataError(f"data path {str(data)!r} does not exist")
    is_jsonl = data is not None and Path(data).is_file() and Path(data).suffix == ".jsonl"
    if finetune is None:
        finetune = is_jsonl and jsonl_kind(data) == "finetune"
    if finetune:
        if not is_jsonl:
            raise DataError(f"fine-tuning data must be a .jsonl file of prompt/completion or messages records, got {data!r}")
        examples = load_finetune_examples(data, tokenizer)
        train, val = split_examples(examples, val_fraction)
        return Dataset(train, val, "finetune", str(data), ExampleSplit(examples, "whole"))
    source = resolve_text_source(data, corpus_max_bytes)
    tokens = load_tokens(tokenize_to_memmap(source, tokenizer, cache_dir, progress=progress))
    train, val = split_tokens(tokens, val_fraction)
    return Dataset(train, val, "pretrain", source.description, TokenSplit(tokens, "whole"))


class BatchSampler:
    """Random training batches from one split with an explicit generator.

    ``state_dict`` holds the generator state and the number of batches drawn (the data
    position), which is all a resumed run needs to continue the same batch sequence.
    """

    def __init__(self, split, batch_size: int, block_size: int, seed: int, pad_to_block: bool = False):
        split.check_block_size(block_size)
        self.split, self.batch_size, self.block_size, self.pad_to_block = split, batch_size, block_size, pad_to_block
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0

    def next_batch(self) -> Tuple[torch.Tensor, torch.Tensor]:
        self.batches_drawn += 1
        if isinstance(self.split, ExampleSplit):
            return self.split.random_batch(self.batch_size, self.block_size, self.generator, self.pad_to_block)
        return self.split.random_batch(self.batch_size, self.block_size, self.generator)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.batches_drawn = int(state["batches_drawn"])
