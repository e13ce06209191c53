"""The reference twins against torch's own implementations (they judge the kernels, so they are judged first)."""
import math

import pytest
import torch
import torch.nn.functional as F

from gptfast import reference


@pytest.mark.parametrize("tq,q_offset", [(1, 0), (17, 0), (64, 0), (5, 12), (1, 30)])
def test_causal_attention_matches_sdpa(tq, q_offset):
    torch.manual_seed(0)
    B, H, D = 2, 3, 16
    q = torch.randn(B, H, tq, D)
    k = torch.randn(B, H, q_offset + tq, D)
    v = torch.randn(B, H, q_offset + tq, D)
    out = reference.causal_attention(q, k, v, q_offset=q_offset)
    # SDPA on the full sequence, keeping the last tq queries, is attention with a cache offset.
    q_full = torch.cat([torch.randn(B, H, q_offset, D), q], dim=2)
    expected = F.scaled_dot_product_attention(q_full, k, v, is_causal=True)[:, :, q_offset:]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_causal_attention_rejects_wrong_offset():
    q = torch.randn(1, 1, 4, 8)
    k = torch.randn(1, 1, 6, 8)
    with pytest.raises(ValueError, match="q_offset"):
        reference.causal_attention(q, k, k, q_offset=1)


def test_decode_attention_matches_causal_last_row():
    torch.manual_seed(1)
    B, H, S, D = 3, 2, 20, 8
    k_cache, v_cache = torch.randn(B, H, S, D), torch.randn(B, H, S, D)
    lens = torch.tensor([1, 7, 20])
    q = torch.randn(B, H, D)
    out = reference.decode_attention(q, k_cache, v_cache, lens)
    for b in range(B):
        n = int(lens[b])
        expected = reference.causal_attention(q[b : b + 1, :, None], k_cache[b : b + 1, :, :n], v_cache[b : b + 1, :, :n], q_offset=n - 1)
        torch.testing.assert_close(out[b], expected[0, :, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 8), (3, 7, 100), (4, 768)])
def test_layer_norm_matches_torch(shape):
    torch.manual_seed(2)
    x = torch.randn(shape)
    w, b = torch.randn(shape[-1]), torch.randn(shape[-1])
    torch.testing.assert_close(reference.layer_norm(x, w, b), F.layer_norm(x, shape[-1:], w, b), rtol=1e-5, atol=1e-5)
    r = torch.randn(shape)
    y, h = reference.layer_norm(x, w, b, residual=r)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y, F.layer_norm(x + r, shape[-1:], w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reference.layer_norm(x, None, None), F.layer_norm(x, shape[-1:]), rtol=1e-5, atol=1e-5)


def test_gelu_is_tanh_form():
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    torch.testing.assert_close(reference.gelu(x), F.gelu(x, approximate="tanh"))
    assert abs(reference.gelu(torch.tensor(1.0)).item() - 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * 1.044715))) < 1e-6
