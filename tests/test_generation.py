"""gptfast.generate: prefill + decode loop, C++ vs Python engine, ragged prompts, stops,
streaming, logprobs, errors, the graph cache's reuse logic and the CLI. CPU only."""
import math
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.nn as nn

from gptfast.generation import cuda_graphs as decode_graphs, generate as generation, sampling_params as sampling
from gptfast.runtime import extension
from gptfast.config import GPTConfig
from gptfast.generation.generate import InvalidLogitsError, generate
from gptfast.model import GPT
from gptfast.generation.sampling_params import SamplingParams
from gptfast.tokenizer import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def engines():
    names = ["python"]
    if extension.load_extension() is not None:
        names.append("cpp")
    return names


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=61, block_size=64, n_layer=2, n_head=2, n_embd=32)
    return GPT(config, backend="torch").eval()


class ScriptedModel(nn.Module):
    """Stands in for GPT in loop tests: the next token is always (token + 1) mod V, or
    whatever ``script(token, position)`` says; it records every decode position."""

    def __init__(self, vocab_size=256, block_size=128, script=None):
        super().__init__()
        self.config = types.SimpleNamespace(vocab_size=vocab_size, block_size=block_size)
        self.lm_head = nn.Linear(1, vocab_size, bias=False)
        self.script = script or (lambda token, position: (token + 1) % vocab_size)
        self.kv_cache = None
        self.decode_positions = []

    def setup_cache(self, max_batch, max_seq_len, device=None, dtype=None):
        k = torch.zeros(max_batch, 1, max_seq_len, 1, device=device, dtype=dtype)
        self.kv_cache = types.SimpleNamespace(max_batch=max_batch, max_seq_len=max_seq_len, k=k)

    def forward(self, idx, input_pos, logits_index=None):
        B, T = idx.shape
        pos = input_pos.expand(B, T) if input_pos.dim() == 1 else input_pos
        if input_pos.dim() == 2:
            self.decode_positions.append(input_pos[:, 0].tolist())
        logits = torch.zeros(B, T, self.config.vocab_size)
        for b in range(B):
            for t in range(T):
                target = self.script(int(idx[b, t]), int(pos[b, t]))
                if target is None:
                    logits[b, t] = math.nan
                else:
                    logits[b, t, target] = 10.0
        if logits_index is not None:  # GPT.forward's contract: one position per row
            return logits[torch.arange(B), logits_index].unsqueeze(1)
        return logits


def greedy(**kwargs):
    return SamplingParams(temperature=0.0, **kwargs)


# ---- correctness against plain loops ------------------------------------------------------


def test_greedy_equals_argmax_over_full_recompute(model, engines):
    prompts = [[5, 9, 2, 33, 7], [1], [40, 41, 42]]
    for engine in engines:
        results = generate(model, prompts, greedy(max_new_tokens=9), engine=engine)
        for prompt, result in zip(prompts, results):
            seq = torch.tensor([prompt])
            for _ in range(9):
                seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
            assert result.token_ids == seq[0, len(prompt):].tolist(), engine
            assert result.finish_reason == "length"


def test_ragged_batch_matches_one_prompt_at_a_time_and_engines_agree(model, engines):
    prompts = [[3, 4, 5, 6, 7, 8], [10], [20, 21, 22]]
    params = [
        SamplingParams(max_new_tokens=12, temperature=0.8, top_k=10, seed=1, logprobs=2),
        SamplingParams(max_new_tokens=7, temperature=1.0, top_p=0.9, repetition_penalty=1.3, seed=2),
        SamplingParams(max_new_tokens=12, temperature=0.0, frequency_penalty=0.5, logit_bias={0: 2.0}),
    ]
    outputs = {}
    for engine in engines:
        batched = generate(model, prompts, params, engine=engine, sync_every=4)
        for prompt, p, result in zip(prompts, params, batched):
            alone = generate(model, [prompt], p, engine=engine)[0]
            assert result.token_ids == alone.token_ids
            torch.testing.assert_close(torch.tensor(result.logprobs or []), torch.tensor(alone.logprobs or []))
        outputs[engine] = batched
    assert [len(r.token_ids) for r in outputs["python"]] == [12, 7, 12]
    if "cpp" in outputs:
        for a, b in zip(outputs["python"], outputs["cpp"]):
            assert a.token_ids == b.token_ids and a.logprobs == b.logprobs and a.top_logprobs == b.top_logprobs


def test_logprobs_are_the_model_distribution(model):
    prompt = [7, 8, 9]
    result = generate(model, [prompt], greedy(max_new_tokens=5, logprobs=3))[0]
    seq = torch.tensor([prompt + result.token_ids])
    logprobs = torch.log_softmax(model(seq)[0, len(prompt) - 1:-1].float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(result.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(result.logprobs), chosen, rtol=1e-5, atol=1e-5)
    for step, top in enumerate(result.top_logprobs):
        ids = [i for i, _ in top]
        assert ids == logprobs[step].topk(3).indices.tolist()
        assert ids[0] == result.token_ids[step]  # greedy picks the most likely token


def test_seed_reproducible_and_none_draws_a_seed(model, engines):
    p = SamplingParams(max_new_tokens=8, temperature=1.0, seed=123)
    for engine in engines:
        a = generate(model, [[1, 2]], p, engine=engine)[0]
        b = generate(model, [[1, 2], [3]], p, engine=engine)[0]
        assert a.token_ids == b.token_ids and a.seed == 123
    torch.manual_seed(5)
    first = generate(model, [[1, 2]], SamplingParams(max_new_tokens=8))[0]
    torch.manual_seed(5)
    again = generate(model, [[1, 2]], SamplingParams(max_new_tokens=8))[0]
    assert first.seed == again.seed and first.token_ids == again.token_ids


def test_tensor_prompts_give_the_tokens_of_list_prompts(model):
    # (B, T) and (T,) id tensors (the contract of the former generate_ids) in, one result per row.
    prompt = torch.tensor([[4, 5, 6], [7, 8, 9]])
    out = generate(model, prompt, greedy(max_new_tokens=6, ignore_eos=True))
    expected = [r.token_ids for r in generate(model, prompt.tolist(), greedy(max_new_tokens=6))]
    assert [r.token_ids for r in out] == expected and all(len(t) == 6 for t in expected)
    assert [r.prompt_token_ids for r in out] == prompt.tolist()
    assert generate(model, prompt[1], greedy(max_new_tokens=6))[0].token_ids == expected[1]


# ---- the loop: positions, stops, streaming, errors -------------------------------------


def test_each_row_decodes_at_its_own_positions(engines):
    for engine in engines:
        m = ScriptedModel()
        generate(m, [[1, 2, 3, 4], [9]], greedy(max_new_tokens=4), engine=engine)
        # After prefill, rows continue from their own lengths: 4, 5, 6 and 1, 2, 3.
        assert m.decode_positions == [[4, 1], [5, 2], [6, 3]]


@pytest.mark.parametrize("sync_every", [1, 3, 16])
def test_stop_tokens_and_strings_end_rows_while_others_continue(engines, sync_every):
    tok = load_tokenizer()  # bytes: the scripted model walks the alphabet
    params = [
        greedy(max_new_tokens=20, stop=["de"]),
        greedy(max_new_tokens=10),
        greedy(max_new_tokens=20, stop_token_ids=[ord("f")]),
        greedy(max_new_tokens=20, stop=["zz", "hij"]),
    ]
    for engine in engines:
        chunks = {}
        results = generate(ScriptedModel(), ["a", "k", "a", "e"], params, tokenizer=tok, engine=engine,
                           sync_every=sync_every, stream=lambda row, ids, text: chunks.setdefault(row, []).append((ids, text)))
        r0, r1, r2, r3 = results
        assert (r0.text, r0.token_ids, r0.finish_reason, r0.stop_reason) == ("bc", list(b"bcde"), "stop", "de")
        assert (r1.text, r1.finish_reason, r1.stop_reason) == ("lmnopqrstu", "length", None)
        assert (r2.text, r2.token_ids, r2.finish_reason, r2.stop_reason) == ("bcde", list(b"bcdef"), "stop", ord("f"))
        assert (r3.text, r3.token_ids, r3.stop_reason) == ("fg", list(b"fghij"), "hij")
        for row, result in enumerate(results):  # the stream adds up to the results
            assert "".join(text for _, text in chunks[row]) == result.text
            assert [t for ids, _ in chunks[row] for t in ids] == result.token_ids


def test_eos_of_the_tokenizer_stops_unless_ignored(engines):
    tok = load_tokenizer()
    tok.eos_token_id = ord("e")
    for engine in engines:
        stopped, ignored = generate(ScriptedModel(), ["a", "a"], [greedy(max_new_tokens=8), greedy(max_new_tokens=8, ignore_eos=True)],
                                    tokenizer=tok, engine=engine)
        assert stopped.token_ids == list(b"bcde") and stopped.text == "bcd" and stopped.stop_reason == ord("e")
        assert ignored.text == "bcdefghi" and ignored.finish_reason == "length"


def test_streaming_holds_back_partial_utf8(engines):
    tok = load_tokenizer()
    euro = list("€".encode())  # three bytes
    script = {1: euro[0], euro[0]: euro[1], euro[1]: euro[2], euro[2]: ord("!")}
    for engine in engines:
        texts = []
        m = ScriptedModel(script=lambda token, position: script.get(token, ord("!")))
        result = generate(m, [[1]], greedy(max_new_tokens=5), tokenizer=tok, engine=engine, sync_every=1,
                          stream=lambda row, ids, text: texts.append(text))
        assert result[0].text == "€!!"
        assert "\ufffd" not in "".join(texts) and "".join(texts) == "€!!"


def test_nan_logits_raise_a_clear_error(engines):
    for engine in engines:
        m = ScriptedModel(script=lambda token, position: None if position == 6 else token + 1)
        with pytest.raises(InvalidLogitsError, match="row 1: logits are NaN or all -inf at generated token 3"):
            generate(m, [[1], [1, 2, 3, 4]], greedy(max_new_tokens=8), engine=engine, sync_every=16)
        banned = SamplingParams(logit_bias={t: -math.inf for t in range(256)})
        with pytest.raises(InvalidLogitsError, match="all -inf"):
            generate(ScriptedModel(), [[1]], banned, engine=engine)


def test_bad_inputs_are_rejected(model):
    cases = [
        (lambda: generate(model, [[]]), ValueError, "empty"),
        (lambda: generate(model, [[1, 61]]), ValueError, "outside the vocabulary"),
        (lambda: generate(model, ["hi"]), ValueError, "tokenizer"),
        (lambda: generate(model, [[1]], SamplingParams(stop=["x"])), ValueError, "stop strings need a tokenizer"),
        (lambda: generate(model, [[1], [2]], [SamplingParams()] * 3), ValueError, "3 SamplingParams for 2 prompts"),
        (lambda: generate(model, [[1] * 60], SamplingParams(max_new_tokens=5)), ValueError, "context overflow"),
        (lambda: generate(model, [[1]], engine="fast"), ValueError, "engine"),
        (lambda: generate(model, [[1]], sync_every=0), ValueError, "sync_every"),
        (lambda: generate(model, [[1]], SamplingParams(max_new_tokens=4), cuda_graph=True), ValueError, "CUDA"),
        (lambda: generate(model, [[1.5]]), TypeError, "non-integer"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


def test_graph_cache_reuses_static_state(model, engines, monkeypatch):
    """The CUDA-graph path's bookkeeping, on the CPU: a stand-in "graph" replays the
    eager step on the state it was captured with; a second call must reuse it by copying
    its own values in, and still produce the eager tokens."""
    captured = []

    class ReplayEagerly:
        def __init__(self, model, engine, p, s):
            self.args = (model, engine, p, s)
            captured.append(self)

        def replay(self):
            m, engine, p, s = self.args
            engine.sample_step(m(s.tokens, input_pos=s.positions), p, s)

    monkeypatch.setattr(generation, "GRAPHS", decode_graphs.DecodeGraphs(ReplayEagerly, device_types=("cpu",)))
    prompts = [[1, 2, 3], [4]]
    for engine in engines:
        for seed in (1, 2):
            params = SamplingParams(max_new_tokens=6, temperature=0.9, top_k=8, seed=seed)
            eager = generate(model, prompts, params, engine=engine, cuda_graph=False)
            graphed = generate(model, prompts, params, engine=engine, cuda_graph=True)
            assert [r.token_ids for r in graphed] == [r.token_ids for r in eager]
    assert len(captured) == len(engines)  # one capture per engine, reused for the second seed


# ---- the CLI ----------------------------------------------------------------------------


def test_cli_generate_streams_and_reports_speed(capsys):
    from gptfast.cli import main

    rc = main(["generate", "--prompt", "hello", "--max-new-tokens", "12", "--temperature", "0.9", "--top-k", "40",
               "--top-p", "0.95", "--min-p", "0.01", "--repetition-penalty", "1.1", "--seed", "3", "--stop", "zzz"])
    out = capsys.readouterr().out
    assert rc == 0 and "random" in out and "tokens/s" in out and "hello" in out


def test_cli_falls_back_to_the_twin_without_the_extension():
    env = dict(os.environ, GPTFAST_NO_EXT="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "gptfast", "generate", "--prompt", "hi", "--max-new-tokens", "4",
                           "--temperature", "0"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Python twin" in proc.stderr and "tokens/s" in proc.stdout


# ---- the CUDA-graph key, CPU weight packing ---------------------------------------------


def test_graph_key_names_every_buffer_and_parameter_the_graph_reads(model):
    from gptfast.generation.engines import PythonEngine

    model.setup_cache(2, 16)
    params = [greedy(max_new_tokens=4)] * 2
    p = sampling.build_sampling_tensors(params, 61, [0, 0], "cpu")
    s = sampling.new_decode_state([[1], [2]], params, p, 61, "cpu")
    key = decode_graphs.graph_key(model, PythonEngine.name, p, s)
    assert key == decode_graphs.graph_key(model, PythonEngine.name, p, s)
    caches = [block.attn.kv_cache for block in model.transformer.h]
    assert len(caches) == 2
    for attr in ("k", "v"):  # a new buffer in the last layer alone must change the key
        old = getattr(caches[-1], attr)
        setattr(caches[-1], attr, old.clone())
        assert decode_graphs.graph_key(model, PythonEngine.name, p, s) != key, attr
        setattr(caches[-1], attr, old)
    assert decode_graphs.graph_key(model, PythonEngine.name, p, s) == key
    weight = model.transformer.h[1].mlp.c_fc.weight
    model.transformer.h[1].mlp.c_fc.weight = nn.Parameter(weight.detach().clone())
    try:
        assert decode_graphs.graph_key(model, PythonEngine.name, p, s) != key
    finally:
        model.transformer.h[1].mlp.c_fc.weight = weight
    wider = sampling.build_sampling_tensors([SamplingParams(max_new_tokens=4, top_k=3)] * 2, 61, [0, 0], "cpu")
    assert decode_graphs.graph_key(model, PythonEngine.name, wider, s) != key
    assert decode_graphs.graph_key(model, "cpp", p, s) != key


@pytest.mark.parametrize("packed", [None, True, False])
def test_packed_cpu_weights_is_passed_to_cpu_linear(model, monkeypatch, packed):
    from gptfast.generation import cpu_linear

    calls = []
    real = cpu_linear.packed_linears

    def recording(m, enabled=True):
        calls.append(enabled)
        return real(m, enabled=enabled)

    monkeypatch.setattr(cpu_linear, "packed_linears", recording)
    monkeypatch.setenv("GPTFAST_CPU_PACKED_LINEAR", "0")
    out = generate(model, [[1, 2]], greedy(max_new_tokens=3), packed_cpu_weights=packed)
    assert calls == [packed]
    if packed is None:  # None: cpu_linear resolves it, and the environment turned packing off
        assert not cpu_linear.applies_to(model, None)
    assert out[0].token_ids == generate(model, [[1, 2]], greedy(max_new_tokens=3))[0].token_ids
