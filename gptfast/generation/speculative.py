"""Speculative decoding with a draft model: checks, the model steps, the round loop's driver.

``gptfast.generate(model, prompts, params, draft_model=small, num_draft_tokens=k)``: each
round the draft proposes k tokens per row, the target scores them all in one verify
forward (``model(idx (B, k+1), input_pos=(B, k+1))``, gptfast.model), and each row keeps
the longest accepted prefix plus one token of the target's own (the rule, and why it keeps
greedy output exact and sampled output distributed as the target's, is the twin's
docstring: gptfast.reference.speculative_round). Rows advance by different amounts: each keeps
its own position, and rolling a cache back is resetting that position.

The loop runs in C++ (csrc/sampling.cpp ``speculative_loop``) or its Python twin
(gptfast.generation.engines); on CUDA the draft steps and the verify step are captured as CUDA graphs
on static inputs (three shapes: the first draft step feeds two tokens per row, the others
one, the verify step k+1); the acceptance math runs eagerly between them.
"""
import warnings

import torch

from gptfast.generation import cpu_decode
from gptfast.generation.decode_state import SpeculativeState

MAX_DRAFT_TOKENS = 16
DEFAULT_DRAFT_TOKENS = 4
_PROBE_TEXT = "def main():\n    return 'héllo wörld' + \u00e9\u4e16\u754c <|endoftext|> 0123456789"


def _same_tokenizer(a, b) -> bool:
    """Whether two tokenizers agree: same kind, vocabulary size, end-of-text id and encoding
    of a probe text (ASCII, accents, CJK, the special token)."""
    return (type(a) is type(b) and getattr(a, "vocab_size", None) == getattr(b, "vocab_size", None)
            and getattr(a, "eos_token_id", None) == getattr(b, "eos_token_id", None)
            and a.encode(_PROBE_TEXT) == b.encode(_PROBE_TEXT))


def check_no_draft(num_draft_tokens, draft_tokenizer) -> None:
    """The speculative settings without a draft model are a mistake, not something to ignore."""
    if num_draft_tokens is not None:
        raise ValueError(f"num_draft_tokens={num_draft_tokens!r} needs a draft_model (speculative decoding); "
                         "pass draft_model= or drop num_draft_tokens")
    if draft_tokenizer is not None:
        raise ValueError("draft_tokenizer needs a draft_model (speculative decoding); pass draft_model= or drop "
                         "draft_tokenizer")


def check_draft(model, draft_model, num_draft_tokens, length: int, tokenizer=None, draft_tokenizer=None) -> int:
    """Validate a speculative request; return the KV cache length both models need (the
    verify step of a row writes up to ``num_draft_tokens`` positions past its last one)."""
    k = num_draft_tokens
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_DRAFT_TOKENS:
        raise ValueError(f"num_draft_tokens must be an int in [1, {MAX_DRAFT_TOKENS}], got {k!r}")
    config = getattr(draft_model, "config", None)
    if config is None or not hasattr(draft_model, "setup_cache"):
        raise TypeError(f"draft_model must be a gptfast GPT, got {type(draft_model).__name__}")
    if config.vocab_size != model.config.vocab_size:
        raise ValueError(f"draft_model's vocabulary ({config.vocab_size} tokens) differs from the target's "
                         f"({model.config.vocab_size}): draft and target must share the tokenizer")
    if draft_tokenizer is not None and tokenizer is None:
        raise ValueError("draft_tokenizer is checked against the target's tokenizer: pass tokenizer= as well "
                         "(or drop draft_tokenizer)")
    if draft_tokenizer is not None and not _same_tokenizer(tokenizer, draft_tokenizer):
        raise ValueError("draft_tokenizer differs from tokenizer: draft and target must share the tokenizer")
    target_device, draft_device = next(model.parameters()).device, next(draft_model.parameters()).device
    if target_device != draft_device:
        raise ValueError(f"draft_model is on {draft_device} but the target model is on {target_device}: "
                         "put both on one device")
    for name, m in (("model", model), ("draft_model", draft_model)):
        if length + k > m.config.block_size:
            raise ValueError(f"context overflow: longest prompt + max_new_tokens + num_draft_tokens ({length + k}) "
                             f"exceeds {name}'s context of {m.config.block_size} tokens")
    return length + k


def new_speculative_state(prev_tokens: torch.Tensor) -> SpeculativeState:
    """The state before the first round; ``prev_tokens`` (B, 1): each row's last prompt token."""
    zeros = torch.zeros(prev_tokens.shape[0], dtype=torch.int64, device=prev_tokens.device)
    return SpeculativeState(prev_tokens=prev_tokens.clone(), drafted=zeros, accepted=zeros.clone())


# ---- the model steps --------------------------------------------------------------------


def _eager_steps(model, draft_model):
    """``draft_step(tokens, positions)`` ((B, 2) or (B, 1): the last position's logits,
    (B, 1, V)) and ``verify_step(tokens, positions)`` ((B, k+1): all logits)."""
    def draft_step(tokens, positions):
        last = torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long, device=tokens.device)
        return draft_model(tokens, input_pos=positions, logits_index=last)

    def verify_step(tokens, positions):
        return model(tokens, input_pos=positions)

    return draft_step, verify_step


def _flat_steps(model, draft_model, batch: int, k: int, draft_step, verify_step):
    """Each step as the flat step of gptfast.generation.cpu_decode where that applies (the
    CPU's packed layers: the same logits without the model's per-call Python), else as given."""
    flat_draft = cpu_decode.decode_step(draft_model, batch, steps=2)  # the first draft step feeds two tokens
    flat_verify = cpu_decode.decode_step(model, batch, steps=k + 1)
    if flat_draft is not None:
        draft_step = lambda tokens, positions: flat_draft(tokens, positions, last=True)  # noqa: E731
    return draft_step, verify_step if flat_verify is None else flat_verify


def _capture(fn, tokens, positions):
    """A CUDA graph of ``fn(tokens, positions)`` on static copies of the inputs; returns the
    replaying step. Warm-up runs write cache slots that the real step rewrites before any
    read (every step writes its positions first)."""
    static_tokens, static_positions = tokens.clone(), positions.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(static_tokens, static_positions)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(static_tokens, static_positions)

    def step(t, pos):
        static_tokens.copy_(t)
        static_positions.copy_(pos)
        graph.replay()
        return out

    return step


def _graphed_steps(draft_step, verify_step, s, k):
    tokens, positions = s.tokens.expand(-1, 2).contiguous(), torch.cat([s.positions - 1, s.positions], dim=1)
    first = _capture(draft_step, tokens, positions)
    rest = _capture(draft_step, s.tokens.clone(), s.positions + 1)
    span = s.positions + torch.arange(k + 1, device=s.positions.device)
    verify = _capture(verify_step, s.tokens.expand(-1, k + 1).contiguous(), span)
    return (lambda t, pos: first(t, pos) if t.shape[1] == 2 else rest(t, pos)), verify


def model_steps(model, draft_model, s, k: int, cuda_graph):
    """The draft and verify steps: CUDA graphs when asked for (default on CUDA), else eager
    (on the CPU with packed layers, flat: ``_flat_steps``). Capture is an optimisation: if
    it fails, a warning, and eager steps."""
    draft_step, verify_step = _eager_steps(model, draft_model)
    on_cuda = s.tokens.device.type == "cuda"
    if cuda_graph and not on_cuda:
        raise ValueError(f"cuda_graph=True needs a model on a CUDA device, not {s.tokens.device}")
    if cuda_graph is False or not on_cuda:
        return _flat_steps(model, draft_model, s.tokens.shape[0], k, draft_step, verify_step)
    try:
        return _graphed_steps(draft_step, verify_step, s, k)
    except Exception as e:  # decode eagerly instead
        warnings.warn(f"gptfast: CUDA graph capture of the speculative steps failed ({type(e).__name__}: {e}); "
                      "decoding eagerly", RuntimeWarning, stacklevel=3)
        return draft_step, verify_step


def run(model, draft_model, engine, p, s, spec: SpeculativeState, k: int, on_sync, num_new: int, sync_every: int,
        cuda_graph) -> int:
    """Speculative rounds until every row is done (at most ``num_new``: each round emits at
    least one token per running row); the host syncs about every ``sync_every`` tokens."""
    draft_step, verify_step = model_steps(model, draft_model, s, k, cuda_graph)
    sync_rounds = max(1, sync_every // (k + 1))
    return engine.speculative_loop(p, s, spec, draft_step, verify_step, on_sync, num_new, sync_rounds, k, 1)


def record_stats(results, spec: SpeculativeState) -> None:
    """Each result's draft tokens proposed and accepted."""
    drafted, accepted = spec.drafted.tolist(), spec.accepted.tolist()
    for result, d, a in zip(results, drafted, accepted):
        result.draft_tokens, result.accepted_draft_tokens = d, a
