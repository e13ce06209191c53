"""The sampler's data: per-row parameter tensors (``SamplingTensors``), the loop state
(``DecodeState``) and the finish codes.

Plain dataclasses of tensors, shared by the three parts that must agree on them: the
Python twin (``gptfast.reference.sampler``), the product (``gptfast.generation.sampling_params`` builds
them, ``gptfast.generation.generate`` drives the loop) and the C++ binding (csrc/sampling.cpp
reads the same field names). This module imports nothing of gptfast.
"""
from dataclasses import dataclass, fields
from typing import Optional

import torch

FINISH_RUNNING, FINISH_STOP_TOKEN, FINISH_LENGTH, FINISH_STOP_STRING = 0, 1, 2, 3


@dataclass
class SamplingTensors:
    """Per-row sampling parameters of one batch, as tensors on the logits' device, plus
    host-side facts about the batch that pick which processors run at all.

    Row parameters that are "off" are exact no-ops (penalty 1, bias 0, top_p = inf ...),
    so a row's tokens do not depend on what the other rows asked for.
    """

    greedy: torch.Tensor  # (B,) bool: temperature == 0
    temperature: torch.Tensor  # (B, 1) float32; 1.0 for greedy rows
    top_k: torch.Tensor  # (B, 1) int64: the k of top-k (ties with the k-th kept); V when off
    top_p: torch.Tensor  # (B, 1) float64; inf when off
    log_min_p: torch.Tensor  # (B, 1) float32; -inf when off
    repetition_penalty: torch.Tensor  # (B, 1) float32
    presence_penalty: torch.Tensor  # (B, 1) float32
    frequency_penalty: torch.Tensor  # (B, 1) float32
    min_new_tokens: torch.Tensor  # (B,) int64
    max_new_tokens: torch.Tensor  # (B,) int64
    seed: torch.Tensor  # (B,) int64 in [0, 2**63 - 1]
    token_table: torch.Tensor  # (V,) int64, token_table(V)
    logit_bias: Optional[torch.Tensor] = None  # (B, V) float32
    stop_mask: Optional[torch.Tensor] = None  # (B, V) bool: stop token ids (eos included)
    # Host-side facts (the same for every row of the batch).
    all_greedy: bool = False
    use_repetition: bool = False
    use_presence_frequency: bool = False
    use_min_new: bool = False
    use_top_k: bool = False
    use_top_p: bool = False
    use_min_p: bool = False
    sort_vocab: bool = False  # race over the vocabulary sorted by z (top-k or top-p in use)
    max_top_k: int = 0  # every sampled row has top_k <= max_top_k < V (0: not so); a CPU shortcut
    num_logprobs: int = -1  # -1: off; N >= 0: chosen token's logprob plus the top N


@dataclass
class DecodeState:
    """Everything the loop changes, on the device; the sampled token never leaves it.

    ``tokens``/``positions`` are the next model input: the last sampled token of each
    row and the position it occupies. Finished rows keep feeding their last token at a
    frozen position (harmless: it rewrites the same cache entry) until the loop ends.
    """

    tokens: torch.Tensor  # (B, 1) int64
    positions: torch.Tensor  # (B, 1) int64
    step: torch.Tensor  # (1,) int64: tokens generated so far by every running row (plain decoding; speculative
    # rounds key their noise by each row's ``generated`` instead and leave it alone)
    generated: torch.Tensor  # (B,) int64: tokens generated per row
    finished: torch.Tensor  # (B,) bool
    finish_reason: torch.Tensor  # (B,) int64: FINISH_* codes
    bad_step: torch.Tensor  # (B,) int64: first step with NaN / all -inf logits, -1 if none
    out_tokens: torch.Tensor  # (B, max_new) int64, -1 where no token
    counts: Optional[torch.Tensor] = None  # (B, V) int32 generated-token counts (penalties)
    prompt_seen: Optional[torch.Tensor] = None  # (B, V) bool prompt tokens (repetition penalty)
    out_logprobs: Optional[torch.Tensor] = None  # (B, max_new) float32
    out_top_ids: Optional[torch.Tensor] = None  # (B, max_new, N) int64
    out_top_logprobs: Optional[torch.Tensor] = None  # (B, max_new, N) float32

    def clone(self) -> "DecodeState":
        return DecodeState(**{f.name: None if t is None else t.clone() for f, t in _items(self)})

    def copy_(self, other: "DecodeState") -> "DecodeState":
        """Copy ``other``'s values into this state's tensors (which keep their storage)."""
        copy_fields(self, other)
        return self


def _items(obj):
    return [(f, getattr(obj, f.name)) for f in fields(obj)]


def copy_fields(dst, src) -> None:
    """Copy ``src``'s tensors into ``dst``'s (same shapes and dtypes); host fields must match."""
    for f, a in _items(dst):
        b = getattr(src, f.name)
        if isinstance(a, torch.Tensor):
            if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
                raise ValueError(f"copy_: field {f.name!r} does not match ({_describe(a)} vs {_describe(b)})")
            a.copy_(b)
        elif a != b:
            raise ValueError(f"copy_: field {f.name!r} differs ({a!r} vs {b!r})")


def _describe(t):
    return f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else repr(t)


@dataclass
class SpeculativeState:
    """What speculative decoding keeps beside the ``DecodeState`` (on the device).

    ``prev_tokens`` is the token before ``DecodeState.tokens`` (at position ``positions - 1``):
    each round's first draft step feeds both, so the draft's cache also holds a fully
    accepted block's last draft token, which the draft itself never fed. ``drafted`` and
    ``accepted`` count, per row, the draft tokens proposed and accepted (rounds of running
    rows only).
    """

    prev_tokens: torch.Tensor  # (B, 1) int64
    drafted: torch.Tensor  # (B,) int64
    accepted: torch.Tensor  # (B,) int64
