"""The fused backend's decode and verify steps (``GPT._decode_step``): few launches, the
same logits, cache and tokens as the torch backend.

Runs where the fused backend runs Triton: CUDA, or the CPU under TRITON_INTERPRET=1 (the
interpreter; tests/conftest.py sets it). fp32 models, so the kernels' products are IEEE
fp32 and the two backends agree to rounding.
"""
import copy

import pytest
import torch

from gptfast import GPT, GPTConfig
from gptfast.generation.generate import generate
from gptfast.generation.sampling_params import SamplingParams
from gptfast.ops._dispatch import use_triton
from gptfast.quantization import quantize
from gptfast.testing import count_device_kernels

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not use_triton(torch.empty(0, device=DEVICE)),
                                reason="the fused decode step runs Triton only on CUDA or under TRITON_INTERPRET=1")

# Head size 16, odd vocabulary: the kernels' tile edges are crossed.
CONFIG = GPTConfig(vocab_size=67, block_size=48, n_layer=4, n_head=2, n_embd=32)
TOL = dict(rtol=1e-4, atol=1e-4)


def _pair(int8=False):
    """(fused, torch) models with the same weights (int8: both quantized the same way)."""
    torch.manual_seed(0)
    fused = GPT(CONFIG, backend="fused").to(DEVICE).eval()
    plain = copy.deepcopy(fused)
    plain.set_backend("torch")
    if int8:
        quantize(fused)
        quantize(plain)
    return fused, plain


def _prefill(models, idx, max_seq_len=32):
    for model in models:
        model.setup_cache(idx.shape[0], max_seq_len)
        model(idx, input_pos=torch.arange(idx.shape[1], device=DEVICE))


def _ids(*shape, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, CONFIG.vocab_size, shape, generator=gen).to(DEVICE)


@torch.no_grad()
def test_a_decode_step_launches_at_most_six_kernels_a_layer_plus_four():
    fused, _ = _pair()
    _prefill([fused], _ids(2, 7))
    tokens, positions = _ids(2, 1, seed=2), torch.tensor([[7], [5]], device=DEVICE)  # ragged rows
    _, count = count_device_kernels(fused, tokens, input_pos=positions)
    layers = CONFIG.n_layer
    assert count.total <= 6 * layers + 4, (count.triton, count.aten)
    # Every projection is one skinny launch (the QKV one writing the cache), the final
    # norm rides in the LM head's, and nothing writes the cache by indexing.
    assert count.triton.count("_skinny_linear_kernel") == 4 * layers + 1, count.triton
    assert not any("index_put" in name or "layer_norm" in name for name in count.aten), count.aten


@torch.no_grad()
@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_decode_steps_match_the_torch_backend(int8):
    fused, plain = _pair(int8)
    prompt = _ids(3, 6)
    _prefill([fused, plain], prompt)
    positions = torch.tensor([[6], [3], [5]], device=DEVICE)  # ragged: each row at its own position
    tokens = _ids(3, 1, seed=3)
    for step in range(4):
        got = fused(tokens, input_pos=positions)
        want = plain(tokens, input_pos=positions)
        assert got.shape == want.shape == (3, 1, CONFIG.vocab_size)
        torch.testing.assert_close(got, want, **TOL, msg=f"decode step {step}")
        tokens, positions = want[:, -1].argmax(-1, keepdim=True), positions + 1
    for layer, (a, b) in enumerate(zip(fused.transformer.h, plain.transformer.h)):
        torch.testing.assert_close(a.attn.kv_cache.k, b.attn.kv_cache.k, **TOL, msg=f"layer {layer} keys")
        torch.testing.assert_close(a.attn.kv_cache.v, b.attn.kv_cache.v, **TOL, msg=f"layer {layer} values")


@torch.no_grad()
@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_verify_step_matches_the_torch_backend(int8):
    fused, plain = _pair(int8)
    _prefill([fused, plain], _ids(2, 8))
    tokens = _ids(2, 5, seed=4)
    positions = torch.tensor([[8], [4]], device=DEVICE) + torch.arange(5, device=DEVICE)  # each row's own block
    got = fused(tokens, input_pos=positions)
    want = plain(tokens, input_pos=positions)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(fused.kv_cache.k, plain.kv_cache.k, **TOL)
    last = torch.tensor([4, 2], device=DEVICE)  # a draft step's logits at one position per row
    torch.testing.assert_close(fused(tokens, input_pos=positions, logits_index=last),
                               plain(tokens, input_pos=positions, logits_index=last), **TOL)


@torch.no_grad()
def test_decode_step_compiles_whole_and_equals_eager():
    torch._dynamo.reset()
    fused, _ = _pair()
    twin = copy.deepcopy(fused)
    prompt = _ids(2, 5)
    _prefill([fused, twin], prompt)
    step = torch.compile(lambda ids, pos: twin(ids, input_pos=pos), fullgraph=True, backend="aot_eager",
                         dynamic=False)
    tokens, positions = _ids(2, 1, seed=5), torch.tensor([[5], [2]], device=DEVICE)
    torch.testing.assert_close(step(tokens, positions), fused(tokens, input_pos=positions), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(twin.kv_cache.k, fused.kv_cache.k, rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_greedy_generation_gives_the_torch_backends_tokens(int8):
    fused, plain = _pair(int8)
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]]  # ragged
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    got = generate(fused, prompts, params, engine="python", cuda_graph=False)
    want = generate(plain, prompts, params, engine="python", cuda_graph=False)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert all(len(r.token_ids) == 6 for r in got)


def test_the_torch_backend_keeps_its_decode_path():
    _, plain = _pair()
    _prefill([plain], _ids(1, 4))
    _, count = count_device_kernels(plain, _ids(1, 1), input_pos=torch.tensor([[4]], device=DEVICE))
    assert count.triton == [] and "aten::index_copy_" in count.aten  # its own KV write (kv_cache.write_rows)
