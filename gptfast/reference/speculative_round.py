"""The Python twin of speculative decoding's round (csrc/sampling.cpp, ``speculative_round``).

One round, per row of the batch, with a draft model and the target model:

1. propose: the draft runs k steps from the row's last token (the first step also feeds
   the token before it, so the draft's cache always holds every accepted token); step j
   processes the draft's logits with the row's own ``SamplingTensors`` (penalties as if
   the earlier draft tokens were accepted, min_new_tokens at output index ``generated + j``)
   and picks draft token d_j: the argmax for greedy rows, else a draw from the processed
   draft distribution q_j (exponential race, noise stream ``STREAM_DRAFT``);
2. verify: one target forward scores the last token and d_1..d_k at the row's positions;
   p_j is the processed target distribution at index ``generated + j`` (penalties again as
   if d_1..d_j were accepted);
3. accept: greedy rows accept d_j while it equals the target's argmax; sampled rows accept
   d_j with probability min(1, p_j(d_j) / q_j(d_j)) (uniform from stream ``STREAM_ACCEPT``),
   and at the first rejection draw from norm(max(0, p_j - q_j)) (race, ``STREAM_RESIDUAL``).
   If all k are accepted, the bonus token is drawn from p_k with the plain sampler's noise.
   That is Leviathan et al.'s rejection rule: every emitted token is distributed exactly as
   the target's processed distribution, whatever the draft proposes;
4. commit: the accepted tokens plus the correction (or bonus) token, cut after a stop token
   and at max_new_tokens, go to the output (with logprobs of the target's raw logits), the
   counts, positions and finish flags. A row's caches are "rolled back" by its position
   alone: cache slots past it are never read and are rewritten as the row advances.

All noise comes from gptfast.reference.sampler's counter-based hash keyed by (seed,
output index, token), the seed xored with a per-stream constant: a seed fixes a row's
tokens whatever its batch. Reusing the noise of an index whose draft was rejected is
sound: nothing emitted so far depended on it.
"""
import dataclasses

import torch

from gptfast.generation.decode_state import FINISH_LENGTH, FINISH_STOP_TOKEN, DecodeState, SamplingTensors, SpeculativeState
from gptfast.reference.sampler import filter_sorted, process_logits, uniform_noise

STREAM_DRAFT, STREAM_ACCEPT, STREAM_RESIDUAL = 1, 2, 3
SALT_STREAM = 0x2C1B3C6D


def stream_seed(seed: torch.Tensor, stream: int) -> torch.Tensor:
    """The seeds of one noise stream: ``seed`` with a stream constant xored into bits 32..62."""
    return seed ^ (((SALT_STREAM * stream) & 0x7FFFFFFF) << 32)


def filtered_z(x: torch.Tensor, xmax: torch.Tensor, p: SamplingTensors) -> torch.Tensor:
    """The sampler's processed log-weights in vocabulary order (B, V) float32: temperature,
    top-k / top-p (on the stably sorted vocabulary), min-p; dropped tokens are -inf."""
    z = (x - xmax[:, None]) / p.temperature
    if p.sort_vocab:
        cand, ids = torch.sort(z, dim=-1, descending=True, stable=True)
        z = torch.empty_like(z).scatter_(1, ids, filter_sorted(cand, p))
    if p.use_min_p:
        z = z.masked_fill(z < p.log_min_p, float("-inf"))
    return z


def race(log_weights: torch.Tensor, seed: torch.Tensor, step: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Exponential race over the vocabulary: a draw from softmax(log_weights) (B,)."""
    u = uniform_noise(seed, step, table)
    return (log_weights.double() - torch.log(-torch.log(u))).argmax(dim=-1)


def lookahead(s: DecodeState, counts, j: int) -> DecodeState:
    """``s`` as the processors see output index ``generated + j``: per-row step, ``counts``."""
    return dataclasses.replace(s, step=s.generated + j, counts=counts)


def _bad(xmax: torch.Tensor) -> torch.Tensor:
    return torch.isnan(xmax) | (xmax == float("-inf"))


def _count(counts, tokens: torch.Tensor):
    if counts is not None:
        counts.scatter_add_(1, tokens[:, None], torch.ones_like(tokens, dtype=torch.int32)[:, None])


def propose(p: SamplingTensors, s: DecodeState, spec: SpeculativeState, draft_step, k: int):
    """Step 1: k draft tokens (B, k), the draft's processed log-weights (k of (B, V); None
    when every row is greedy) and the rows whose draft logits were bad (B, k)."""
    counts = None if s.counts is None else s.counts.clone()
    tokens = torch.cat([spec.prev_tokens, s.tokens], dim=1)
    positions = torch.cat([s.positions - 1, s.positions], dim=1)
    drafts, weights, bad = [], [], []
    for j in range(k):
        view = lookahead(s, counts, j)
        x = process_logits(draft_step(tokens, positions)[:, -1], p, view)
        xmax, top = x.max(dim=-1)
        if p.all_greedy:
            token = top
        else:
            z = filtered_z(x, xmax, p)
            token = torch.where(p.greedy, top, race(z, stream_seed(p.seed, STREAM_DRAFT), view.step, p.token_table))
            weights.append(z)
        bad.append(_bad(xmax))
        drafts.append(token)
        _count(counts, token)
        tokens, positions = token[:, None], s.positions + (j + 1)
    return torch.stack(drafts, dim=1), (weights or None), torch.stack(bad, dim=1)


def _judge(d, x, xmax, top, q_weights, q_bad, p: SamplingTensors, view: DecodeState):
    """Step 3 at one index for sampled rows: (accepted (B,), correction token (B,))."""
    target = torch.softmax(filtered_z(x, xmax, p).double(), dim=-1)
    draft = torch.softmax(q_weights.double(), dim=-1).masked_fill(q_bad[:, None], 0.0)
    zeros = torch.zeros_like(d)[:, None]
    u = uniform_noise(stream_seed(p.seed, STREAM_ACCEPT), view.step, p.token_table, zeros)[:, 0]
    take = (u * draft.gather(1, d[:, None])[:, 0] < target.gather(1, d[:, None])[:, 0]) & ~q_bad
    residual = (target - draft).clamp(min=0.0)
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, target)
    fix = race(torch.log(residual), stream_seed(p.seed, STREAM_RESIDUAL), view.step, p.token_table)
    return torch.where(p.greedy, d == top, take), torch.where(p.greedy, top, fix)


def accept(logits, drafts, draft_weights, draft_bad, p: SamplingTensors, s: DecodeState, k: int):
    """Steps 2-3 on the verify logits (B, k+1, V): the block of candidate tokens (B, k+1)
    (accepted drafts, then the correction), the number of accepted drafts (B,) and the
    indices whose target logits were bad (B, k+1)."""
    counts = None if s.counts is None else s.counts.clone()
    ok, fixes, bad = [], [], []
    for j in range(k + 1):
        view = lookahead(s, counts, j)
        x = process_logits(logits[:, j], p, view)
        xmax, top = x.max(dim=-1)
        bad.append(_bad(xmax))
        if j == k:
            if not p.all_greedy:
                top = torch.where(p.greedy, top, race(filtered_z(x, xmax, p), p.seed, view.step, p.token_table))
            fixes.append(top)
            break
        d = drafts[:, j]
        if p.all_greedy:
            ok.append(d == top)
            fixes.append(top)
        else:
            take, fix = _judge(d, x, xmax, top, draft_weights[j], draft_bad[:, j], p, view)
            ok.append(take)
            fixes.append(fix)
        _count(counts, d)
    n_accepted = torch.stack(ok, dim=1).long().cumprod(dim=1).sum(dim=1)
    index = torch.arange(k + 1, device=drafts.device)
    block = torch.where(index < n_accepted[:, None], torch.cat([drafts, drafts[:, :1]], dim=1),
                        torch.stack(fixes, dim=1))
    return block, n_accepted, torch.stack(bad, dim=1)


def _put(buffer: torch.Tensor, column: torch.Tensor, values: torch.Tensor, keep: torch.Tensor) -> None:
    """buffer[b, column[b]] = values[b] where keep[b] (buffer (B, W) or (B, W, N))."""
    shape = (-1, 1) + (1,) * (buffer.dim() - 2)
    index = column.view(shape).expand((-1, 1) + tuple(buffer.shape[2:]))
    old = buffer.gather(1, index)
    buffer.scatter_(1, index, torch.where(keep.view(shape), values.unsqueeze(1), old))


def _emitted(block, n_accepted, p: SamplingTensors, s: DecodeState):
    """How many of the block's tokens each row emits (B,), and whether it ends on a stop token."""
    index = torch.arange(block.shape[1], device=block.device)
    n = n_accepted + 1
    hit_stop = torch.zeros_like(s.finished)
    if p.stop_mask is not None:
        stops = p.stop_mask.gather(1, block) & (index < n[:, None])
        n = torch.where(stops.any(dim=1), stops.int().argmax(dim=1) + 1, n)
        hit_stop = stops.any(dim=1)
    room = p.max_new_tokens - s.generated
    hit_stop = hit_stop & (n <= room)
    active = ~s.finished
    return torch.where(active, torch.minimum(n, room), 0), hit_stop & active


def commit(logits, block, n_accepted, bad, p: SamplingTensors, s: DecodeState, spec: SpeculativeState) -> None:
    """Step 4: write the emitted tokens and advance ``s`` and ``spec`` in place."""
    k1, width = block.shape[1], s.out_tokens.shape[1]
    n, hit_stop = _emitted(block, n_accepted, p, s)
    active = ~s.finished
    index = torch.arange(k1, device=block.device)
    keep = index < n[:, None]  # (B, k+1)
    bad_in = bad & keep
    first_bad = s.generated + bad_in.int().argmax(dim=1)
    s.bad_step.copy_(torch.where(bad_in.any(dim=1) & (s.bad_step < 0), first_bad, s.bad_step))
    logprobs = torch.log_softmax(logits.float(), dim=-1) if p.num_logprobs >= 0 else None
    for i in range(k1):
        column = (s.generated + i).clamp(max=width - 1)
        _put(s.out_tokens, column, block[:, i], keep[:, i])
        if logprobs is not None:
            _put(s.out_logprobs, column, logprobs[:, i].gather(1, block[:, i:i + 1])[:, 0], keep[:, i])
            if p.num_logprobs > 0:
                top_values, top_ids = torch.topk(logprobs[:, i], p.num_logprobs, dim=-1)
                _put(s.out_top_logprobs, column, top_values, keep[:, i])
                _put(s.out_top_ids, column, top_ids, keep[:, i])
    if s.counts is not None:
        s.counts.scatter_add_(1, block, keep.int())
    last = block.gather(1, (n - 1).clamp(min=0)[:, None])
    before = block.gather(1, (n - 2).clamp(min=0)[:, None])
    spec.prev_tokens.copy_(torch.where((n >= 2)[:, None], before, torch.where((n == 1)[:, None], s.tokens,
                                                                              spec.prev_tokens)))
    s.tokens.copy_(torch.where((n >= 1)[:, None], last, s.tokens))
    s.generated.add_(n)
    s.positions.add_(n[:, None])
    done = active & (s.generated >= p.max_new_tokens)
    reason = torch.where(done, FINISH_LENGTH, s.finish_reason)
    s.finish_reason.copy_(torch.where(hit_stop, FINISH_STOP_TOKEN, reason))
    s.finished.logical_or_(done | hit_stop)
    spec.drafted.add_(active.long() * (k1 - 1))
    spec.accepted.add_(torch.where(active, n_accepted, 0))


def speculative_round(p: SamplingTensors, s: DecodeState, spec: SpeculativeState, draft_step, verify_step,
                      k: int) -> None:
    """One round (steps 1-4). ``draft_step(tokens, positions)`` and ``verify_step(tokens,
    positions)`` ((B, T) each) return the draft's logits (last position used) and the
    target's (B, k+1, V)."""
    drafts, weights, draft_bad = propose(p, s, spec, draft_step, k)
    positions = s.positions + torch.arange(k + 1, device=s.positions.device)
    logits = verify_step(torch.cat([s.tokens, drafts], dim=1), positions)
    block, n_accepted, bad = accept(logits, drafts, weights, draft_bad, p, s, k)
    commit(logits, block, n_accepted, bad, p, s, spec)
