"""The sampler: C++ extension vs its Python twin, the noise, the processors, the
distribution and parameter validation. CPU only, small shapes. (The extension's loader:
tests/test_extension.py.)"""
import math
import os

import pytest
import torch

from gptfast.generation import decode_state, sampling_params as sampling
from gptfast.runtime import extension
from gptfast.generation.engines import CppEngine, PythonEngine
from gptfast.reference import sampler as twin
from gptfast.generation.sampling_params import SamplingParams, build_sampling_tensors, new_decode_state

V = 97  # a vocabulary that is not a power of two


@pytest.fixture(scope="module")
def ext():
    module = extension.load_extension()
    if module is None:
        reason = f"C++ sampling extension unavailable: {extension.extension_status()}"
        if os.environ.get("GPTFAST_REQUIRE_EXT") == "1":  # CI builds the extension: its absence is a failure
            pytest.fail(reason)
        pytest.skip(reason)
    return module


@pytest.fixture(scope="module")
def engines(ext):
    """The twin, the C++ CPU fast path, and the C++ general (ATen, CUDA's) path on CPU."""
    return [PythonEngine(), CppEngine(ext), CppEngine(ext, force_aten=True)]


def name_of(engine):
    return engine.name + ("-aten" if getattr(engine, "force_aten", False) else "")


def make_batch(params, prompts=None, vocab=V, eos=None, table=None):
    prompts = prompts or [[1, 2, 3]] * len(params)
    seeds = sampling.resolve_seeds(params)
    p = build_sampling_tensors(params, vocab, seeds, "cpu", eos, token_table=table)
    return p, new_decode_state(prompts, params, p, vocab, "cpu")


def run_steps(engine, params, logits_per_step, prompts=None, eos=None):
    """Sample len(logits_per_step) steps on fixed logits; return (tokens per step, state)."""
    p, s = make_batch(params, prompts, vocab=logits_per_step[0].shape[-1], eos=eos, table=engine.token_table)
    tokens = [engine.sample_step(logits, p, s).tolist() for logits in logits_per_step]
    return tokens, s


def random_logits(steps, batch, vocab=V, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, vocab, generator=g) * scale for _ in range(steps)]


# ---- noise ------------------------------------------------------------------------------


def test_noise_bits_identical_cpp_cpu_loop_aten_and_twin(ext):
    table = twin.token_table(V)
    assert torch.equal(ext.token_table(V), table)
    seed = torch.tensor([0, 1, 7, 2**32 - 1, 2**32, 2**63 - 1], dtype=torch.long)
    for step in (0, 1, 12345, 2**31 + 5):
        step_t = torch.tensor([step])
        expected = twin.uniform_noise(seed, step_t, table)
        assert torch.equal(ext.uniform_noise(seed, step_t, table), expected)
        assert torch.equal(ext.uniform_noise(seed, step_t, table, force_aten=True), expected)
        ids = torch.randint(0, V, (6, 11))
        expected = twin.uniform_noise(seed, step_t, table, ids)
        assert torch.equal(ext.uniform_noise(seed, step_t, table, ids), expected)
        assert torch.equal(ext.uniform_noise(seed, step_t, table, ids, force_aten=True), expected)
        # Gathered candidates get exactly the noise of the full-vocabulary form.
        assert torch.equal(expected, twin.uniform_noise(seed, step_t, table).gather(1, ids))


def test_noise_is_uniform_and_depends_on_seed_step_token():
    table = twin.token_table(1000)
    seeds = torch.arange(20, dtype=torch.long) * 1_000_003
    u = torch.cat([twin.uniform_noise(seeds, torch.tensor([t]), table).flatten() for t in range(10)])
    assert 0 < u.min() and u.max() < 1
    counts = torch.histc(u.float(), bins=32, min=0, max=1)
    expected = u.numel() / 32
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert torch.special.gammaincc(torch.tensor(31 / 2), chi2 / 2) > 1e-3  # p-value of a 31-dof chi-square
    assert abs(float((-u.log()).mean()) - 1.0) < 0.01  # E = -log u is Exp(1)
    one = twin.uniform_noise(seeds[:1], torch.tensor([3]), table)
    assert not torch.equal(one, twin.uniform_noise(seeds[1:2], torch.tensor([3]), table))
    assert not torch.equal(one, twin.uniform_noise(seeds[:1], torch.tensor([4]), table))
    assert len(set(one.flatten().tolist())) == 1000


# ---- C++ == twin ------------------------------------------------------------------------

MIXES = [
    dict(temperature=0.0),
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=0.9, top_k=20, top_p=0.6),
    dict(temperature=1.0, min_p=0.1),
    dict(temperature=0.5, top_k=50, top_p=0.95, min_p=0.05),
    dict(temperature=1.0, repetition_penalty=1.3),
    dict(temperature=0.0, repetition_penalty=2.0, penalize_prompt=False),
    dict(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.3),
    dict(temperature=0.8, logit_bias={3: 5.0, 4: -math.inf}),
    dict(temperature=1.0, top_k=3, repetition_penalty=0.8, frequency_penalty=-0.2),
    dict(temperature=1.2, top_k=V + 10),
    dict(temperature=2.0, top_p=0.3, logprobs=3),
    dict(temperature=0.0, logprobs=0),
]


@pytest.mark.parametrize("rows", [[0], [1], [2, 3], [4, 5, 6], list(range(len(MIXES))), [1, 3, 12, 0]])
def test_cpp_and_twin_pick_identical_tokens(engines, rows):
    params = [SamplingParams(max_new_tokens=40, seed=100 + i, **MIXES[i]) for i in rows]
    logits = random_logits(12, len(rows), seed=len(rows))
    (tokens_py, state_py), *others = [run_steps(e, params, logits) for e in engines]
    for engine, (tokens, state) in zip(engines[1:], others):
        assert tokens == tokens_py, name_of(engine)
        for f in ("tokens", "positions", "step", "generated", "finished", "finish_reason", "bad_step", "out_tokens",
                  "counts", "out_logprobs", "out_top_ids", "out_top_logprobs"):
            a, b = getattr(state_py, f), getattr(state, f)
            assert (a is None and b is None) or torch.equal(a, b), (name_of(engine), f)


def test_greedy_argmax_matches_torch_max_on_edge_rows(engines):
    # Rows that stress "first maximum wins, first NaN wins": ties, -0.0 vs 0.0, all -inf,
    # NaN after the maximum, the maximum in the last (non-multiple-of-8) positions.
    rows = torch.randint(0, 3, (8, V), generator=torch.Generator().manual_seed(1)).float()
    rows[1] = 0.0
    rows[1, :40:3] = -0.0
    rows[2] = -math.inf
    rows[3, 90] = math.nan
    rows[3, 95] = math.nan
    rows[4, V - 1] = 5.0
    rows[5, :] = -math.inf
    rows[5, V - 2] = -1e30
    rows[6, 17] = math.nan
    params = [SamplingParams(temperature=0.0)] * 8
    expected = rows.max(dim=-1).indices.tolist()
    for engine in engines:
        tokens, s = run_steps(engine, params, [rows])
        assert tokens[0] == expected, name_of(engine)
        assert s.bad_step.tolist() == [-1, -1, 0, 0, -1, -1, 0, -1], name_of(engine)


def test_cpu_fast_paths_match_torch_on_rows_built_to_trip_them(engines):
    # The C++ CPU path finds the argmax eight lanes at a time and the top k from the k+1
    # largest raw logits; these rows aim at the seams: the maximum tied across lanes, NaN
    # only in the scalar tail, x values distinct but z = (x - max) / T tied (a subnormal
    # gap divided by T rounds to -0.0), and the (k+1)-th logit tied with the next.
    vocab, k = 203, 3
    g = torch.Generator().manual_seed(7)
    rows = torch.randn(6, vocab, generator=g)
    rows[0, [21, 13, 150]] = 9.0  # ties in lanes 5, 5 and 6: index 13 wins
    rows[1, vocab - 2] = math.nan  # NaN after the vectorised body
    rows[2] = -30.0
    rows[2, 50], rows[2, 3], rows[2, 4] = 0.0, -1e-45, -2e-45  # z ties at 0 after / T
    rows[3, :8] = torch.tensor([5.0, 4.0, 3.0, 2.0, 2.0, 2.0, -1.0, -2.0])  # 4th largest tied
    rows[4, 100:] = -math.inf
    rows[5] = torch.linspace(-1, 1, vocab)
    greedy = [SamplingParams(temperature=0.0)] * 6
    sampled = [SamplingParams(temperature=3.0, top_k=k, seed=i) for i in range(6)]
    logits = [rows, rows.flip(-1).contiguous()]
    results = {}
    for engine in engines:
        greedy_tokens, _ = run_steps(engine, greedy, logits)
        sampled_tokens, _ = run_steps(engine, sampled, logits)
        results[name_of(engine)] = (greedy_tokens, sampled_tokens)
        assert greedy_tokens == [x.max(dim=-1).indices.tolist() for x in logits], name_of(engine)
    assert len({repr(r) for r in results.values()}) == 1, results
    for step, x in enumerate(logits):  # every sampled token is among the row's top k
        for row in (0, 2, 3, 4, 5):
            z = (x[row] - x[row].max()) / 3.0
            assert results["python"][1][step][row] in torch.topk(z, k).indices.tolist() or z[
                results["python"][1][step][row]] >= torch.topk(z, k).values[-1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_cpp_and_twin_agree_on_ties_and_low_precision_logits(engines, dtype):
    # Small integers: many exact ties, where "first maximum wins" must hold everywhere.
    g = torch.Generator().manual_seed(4)
    logits = [torch.randint(0, 4, (6, V), generator=g).to(dtype) for _ in range(6)]
    for x in logits:  # one row without ties, in the same top-k batch as tied rows
        x[5] = torch.randn(V, generator=g).to(dtype) * 3
    params = [SamplingParams(seed=i, **kw) for i, kw in enumerate(
        [dict(temperature=0.0), dict(temperature=0.0, repetition_penalty=1.5), dict(top_k=3),
         dict(top_p=0.5, presence_penalty=0.5), dict(min_p=0.5), dict(top_k=4)])]
    results = [run_steps(e, params, logits)[0] for e in engines]
    assert all(r == results[0] for r in results[1:])
    assert [t[0] for t in results[0]] == [int(x[0].float().argmax()) for x in logits]


def test_cpp_and_twin_identical_with_stops_and_min_new_tokens(engines):
    # Token 7 leads every row's logits: rows stop on it once min_new_tokens allows.
    logits = random_logits(10, 4, seed=3)
    for x in logits:
        x[:, 7] += 20.0
    params = [
        SamplingParams(max_new_tokens=10, temperature=0.0, stop_token_ids=[7], min_new_tokens=3),
        SamplingParams(max_new_tokens=10, temperature=0.9, stop_token_ids=[7, 8], seed=5),
        SamplingParams(max_new_tokens=4, temperature=1.0, seed=6, ignore_eos=True),
        SamplingParams(max_new_tokens=10, temperature=0.0, min_new_tokens=5, seed=7),
    ]
    (tokens_py, state_py), *others = [run_steps(e, params, logits, eos=7) for e in engines]
    for tokens, state in others:
        assert tokens == tokens_py
        assert torch.equal(state_py.out_tokens, state.out_tokens)
        assert torch.equal(state_py.finish_reason, state.finish_reason)
    state_cpp = others[0][1]
    out = state_cpp.out_tokens
    assert out[0, :3].ne(7).all() and out[0, 3] == 7 and out[0, 4:].eq(-1).all()  # stops right at min_new_tokens
    assert state_cpp.finish_reason.tolist()[0] == decode_state.FINISH_STOP_TOKEN
    assert out[2, :4].ne(-1).all() and out[2, 4:].eq(-1).all()  # eos ignored: runs to its length
    assert state_cpp.finish_reason[2] == decode_state.FINISH_LENGTH
    assert out[3, :5].ne(7).all() and out[3, 5] == 7  # eos is a stop token too


def test_decode_loops_agree_and_sync_on_cadence(engines):
    """The C++ decode_loop (fast and ATen paths) and the Python loop: same tokens, same
    host syncs (every 3 tokens, at the end, and early once every row has finished)."""
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(9)) * 2

    def model_step(tokens, positions):  # logits depend on the last token and its position
        return (table[tokens[:, 0]] + positions.float() * 0.01)[:, None, :]

    params = [SamplingParams(max_new_tokens=n, seed=i, top_k=9, repetition_penalty=1.2, stop_token_ids=[5])
              for i, n in enumerate((11, 7, 11))]
    outcomes = []
    for engine in engines:
        p, s = make_batch(params, table=engine.token_table)
        engine.sample_step(model_step(s.tokens, s.positions), p, s)
        syncs = []
        steps = engine.decode_loop(p, s, model_step, False, lambda n: syncs.append(n) or bool(s.finished.all()),
                                   10, 3, 1)
        outcomes.append((s.out_tokens.tolist(), s.finish_reason.tolist(), syncs, steps, int(s.generated.max())))
    assert all(o == outcomes[0] for o in outcomes[1:]), [name_of(e) for e in engines]
    _, _, syncs, steps, last = outcomes[0]
    assert syncs == [n for n in (3, 6, 9) if n < last] + [last] and steps == last - 1


# ---- greedy equivalents and processors ---------------------------------------------------


@pytest.mark.parametrize("kwargs", [dict(temperature=0.0), dict(top_k=1), dict(top_p=1e-9), dict(min_p=1.0),
                                    dict(top_k=1, temperature=5.0), dict(top_p=1e-6, top_k=30)])
def test_greedy_equivalents_pick_the_argmax(engines, kwargs):
    logits = random_logits(6, 5, seed=11)
    params = [SamplingParams(seed=i, **kwargs) for i in range(5)]
    for engine in engines:
        tokens, _ = run_steps(engine, params, logits)
        assert tokens == [x.argmax(-1).tolist() for x in logits]


def test_repetition_penalty_matches_hugging_face():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = random_logits(1, 2, seed=5)[0]
    prompt = [3, 10, 10, 50]
    params = [SamplingParams(repetition_penalty=1.7)] * 2
    p, s = make_batch(params, [prompt, prompt])
    s.counts[:, 60] = 2  # token 60 was generated twice
    got = twin.process_logits(logits, p, s)
    input_ids = torch.tensor([prompt + [60, 60]] * 2)
    expected = RepetitionPenaltyLogitsProcessor(1.7)(input_ids, logits.clone())
    assert torch.equal(got, expected)
    changed = (got != logits).any(0).nonzero().flatten().tolist()
    assert changed == [3, 10, 50, 60]
    # penalize_prompt=False: only generated tokens count.
    p, s = make_batch([SamplingParams(repetition_penalty=1.7, penalize_prompt=False)], [prompt])
    s.counts[0, 60] = 1
    got = twin.process_logits(logits[:1], p, s)
    assert (got != logits[:1]).nonzero()[:, 1].tolist() == [60]


def test_presence_frequency_and_logit_bias_change_exactly_their_tokens():
    logits = random_logits(1, 1, seed=6)[0]
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, logit_bias={2: 1.5, 90: -math.inf})]
    p, s = make_batch(params)
    s.counts[0, 40], s.counts[0, 41] = 1, 3
    got = twin.process_logits(logits, p, s)
    expected = logits.clone()
    expected[0, 40] -= 0.25 * 1 + 0.5
    expected[0, 41] -= 0.25 * 3 + 0.5
    expected[0, 2] += 1.5
    expected[0, 90] = -math.inf
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert sorted((got != logits).nonzero()[:, 1].tolist()) == [2, 40, 41, 90]


def test_penalties_and_bias_steer_greedy_tokens_in_both_engines(engines):
    logits = torch.zeros(1, V)
    logits[0, 10], logits[0, 11], logits[0, 12] = 3.0, 2.0, 1.0
    cases = [
        (dict(), [10, 10, 10]),
        (dict(repetition_penalty=2.0, penalize_prompt=False), [10, 11, 10]),  # 3/2 < 2, then 2/2 < 1.5
        (dict(repetition_penalty=2.0), [11, 10, 10]),  # prompt [10]: 10 penalised from the start
        (dict(frequency_penalty=1.5), [10, 11, 10]),
        (dict(presence_penalty=2.5), [10, 11, 12]),
        (dict(logit_bias={12: 2.5}), [12, 12, 12]),
        (dict(logit_bias={10: -math.inf, 11: -math.inf}), [12, 12, 12]),
    ]
    for kwargs, expected in cases:
        params = [SamplingParams(temperature=0.0, **kwargs)]
        for engine in engines:
            tokens, _ = run_steps(engine, params, [logits] * 3, prompts=[[10]])
            assert [t[0] for t in tokens] == expected, (kwargs, name_of(engine))


def test_top_k_top_p_min_p_never_sample_removed_tokens(engines):
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05] + [0.0] * 3]).clamp_min(1e-12))
    logits[0, 5:] = -math.inf
    rows = 64
    for kwargs, allowed in [(dict(top_k=2), {0, 1}), (dict(top_p=0.65), {0, 1}), (dict(top_p=0.75), {0, 1, 2}),
                            (dict(min_p=0.3), {0, 1, 2}), (dict(top_k=4, min_p=0.26), {0, 1, 2})]:
        params = [SamplingParams(seed=s, **kwargs) for s in range(rows)]
        for engine in engines:
            tokens, _ = run_steps(engine, params, [logits.expand(rows, -1)] * 3)
            seen = {t for step in tokens for t in step}
            assert seen == allowed, (kwargs, name_of(engine), seen)


def test_sampled_frequencies_match_the_processed_distribution(ext):
    # One step for many seeds on a fixed small distribution: a chi-square goodness of fit.
    probs = torch.tensor([0.30, 0.22, 0.15, 0.12, 0.09, 0.06, 0.04, 0.02])
    logits = probs.log()[None]
    temperature, top_k, top_p = 0.8, 6, 0.9
    expected = torch.softmax(logits[0] / temperature, -1)
    expected[top_k:] = 0  # top-k: the 6 largest
    expected /= expected.sum()
    keep = (expected.cumsum(0) - expected) < top_p  # top-p on the renormalised top 6
    expected = torch.where(keep, expected, 0.0)
    expected /= expected.sum()
    draws = 20000
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=s) for s in range(draws)]
    tokens, _ = run_steps(CppEngine(ext), params, [logits.expand(draws, -1)])
    counts = torch.bincount(torch.tensor(tokens[0]), minlength=8).double()
    assert counts[~keep].sum() == 0
    e = expected[keep].double() * draws
    chi2 = ((counts[keep] - e) ** 2 / e).sum()
    dof = int(keep.sum()) - 1
    p_value = torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), chi2 / 2)
    assert p_value > 1e-3, f"chi2 {chi2:.2f} with {dof} dof, p = {p_value:.2e}"


def test_same_seed_same_tokens_whatever_the_batch(engines):
    # Each request brings its own logits stream; request A must not notice its neighbours,
    # although they switch the batch between full-vocabulary, top-K and sorted sampling.
    requests = {
        "A": dict(temperature=0.9, top_p=0.85, repetition_penalty=1.2, seed=42),
        "B": dict(temperature=1.1, top_k=7, seed=1),
        "C": dict(temperature=0.0),
        "D": dict(temperature=1.0, min_p=0.05, seed=42),
    }
    streams = {name: random_logits(15, 1, seed=i) for i, name in enumerate(requests)}

    def run(engine, names):
        params = [SamplingParams(max_new_tokens=15, **requests[n]) for n in names]
        logits = [torch.cat([streams[n][t] for n in names]) for t in range(15)]
        tokens, _ = run_steps(engine, params, logits)
        return {n: [step[i] for step in tokens] for i, n in enumerate(names)}

    for engine in engines:
        alone = run(engine, ["A"])["A"]
        for names in (["B", "A"], ["A", "C", "B"], ["D", "C", "A", "B"], ["A", "A"]):
            out = run(engine, names)
            assert all(out[n] == alone for n in names if n == "A"), (name_of(engine), names)


def test_bad_logits_are_flagged_per_row(engines):
    logits = random_logits(3, 3, seed=2)
    logits[1][0, 5] = math.nan
    logits[2][2] = -math.inf
    params = [SamplingParams(temperature=t, seed=0) for t in (0.0, 1.0, 0.7)]
    for engine in engines:
        _, s = run_steps(engine, params, logits)
        assert s.bad_step.tolist() == [1, -1, 2]
    # A logit bias that bans every token is caught the same way.
    params = [SamplingParams(logit_bias={t: -math.inf for t in range(V)})]
    for engine in engines:
        _, s = run_steps(engine, params, random_logits(1, 1))
        assert s.bad_step.tolist() == [0]


# ---- parameters -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(top_p=0.0), ValueError, "top_p"),
        (dict(top_p=1.5), ValueError, "top_p"),
        (dict(top_p=-0.1), ValueError, "top_p"),
        (dict(top_k=-1), ValueError, "top_k"),
        (dict(top_k=2.5), TypeError, "top_k"),
        (dict(temperature=-0.5), ValueError, "temperature"),
        (dict(temperature=math.nan), ValueError, "temperature"),
        (dict(min_p=1.5), ValueError, "min_p"),
        (dict(repetition_penalty=0.0), ValueError, "repetition_penalty"),
        (dict(presence_penalty=math.inf), ValueError, "presence_penalty"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(seed=2**63), ValueError, "seed"),
        (dict(seed=1.0), ValueError, "seed"),
        (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
        (dict(min_new_tokens=10, max_new_tokens=5), ValueError, "min_new_tokens"),
        (dict(stop_token_ids=[-3]), ValueError, "stop_token_ids"),
        (dict(stop=[""]), ValueError, "stop"),
        (dict(logit_bias={1: math.nan}), ValueError, "logit_bias"),
        (dict(logit_bias=[1, 2]), TypeError, "logit_bias"),
        (dict(logprobs=-1), ValueError, "logprobs"),
        (dict(ignore_eos=1), TypeError, "ignore_eos"),
    ],
)
def test_invalid_params_rejected_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        SamplingParams(**kwargs)


def test_params_checked_against_the_vocabulary():
    for kwargs, match in [(dict(stop_token_ids=[V]), "stop_token_ids"), (dict(logit_bias={V + 5: 1.0}), "logit_bias"),
                          (dict(logprobs=V + 1), "logprobs")]:
        with pytest.raises(ValueError, match=match):
            make_batch([SamplingParams(**kwargs)])
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(seed=2**63 - 1, top_p=1.0, min_p=0.0).replace(top_k=3).top_k == 3


@pytest.mark.parametrize(
    "kwargs, error, names",
    [
        (dict(logit_bias={3: 1e300}), ValueError, ["logit_bias[3]", "1e+300"]),
        (dict(logit_bias={5: -1e300}), ValueError, ["logit_bias[5]", "-1e+300"]),
        (dict(logit_bias={4: math.inf}), ValueError, ["logit_bias[4]", "inf"]),
        (dict(logit_bias={4: "1"}), ValueError, ["logit_bias[4]", "'1'"]),
        (dict(presence_penalty=1e300), ValueError, ["presence_penalty", "1e+300"]),
        (dict(presence_penalty=-1e300), ValueError, ["presence_penalty", "-1e+300"]),
        (dict(frequency_penalty=1e300), ValueError, ["frequency_penalty", "1e+300"]),
        (dict(frequency_penalty=-math.inf), ValueError, ["frequency_penalty", "-inf"]),
        (dict(frequency_penalty=math.nan), ValueError, ["frequency_penalty", "nan"]),
        (dict(temperature=1e300), ValueError, ["temperature", "1e+300"]),
        (dict(temperature=math.inf), ValueError, ["temperature", "inf"]),
        (dict(temperature=1e-300), ValueError, ["temperature", "1e-300"]),
        (dict(top_p=math.nan), ValueError, ["top_p", "nan"]),
        (dict(top_p=math.inf), ValueError, ["top_p", "inf"]),
        (dict(min_p=math.nan), ValueError, ["min_p", "nan"]),
        (dict(repetition_penalty=1e300), ValueError, ["repetition_penalty", "1e+300"]),
        (dict(repetition_penalty=1e-300), ValueError, ["repetition_penalty", "1e-300"]),
        (dict(repetition_penalty=math.nan), ValueError, ["repetition_penalty", "nan"]),
        (dict(repetition_penalty=math.inf), ValueError, ["repetition_penalty", "inf"]),
        (dict(temperature="hot"), TypeError, ["temperature", "'hot'"]),
        (dict(top_k=True), TypeError, ["top_k", "True"]),
    ],
)
def test_values_outside_float32_or_the_documented_range_are_named(kwargs, error, names):
    # Each of these used to pass construction and fail later (float32 conversion) or turn
    # logits into NaN, with an error blaming the model's weights.
    with pytest.raises(error) as caught:
        SamplingParams(**kwargs)
    assert all(name in str(caught.value) for name in names), str(caught.value)


def test_the_range_limits_themselves_are_accepted_and_sample_finite(engines):
    edge = [dict(presence_penalty=1e6, frequency_penalty=-1e6), dict(repetition_penalty=1e-6),
            dict(repetition_penalty=1e6, temperature=1e-6), dict(temperature=1e6), dict(logit_bias={3: 3e38})]
    params = [SamplingParams(seed=i, **kw) for i, kw in enumerate(edge)]
    for engine in engines:
        _, s = run_steps(engine, params, random_logits(3, len(edge)))
        assert s.bad_step.tolist() == [-1] * len(edge), name_of(engine)


def test_top_k_keeps_ties_with_the_kth_token_like_hugging_face(engines):
    from transformers.generation.logits_process import TopKLogitsWarper

    # Uniform logits over 5 tokens, top_k=3: HF keeps all five (each ties the 3rd).
    logits = torch.full((1, 8), -math.inf)
    logits[0, :5] = 1.5
    kept = TopKLogitsWarper(3)(None, logits.clone()).isfinite()[0].nonzero().flatten().tolist()
    assert kept == [0, 1, 2, 3, 4]
    rows = 200
    params = [SamplingParams(top_k=3, seed=s) for s in range(rows)]
    results = {}
    for engine in engines:
        tokens, _ = run_steps(engine, params, [logits.expand(rows, -1).contiguous()] * 2)
        results[name_of(engine)] = tokens
        assert {t for step in tokens for t in step} == set(kept), name_of(engine)
    assert len({repr(r) for r in results.values()}) == 1
    # Ties at the k-th place of a large vocabulary (the C++ CPU path's top-K list, which
    # must give way to the sorted vocabulary), mixed with untied rows and other k.
    vocab = 400
    g = torch.Generator().manual_seed(3)
    big = torch.randn(6, vocab, generator=g)
    big[0, 50:60] = 8.0  # ten tokens tie for the lead, top_k=2 keeps all ten
    big[1, [7, 300, 399]] = 9.0
    big[1, [8, 9, 200, 350]] = 8.5  # the 4th..7th tie, top_k=4 keeps seven
    params = [SamplingParams(top_k=k, seed=i, **extra) for i, (k, extra) in enumerate(
        [(2, {}), (4, {}), (5, {}), (2, dict(top_p=0.5)), (4, dict(min_p=0.2)), (3, dict(temperature=0.0))])]
    results = [run_steps(e, params, [big] * 4)[0] for e in engines]
    assert all(r == results[0] for r in results[1:])
    rows = [SamplingParams(top_k=2, seed=s) for s in range(300)]
    drawn = {t for step in run_steps(engines[-1], rows, [big[:1].expand(300, -1).contiguous()])[0] for t in step}
    assert drawn == set(range(50, 60))
