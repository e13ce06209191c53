"""Batched generation: prefill, then the decode loop driven from C++ (or its Python twin).

``generate(model, prompts, params)`` runs:

1. prefill: prompts right-padded to the longest, one forward over the static KV cache;
   each row's logits are taken at its own last real token;
2. the first sampling step on those logits;
3. the decode loop: model step (one token per row at that row's own position; the pad
   entries a short row left in the cache are masked by its cache length and overwritten
   as it advances) + sampling step, with the sampled token staying on the device. On
   CUDA both are captured once in a CUDA graph and replayed. The host reads the device
   only every ``sync_every`` tokens: finished flags and new tokens in one transfer, then
   streaming and stop-string checks happen on the host.

With a draft model, step 3 is speculative decoding instead (gptfast.generation.speculative): rounds
of k draft tokens verified by one target forward, driven from C++ as well.

The parts, each in its own module: the engines that sample (gptfast.generation.engines), the
per-row tensors (gptfast.generation.sampling_params), the host side of the loop: streaming and stop
strings (gptfast.generation.streaming), and the CUDA-graph cache (gptfast.generation.cuda_graphs).
"""
import warnings
from typing import Callable, List, Optional

import torch

from gptfast.generation import cpu_decode, cpu_linear, speculative
from gptfast.generation.cuda_graphs import GRAPHS
from gptfast.generation.engines import get_engine
from gptfast.generation.sampling_params import SamplingParams, build_sampling_tensors, new_decode_state, resolve_seeds, to_device
from gptfast.generation.streaming import GenerationResult, HostRows, InvalidLogitsError

__all__ = ["generate", "GenerationResult", "InvalidLogitsError"]

DEFAULT_SYNC_EVERY = 16


# ---- inputs -----------------------------------------------------------------------------


def _normalize_prompts(prompts, tokenizer, vocab_size) -> List[List[int]]:
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        if prompts.dim() != 2 or prompts.is_floating_point():
            raise ValueError(f"prompt tensor must be (T,) or (B, T) integer token ids, got {tuple(prompts.shape)} {prompts.dtype}")
        prompts = prompts.tolist()
    elif isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings or of token-id lists")
    out = []
    for row, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError(f"prompt {row} is a string: pass tokenizer= to encode it")
            prompt = tokenizer.encode(prompt)
        prompt = list(prompt)
        if not prompt:
            raise ValueError(f"prompt {row} is empty: generation needs at least one prompt token")
        for t in prompt:
            if isinstance(t, bool) or not isinstance(t, int):
                raise TypeError(f"prompt {row} holds a non-integer token id {t!r}")
            if not 0 <= t < vocab_size:
                raise ValueError(f"prompt {row} holds token id {t}, outside the vocabulary of {vocab_size} tokens")
        out.append(prompt)
    return out


def _normalize_params(params, batch) -> List[SamplingParams]:
    if params is None:
        params = SamplingParams()
    if isinstance(params, SamplingParams):
        return [params] * batch
    params = list(params)
    if len(params) != batch:
        raise ValueError(f"got {len(params)} SamplingParams for {batch} prompts")
    for p in params:
        if not isinstance(p, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(p).__name__}")
    return params


def _check_settings(model, prompts, params, tokenizer, sync_every) -> int:
    """Checks that need the whole request; returns the KV cache length it needs."""
    if not isinstance(sync_every, int) or isinstance(sync_every, bool) or sync_every < 1:
        raise ValueError(f"sync_every must be an int >= 1, got {sync_every!r}")
    if tokenizer is None and any(p.stop for p in params):
        raise ValueError("stop strings need a tokenizer: pass tokenizer= (or use stop_token_ids)")
    longest, max_new = max(len(t) for t in prompts), max(p.max_new_tokens for p in params)
    if longest + max_new > model.config.block_size:
        raise ValueError(
            f"context overflow: longest prompt ({longest}) + max_new_tokens ({max_new}) exceeds the model's context "
            f"of {model.config.block_size} tokens"
        )
    return longest + max_new


def _ensure_cache(model, batch, length, device, dtype):
    """Reuse the model's KV cache when it has exactly this shape (captured graphs point at
    it), else allocate one."""
    cache = getattr(model, "kv_cache", None)
    if (cache is not None and cache.max_batch == batch and cache.max_seq_len == length
            and cache.k.device == device and cache.k.dtype == dtype):
        return
    model.setup_cache(batch, length, device=device, dtype=dtype)


# ---- the two phases -----------------------------------------------------------------


def _prefill(model, prompts, device):
    """One forward over the right-padded prompts; (B, 1, V) logits at each row's last token."""
    B, longest = len(prompts), max(len(t) for t in prompts)
    idx = torch.tensor([t + [0] * (longest - len(t)) for t in prompts], dtype=torch.long)
    idx, last = to_device([idx, torch.tensor([len(t) - 1 for t in prompts])], device)
    with torch.profiler.record_function("prefill"):  # named ranges for `gptfast profile generate`
        return model(idx, input_pos=torch.arange(longest, device=device), logits_index=last)


def _decode_step(model, engine, p, s, cuda_graph, steps):
    """(model_step, graph_replay, p, s) for ``steps`` decode steps: a replayed CUDA graph
    (with its static p and s) when asked for (the default on CUDA); on the CPU with packed
    layers, the flat step of gptfast.generation.cpu_decode; else the model's eager step."""
    supported = GRAPHS.supports(s.tokens.device)
    if cuda_graph and not supported:
        raise ValueError(f"cuda_graph=True needs a model on a CUDA device, not {s.tokens.device}")
    if (supported if cuda_graph is None else cuda_graph) and steps > 0:
        try:
            graph, p, s = GRAPHS.get(model, engine, p, s)
            return graph.replay, True, p, s
        except Exception as e:  # capture is an optimisation: decode eagerly instead
            warnings.warn(f"gptfast: CUDA graph capture failed ({type(e).__name__}: {e}); decoding eagerly",
                          RuntimeWarning, stacklevel=3)
    flat = cpu_decode.decode_step(model, s.tokens.shape[0])  # None unless the CPU's packed layers serve the steps
    if flat is not None:  # the same kernels without the model's per-call Python
        return flat, False, p, s
    return (lambda tokens, positions: model(tokens, input_pos=positions)), False, p, s


# ---- generate ---------------------------------------------------------------------------


@torch.no_grad()
def generate(model, prompts, params=None, *, tokenizer=None, stream: Optional[Callable] = None, engine: str = "auto",
             sync_every: int = DEFAULT_SYNC_EVERY, cuda_graph: Optional[bool] = None,
             eos_token_id: Optional[int] = None, packed_cpu_weights: Optional[bool] = None,
             draft_model=None, num_draft_tokens: Optional[int] = None,
             draft_tokenizer=None) -> List[GenerationResult]:
    """Generate continuations of ``prompts`` with ``model`` (a gptfast GPT).

    prompts: a list of token-id lists or strings (strings need ``tokenizer``), or one
    prompt; a (B, T) tensor of ids also works. params: one ``SamplingParams`` for all
    rows, or one per row (rows may differ freely), default ``SamplingParams()``.
    stream: ``stream(row, new_token_ids, new_text)`` is called as tokens arrive (every
    ``sync_every`` tokens; ``new_text`` is None without a tokenizer). engine: "cpp",
    "python" (the twin) or "auto". cuda_graph: capture the decode step on CUDA (default
    True there). eos_token_id: end-of-text token (default: the tokenizer's).
    packed_cpu_weights: run the linear layers on prepacked weights (gptfast.generation.cpu_linear;
    CPU float32 only); None: on where it applies unless $GPTFAST_CPU_PACKED_LINEAR=0.
    draft_model: a smaller gptfast GPT with the same tokenizer (``draft_tokenizer``, when
    given, is checked against ``tokenizer``): speculative decoding with ``num_draft_tokens``
    (1..16, default 4) draft tokens per round (gptfast.generation.speculative): greedy rows give exactly the
    tokens of plain decoding, sampled rows tokens of the same distribution.
    Returns one ``GenerationResult`` per prompt, in order.
    """
    if draft_model is None:
        speculative.check_no_draft(num_draft_tokens, draft_tokenizer)
    elif num_draft_tokens is None:
        num_draft_tokens = speculative.DEFAULT_DRAFT_TOKENS
    vocab_size = model.config.vocab_size
    weight = next(model.parameters())  # a GPT's embedding (an int8 LM head has no float weight)
    prompts = _normalize_prompts(prompts, tokenizer, vocab_size)
    params = _normalize_params(params, len(prompts))
    eng = get_engine(engine)
    length = _check_settings(model, prompts, params, tokenizer, sync_every)
    if draft_model is not None:
        length = speculative.check_draft(model, draft_model, num_draft_tokens, length, tokenizer, draft_tokenizer)
    if eos_token_id is None and tokenizer is not None:
        eos_token_id = getattr(tokenizer, "eos_token_id", None)
    seeds, max_new = resolve_seeds(params), max(p.max_new_tokens for p in params)
    p = build_sampling_tensors(params, vocab_size, seeds, weight.device, eos_token_id, token_table=eng.token_table)
    s = new_decode_state(prompts, params, p, vocab_size, weight.device)
    _ensure_cache(model, len(prompts), length, weight.device, weight.dtype)
    if draft_model is not None:
        return _generate_speculative(model, draft_model, num_draft_tokens, prompts, params, seeds, eng, p, s, length,
                                     (tokenizer, stream, sync_every, cuda_graph, packed_cpu_weights))
    with cpu_linear.packed_linears(model, enabled=packed_cpu_weights):
        logits = _prefill(model, prompts, weight.device)
        with torch.profiler.record_function("sample"):
            eng.sample_step(logits[:, 0], p, s)
        model_step, graph_replay, p, s = _decode_step(model, eng, p, s, cuda_graph, max_new - 1)
        host = HostRows(prompts, params, seeds, s, tokenizer, stream)
        if not host.on_sync(1) and max_new > 1:
            with torch.profiler.record_function("decode"):
                eng.decode_loop(p, s, model_step, graph_replay, host.on_sync, max_new - 1, sync_every, 1)
        return host.results()


def _generate_speculative(model, draft_model, k, prompts, params, seeds, eng, p, s, length, options):
    """generate()'s path with a draft model: both prefills, the target's first token, then
    speculative rounds (gptfast.generation.speculative)."""
    tokenizer, stream, sync_every, cuda_graph, packed = options
    draft_weight = next(draft_model.parameters())
    _ensure_cache(draft_model, len(prompts), length, draft_weight.device, draft_weight.dtype)
    spec = speculative.new_speculative_state(s.tokens)
    max_new = max(q.max_new_tokens for q in params)
    with cpu_linear.packed_linears(model, enabled=packed), cpu_linear.packed_linears(draft_model, enabled=packed):
        _prefill(draft_model, prompts, s.tokens.device)
        logits = _prefill(model, prompts, s.tokens.device)
        with torch.profiler.record_function("sample"):
            eng.sample_step(logits[:, 0], p, s)
        host = HostRows(prompts, params, seeds, s, tokenizer, stream)
        if not host.on_sync(1) and max_new > 1:
            with torch.profiler.record_function("speculative"):
                speculative.run(model, draft_model, eng, p, s, spec, k, host.on_sync, max_new - 1, sync_every,
                                cuda_graph)
        results = host.results()
    speculative.record_stats(results, spec)
    return results
