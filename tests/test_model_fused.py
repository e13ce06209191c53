"""The model on the fused backend against the reference backend, on the device where the
fused backend runs Triton: CUDA when there is a GPU (compiled kernels), else the CPU under
TRITON_INTERPRET=1 (the interpreter). Models and inputs are built on that device, so a GPU
machine tests its kernels, not the torch path."""
import pytest
import torch

from gptfast import GPT, GPTConfig
from gptfast.ops._dispatch import use_triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not use_triton(torch.empty(0, device=DEVICE)),
                                reason="the fused backend runs Triton only on CUDA or under TRITON_INTERPRET=1")

# Head size 16 and odd lengths: every block edge of the kernels is crossed.
CONFIG = GPTConfig(vocab_size=67, block_size=40, n_layer=2, n_head=2, n_embd=32)


def _pair():
    torch.manual_seed(0)
    fused = GPT(CONFIG, backend="fused").to(DEVICE).eval()
    reference = GPT(CONFIG, backend="reference").to(DEVICE).eval()
    reference.load_state_dict(fused.state_dict())
    return fused, reference


def _randint(high, shape):
    return torch.randint(0, high, shape).to(DEVICE)


def test_the_fused_backend_runs_triton_here():
    fused, _ = _pair()
    assert fused.backend == "fused" and fused.lm_head.weight.device.type == DEVICE.type
    assert use_triton(fused.lm_head.weight)


@torch.no_grad()
def test_fused_prefill_and_every_decode_step_match_reference():
    fused, reference = _pair()
    idx = _randint(67, (2, 15))
    for model in (fused, reference):
        model.setup_cache(max_batch=2, max_seq_len=24)
    prefill = 9
    got = fused(idx[:, :prefill], input_pos=torch.arange(prefill, device=DEVICE))
    want = reference(idx[:, :prefill], input_pos=torch.arange(prefill, device=DEVICE))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for t in range(prefill, 15):
        pos = torch.tensor([[t], [t]], device=DEVICE)
        got = fused(idx[:, t : t + 1], input_pos=pos)
        want = reference(idx[:, t : t + 1], input_pos=pos)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"decode step at position {t}")


def test_fused_training_step_matches_reference():
    fused, reference = _pair()
    idx = _randint(67, (2, 13))
    targets = _randint(67, (2, 13))
    _, loss_fused = fused(idx, targets)
    _, loss_ref = reference(idx, targets)
    loss_fused.backward()
    loss_ref.backward()
    torch.testing.assert_close(loss_fused, loss_ref, rtol=1e-5, atol=1e-5)
    ref_grads = dict(reference.named_parameters())
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-4, atol=1e-5, msg=name)


@torch.no_grad()
def test_compile_fullgraph_has_no_graph_break():
    fused, reference = _pair()
    idx = _randint(67, (1, 11))
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(idx), reference(idx), rtol=1e-4, atol=1e-4)


def test_residual_stream_keeps_its_dtype_under_mixed_inputs():
    # Under autocast the attention output is bf16 while the residual stream stays fp32:
    # the fused layernorm must see one dtype, the stream's, as `x + residual` would give.
    fused, reference = _pair()
    delta = torch.randn(2, 5, 32).to(device=DEVICE, dtype=torch.bfloat16)
    stream = torch.randn(2, 5, 32, device=DEVICE)
    y, h = fused.transformer.h[0].ln_2(delta, residual=stream)
    y_ref, h_ref = reference.transformer.h[0].ln_2(delta, residual=stream)
    assert h.dtype == torch.float32 and y.dtype == torch.float32
    torch.testing.assert_close(h, delta.float() + stream)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
