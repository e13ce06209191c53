"""The flat CPU decode step (gptfast.generation.cpu_decode): the same logits as the model's
own decode step, bit for bit, wherever it applies; None wherever it does not; and
``generate`` decodes through it with the same tokens."""
import copy

import pytest
import torch

from gptfast.config import GPTConfig
from gptfast.generation import cpu_decode, cpu_linear
from gptfast.generation.generate import generate
from gptfast.generation.sampling_params import SamplingParams
from gptfast.model import GPT
from gptfast.ops import _dispatch
from gptfast.ops.causal_attention import CPU_KERNEL_MAX_QUERIES
from gptfast.ops.int8_linear import CPU_KERNEL_MAX_ROWS
from gptfast.quantization import quantize
from gptfast.runtime.extension import cpu_op

pytestmark = pytest.mark.skipif(not cpu_linear.available() or cpu_op("write_kv") is None,
                                reason="the gptfast C++ extension is not loaded")

VOCAB = 97


@pytest.fixture
def cpp_attention(monkeypatch):
    """The model's own step as the flat step runs it: under TRITON_INTERPRET=1 (the suite's
    setting) ``gptfast.ops.decode_attention`` would run the interpreted Triton kernel on the
    CPU; the flat step always calls the C++ one."""
    monkeypatch.setattr(_dispatch, "interpreting", lambda: False)


def model_of(int8=False, seed=0, **overrides):
    torch.manual_seed(seed)
    settings = dict(n_layer=2, n_head=2, n_embd=48, block_size=64, vocab_size=VOCAB, dropout=0.0)
    settings.update(overrides)
    model = GPT(GPTConfig(**settings), backend="torch").eval()
    return quantize(model, "int8") if int8 else model


def ids(*shape, seed=1):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def prefilled(model, batch, prompt_len=5, max_seq_len=32):
    model.setup_cache(batch, max_seq_len)
    model(ids(batch, prompt_len), input_pos=torch.arange(prompt_len))


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("overrides", [{}, {"bias": False}, {"pos_embedding": "sinusoidal"}, {"n_head": 3}],
                         ids=["gpt2", "no-bias", "sinusoidal", "head-16"])
def test_flat_steps_equal_the_models_decode_steps_bit_for_bit(cpp_attention, int8, batch, overrides):
    """Several steps at ragged positions (each row at its own length): logits and every
    layer's cache equal the model's ``_decode_step`` through the same packed layers."""
    model = model_of(int8, **overrides)
    twin = copy.deepcopy(model)
    with torch.no_grad(), cpu_linear.packed_linears(model), cpu_linear.packed_linears(twin):
        prefilled(model, batch)
        prefilled(twin, batch)
        step = cpu_decode.decode_step(model, batch)
        assert step is not None
        positions = torch.tensor([[5], [2], [4]])[:batch]
        tokens = ids(batch, 1, seed=2)
        for _ in range(4):
            got, want = step(tokens, positions), twin(tokens, input_pos=positions)
            assert got.shape == want.shape == (batch, 1, VOCAB)
            assert torch.equal(got, want)
            tokens, positions = want[:, -1].argmax(-1, keepdim=True), positions + 1
        for mine, theirs in zip(model.transformer.h, twin.transformer.h):
            assert torch.equal(mine.attn.kv_cache.k, theirs.attn.kv_cache.k)
            assert torch.equal(mine.attn.kv_cache.v, theirs.attn.kv_cache.v)


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
@pytest.mark.parametrize("overrides", [{}, {"pos_embedding": "sinusoidal"}], ids=["gpt2", "sinusoidal"])
def test_verify_and_draft_steps_equal_the_models_bit_for_bit(cpp_attention, int8, overrides):
    """Several tokens per row at each row's own consecutive positions (a speculative verify
    step: all logits; a draft step: each row's last position's, as ``logits_index`` picks)."""
    model = model_of(int8, **overrides)
    twin = copy.deepcopy(model)
    with torch.no_grad(), cpu_linear.packed_linears(model), cpu_linear.packed_linears(twin):
        prefilled(model, 3)
        prefilled(twin, 3)
        step = cpu_decode.decode_step(model, 3, steps=4)
        positions = torch.tensor([[5], [2], [4]]) + torch.arange(4)
        tokens = ids(3, 4, seed=3)
        got, want = step(tokens, positions), twin(tokens, input_pos=positions)
        assert got.shape == want.shape == (3, 4, VOCAB) and torch.equal(got, want)
        tokens, positions = tokens[:, :2], positions[:, :2] + 4
        got = step(tokens, positions, last=True)
        want = twin(tokens, input_pos=positions, logits_index=torch.ones(3, dtype=torch.long))
        assert got.shape == want.shape == (3, 1, VOCAB) and torch.equal(got, want)
        for mine, theirs in zip(model.transformer.h, twin.transformer.h):
            assert torch.equal(mine.attn.kv_cache.k, theirs.attn.kv_cache.k)
            assert torch.equal(mine.attn.kv_cache.v, theirs.attn.kv_cache.v)


def test_the_flat_step_leaves_rows_past_its_batch_alone():
    """A step for 2 rows of a 3-row cache writes only rows 0 and 1."""
    model = model_of()
    with torch.no_grad(), cpu_linear.packed_linears(model):
        prefilled(model, 3)
        before = [b.attn.kv_cache.k[2].clone() for b in model.transformer.h]
        cpu_decode.decode_step(model, 2)(ids(2, 1), torch.tensor([[5], [5]]))
        assert all(torch.equal(b.attn.kv_cache.k[2], k) for b, k in zip(model.transformer.h, before))


def test_where_the_flat_step_does_not_apply_it_is_none():
    assert cpu_decode.decode_step(torch.nn.Linear(2, 2), 1) is None  # not a GPT
    model = model_of()
    prefilled(model, 2)
    with torch.no_grad():
        assert cpu_decode.decode_step(model, 2) is None  # nothing packed
    with cpu_linear.packed_linears(model):
        assert cpu_decode.decode_step(model, 2) is None  # gradients recorded
        with torch.no_grad():
            assert cpu_decode.decode_step(model, 2) is not None
            assert cpu_decode.decode_step(model, 3) is None  # rows no prefill wrote
    with torch.no_grad(), cpu_linear.packed_linears(model, enabled=False):
        assert cpu_decode.decode_step(model, 2) is None  # packing off
    dropout = model_of(dropout=0.1).train()
    with torch.no_grad(), cpu_linear.packed_linears(dropout):
        prefilled(dropout, 1)
        assert cpu_decode.decode_step(dropout, 1) is None  # training with dropout: the model's own step
    wide = model_of()
    with torch.no_grad(), cpu_linear.packed_linears(wide):
        rows = CPU_KERNEL_MAX_ROWS + 1
        prefilled(wide, rows, prompt_len=2, max_seq_len=4)
        assert cpu_decode.decode_step(wide, rows) is None  # more rows than the packed kernels take
        assert cpu_decode.decode_step(wide, rows - 1) is not None
        assert cpu_decode.decode_step(wide, 16, steps=4) is not None
        assert cpu_decode.decode_step(wide, 16, steps=5) is None  # 80 rows of tokens
        assert cpu_decode.decode_step(wide, 1, steps=CPU_KERNEL_MAX_QUERIES) is not None
        assert cpu_decode.decode_step(wide, 1, steps=CPU_KERNEL_MAX_QUERIES + 1) is None  # a prefill's share
    double = model_of().double()
    with torch.no_grad(), cpu_linear.packed_linears(double):
        prefilled(double, 1)
        assert cpu_decode.decode_step(double, 1) is None  # float64: nothing packed


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=10, temperature=0.0),
                                    SamplingParams(max_new_tokens=10, temperature=0.9, top_k=20, seed=5)],
                         ids=["greedy", "sampled"])
def test_generate_decodes_through_the_flat_step_with_the_same_tokens(cpp_attention, monkeypatch, int8, params):
    model = model_of(int8)
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9]]
    calls = []
    made = cpu_decode.decode_step

    def counting(model, batch):
        step = made(model, batch)
        return None if step is None else (lambda *args: calls.append(1) or step(*args))

    monkeypatch.setattr(cpu_decode, "decode_step", counting)
    flat = [r.token_ids for r in generate(model, prompts, params)]
    assert len(calls) == params.max_new_tokens - 1  # every decode step after the prefill's token
    monkeypatch.setattr(cpu_decode, "decode_step", lambda model, batch: None)
    through_the_model = [r.token_ids for r in generate(model, prompts, params)]
    assert flat == through_the_model and all(len(t) == params.max_new_tokens for t in flat)


@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=12, temperature=0.0),
                                    SamplingParams(max_new_tokens=12, temperature=0.9, top_k=20, seed=5)],
                         ids=["greedy", "sampled"])
def test_speculative_decoding_takes_flat_steps_with_the_same_tokens(cpp_attention, monkeypatch, params):
    """Draft and verify steps flat where they apply: the tokens of the model-called steps."""
    model, draft = model_of(seed=0), model_of(seed=1, n_layer=1)
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9]]
    steps = []
    made = cpu_decode.decode_step

    def counting(model, batch, steps_per_row=1):
        step = made(model, batch, steps_per_row)
        return None if step is None else (lambda *args, **kw: steps.append(model is draft) or step(*args, **kw))

    monkeypatch.setattr(cpu_decode, "decode_step", lambda model, batch, steps=1: counting(model, batch, steps))
    flat = [r.token_ids for r in generate(model, prompts, params, draft_model=draft, num_draft_tokens=3)]
    assert set(steps) == {True, False}  # the draft's steps and the target's verify steps ran flat
    monkeypatch.setattr(cpu_decode, "decode_step", lambda model, batch, steps=1: None)
    through_the_models = [r.token_ids for r in generate(model, prompts, params, draft_model=draft, num_draft_tokens=3)]
    assert flat == through_the_models and all(len(t) == 12 for t in flat)
