"""Speculative decoding (gptfast.generation.speculative, gptfast.reference.speculative_round, the C++
speculative_loop): greedy output equals plain greedy output token for token; sampled
tokens follow the target's processed distribution (chi-square on models whose logits
are fixed by construction); the C++ loop and the twin give identical tokens; bad input."""
import contextlib
import math

import pytest
import torch

from gptfast import GPT, GPTConfig, SamplingParams, generate
from gptfast.generation import generate as generate_module
from gptfast.generation.engines import CppEngine
from gptfast.generation.streaming import InvalidLogitsError
from gptfast.runtime import extension
from gptfast.generation.decode_state import SamplingTensors
from gptfast.reference.speculative_round import filtered_z
from gptfast.generation.sampling_params import build_sampling_tensors
from test_generation import ScriptedModel

V = 48


def _have_cpp():
    return hasattr(extension.load_extension(), "speculative_loop")


def _engines():
    unavailable = pytest.mark.skipif(not _have_cpp(), reason="C++ extension unavailable")
    return ["python", pytest.param("cpp", marks=unavailable)]


@pytest.fixture(scope="module")
def models():
    """A 2-layer target and a 1-layer draft in float64 (no near-ties between argmaxes of
    the batched verify step and the plain decode step)."""
    torch.manual_seed(0)
    target = GPT(GPTConfig(vocab_size=V, block_size=80, n_layer=2, n_head=2, n_embd=32), backend="torch")
    torch.manual_seed(1)
    draft = GPT(GPTConfig(vocab_size=V, block_size=80, n_layer=1, n_head=2, n_embd=16), backend="torch")
    return target.double().eval(), draft.double().eval()


def _prompts(n, seed=0, lengths=(3, 9, 1, 14, 6)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


def _same(plain, spec):
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    assert [(r.finish_reason, r.stop_reason) for r in spec] == [(r.finish_reason, r.stop_reason) for r in plain]


@pytest.mark.parametrize("engine", _engines())
@pytest.mark.parametrize("batch", [1, 5])
def test_greedy_equals_plain_greedy(models, engine, batch):
    target, draft = models
    params = SamplingParams(max_new_tokens=16, temperature=0)
    for seed in range(1 if batch > 1 else 3):
        prompts = _prompts(batch, seed)
        plain = generate(target, prompts, params, engine="python")
        for k in range(1, 9):
            spec = generate(target, prompts, params, engine=engine, draft_model=draft, num_draft_tokens=k)
            _same(plain, spec)
            assert all(r.draft_tokens > 0 and 0 <= r.accepted_draft_tokens <= r.draft_tokens for r in spec)


@pytest.mark.parametrize("engine", _engines())
def test_greedy_stops_mid_block_and_keeps_processors(models, engine):
    """Stop tokens inside an accepted block end the row there; penalties, min_new_tokens,
    logit bias and logprobs keep their meaning; rows with different settings mix."""
    target, draft = models
    prompts = _prompts(5, seed=3)
    base = generate(target, prompts, SamplingParams(max_new_tokens=24, temperature=0), engine="python")
    stop = base[0].token_ids[7]  # a token in the middle of row 0's output
    params = [SamplingParams(max_new_tokens=24, temperature=0, stop_token_ids=(stop,)),
              SamplingParams(max_new_tokens=24, temperature=0, stop_token_ids=(stop,), min_new_tokens=10),
              SamplingParams(max_new_tokens=17, temperature=0, repetition_penalty=1.6, logprobs=3),
              SamplingParams(max_new_tokens=24, temperature=0, presence_penalty=0.7, frequency_penalty=0.4,
                             logit_bias={base[3].token_ids[2]: -50.0}),
              SamplingParams(max_new_tokens=5, temperature=0, logprobs=0)]
    plain = generate(target, prompts, params, engine="python")
    assert plain[0].finish_reason == "stop" and len(plain[0].token_ids) < 24
    for k in (2, 5, 8):
        spec = generate(target, prompts, params, engine=engine, draft_model=draft, num_draft_tokens=k)
        _same(plain, spec)
        for a, b in zip(plain, spec):
            if a.logprobs is not None:
                assert b.logprobs == pytest.approx(a.logprobs, abs=1e-5)
                ids = [[[t for t, _ in row] for row in r.top_logprobs] for r in (a, b)]
                assert ids[0] == ids[1]


class _Recording(CppEngine):
    """The C++ engine (CPU fast paths, or the ATen path with ``force_aten``) keeping the
    state tensors the speculative loop leaves."""

    def speculative_loop(self, p, s, spec, *args):
        try:
            return super().speculative_loop(p, s, spec, *args)
        finally:  # (also when a sync raises: bad logits)
            self.final = {name: getattr(state, name).clone() for state, names in (
                (s, ("out_tokens", "finished", "finish_reason", "bad_step", "generated", "positions", "tokens",
                     "counts")),
                (spec, ("prev_tokens", "drafted", "accepted"))) for name in names if getattr(state, name) is not None}


def _speculate(monkeypatch, engine, target, draft, prompts, params, k):
    monkeypatch.setattr(generate_module, "get_engine", lambda name: engine)
    return generate(target, prompts, params, engine="cpp", draft_model=draft, num_draft_tokens=k)


def _greedy_settings(stop, bias):
    """One greedy row of each kind the CPU round handles: plain, stop tokens (with and
    without min_new_tokens), penalties, logit bias, and lengths that end mid-block."""
    return [SamplingParams(max_new_tokens=24, temperature=0, stop_token_ids=(stop,)),
            SamplingParams(max_new_tokens=23, temperature=0, stop_token_ids=(stop,), min_new_tokens=11),
            SamplingParams(max_new_tokens=17, temperature=0, repetition_penalty=1.6),
            SamplingParams(max_new_tokens=21, temperature=0, presence_penalty=0.7, frequency_penalty=0.4,
                           logit_bias={bias: -50.0}),
            SamplingParams(max_new_tokens=5, temperature=0, penalize_prompt=False, repetition_penalty=1.2)]


@pytest.mark.parametrize("batch", [1, 5])
def test_cpu_greedy_round_equals_the_aten_round(models, monkeypatch, batch):
    """Every row greedy, no logprobs: on CPU state the C++ loop runs its rounds as loops over
    rows (the CPU fast path); every state tensor it leaves, and every result, equals what
    the ATen round (the path CUDA runs) leaves: ragged prompts, stops inside a block,
    min_new_tokens, penalties, logit bias, rows ending at different rounds, k = 1 to 8."""
    if not _have_cpp():
        pytest.skip("C++ extension unavailable")
    target, draft = models
    prompts = _prompts(batch, seed=21)
    base = generate(target, prompts, SamplingParams(max_new_tokens=24, temperature=0), engine="python")
    settings = _greedy_settings(base[0].token_ids[6], base[-1].token_ids[2])
    for k in (1, 3, 8):
        params = settings[:batch] if batch > 1 else settings[k % len(settings)]
        fast, aten = _Recording(extension.load_extension()), _Recording(extension.load_extension(), force_aten=True)
        got = _speculate(monkeypatch, fast, target, draft, prompts, params, k)
        want = _speculate(monkeypatch, aten, target, draft, prompts, params, k)
        assert fast.final.keys() == aten.final.keys()
        for name in aten.final:
            assert torch.equal(fast.final[name], aten.final[name]), (k, name)
        _same(want, got)
        assert [r.accepted_draft_tokens for r in got] == [r.accepted_draft_tokens for r in want]
    assert any(r.finish_reason == "stop" for r in got) or batch == 1


def test_cpu_greedy_round_records_bad_logits(monkeypatch):
    """A row whose logits turn NaN inside a verified block: the CPU round and the ATen round
    record the same first bad step and state, and generate names it (InvalidLogitsError),
    on models whose logits are fixed by construction."""
    if not _have_cpp():
        pytest.skip("C++ extension unavailable")
    target, draft = _fixed_pair()
    target.table[6, 3] = float("nan")  # the logits at position 6 choose generated token 6 (prompt [0])
    params = [SamplingParams(max_new_tokens=10, temperature=0), SamplingParams(max_new_tokens=3, temperature=0)]
    finals = []
    for force_aten in (False, True):
        engine = _Recording(extension.load_extension(), force_aten=force_aten)
        with pytest.raises(InvalidLogitsError, match="row 0: .* at generated token 6"):
            _speculate(monkeypatch, engine, target, draft, [[0], [1, 2]], params, 3)
        finals.append(engine.final)
    fast, aten = finals
    assert int(aten["bad_step"][0]) == 6
    for name in aten:
        assert torch.equal(fast[name], aten[name]), name


def test_verify_step_matches_prefill(models):
    """model(idx (B, T), input_pos=(B, T)): rows at different positions, causal within the
    block, the logits of a full prefill at those positions."""
    target, _ = models
    idx = torch.randint(0, V, (3, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        target.setup_cache(3, 32)
        full = target(idx, input_pos=torch.arange(20))
        target.setup_cache(3, 32)
        target(idx[:, :12], input_pos=torch.arange(12))
        starts = torch.tensor([4, 9, 12])
        positions = starts[:, None] + torch.arange(5)
        out = target(idx.gather(1, positions), input_pos=positions)
    torch.testing.assert_close(out, full.gather(1, positions[:, :, None].expand(-1, -1, V)), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="consecutive"):
        target(idx[:, :3], input_pos=torch.tensor([[1, 2, 4]] * 3))


def test_self_draft_accepts_everything(models):
    target, _ = models
    prompts = _prompts(3, seed=5)
    params = SamplingParams(max_new_tokens=21, temperature=0)
    spec = generate(target, prompts, params, engine="python", draft_model=target, num_draft_tokens=4)
    _same(generate(target, prompts, params, engine="python"), spec)
    assert all(r.accepted_draft_tokens == r.draft_tokens == 16 for r in spec)  # 4 rounds of 4 + 1 tokens


# ---- sampling: fixed logits by construction ------------------------------------------


class FixedLogits(ScriptedModel):
    """Stands in for GPT: the logits at position t are ``table[t]``, whatever the tokens
    (test_generation's stand-in, with its cache and parameter, and a fixed table)."""

    def __init__(self, table):
        super().__init__(vocab_size=table.shape[1], block_size=table.shape[0])
        self.table = table

    def forward(self, idx, input_pos, logits_index=None):
        rows = torch.arange(idx.shape[0])
        logits = self.table[input_pos.expand(idx.shape)]
        return logits if logits_index is None else logits[rows, logits_index].unsqueeze(1)


SV = 10  # the sampling tests' vocabulary


def _fixed_pair():
    g = torch.Generator().manual_seed(7)
    target = torch.randn(16, SV, generator=g) * 1.5
    draft = target.flip(-1) * 0.7 + torch.randn(16, SV, generator=g)  # a quite different distribution
    return FixedLogits(target), FixedLogits(draft)


def _target_probs(table_row, params):
    """The target's processed distribution at one position (the sampler's filters)."""
    p: SamplingTensors = build_sampling_tensors([params], SV, [0], "cpu")
    x = table_row[None].float()
    return torch.softmax(filtered_z(x, x.max(dim=-1).values, p).double(), dim=-1)[0]


def _chi_square(counts, probs):
    """Pearson's statistic and degrees of freedom over the tokens the target can emit;
    cells with expected count < 5 are pooled; any count on a zero-probability token fails."""
    assert counts[probs == 0].sum() == 0, "a token the target's processed distribution excludes was emitted"
    keep = probs > 0
    expected, observed = probs[keep] * counts.sum(), counts[keep].double()
    small = expected < 5
    if small.any():
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
        observed = torch.cat([observed[~small], observed[small].sum()[None]])
    return float(((observed - expected) ** 2 / expected).sum()), len(expected) - 1


def _chi2_limit(df):
    """The chi-square statistic's 0.9999 quantile (Wilson-Hilferty), a loose but fixed bar."""
    z = 3.719
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


SETTINGS = [dict(temperature=1.0), dict(temperature=0.6), dict(temperature=1.3, top_k=4),
            dict(temperature=1.0, top_p=0.7), dict(temperature=0.9, min_p=0.08)]


@pytest.mark.parametrize("engine", _engines())
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_sampling_follows_target_distribution(setting, engine):
    target, draft = _fixed_pair()
    rows, k, new = 600, 3, 5
    params = [SamplingParams(max_new_tokens=new, seed=1000 + i, **setting) for i in range(rows)]
    out = generate(target, [[0]] * rows, params, engine=engine, draft_model=draft, num_draft_tokens=k)
    tokens = torch.tensor([r.token_ids for r in out])
    for index in range(1, new):  # index 0 is the plain first sample; index i: the logits at position i
        counts = torch.bincount(tokens[:, index], minlength=SV)
        stat, df = _chi_square(counts, _target_probs(target.table[index], params[0]))
        assert stat < _chi2_limit(max(df, 1)), (index, stat, df, counts.tolist())
    accepted = sum(r.accepted_draft_tokens for r in out) / sum(r.draft_tokens for r in out)
    assert 0 < accepted < 1  # both the accept and the residual paths ran


@pytest.mark.parametrize("setting", SETTINGS[2:] + [dict(temperature=0.8, repetition_penalty=1.3, top_k=6)],
                         ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_cpp_and_twin_sample_identical_tokens(models, setting):
    if not _have_cpp():
        pytest.skip("C++ extension unavailable")
    target, draft = models
    prompts = _prompts(5, seed=11)
    params = [SamplingParams(max_new_tokens=18, seed=40 + i, **setting) for i in range(4)]
    params.append(SamplingParams(max_new_tokens=18, temperature=0))  # a greedy row in the batch
    for k in (1, 4):
        twin = generate(target, prompts, params, engine="python", draft_model=draft, num_draft_tokens=k)
        cpp = generate(target, prompts, params, engine="cpp", draft_model=draft, num_draft_tokens=k)
        assert [r.token_ids for r in cpp] == [r.token_ids for r in twin]
        assert [r.accepted_draft_tokens for r in cpp] == [r.accepted_draft_tokens for r in twin]


def test_seed_fixes_a_row_whatever_its_batch(models):
    target, draft = models
    prompts = _prompts(4, seed=13)
    params = [SamplingParams(max_new_tokens=12, seed=5 + i, temperature=0.9, top_k=10) for i in range(4)]
    together = generate(target, prompts, params, engine="python", draft_model=draft, num_draft_tokens=3)
    alone = generate(target, prompts[2:3], params[2:3], engine="python", draft_model=draft, num_draft_tokens=3)
    assert alone[0].token_ids == together[2].token_ids


# ---- bad input -------------------------------------------------------------------------


def test_bad_input(models):
    target, draft = models
    prompts = _prompts(2)
    other = GPT(GPTConfig(vocab_size=V + 1, block_size=80, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(ValueError, match="vocabulary"):
        generate(target, prompts, draft_model=other.double())
    for k in (0, 17, 2.0, True):  # None: the default (4)
        with pytest.raises(ValueError, match="num_draft_tokens"):
            generate(target, prompts, draft_model=draft, num_draft_tokens=k)
    with pytest.raises(TypeError, match="draft_model"):
        generate(target, prompts, draft_model=object())
    with pytest.raises(ValueError, match="draft_model's context"):
        short = GPT(GPTConfig(vocab_size=V, block_size=24, n_layer=1, n_head=2, n_embd=16)).double()
        generate(target, prompts, SamplingParams(max_new_tokens=20), draft_model=short, num_draft_tokens=4)
    with pytest.raises(ValueError, match="share the tokenizer"):
        from gptfast.tokenizer import ByteTokenizer

        class Shifted(ByteTokenizer):
            pass

        generate(target, prompts, tokenizer=ByteTokenizer(), draft_tokenizer=Shifted(), draft_model=draft)
    meta = GPT(GPTConfig(vocab_size=V, block_size=80, n_layer=1, n_head=2, n_embd=16)).to("meta")
    with pytest.raises(ValueError, match="device"):
        generate(target, prompts, draft_model=meta)


def test_cli_generate_with_a_draft(tmp_path, capsys):
    from gptfast.cli import main

    for name, n_layer, seed in (("target", 2, 0), ("draft", 1, 1)):  # byte-level models
        torch.manual_seed(seed)
        GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=n_layer, n_head=2, n_embd=32)).save_pretrained(
            tmp_path / name)
    common = ["generate", "--model", str(tmp_path / "target"), "--prompt", "ab", "--max-new-tokens", "12",
              "--temperature", "0"]
    assert main(common) == 0
    plain = capsys.readouterr().out
    assert main(common + ["--draft", str(tmp_path / "draft"), "--draft-tokens", "3"]) == 0
    spec = capsys.readouterr().out
    assert "draft tokens accepted" in spec and spec.split("\n[")[0] == plain.split("\n[")[0]
    assert main(common + ["--draft-tokens", "3"]) == 2
    assert "--draft-tokens needs --draft" in capsys.readouterr().err
    assert main(common + ["--draft", str(tmp_path / "draft"), "--draft-tokens", "17"]) == 2
    assert "num_draft_tokens" in capsys.readouterr().err


def test_cuda_graph_needs_cuda(models):
    target, draft = models
    with pytest.raises(ValueError, match="cuda_graph=True needs"):
        generate(target, _prompts(1), SamplingParams(max_new_tokens=4), draft_model=draft, cuda_graph=True)


# ---- the C++ round's CPU fast path (every row greedy) against its ATen path -------------
#
# The fast path runs when every row is greedy, no logprobs are asked for and the state
# is on the CPU; force_aten=True runs the general (CUDA's) path on the same CPU tensors.
# The steps are stand-ins whose logits are a table lookup by (row, position, token), so
# each row's logits at an index follow from what it was fed there: the draft's table is
# the target's plus noise, which makes some drafts accepted and others not.

FV = 67  # >= 64: argmax_row's vectorised path, and not a multiple of 8: its scalar tail
FAST_FIELDS = ("tokens", "positions", "step", "generated", "finished", "finish_reason", "bad_step", "out_tokens",
               "counts", "prompt_seen", "out_logprobs", "out_top_ids", "out_top_logprobs")
SPEC_FIELDS = ("prev_tokens", "drafted", "accepted")


def _tables(seed=0, rows=4, positions=64, noise=0.5, bad=False):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(rows, positions, FV, FV, generator=g) * 2
    draft = target + torch.randn(rows, positions, FV, FV, generator=g) * noise
    if bad:  # row 2: a NaN logit at position 12 (the target's and the draft's); row 3: all -inf at 15
        target[2, 12, :, 5] = draft[2, 12, :, 5] = math.nan
        target[3, 15] = -math.inf
    return target, draft


def _table_steps(target, draft, draft_dtype=torch.float32, verify_dtype=torch.float32, strided=False):
    """draft_step / verify_step ((B, T) tokens and positions) on the tables; the verify
    logits can come back in another dtype and as a non-contiguous tensor."""
    def lookup(table, tokens, positions):
        rows = torch.arange(tokens.shape[0])[:, None] % table.shape[0]
        return table[rows, positions, tokens]  # (B, T, V)

    def draft_step(tokens, positions):
        return lookup(draft, tokens, positions)[:, -1:].to(draft_dtype)

    def verify_step(tokens, positions):
        out = lookup(target, tokens, positions).to(verify_dtype)
        return out.transpose(0, 1).contiguous().transpose(0, 1) if strided else out

    return draft_step, verify_step


def _run_rounds(engine, params, prompts, k, steps, eos=None, around_loop=None):
    """generate()'s speculative path on the stand-in steps: the first token by the twin's
    sample step, then engine.speculative_loop (inside the context ``around_loop``);
    returns (state, speculative state)."""
    from gptfast.generation.sampling_params import new_decode_state, resolve_seeds
    from gptfast.generation.speculative import new_speculative_state
    from gptfast.reference import sampler as twin

    p = build_sampling_tensors(params, FV, resolve_seeds(params), "cpu", eos)  # the twin's token table
    s = new_decode_state(prompts, params, p, FV, "cpu")
    spec = new_speculative_state(s.tokens)
    draft_step, verify_step = steps
    twin.sample_step(verify_step(s.tokens, s.positions)[:, -1], p, s)
    max_new = max(q.max_new_tokens for q in params)
    with around_loop or contextlib.nullcontext():
        engine.speculative_loop(p, s, spec, draft_step, verify_step, lambda bound: bool(s.finished.all()),
                                max_new - 1, 2, k, 1)
    return s, spec


def _assert_same_states(a, b, what):
    (s1, spec1), (s2, spec2) = a, b
    for obj1, obj2, names in ((s1, s2, FAST_FIELDS), (spec1, spec2, SPEC_FIELDS)):
        for name in names:
            x, y = getattr(obj1, name), getattr(obj2, name)
            assert (x is None and y is None) or torch.equal(x, y), (what, name, x, y)


@pytest.fixture(scope="module")
def cpp_engines():
    if not _have_cpp():
        pytest.skip("C++ extension unavailable")
    from gptfast.generation.engines import CppEngine

    module = extension.load_extension()
    return CppEngine(module), CppEngine(module, force_aten=True)


def _fast_equals_aten(cpp_engines, params, prompts, k, steps, eos=None):
    fast, aten = (_run_rounds(e, params, prompts, k, steps, eos) for e in cpp_engines)
    _assert_same_states(fast, aten, (k, params))
    return fast


RAGGED = [[3, 9], [1, 4, 7, 2, 8, 8, 0, 5, 6], [11, 12, 13, 14], [2, 60, 33, 4, 50, 1]]


@pytest.mark.parametrize("k", [1, 3, 8])
def test_greedy_fast_round_equals_aten_batch1(cpp_engines, k):
    target, draft = _tables(seed=k)
    for noise in (0.0, 0.5, 3.0):  # the draft is the target; close to it; far from it
        steps = _table_steps(target, target + (draft - target) * noise / 0.5)
        for max_new in (1, 2, 5, 23):
            s, spec = _fast_equals_aten(cpp_engines, [SamplingParams(max_new_tokens=max_new, temperature=0)],
                                        [[7, 3, 9]], k, steps)
            assert int(s.generated[0]) == max_new and int(s.finish_reason[0]) == 2
        drafted, accepted = int(spec.drafted[0]), int(spec.accepted[0])
        assert accepted == drafted > 0 if noise == 0 else 0 <= accepted < drafted


def _greedy_outputs(cpp_engines, prompts, k, steps):
    params = [SamplingParams(max_new_tokens=24, temperature=0)] * len(prompts)
    s, _ = _run_rounds(cpp_engines[1], params, prompts, k, steps)
    return s.out_tokens.tolist()


def _last_token_stops(outputs, shortest=6):
    """Per row, (m, t): t is the row's m-th output token and none before it, so that with
    max_new_tokens=m a stop on t ends the row at its length limit (the stop wins)."""
    return [next((m, row[m - 1]) for m in range(shortest, 25) if row[m - 1] not in row[:m - 1]) for row in outputs]


@pytest.mark.parametrize("k", [1, 3, 8])
def test_greedy_fast_round_equals_aten_ragged(cpp_engines, k):
    """A ragged batch of 4: stop tokens mid-block, max_new_tokens mid-block (rows finish in
    different rounds), penalties, logit bias, min_new_tokens, an end-of-text id."""
    steps = _table_steps(*_tables(seed=10 + k))
    outputs = _greedy_outputs(cpp_engines, RAGGED, k, steps)
    stop = [row[6] for row in outputs]  # stops that come mid-output
    at_limit = _last_token_stops(outputs)
    settings = [
        [dict(max_new_tokens=m) for m in (5, 24, 13, 20)],
        [dict(max_new_tokens=24, stop_token_ids=(t,)) for t in stop],
        [dict(max_new_tokens=24, stop_token_ids=(stop[0],), min_new_tokens=12),
         dict(max_new_tokens=17, repetition_penalty=1.7),
         dict(max_new_tokens=24, repetition_penalty=0.6, penalize_prompt=False, stop_token_ids=(stop[2],)),
         dict(max_new_tokens=22, presence_penalty=0.8, frequency_penalty=0.5, min_new_tokens=3)],
        [dict(max_new_tokens=24, logit_bias={stop[1]: 4.0, 3: -math.inf}),
         dict(max_new_tokens=9, frequency_penalty=-0.3, logit_bias={stop[0]: -2.5}),
         dict(max_new_tokens=24, repetition_penalty=1.3, presence_penalty=-0.4, stop_token_ids=(stop[2], stop[3])),
         dict(max_new_tokens=24, min_new_tokens=24, stop_token_ids=(stop[3],))],
        # Row 0: a stop token favoured by far, allowed from index 10 on (a draft index of
        # the round that crosses it); the others: a stop on their last allowed token.
        [dict(max_new_tokens=24, min_new_tokens=10, stop_token_ids=(5,), logit_bias={5: 50.0}, ignore_eos=True)]
        + [dict(max_new_tokens=m, stop_token_ids=(t,), ignore_eos=True) for m, t in at_limit[1:]],
    ]
    reasons, stopped_early = set(), 0
    for rows in settings:
        params = [SamplingParams(temperature=0, **row) for row in rows]
        s, spec = _fast_equals_aten(cpp_engines, params, RAGGED, k, steps, eos=stop[1])
        reasons |= set(s.finish_reason.tolist())
        stopped_early += sum(int(g) < q.max_new_tokens for g, q in zip(s.generated, params))
        assert bool(s.finished.all()) and bool((spec.accepted <= spec.drafted).all())
    assert s.generated.tolist() == [11] + [m for m, _ in at_limit[1:]] and s.finish_reason.tolist() == [1] * 4
    assert reasons == {1, 2} and stopped_early > 0


def test_greedy_fast_round_equals_aten_on_bad_logits_and_dtypes(cpp_engines):
    """NaN and all -inf logits (bad_step), draft logits in bfloat16, verify logits in
    float64 and non-contiguous: each step's logits as the ATen path reads them."""
    target, draft = _tables(seed=3, bad=True)
    params = [SamplingParams(max_new_tokens=20, temperature=0, repetition_penalty=1.2)] * 4
    for k in (2, 5):
        for kinds in (dict(), dict(draft_dtype=torch.bfloat16, verify_dtype=torch.float64, strided=True),
                      dict(draft_dtype=torch.float16, verify_dtype=torch.bfloat16)):
            s, _ = _fast_equals_aten(cpp_engines, params, RAGGED, k, _table_steps(target, draft, **kinds))
            if not kinds:
                assert int(s.bad_step[0]) < 0 and int(s.bad_step[2]) >= 0 and int(s.bad_step[3]) >= 0


def test_round_without_the_fast_path_equals_twin(cpp_engines):
    """Where the fast path's preconditions fail (logprobs asked for, a sampled row), the C++
    loop still gives the twin's state, and its greedy rows the tokens without them."""
    from gptfast.generation.engines import PythonEngine

    steps = _table_steps(*_tables(seed=5))
    greedy = [SamplingParams(max_new_tokens=16, temperature=0, repetition_penalty=1.2)] * 4
    plain, _ = _run_rounds(cpp_engines[0], greedy, RAGGED, 3, steps)
    for change in (dict(logprobs=2), dict(temperature=0.8, seed=9)):
        params = greedy[:2] + [greedy[2].replace(**change)] + greedy[3:]
        twin = _run_rounds(PythonEngine(), params, RAGGED, 3, steps)
        for engine in cpp_engines:
            _assert_same_states(_run_rounds(engine, params, RAGGED, 3, steps), twin, change)
        rows = [0, 1, 3] if "temperature" in change else [0, 1, 2, 3]
        assert torch.equal(twin[0].out_tokens[rows], plain.out_tokens[rows])


def test_greedy_rounds_take_the_fast_path(cpp_engines):
    """The observable difference: the fast path picks tokens with its own loops, the ATen
    path with torch.max, once per draft step and verify index (the profiler's op names)."""
    steps = _table_steps(*_tables(seed=6))
    params = [SamplingParams(max_new_tokens=12, temperature=0, repetition_penalty=1.2)] * 4
    calls = []
    for engine in cpp_engines:
        prof = torch.profiler.profile()
        _run_rounds(engine, params, RAGGED, 3, steps, around_loop=prof)
        calls.append(sum(event.name == "aten::max" for event in prof.events()))
    assert calls[0] == 0 and calls[1] >= 7
