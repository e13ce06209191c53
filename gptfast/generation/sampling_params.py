"""The sampler's parameters: ``SamplingParams`` (validated where they enter), and
batching them into the per-row tensors the sampling step reads.

The algorithm itself is documented, and implemented in pure PyTorch, in
``gptfast.reference.sampler``; ``csrc/sampling.cpp`` runs the same operations in C++
(loaded by ``gptfast.runtime.extension``). The tensors' layout is ``gptfast.generation.decode_state``.
"""
import dataclasses
import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

from gptfast.generation.decode_state import DecodeState, SamplingTensors
from gptfast.reference import sampler as twin

MAX_SEED = 2**63 - 1
FLOAT32_MAX = float(torch.finfo(torch.float32).max)

# Numeric fields: (lowest, highest, lowest excluded, 0 also allowed). The bounds keep
# every value, and what the processors compute from it, finite in float32 (a penalty of
# 1e300 would turn logits into NaN); they are far outside any useful setting.
_RANGES = {
    "temperature": (1e-6, 1e6, False, True),
    "top_p": (0.0, 1.0, True, False),
    "min_p": (0.0, 1.0, False, False),
    "repetition_penalty": (1e-6, 1e6, False, False),
    "presence_penalty": (-1e6, 1e6, False, False),
    "frequency_penalty": (-1e6, 1e6, False, False),
}
_INTS = {"max_new_tokens": 1, "min_new_tokens": 0, "top_k": 0}  # name: lowest value
_BOOLS = ("penalize_prompt", "ignore_eos")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fail(message, error=ValueError):
    raise error(f"SamplingParams: {message}")


def _check_range(name, value) -> None:
    low, high, low_open, zero_ok = _RANGES[name]
    if not _is_number(value):
        _fail(f"{name} must be a number, got {value!r}", TypeError)
    if zero_ok and value == 0:
        return
    if not (low < value if low_open else low <= value) or not value <= high:  # NaN fails too
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        _fail(f"{name} must be {'0 or ' if zero_ok else ''}in {interval}, got {value!r}")


def _check_logit_bias(bias) -> dict:
    if not isinstance(bias, Mapping):
        _fail(f"logit_bias must be a mapping {{token id: bias}}, got {type(bias).__name__}", TypeError)
    for token, value in bias.items():
        if not _is_int(token) or token < 0:
            _fail(f"logit_bias keys must be non-negative token ids, got {token!r}")
        if not _is_number(value) or not (value == -math.inf or abs(value) <= FLOAT32_MAX):
            _fail(f"logit_bias[{token}] must be a number within float32 range ({FLOAT32_MAX:.4g}) or -inf, "
                  f"got {value!r}")
    return dict(bias)


@dataclass
class SamplingParams:
    """How one request is decoded. Validated at construction (``ValueError``/``TypeError``).

    Logits go through these processors, in Hugging Face ``generate``'s order:

    1. ``repetition_penalty`` (HF semantics; 1 = off; in [1e-6, 1e6]): for every token
       already generated (and, when ``penalize_prompt``, every prompt token), a positive
       logit is divided by the penalty and a negative one multiplied by it;
    2. ``presence_penalty`` and ``frequency_penalty`` (OpenAI semantics; 0 = off; each in
       [-1e6, 1e6]), over generated tokens: ``logit - frequency * count - presence * (count > 0)``;
    3. ``logit_bias``: {token id: value} added to the logits (a float32 value, or ``-inf``
       to ban a token);
    4. ``min_new_tokens``: stop tokens are masked until that many tokens exist;
    5. ``temperature`` (0 = greedy: the argmax of the logits after steps 1-4; else in
       [1e-6, 1e6]);
    6. ``top_k`` (0 = off): keep the k most likely tokens and every token tied with the
       k-th (Hugging Face's TopKLogitsWarper rule, so more than k may stay);
    7. ``top_p`` (1 = off): keep the smallest set of most likely tokens whose probability
       reaches top_p;
    8. ``min_p`` (0 = off): drop tokens less likely than ``min_p`` times the top token.

    Then one token is drawn from what is left, with noise fixed by ``seed`` and the token's
    position in the output, so a seed gives the same tokens whatever else is in the batch.
    ``seed=None`` draws a seed from torch's default generator (``torch.manual_seed``
    makes that reproducible); results report the seed used.

    A row stops at a token of ``stop_token_ids`` or the tokenizer's end-of-text token
    (unless ``ignore_eos``), at a ``stop`` string (needs a tokenizer; the text is cut before
    it), or after ``max_new_tokens`` tokens. ``logprobs=N`` returns the log-probability of
    every chosen token plus the N most likely alternatives, under the model's raw
    distribution (before any processor).
    """

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalize_prompt: bool = True
    logit_bias: Optional[Mapping[int, float]] = None
    stop_token_ids: Sequence[int] = ()
    stop: Sequence[str] = ()
    ignore_eos: bool = False
    seed: Optional[int] = None
    logprobs: Optional[int] = None

    def __post_init__(self):
        for name, lowest in _INTS.items():
            value = getattr(self, name)
            if not _is_int(value):
                _fail(f"{name} must be an int, got {value!r}", TypeError)
            if value < lowest:
                _fail(f"{name} must be >= {lowest}, got {value}")
        if self.min_new_tokens > self.max_new_tokens:
            _fail(f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens}")
        for name in _RANGES:
            _check_range(name, getattr(self, name))
        for name in _BOOLS:
            if not isinstance(getattr(self, name), bool):
                _fail(f"{name} must be True or False, got {getattr(self, name)!r}", TypeError)
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            _fail(f"seed must be an int in [0, 2**63 - 1] or None, got {self.seed!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            _fail(f"logprobs must be None or an int >= 0, got {self.logprobs!r}")
        self.stop_token_ids = tuple(self.stop_token_ids)
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            _fail(f"stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}")
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if any(not isinstance(s, str) or not s for s in self.stop):
            _fail(f"stop strings must be non-empty str, got {self.stop!r}")
        if self.logit_bias is not None:
            self.logit_bias = _check_logit_bias(self.logit_bias)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replace(self, **changes) -> "SamplingParams":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


# ---- batching ---------------------------------------------------------------------------


def resolve_seeds(params: Sequence[SamplingParams]) -> list:
    """Each row's seed: its own, or one drawn from torch's default generator."""
    return [p.seed if p.seed is not None else int(torch.randint(0, MAX_SEED, ())) for p in params]


def to_device(host_tensors: Sequence[torch.Tensor], device) -> list:
    """Host tensors moved to ``device`` in one non-blocking copy (from pinned memory where
    CUDA is available), so that building a batch does not stall the host per tensor."""
    device = torch.device(device)
    if device.type == "cpu":
        return list(host_tensors)
    # One byte buffer; 8-byte dtypes first, then 4, then 1, so every view stays aligned.
    order = sorted(range(len(host_tensors)), key=lambda i: -host_tensors[i].element_size())
    flat = [host_tensors[i].contiguous().reshape(-1).view(torch.uint8) for i in order]
    buffer = torch.cat(flat)
    if torch.cuda.is_available():
        buffer = buffer.pin_memory()
    moved = buffer.to(device, non_blocking=True)
    out, offset = [None] * len(host_tensors), 0
    for i, part in zip(order, flat):
        t = host_tensors[i]
        out[i] = moved[offset:offset + part.numel()].view(t.dtype).view(t.shape)
        offset += part.numel()
    return out


def _check_token_ids(what: str, ids, vocab_size: int) -> None:
    bad = [t for t in ids if t >= vocab_size]
    if bad:
        raise ValueError(f"SamplingParams.{what}: token ids {bad} are outside the vocabulary of {vocab_size} tokens")


def _check_against_vocabulary(params, vocab_size) -> None:
    if not params:
        raise ValueError("build_sampling_tensors: no rows")
    for p in params:
        _check_token_ids("stop_token_ids", p.stop_token_ids, vocab_size)
        _check_token_ids("logit_bias", list(p.logit_bias or ()), vocab_size)
        if p.logprobs is not None and p.logprobs > vocab_size:
            raise ValueError(f"SamplingParams.logprobs: {p.logprobs} alternatives requested from a "
                             f"{vocab_size}-token vocabulary")


def stop_ids_of(p: SamplingParams, eos_token_id) -> list:
    """The token ids that end a row: ``stop_token_ids`` plus end-of-text unless ignored."""
    ids = list(p.stop_token_ids)
    if eos_token_id is not None and not p.ignore_eos and eos_token_id not in ids:
        ids.append(eos_token_id)
    return ids


def _row_columns(params, vocab_size, seeds) -> dict:
    """The per-row values of SamplingTensors' tensor fields, as host tensors."""
    def col(values, dtype):
        return torch.tensor(values, dtype=dtype)[:, None]

    sampled = [not p.greedy for p in params]
    return dict(
        greedy=torch.tensor([p.greedy for p in params]),
        temperature=col([1.0 if p.greedy else p.temperature for p in params], torch.float32),
        top_k=col([p.top_k if 0 < p.top_k < vocab_size and s else vocab_size for p, s in zip(params, sampled)],
                  torch.int64),
        top_p=col([p.top_p if p.top_p < 1 and s else math.inf for p, s in zip(params, sampled)], torch.float64),
        log_min_p=col([math.log(p.min_p) if p.min_p > 0 and s else -math.inf for p, s in zip(params, sampled)],
                      torch.float32),
        repetition_penalty=col([p.repetition_penalty for p in params], torch.float32),
        presence_penalty=col([p.presence_penalty for p in params], torch.float32),
        frequency_penalty=col([p.frequency_penalty for p in params], torch.float32),
        min_new_tokens=torch.tensor([p.min_new_tokens for p in params], dtype=torch.int64),
        max_new_tokens=torch.tensor([p.max_new_tokens for p in params], dtype=torch.int64),
        seed=torch.tensor(list(seeds), dtype=torch.int64),
    )


def _sparse_rows(rows, vocab_size, dtype):
    """(flat indices, values) of a (B, V) table given {token: value} per row; None if empty."""
    index = [row * vocab_size + token for row, entries in enumerate(rows) for token in entries]
    if not index:
        return None
    values = [value for entries in rows for value in entries.values()]
    return torch.tensor(index, dtype=torch.int64), torch.tensor(values, dtype=dtype)


def _dense(sparse, shape, dtype, device):
    """The (B, V) table of ``_sparse_rows`` on the device (a scatter: no host sync)."""
    if sparse is None:
        return None
    index, values = sparse
    return torch.zeros(shape, dtype=dtype, device=device).view(-1).scatter_(0, index, values).view(shape)


def build_sampling_tensors(params: Sequence[SamplingParams], vocab_size: int, seeds: Sequence[int], device,
                           eos_token_id=None, token_table=None) -> SamplingTensors:
    """Per-row tensors for ``params`` (one per batch row) on ``device``, sent in one copy.

    ``token_table`` is the hash table of the engine that will sample (the twin's by
    default; the C++ one has the same bits).
    """
    V = vocab_size
    _check_against_vocabulary(params, V)
    columns = _row_columns(params, V, seeds)
    stops = _sparse_rows([dict.fromkeys(stop_ids_of(p, eos_token_id), True) for p in params], V, torch.bool)
    biases = _sparse_rows([p.logit_bias or {} for p in params], V, torch.float32)
    host = list(columns.values()) + [t for pair in (stops, biases) if pair is not None for t in pair]
    moved = iter(to_device(host, device))
    columns = {name: next(moved) for name in columns}
    stops, biases = [None if pair is None else (next(moved), next(moved)) for pair in (stops, biases)]

    sampled = [p for p in params if not p.greedy]
    max_top_k = max((p.top_k for p in sampled), default=0)
    requested = [p.logprobs for p in params if p.logprobs is not None]
    return SamplingTensors(
        **columns,
        token_table=(token_table or twin.token_table)(V, device),
        logit_bias=_dense(biases, (len(params), V), torch.float32, device),
        stop_mask=_dense(stops, (len(params), V), torch.bool, device),
        all_greedy=not sampled,
        use_repetition=any(p.repetition_penalty != 1 for p in params),
        use_presence_frequency=any(p.presence_penalty != 0 or p.frequency_penalty != 0 for p in params),
        use_min_new=stops is not None and any(p.min_new_tokens > 0 for p in params),
        use_top_k=any(0 < p.top_k < V for p in sampled),
        use_top_p=any(p.top_p < 1 for p in sampled),
        use_min_p=any(p.min_p > 0 for p in sampled),
        sort_vocab=any(0 < p.top_k < V or p.top_p < 1 for p in sampled),
        max_top_k=max_top_k if all(0 < p.top_k < V for p in sampled) else 0,
        num_logprobs=max(requested) if requested else -1,
    )


def new_decode_state(prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams], tensors: SamplingTensors,
                     vocab_size: int, device) -> DecodeState:
    """The loop state before the first sampled token: each row's last prompt token sits
    at position ``len(prompt) - 1``; the first sample moves it to ``len(prompt)``."""
    B, V = len(prompts), vocab_size
    width = max(p.max_new_tokens for p in params)
    seen = None
    if tensors.use_repetition and any(p.penalize_prompt for p in params):
        seen = _sparse_rows([dict.fromkeys(t, True) if p.penalize_prompt else {} for t, p in zip(prompts, params)],
                            V, torch.bool)
    host = [torch.tensor([[t[-1]] for t in prompts], dtype=torch.int64),
            torch.tensor([[len(t) - 1] for t in prompts], dtype=torch.int64)] + list(seen or ())
    tokens, positions, *seen = to_device(host, device)
    n = tensors.num_logprobs

    def filled(shape, value, dtype=torch.int64):
        return torch.full(shape, value, dtype=dtype, device=device)

    return DecodeState(
        tokens=tokens,
        positions=positions,
        step=filled((1,), 0),
        generated=filled((B,), 0),
        finished=filled((B,), False, torch.bool),
        finish_reason=filled((B,), 0),
        bad_step=filled((B,), -1),
        out_tokens=filled((B, width), -1),
        counts=filled((B, V), 0, torch.int32) if tensors.use_repetition or tensors.use_presence_frequency else None,
        prompt_seen=_dense(seen, (B, V), torch.bool, device) if seen else None,
        out_logprobs=filled((B, width), 0.0, torch.float32) if n >= 0 else None,
        out_top_ids=filled((B, width, n), 0) if n > 0 else None,
        out_top_logprobs=filled((B, width, n), 0.0, torch.float32) if n > 0 else None,
    )
