"""The model: backends agree, the KV cache equals full recompute, bad input is refused."""
import pytest
import torch

from gptfast import GPT, GPTConfig, SamplingParams, generate
from gptfast.backends import resolve_backend

TINY = dict(vocab_size=97, block_size=48, n_layer=2, n_head=2, n_embd=32)


def make_model(**overrides):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**TINY, **overrides})).eval()


def test_presets_and_unknown_preset():
    assert GPTConfig.from_preset("gpt2").n_embd == 768
    assert GPTConfig.from_preset("gpt2-xl").n_layer == 48
    assert GPTConfig.from_preset("gpt2", n_layer=2).n_layer == 2
    with pytest.raises(ValueError, match="unknown preset 'gpt3'"):
        GPTConfig.from_preset("gpt3")
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)


def test_gpt2_parameter_count():
    model = GPT(GPTConfig.from_preset("gpt2"))
    assert model.num_params(non_embedding=False) == 124_439_808  # GPT-2 small, tied head


def test_backend_switch_and_env(monkeypatch):
    model = make_model()
    assert model.backend == resolve_backend()
    monkeypatch.setenv("GPTFAST_BACKEND", "reference")
    assert GPT(GPTConfig(**TINY)).backend == "reference"
    with pytest.raises(ValueError, match="unknown backend"):
        model.set_backend("cuda-magic")


@pytest.mark.parametrize("pos_embedding", ["learned", "sinusoidal"])
def test_backends_agree(pos_embedding):
    model = make_model(pos_embedding=pos_embedding)
    idx = torch.randint(0, 97, (2, 19))
    outs = {name: model.set_backend(name)(idx) for name in ("reference", "torch")}
    torch.testing.assert_close(outs["reference"], outs["torch"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_kv_cache_decode_equals_full_recompute(backend):
    model = make_model().set_backend(backend)
    idx = torch.randint(0, 97, (3, 30))
    full = model(idx)
    model.setup_cache(max_batch=4, max_seq_len=40)
    prefix = 11
    logits = model(idx[:, :prefix], input_pos=torch.arange(prefix))
    torch.testing.assert_close(logits, full[:, :prefix], rtol=1e-5, atol=1e-5)
    for t in range(prefix, 30):  # every later position, one decode step each
        step = model(idx[:, t : t + 1], input_pos=torch.full((3, 1), t))
        torch.testing.assert_close(step[:, 0], full[:, t], rtol=1e-5, atol=1e-5)


def test_chunked_prefill_and_per_row_decode_positions():
    model = make_model()
    a, b = torch.randint(0, 97, (1, 20)), torch.randint(0, 97, (1, 20))
    model.setup_cache(2, 40)
    # Chunked prefill: positions 0..7 then 8..13, both rows.
    idx = torch.cat([a, b])
    model(idx[:, :8], input_pos=torch.arange(8))
    chunk = model(idx[:, 8:14], input_pos=torch.arange(8, 14))
    torch.testing.assert_close(chunk, model.set_backend("torch").forward(idx[:, :14])[:, 8:], rtol=1e-5, atol=1e-5)
    # Rows at different positions in one decode step: row 0 at 14, row 1 overwrites position 9.
    step = model(torch.stack([a[0, 14:15], b[0, 9:10]]), input_pos=torch.tensor([[14], [9]]))
    torch.testing.assert_close(step[0, 0], model(a[:, :15])[0, 14], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step[1, 0], model(b[:, :10])[0, 9], rtol=1e-5, atol=1e-5)


def test_loss_and_ignore_index():
    model = make_model()
    idx = torch.randint(0, 97, (2, 10))
    targets = torch.randint(0, 97, (2, 10))
    logits, loss = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits.view(-1, 97), targets.view(-1))
    torch.testing.assert_close(loss, expected)
    masked = targets.clone()
    masked[:, :5] = -100
    _, loss_masked = model(idx, masked)
    expected = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, 97), targets[:, 5:].reshape(-1))
    torch.testing.assert_close(loss_masked, expected)


def test_tied_head_and_init_scale():
    model = make_model()
    assert model.lm_head.weight is model.transformer.wte.weight
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert 0.5 * 0.02 / 2 < std < 1.5 * 0.02 / 2  # 0.02 / sqrt(2 * n_layer) with n_layer = 2


def test_generate_greedy_matches_argmax_recompute():
    model = make_model()
    prompt = torch.randint(0, 97, (2, 5))
    results = generate(model, prompt.tolist(), SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True))
    out = torch.cat([prompt, torch.tensor([r.token_ids for r in results])], dim=1)
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_generate_seeded_sampling_is_reproducible():
    model = make_model()
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=5, seed=7, ignore_eos=True)
    a = generate(model, [[1, 2, 3]], params)[0].token_ids
    b = generate(model, [[1, 2, 3]], params)[0].token_ids
    assert a == b and len(a) == 10


def test_bad_inputs():
    model = make_model()
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 49, dtype=torch.long))  # longer than block_size 48
    with pytest.raises(ValueError, match="context overflow"):
        generate(model, [[1] * 40], SamplingParams(max_new_tokens=20))
    with pytest.raises(RuntimeError, match="setup_cache"):
        model(torch.zeros(1, 3, dtype=torch.long), input_pos=torch.arange(3))
    model.setup_cache(max_batch=2, max_seq_len=16)
    with pytest.raises(ValueError, match="larger than the KV cache"):
        model(torch.zeros(3, 2, dtype=torch.long), input_pos=torch.arange(2))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(1, 3, dtype=torch.long), input_pos=torch.arange(4))
    with pytest.raises(ValueError, match="consecutive"):
        model(torch.zeros(1, 3, dtype=torch.long), input_pos=torch.tensor([0, 2, 3]))
    with pytest.raises(ValueError, match="context overflow"):
        model(torch.zeros(1, 4, dtype=torch.long), input_pos=torch.arange(14, 18))
    with pytest.raises(ValueError, match="context overflow"):
        model(torch.zeros(2, 1, dtype=torch.long), input_pos=torch.tensor([[3], [16]]))
    with pytest.raises(ValueError, match="decode expects"):
        model(torch.zeros(2, 1, dtype=torch.long), input_pos=torch.tensor([[3, 4], [1, 2]]))
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 3), input_pos=None)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        model.setup_cache(1, 100)
