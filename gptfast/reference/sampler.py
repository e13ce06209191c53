"""The Python twin of the C++ sampler (csrc/sampling.cpp): same processors, same noise.

It is the judge of the extension: for the same inputs it runs the same sequence of
torch operations, so the C++ loop and this twin choose identical tokens for one seed.
It never imports the extension or the product sampler; the data it works on
(``SamplingTensors``, ``DecodeState``) is defined in ``gptfast.generation.decode_state``, which
``gptfast.generation.sampling_params`` fills from ``SamplingParams``; ``gptfast.generation.generate`` drives the loop.

One sampling step (``sample_step``), per row of a (B, V) batch of logits:

1. repetition penalty (Hugging Face semantics): tokens seen in the generated text (and
   in the prompt, when ``penalize_prompt``) have positive logits divided by the penalty
   and negative ones multiplied by it;
2. presence and frequency penalties (OpenAI semantics, generated tokens only):
   ``logit - frequency * count - presence * (count > 0)``;
3. logit bias (added);
4. min_new_tokens: stop tokens are masked to -inf until that many tokens exist;
5. check: a row whose logits are NaN or all -inf is flagged (``bad_step``);
6. greedy rows (temperature 0) take the argmax here; sampled rows continue:
7. temperature: ``z = (logit - max) / T`` (so the largest z is exactly 0);
8. over the vocabulary sorted by z (stable, descending) when top-k or top-p is on:
   top-k keeps every token whose z is at least the k-th largest (ties with the k-th
   stay, as in Hugging Face's TopKLogitsWarper), top-p the smallest prefix of what is
   left whose probability reaches top_p; then min-p (``p >= min_p * p_max``, i.e.
   ``z >= log(min_p)``);
9. exponential race: choose ``argmax(p_i / E_i)`` with ``E_i = -log(u_i)``, computed as
   ``argmax(z_i - log(E_i))``. That is an exact draw from the processed distribution.

The noise ``u`` is a counter-based hash of (seed, generation step, token id): it does not
depend on the batch row or on the batch's other requests, so a seed gives the same
tokens whatever the batch composition, and nothing needs a random-number state.
"""
import torch

from gptfast.generation.decode_state import FINISH_LENGTH, FINISH_STOP_TOKEN, DecodeState, SamplingTensors

# ---- counter-based noise ---------------------------------------------------------------
#
# All hashing is 32-bit arithmetic carried in int64 tensors. Every value stays below
# 2**32 and every multiplier below 2**31, so no product overflows int64: the same bits
# come out of torch on any device and out of plain C++ uint64 arithmetic.

MASK32 = 0xFFFFFFFF
MIX_MUL_1 = 0x7FEB352D  # odd multipliers below 2**31
MIX_MUL_2 = 0x68E31DA5
SALT_SEED = 0x9E3779B9
SALT_TOKEN = 0x85EBCA77
SALT_OUTER = 0x27D4EB2F
INV_2_POW_32 = 2.0**-32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit mixer (xor-shift / multiply rounds) on int64 tensors in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * MIX_MUL_1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MIX_MUL_2) & MASK32
    return x ^ (x >> 16)


def token_table(vocab_size: int, device=None) -> torch.Tensor:
    """Per-token hash input ``mix32(token ^ SALT_TOKEN)``, shape (V,) int64."""
    return mix32(torch.arange(vocab_size, dtype=torch.int64, device=device) ^ SALT_TOKEN)


def row_keys(seed: torch.Tensor, step: torch.Tensor):
    """Two 32-bit keys per row from the row's seed (< 2**63) and the generation step."""
    k = mix32((seed & MASK32) ^ SALT_SEED)
    k = mix32(k ^ (seed >> 32))
    k = mix32(k ^ (step & MASK32))
    return k, mix32(k ^ SALT_OUTER)


def uniform_noise(seed: torch.Tensor, step: torch.Tensor, table: torch.Tensor, token_ids=None) -> torch.Tensor:
    """Uniforms in (0, 1), float64, one per (row, token): ``(hash + 0.5) / 2**32``.

    seed: (B,) int64; step: (1,) or (B,) int64; table: ``token_table(V)``; token_ids: (B, K)
    int64 candidate ids, or None for the whole vocabulary (result (B, V)).
    """
    k1, k2 = row_keys(seed, step)
    per_token = table[None, :] if token_ids is None else table[token_ids]
    h = mix32(mix32(k1[:, None] ^ per_token) ^ k2[:, None])
    return (h.double() + 0.5) * INV_2_POW_32


# ---- one step -------------------------------------------------------------------------


def process_logits(logits: torch.Tensor, p: SamplingTensors, s: DecodeState) -> torch.Tensor:
    """Steps 1-4: penalties, logit bias and the min_new_tokens mask; (B, V) float32."""
    x = logits.float()
    if p.use_repetition:
        seen = s.counts > 0
        if s.prompt_seen is not None:
            seen = seen | s.prompt_seen
        penalized = torch.where(x < 0, x * p.repetition_penalty, x / p.repetition_penalty)
        x = torch.where(seen, penalized, x)
    if p.use_presence_frequency:
        x = x - s.counts.float() * p.frequency_penalty - (s.counts > 0).float() * p.presence_penalty
    if p.logit_bias is not None:
        x = x + p.logit_bias
    if p.use_min_new:
        too_early = s.step < p.min_new_tokens  # (B,)
        x = x.masked_fill(p.stop_mask & too_early[:, None], float("-inf"))
    return x


def choose_tokens(x: torch.Tensor, p: SamplingTensors, s: DecodeState):
    """Steps 5-9 on processed logits ``x`` (B, V): returns (tokens (B,), bad rows (B,) bool)."""
    xmax, greedy_tokens = x.max(dim=-1)
    bad = torch.isnan(xmax) | (xmax == float("-inf"))
    if p.all_greedy:
        return greedy_tokens, bad
    z = (x - xmax[:, None]) / p.temperature
    if p.sort_vocab:
        cand, cand_ids = sorted_candidates(z, p)
        cand = filter_sorted(cand, p)
    else:
        cand, cand_ids = z, None
    if p.use_min_p:
        cand = cand.masked_fill(cand < p.log_min_p, float("-inf"))
    # Exponential race: argmax p_i / E_i == argmax (z_i - log E_i), E_i = -log u_i.
    u = uniform_noise(p.seed, s.step, p.token_table, cand_ids)
    score = cand.double() - torch.log(-torch.log(u))
    winner = score.argmax(dim=-1)
    sampled = winner if cand_ids is None else cand_ids.gather(1, winner[:, None]).squeeze(1)
    return torch.where(p.greedy, greedy_tokens, sampled), bad


def sorted_candidates(z: torch.Tensor, p: SamplingTensors):
    """z sorted descending (stable) with the token ids: (values, ids), each (B, K).

    On CPU tensors, where a host read is free, a batch whose sampled rows all have a
    top_k <= ``max_top_k`` gets only its top ``max_top_k`` when their z are strictly
    decreasing through place ``max_top_k + 1``: then top-k keeps nothing past the list,
    and the list is the sorted vocabulary's head in the same order, so every later step
    gives the same result as on the whole sorted vocabulary, at a fraction of the cost.
    """
    k = p.max_top_k
    if 0 < k < z.shape[-1] and z.device.type == "cpu":
        top, ids = torch.topk(z, k + 1, dim=-1)
        if bool(((top[:, :-1] > top[:, 1:]).all(dim=-1) | p.greedy).all()):
            return top[:, :k], ids[:, :k]
    return torch.sort(z, dim=-1, descending=True, stable=True)


def filter_sorted(cand: torch.Tensor, p: SamplingTensors) -> torch.Tensor:
    """Top-k and top-p on candidates sorted by z, descending ((B, K), -inf = dropped).

    Top-k: drop what is below the k-th candidate (so ties with it stay). Top-p: keep a
    candidate while the probability mass before it is below top_p (the first always
    stays), as unnormalised float64 prefix sums compared with ``top_p * total``: a list
    cut after its last kept candidate gives the same sums as the whole sorted vocabulary
    (the C++ CPU loop samples from such a list).
    """
    if p.use_top_k:
        kth = cand.gather(1, torch.clamp(p.top_k, max=cand.shape[-1]) - 1)
        cand = cand.masked_fill(cand < kth, float("-inf"))
    if p.use_top_p:
        weight = torch.exp(cand.double() - cand[:, :1].double())
        total = weight.cumsum(dim=-1)
        cand = cand.masked_fill(total - weight >= p.top_p * total[:, -1:], float("-inf"))
    return cand


def sample_step(logits: torch.Tensor, p: SamplingTensors, s: DecodeState) -> torch.Tensor:
    """Process ``logits`` ((B, V) or (B, 1, V)), choose one token per row and advance ``s``
    in place (output buffers, stop checks, counts, positions). Returns the tokens (B,)."""
    batch = s.tokens.shape[0]
    logits = logits.reshape(batch, -1)
    tokens, bad = choose_tokens(process_logits(logits, p, s), p, s)
    active = ~s.finished
    s.bad_step.copy_(torch.where(bad & active & (s.bad_step < 0), s.step, s.bad_step))
    # Finished rows keep their last token; their output slot says -1.
    tokens = torch.where(active, tokens, s.tokens[:, 0])
    column = s.step.expand(batch)[:, None]
    s.out_tokens.scatter_(1, column, torch.where(active, tokens, -1)[:, None])
    if p.num_logprobs >= 0:
        _record_logprobs(logits, tokens, column, p.num_logprobs, s)
    s.generated.add_(active.long())
    done = active & (s.generated >= p.max_new_tokens)
    reason = torch.where(done, FINISH_LENGTH, s.finish_reason)
    if p.stop_mask is not None:
        hit_stop = active & p.stop_mask.gather(1, tokens[:, None]).squeeze(1)
        reason = torch.where(hit_stop, FINISH_STOP_TOKEN, reason)
        done = done | hit_stop
    s.finish_reason.copy_(reason)
    s.finished.logical_or_(done)
    if s.counts is not None:
        s.counts.scatter_add_(1, tokens[:, None], active.int()[:, None])
    s.positions.add_(active.long()[:, None])
    s.tokens.copy_(tokens[:, None])
    s.step.add_(1)
    return tokens


def _record_logprobs(logits, tokens, column, n, s: DecodeState) -> None:
    """Log-probabilities of the model's distribution (raw logits, before any processor)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    s.out_logprobs.scatter_(1, column, logprobs.gather(1, tokens[:, None]))
    if n > 0:
        top_values, top_ids = torch.topk(logprobs, n, dim=-1)
        top_column = column[:, :, None].expand(-1, 1, n)
        s.out_top_logprobs.scatter_(1, top_column, top_values[:, None, :])
        s.out_top_ids.scatter_(1, top_column, top_ids[:, None, :])
