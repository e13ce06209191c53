"""The sampler's Python face: ``SamplingParams``, batching them into per-row tensors, and
loading the C++ extension (with the Python twin as the fallback).

The algorithm itself is documented, and implemented in pure PyTorch, in
``gptfast.reference.sampling``; ``csrc/sampling.cpp`` runs the same operations in C++.
"""
import dataclasses
import glob
import hashlib
import importlib
import math
import os
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch

from gptfast import paths
from gptfast.reference import sampling as twin
from gptfast.reference.sampling import DecodeState, SamplingTensors

MAX_SEED = 2**63 - 1


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """How one request is decoded. Validated at construction (``ValueError``/``TypeError``).

    Logits go through these processors, in Hugging Face ``generate``'s order:

    1. ``repetition_penalty`` (HF semantics; 1 = off): for every token already generated
       (and, when ``penalize_prompt``, every prompt token), a positive logit is divided by
       the penalty and a negative one multiplied by it;
    2. ``presence_penalty`` and ``frequency_penalty`` (OpenAI semantics; 0 = off), over
       generated tokens: ``logit - frequency * count - presence * (count > 0)``;
    3. ``logit_bias``: {token id: value} added to the logits (``-inf`` bans a token);
    4. ``min_new_tokens``: stop tokens are masked until that many tokens exist;
    5. ``temperature`` (0 = greedy: the argmax of the logits after steps 1-4);
    6. ``top_k`` (0 = off): keep exactly the k most likely tokens;
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
        def fail(message, error=ValueError):
            raise error(f"SamplingParams: {message}")

        for name in ("max_new_tokens", "min_new_tokens", "top_k"):
            if not _is_int(getattr(self, name)):
                fail(f"{name} must be an int, got {getattr(self, name)!r}", TypeError)
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value):
                fail(f"{name} must be a number, got {value!r}", TypeError)
            if not math.isfinite(value):
                fail(f"{name} must be finite, got {value!r}")
        for name in ("penalize_prompt", "ignore_eos"):
            if not isinstance(getattr(self, name), bool):
                fail(f"{name} must be True or False, got {getattr(self, name)!r}", TypeError)
        if self.max_new_tokens < 1:
            fail(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            fail(f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens}")
        if self.temperature < 0:
            fail(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            fail(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            fail(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            fail(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            fail(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            fail(f"seed must be an int in [0, 2**63 - 1] or None, got {self.seed!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            fail(f"logprobs must be None or an int >= 0, got {self.logprobs!r}")
        self.stop_token_ids = tuple(self.stop_token_ids)
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                fail(f"stop_token_ids must be non-negative ints, got {t!r}")
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                fail(f"stop strings must be non-empty str, got {s!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, Mapping):
                fail(f"logit_bias must be a mapping {{token id: bias}}, got {type(self.logit_bias).__name__}", TypeError)
            self.logit_bias = dict(self.logit_bias)
            for token, bias in self.logit_bias.items():
                if not _is_int(token) or token < 0:
                    fail(f"logit_bias keys must be non-negative token ids, got {token!r}")
                if not _is_number(bias) or math.isnan(bias) or bias == math.inf:
                    fail(f"logit_bias[{token}] must be a finite number or -inf, got {bias!r}")

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


def _check_token_ids(what: str, ids, vocab_size: int) -> None:
    bad = [t for t in ids if t >= vocab_size]
    if bad:
        raise ValueError(f"SamplingParams.{what}: token ids {bad} are outside the vocabulary of {vocab_size} tokens")


def stop_ids_of(p: SamplingParams, eos_token_id) -> list:
    """The token ids that end a row: ``stop_token_ids`` plus end-of-text unless ignored."""
    ids = list(p.stop_token_ids)
    if eos_token_id is not None and not p.ignore_eos and eos_token_id not in ids:
        ids.append(eos_token_id)
    return ids


def build_sampling_tensors(params: Sequence[SamplingParams], vocab_size: int, seeds: Sequence[int], device,
                           eos_token_id=None, token_table=None) -> SamplingTensors:
    """Per-row tensors for ``params`` (one per batch row) on ``device``.

    ``token_table`` is the hash table of the engine that will sample (the twin's by
    default; the C++ one has the same bits).
    """
    B, V = len(params), vocab_size
    if B == 0:
        raise ValueError("build_sampling_tensors: no rows")
    for p in params:
        _check_token_ids("stop_token_ids", p.stop_token_ids, V)
        _check_token_ids("logit_bias", list(p.logit_bias or ()), V)
        if p.logprobs is not None and p.logprobs > V:
            raise ValueError(f"SamplingParams.logprobs: {p.logprobs} alternatives requested from a {V}-token vocabulary")

    def col(values, dtype):
        return torch.tensor(values, dtype=dtype, device=device)[:, None]

    sampled = [p for p in params if not p.greedy]
    # Candidate list (see gptfast.reference.sampling.choose_tokens): the top K when every
    # sampled row has a top_k, the whole vocabulary sorted when top-p needs it without one.
    if not any(p.top_k > 0 or p.top_p < 1 for p in sampled):
        num_candidates = 0
    elif all(p.top_k > 0 for p in sampled):
        num_candidates = min(V, max(p.top_k for p in sampled))
    else:
        num_candidates = V
    kept = [min(p.top_k, num_candidates) if p.top_k > 0 and not p.greedy else num_candidates for p in params]

    stop_ids = [stop_ids_of(p, eos_token_id) for p in params]
    stop_mask = None
    if any(stop_ids):
        stop_mask = torch.zeros(B, V, dtype=torch.bool, device=device)
        for row, ids in enumerate(stop_ids):
            stop_mask[row, ids] = True
    logit_bias = None
    if any(p.logit_bias for p in params):
        logit_bias = torch.zeros(B, V, dtype=torch.float32, device=device)
        for row, p in enumerate(params):
            for token, bias in (p.logit_bias or {}).items():
                logit_bias[row, token] = bias
    requested = [p.logprobs for p in params if p.logprobs is not None]

    return SamplingTensors(
        greedy=torch.tensor([p.greedy for p in params], dtype=torch.bool, device=device),
        temperature=col([1.0 if p.greedy else p.temperature for p in params], torch.float32),
        top_k=col(kept, torch.int64),
        top_p=col([p.top_p if p.top_p < 1 and not p.greedy else math.inf for p in params], torch.float64),
        log_min_p=col([math.log(p.min_p) if p.min_p > 0 and not p.greedy else -math.inf for p in params],
                      torch.float32),
        repetition_penalty=col([p.repetition_penalty for p in params], torch.float32),
        presence_penalty=col([p.presence_penalty for p in params], torch.float32),
        frequency_penalty=col([p.frequency_penalty for p in params], torch.float32),
        min_new_tokens=torch.tensor([p.min_new_tokens for p in params], dtype=torch.int64, device=device),
        max_new_tokens=torch.tensor([p.max_new_tokens for p in params], dtype=torch.int64, device=device),
        seed=torch.tensor(list(seeds), dtype=torch.int64, device=device),
        token_table=(token_table or twin.token_table)(V, device),
        logit_bias=logit_bias,
        stop_mask=stop_mask,
        all_greedy=not sampled,
        use_repetition=any(p.repetition_penalty != 1 for p in params),
        use_presence_frequency=any(p.presence_penalty != 0 or p.frequency_penalty != 0 for p in params),
        use_min_new=stop_mask is not None and any(p.min_new_tokens > 0 for p in params),
        use_top_k=any(k < num_candidates for k in kept),
        use_top_p=any(p.top_p < 1 for p in sampled),
        use_min_p=any(p.min_p > 0 for p in sampled),
        num_candidates=num_candidates,
        num_logprobs=max(requested) if requested else -1,
    )


def new_decode_state(prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams], tensors: SamplingTensors,
                     vocab_size: int, device) -> DecodeState:
    """The loop state before the first sampled token: each row's last prompt token sits
    at position ``len(prompt) - 1``; the first sample moves it to ``len(prompt)``."""
    B = len(prompts)
    width = max(p.max_new_tokens for p in params)
    lens = torch.tensor([len(t) for t in prompts], dtype=torch.int64, device=device)
    last = torch.tensor([t[-1] for t in prompts], dtype=torch.int64, device=device)
    counts = prompt_seen = None
    if tensors.use_repetition or tensors.use_presence_frequency:
        counts = torch.zeros(B, vocab_size, dtype=torch.int32, device=device)
    if tensors.use_repetition and any(p.penalize_prompt for p in params):
        prompt_seen = torch.zeros(B, vocab_size, dtype=torch.bool, device=device)
        for row, (tokens, p) in enumerate(zip(prompts, params)):
            if p.penalize_prompt:
                prompt_seen[row, list(tokens)] = True
    n = tensors.num_logprobs
    return DecodeState(
        tokens=last[:, None].clone(),
        positions=(lens - 1)[:, None].clone(),
        step=torch.zeros(1, dtype=torch.int64, device=device),
        generated=torch.zeros(B, dtype=torch.int64, device=device),
        finished=torch.zeros(B, dtype=torch.bool, device=device),
        finish_reason=torch.zeros(B, dtype=torch.int64, device=device),
        bad_step=torch.full((B,), -1, dtype=torch.int64, device=device),
        out_tokens=torch.full((B, width), -1, dtype=torch.int64, device=device),
        counts=counts,
        prompt_seen=prompt_seen,
        out_logprobs=torch.zeros(B, width, device=device) if n >= 0 else None,
        out_top_ids=torch.zeros(B, width, n, dtype=torch.int64, device=device) if n > 0 else None,
        out_top_logprobs=torch.zeros(B, width, n, device=device) if n > 0 else None,
    )


# ---- the C++ extension ------------------------------------------------------------------

EXTENSION_API_VERSION = 2  # must match kApiVersion in csrc/sampling.cpp
# Compiler flags of every build (setup.py repeats them). ISO C++ (not gnu++) keeps the
# compiler from fusing a * b + c into an FMA, which would round differently from the twin;
# -fno-trapping-math lets branch-free loops with a division vectorise (rounding unchanged).
EXTENSION_CFLAGS = ["-O3", "-std=c++17", "-fno-trapping-math"]
NO_EXT_ENV = "GPTFAST_NO_EXT"


class SamplingExtensionWarning(UserWarning):
    """The C++ sampler could not be loaded or built; gptfast uses the Python twin."""


@dataclass
class _Loaded:
    module: object = None
    status: str = ""
    tried: bool = False
    extra: dict = field(default_factory=dict)


_loaded = _Loaded()


def source_files() -> list:
    """csrc/*.cpp of a source checkout (beside the package), else of the installed package."""
    package_dir = os.path.dirname(os.path.abspath(__file__))
    for directory in (os.path.join(os.path.dirname(package_dir), "csrc"), os.path.join(package_dir, "csrc")):
        files = sorted(glob.glob(os.path.join(directory, "*.cpp")))
        if files:
            return files
    return []


def cache_dir() -> str:
    """Where JIT builds go: gptfast.paths.cache_dir()."""
    return str(paths.cache_dir())


def _prebuilt():
    """gptfast._C as built by setup.py, or (None, reason)."""
    try:
        module = importlib.import_module("gptfast._C")
    except ImportError as e:
        return None, f"gptfast._C not built ({e})"
    if getattr(module, "API_VERSION", None) != EXTENSION_API_VERSION:
        return None, f"gptfast._C is API version {getattr(module, 'API_VERSION', None)}, expected {EXTENSION_API_VERSION}"
    built = getattr(module, "__file__", None)
    sources = source_files()
    if built and sources and max(os.path.getmtime(s) for s in sources) > os.path.getmtime(built):
        return None, "gptfast._C is older than csrc/ (rebuild with pip install --no-build-isolation -e .)"
    return module, f"C++ extension gptfast._C ({built})"


def _jit(sources):
    """Build (once, cached by source and torch version) and load the extension."""
    from torch.utils import cpp_extension

    digest = hashlib.sha256()
    for path in sources:
        with open(path, "rb") as f:
            digest.update(f.read())
    digest.update(f"{torch.__version__} {sys.version} {EXTENSION_API_VERSION} {EXTENSION_CFLAGS}".encode())
    tag = digest.hexdigest()[:16]
    name = f"gptfast_sampling_{tag}"
    build_dir = os.path.join(cache_dir(), f"ext-{tag}")
    os.makedirs(build_dir, exist_ok=True)
    if not glob.glob(os.path.join(build_dir, f"{name}*.so")) and not glob.glob(os.path.join(build_dir, f"{name}*.pyd")):
        print(f"gptfast: building the C++ sampling extension (first use; minutes on a small CPU) in {build_dir}",
              file=sys.stderr, flush=True)
    module = cpp_extension.load(name=name, sources=list(sources), build_directory=build_dir,
                                extra_cflags=EXTENSION_CFLAGS, verbose=False)
    if getattr(module, "API_VERSION", None) != EXTENSION_API_VERSION:
        raise RuntimeError(f"built extension has API version {getattr(module, 'API_VERSION', None)}")
    return module, f"C++ extension, JIT-built in {build_dir}"


def load_extension():
    """The C++ sampler module, or None (after a one-line warning) to use the Python twin.

    Tries, in order: nothing when $GPTFAST_NO_EXT=1; the setup.py-built ``gptfast._C``;
    a JIT build of csrc/ into the cache directory. The outcome is remembered.
    """
    if _loaded.tried:
        return _loaded.module
    _loaded.tried = True
    if os.environ.get(NO_EXT_ENV) == "1":
        return _fall_back(f"{NO_EXT_ENV}=1")
    module, reason = _prebuilt()
    if module is not None:
        _loaded.module, _loaded.status = module, reason
        return module
    sources = source_files()
    if not sources:
        return _fall_back(f"{reason}; no csrc/*.cpp to build from")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return _fall_back(f"{reason}; no C++ compiler ({compiler}) to build it")
    try:
        _loaded.module, _loaded.status = _jit(sources)
    except Exception as e:  # a failed build must not take generation down with it
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return _fall_back(f"JIT build failed: {first_line[:200]}")
    return _loaded.module


def _fall_back(reason: str):
    _loaded.module, _loaded.status = None, f"Python twin ({reason})"
    warnings.warn(
        f"gptfast: C++ sampling extension unavailable ({reason}); using the Python twin (same tokens, slower loop)",
        SamplingExtensionWarning,
        stacklevel=3,
    )
    return None


def extension_status() -> str:
    """One line: which sampler implementation serves generation here (loads it if needed)."""
    load_extension()
    return _loaded.status


def reset_extension_cache() -> None:
    """Forget the loader's outcome (tests, or after building the extension in-process)."""
    global _loaded
    _loaded = _Loaded()
