"""Prepacked CPU linear layers (gptfast.generation.cpu_linear) and their C++ kernels
(csrc/cpu_linear.cpp): fp32 against F.linear and float64 by the error-ratio rule on every
instruction set; int8 (the same bits as the op's C++ path, through generate and a
save/load round trip); and the prefill's ``logits_index``."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from gptfast.generation import cpu_linear
from gptfast.config import GPTConfig
from gptfast.generation.generate import generate
from gptfast.model import GPT
from gptfast.generation.sampling_params import SamplingParams
from gptfast.quantization import Int8Linear, load_quantized, quantize, save_quantized
from gptfast.testing import assert_error_ratio

needs_packing = pytest.mark.skipif(not cpu_linear.available(), reason="the gptfast C++ extension is not loaded")
needs_int8_packing = pytest.mark.skipif(cpu_linear.int8_ops() is None, reason="the gptfast C++ extension is not loaded")


def tiny_model(vocab_size=97, seed=0):
    torch.manual_seed(seed)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=vocab_size, dropout=0.0)
    return GPT(config, backend="torch").eval()


class Wrapper(torch.nn.Module):  # packed_linears looks for lm_head.weight
    def __init__(self, linear):
        super().__init__()
        self.lm_head = linear


def packed_modules(model):
    return [m for m in model.modules() if isinstance(m, cpu_linear.PackedLinear)]


def plain_linears(model):
    return [m for m in model.modules() if type(m) is torch.nn.Linear]


# ---- the fp32 kernel ----------------------------------------------------------------------


def fp32_ops():
    return torch.ops.gptfast_cpu.fp32_pack, torch.ops.gptfast_cpu.fp32_linear_packed


@needs_packing
def test_fp32_pack_layout():
    """Blocks of 64 channels, K-major: packed[b, k, c] = w[64 b + c, k]; channels past N are 0."""
    pack, _ = fp32_ops()
    w = torch.randn(130, 7, generator=torch.Generator().manual_seed(0))
    packed = pack(w)
    assert packed.shape == (3, 7, 64) and packed.dtype == torch.float32
    padded = torch.cat([w, torch.zeros(62, 7)])
    assert torch.equal(packed, padded.view(3, 64, 7).transpose(1, 2))
    assert torch.equal(pack(w.t().contiguous().t()), packed)  # a non-contiguous weight packs the same


# Odd K and N (block tails), one K past a few hundred, and every row count 1..70: one
# register tile, two, and many (the kernel serves up to CPU_KERNEL_MAX_ROWS = 64 rows in
# generation; more rows only add tiles).
@needs_packing
@pytest.mark.parametrize("k,n", [(77, 33), (300, 130), (129, 65), (1, 64)])
def test_fp32_kernel_every_isa_every_row_count(k, n):
    pack, matmul = fp32_ops()
    best = torch.ops.gptfast_cpu.int8_linear_best_isa()
    gen = torch.Generator().manual_seed(k)
    x_all, w, b = torch.randn(70, k, generator=gen), torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)
    packed = pack(w)
    for m in range(1, 71):
        x = x_all[:m]
        for bias in (b, None):
            plain = F.linear(x, w, bias)
            exact = F.linear(x.double(), w.double(), None if bias is None else bias.double())
            for isa in range(best + 1):
                out = matmul(x, packed, n, bias, isa)
                assert out.shape == (m, n) and torch.isfinite(out).all()
                assert_error_ratio(out, plain, exact, what=f"fp32 isa {isa} {m}x{k}x{n} bias={bias is not None}")


@needs_packing
def test_fp32_kernel_empty_shapes():
    pack, matmul = fp32_ops()
    w, b = torch.randn(5, 3), torch.randn(5)
    assert matmul(torch.randn(0, 3), pack(w), 5, b).shape == (0, 5)
    empty_k = pack(torch.randn(5, 0))
    torch.testing.assert_close(matmul(torch.randn(2, 0), empty_k, 5, b), b.expand(2, 5))
    assert torch.equal(matmul(torch.randn(2, 0), empty_k, 5, None), torch.zeros(2, 5))


@needs_packing
def test_a_layer_without_inputs_is_left_alone():
    layer = torch.nn.Linear(0, 4)
    wrapper = Wrapper(layer)
    with torch.no_grad(), cpu_linear.packed_linears(wrapper):
        assert wrapper.lm_head is layer
        torch.testing.assert_close(wrapper.lm_head(torch.randn(3, 0)), layer.bias.expand(3, 4))


@needs_packing
def test_fp32_kernel_rejects_mismatched_operands():
    pack, matmul = fp32_ops()
    x, w, b = torch.randn(2, 70), torch.randn(130, 70), torch.randn(130)
    packed = pack(w)
    with pytest.raises(RuntimeError, match="blocks of 64 channels"):
        matmul(x, packed, 64, b[:64])
    with pytest.raises(RuntimeError, match=r"x must be \(M, 70\)"):
        matmul(x[:, :-1], packed, 130, b)
    with pytest.raises(RuntimeError, match="made by fp32_pack"):
        matmul(x, torch.ops.gptfast_cpu.int8_pack(w.to(torch.int8)), 130, b)
    with pytest.raises(RuntimeError, match="bias must be contiguous float32"):
        matmul(x, packed, 130, b[:-1])
    with pytest.raises(RuntimeError, match="x must be a contiguous float32"):
        matmul(x.double(), packed, 130, b)
    with pytest.raises(RuntimeError, match="isa"):
        matmul(x, packed, 130, b, 7)
    with pytest.raises(RuntimeError, match="2-D float32"):
        pack(w.double())


# ---- the epilogue: GELU and residual ------------------------------------------------------------


def _epilogue_reference(x, w, b, residual, gelu, scale=None):
    """(float32 twin, float64 exact) of gelu(x w^T (* scale) + b) + residual."""
    def compose(x, w, b, residual):
        y = F.linear(x, w if scale is None else w * scale.to(w.dtype)[:, None], b)
        y = F.gelu(y, approximate="tanh") if gelu else y
        return y if residual is None else y + residual
    dbl = (lambda t: None if t is None else t.double())
    return compose(x, w, b, residual), compose(x.double(), w.double(), dbl(b), dbl(residual))


@needs_packing
@pytest.mark.parametrize("gelu", [True, False])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("m,k,n", [(1, 77, 33), (5, 300, 130), (8, 129, 65), (13, 64, 200)])
def test_fp32_epilogue_every_isa(m, k, n, gelu, with_residual):
    """gelu(x w^T + b) + residual in the kernel, against the torch composition and float64."""
    pack, matmul = fp32_ops()
    gen = torch.Generator().manual_seed(m * k + n)
    x, w, b = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen) / k ** 0.5, torch.randn(n, generator=gen)
    residual = torch.randn(m, n, generator=gen) if with_residual else None
    kept = None if residual is None else residual.clone()
    plain, exact = _epilogue_reference(x, w, b, residual, gelu)
    packed = pack(w)
    for isa in range(torch.ops.gptfast_cpu.int8_linear_best_isa() + 1):
        for bias, plain_b, exact_b in ((b, plain, exact), (None,) + _epilogue_reference(x, w, None, residual, gelu)):
            out = matmul(x, packed, n, bias, isa, residual, gelu)
            assert out.shape == (m, n) and torch.isfinite(out).all()
            assert_error_ratio(out, plain_b, exact_b, what=f"isa {isa} {m}x{k}x{n} gelu={gelu} residual={with_residual}")
    if residual is not None:
        assert torch.equal(residual, kept)  # read, never written


@needs_packing
def test_kernel_gelu_across_its_range():
    """The epilogue's GELU (its own exp) against float64 over [-30, 30], and at the extremes:
    absolute error within a few times torch's float32 GELU's."""
    pack, matmul = fp32_ops()
    a = torch.cat([torch.linspace(-30, 30, 20001), torch.tensor([-1e30, -100.0, 0.0, 100.0, 1e30, 3e38])])
    out = matmul(a[:, None].contiguous(), pack(torch.ones(1, 1)), 1, None, -1, None, True)[:, 0]
    exact = F.gelu(a.double(), approximate="tanh")
    plain = F.gelu(a, approximate="tanh")
    assert torch.isfinite(out).all()
    assert (out.double() - exact).abs().max() <= 4 * (plain.double() - exact).abs().max()
    assert torch.equal(out[-6:], torch.tensor([0.0, 0.0, 0.0, 100.0, 1e30, 3e38])) or \
        (out[-6:].double() - exact[-6:]).abs().max() <= 1e-5 * exact[-6:].abs().max()


@needs_int8_packing
@pytest.mark.parametrize("gelu", [True, False])
@pytest.mark.parametrize("m", [1, 3, 8, 20])
def test_int8_epilogue(m, gelu):
    """The int8 kernel's epilogue (every schedule: 20 rows take the panel) against the
    dequantising twin's composition and float64."""
    from gptfast.ops.int8_linear import quantize_weight

    gen = torch.Generator().manual_seed(m)
    k, n = 300, 130
    x, weight = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    b, residual = torch.randn(n, generator=gen), torch.randn(m, n, generator=gen)
    w8, scale = quantize_weight(weight)
    plain, exact = _epilogue_reference(x, w8.float(), b, residual, gelu, scale=scale)
    packed = torch.ops.gptfast_cpu.int8_pack(w8)
    for isa in range(torch.ops.gptfast_cpu.int8_linear_best_isa() + 1):
        out = torch.ops.gptfast_cpu.int8_linear_packed(x, packed, scale, b, isa, residual, gelu)
        assert_error_ratio(out, plain, exact, what=f"int8 isa {isa} m={m} gelu={gelu}")


@needs_packing
def test_epilogue_rejects_a_bad_residual():
    pack, matmul = fp32_ops()
    x, packed = torch.randn(2, 8), pack(torch.randn(5, 8))
    for bad in (torch.randn(2, 4), torch.randn(3, 5), torch.randn(5, 2).t(), torch.randn(2, 5).double()):
        with pytest.raises(RuntimeError, match="residual must be a contiguous float32 CPU tensor of shape"):
            matmul(x, packed, 5, None, -1, bad, False)
    w8 = torch.ops.gptfast_cpu.int8_pack(torch.ones(5, 8, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="residual must be"):
        torch.ops.gptfast_cpu.int8_linear_packed(x, w8, torch.ones(5), None, -1, torch.randn(2, 4), True)


# ---- the packed layers' decode step ------------------------------------------------------------


@needs_packing
@pytest.mark.parametrize("int8", [False, True])
def test_packed_decode_equals_the_torch_composition(int8):
    """``gptfast.nn.decode_linear`` on a packed layer (its ``decode``: layer norm, then the
    kernel with GELU and residual as its epilogue) against the same steps in torch, on
    2-D, 3-D and non-contiguous inputs and residuals; more rows than the kernel serves and
    autograd take the torch ops."""
    from gptfast.nn import decode_linear

    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 80)
    if int8:
        layer = Int8Linear.from_linear(layer)
    norm = torch.nn.LayerNorm(48)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    wrapper = Wrapper(layer)
    with torch.no_grad(), cpu_linear.packed_linears(wrapper):
        packed = wrapper.lm_head
        assert type(packed) is (cpu_linear.PackedInt8Linear if int8 else cpu_linear.PackedLinear)
        for shape in ((1, 48), (3, 1, 48), (2, 3, 48), (70, 48)):
            x = torch.randn(*shape)
            residual = torch.randn(*shape[:-1], 80)
            strided_residual = torch.randn(80, *shape[:-1]).movedim(0, -1)
            for norm_, activation, res in ((None, None, None), (norm, "gelu", None), (None, None, residual),
                                           (norm, "gelu", strided_residual)):
                out = decode_linear(x, packed, norm_, activation=activation, residual=res)
                h = x if norm_ is None else F.layer_norm(x, (48,), norm.weight, norm.bias, norm.eps)
                want = layer(h)
                want = F.gelu(want, approximate="tanh") if activation else want
                want = want if res is None else want + res
                assert out.shape == want.shape
                torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="activation must be None or 'gelu'"):
            decode_linear(torch.randn(1, 48), packed, activation="relu")


@needs_packing
@pytest.mark.parametrize("int8", [False, True])
def test_decode_steps_take_the_packed_layers_and_match_the_module_path(int8, monkeypatch):
    """Inside packed_linears a GPT's decode and verify steps run ``_decode_step`` (the
    packed layers' ``decode``): logits equal the module-by-module path's; the flag is put
    back on exit."""
    model = int8_model() if int8 else tiny_model()
    kind = cpu_linear.PackedInt8Linear if int8 else cpu_linear.PackedLinear
    calls = []
    for method in ("decode", "decode_kv"):
        original = getattr(kind, method)
        monkeypatch.setattr(kind, method, lambda *args, _f=original: calls.append(1) or _f(*args))
    prompt = torch.randint(0, 97, (3, 5), generator=torch.Generator().manual_seed(1))
    step = torch.randint(0, 97, (3, 1), generator=torch.Generator().manual_seed(2))
    verify = torch.randint(0, 97, (3, 3), generator=torch.Generator().manual_seed(3))
    outs = []
    for fused in (False, True):
        model.setup_cache(3, 32)
        with torch.no_grad(), cpu_linear.packed_linears(model):
            assert model.fused_decode
            model.fused_decode = fused
            model(prompt, input_pos=torch.arange(5))
            calls.clear()
            a = model(step, input_pos=torch.full((3, 1), 5))
            b = model(verify, input_pos=torch.arange(6, 9).expand(3, 3))
            assert len(calls) == (2 * (2 * 4 + 1) if fused else 0)
            outs.append((a, b))
        assert model.fused_decode is False
    for got, want in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _qkv_and_caches(batch, tokens, kv_heads, head_dim, q_cols, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, tokens, q_cols + 2 * kv_heads * head_dim, generator=gen)
    cache = torch.randn(batch + 1, kv_heads, 9, head_dim, generator=gen)
    return qkv, cache, cache.clone() * 2


@needs_packing
@pytest.mark.parametrize("batch,tokens,kv_heads,head_dim,q_cols", [(1, 1, 2, 4, 8), (3, 1, 2, 4, 8), (3, 3, 1, 5, 20),
                                                                    (2, 2, 3, 1, 6)])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_cpp_write_kv_equals_the_torch_path(batch, tokens, kv_heads, head_dim, q_cols, dtype):
    """The C++ KV-cache write against ``torch_path.write_kv``: rows' own positions (clamped
    into [0, S)), grouped-query widths, strided qkv and caches; every other slot untouched."""
    from gptfast.ops import torch_path

    write = torch.ops.gptfast_cpu.write_kv
    positions = torch.tensor([[(7 * b + t * 3 - 2) for t in range(tokens)] for b in range(batch)], dtype=dtype)
    positions[0, 0] = 40  # past the cache: clamped to its last slot
    for strided in (False, True):
        qkv, k_cache, v_cache = _qkv_and_caches(batch, tokens, kv_heads, head_dim, q_cols)
        if strided:
            qkv = torch.randn(qkv.shape[-1], batch, tokens).permute(1, 2, 0)
            k_cache, v_cache = k_cache.transpose(2, 3).contiguous().transpose(2, 3), v_cache[..., :head_dim]
        want_k, want_v = k_cache.clone(), v_cache.clone()
        q = torch_path.write_kv(qkv, want_k, want_v, positions)
        write(qkv, k_cache, v_cache, positions)
        assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
        assert q.shape == (batch, tokens, q_cols)


@needs_packing
def test_cpp_write_kv_rejects_bad_operands():
    write = torch.ops.gptfast_cpu.write_kv
    qkv, k_cache, v_cache = _qkv_and_caches(2, 1, 2, 4, 8)
    positions = torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="must be float32 CPU tensors"):
        write(qkv.double(), k_cache, v_cache, positions)
    with pytest.raises(RuntimeError, match="one shape"):
        write(qkv, k_cache, v_cache[:, :1], positions)
    with pytest.raises(RuntimeError, match="cannot hold"):
        write(torch.randn(5, 1, 24), k_cache, v_cache, torch.zeros(5, 1, dtype=torch.long))
    with pytest.raises(RuntimeError, match="not more than 2"):
        write(qkv[..., :16], k_cache, v_cache, positions)
    with pytest.raises(RuntimeError, match="int32 or int64"):
        write(qkv, k_cache, v_cache, positions.float())
    with pytest.raises(RuntimeError, match="positions must have shape"):
        write(qkv, k_cache, v_cache, positions[:1])


# ---- the packed fp32 layers -----------------------------------------------------------------


@needs_packing
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 75), (3, 75), (2, 5, 75), (1, 1, 75)])
def test_packed_forward_matches_f_linear(shape, bias):
    torch.manual_seed(0)
    layer = torch.nn.Linear(75, 131, bias=bias)
    wrapper = Wrapper(layer)
    x = torch.randn(shape)
    expected = F.linear(x, layer.weight, layer.bias)
    with torch.no_grad(), cpu_linear.packed_linears(wrapper) as packed:
        assert packed and isinstance(wrapper.lm_head, cpu_linear.PackedLinear) and wrapper.lm_head.linear is layer
        out = wrapper.lm_head(x)
        strided = wrapper.lm_head(torch.randn(75, *shape[:-1]).movedim(0, -1))  # a non-contiguous input
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert strided.shape == expected.shape and torch.isfinite(strided).all()
    assert wrapper.lm_head is layer  # uninstalled on exit


@needs_packing
def test_autograd_and_other_dtypes_take_f_linear():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8)
    wrapper = Wrapper(layer)
    x = torch.randn(4, 16, requires_grad=True)
    with cpu_linear.packed_linears(wrapper):
        out = wrapper.lm_head(x)  # grad mode on: the packed path has no backward
        out.sum().backward()
        with torch.no_grad():
            double = wrapper.lm_head.double()(x.detach().double())
    assert x.grad is not None and layer.weight.grad is not None
    assert double.dtype == torch.float64


@needs_packing
def test_pack_is_rebuilt_when_the_weight_changes():
    torch.manual_seed(0)
    layer = torch.nn.Linear(24, 40)
    wrapper = Wrapper(layer)
    x = torch.randn(2, 24)
    with torch.no_grad():
        with cpu_linear.packed_linears(wrapper):
            before = wrapper.lm_head(x)
        layer.weight.mul_(2.0)  # in place, as an optimizer step
        with cpu_linear.packed_linears(wrapper):
            after = wrapper.lm_head(x)
        layer.weight = torch.nn.Parameter(torch.zeros(40, 24))  # a new tensor
        with cpu_linear.packed_linears(wrapper):
            zero_weight = wrapper.lm_head(x)
    torch.testing.assert_close(after - layer.bias, 2 * (before - layer.bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(zero_weight, layer.bias.expand(2, 40))


@needs_packing
def test_context_cleans_up_on_error_and_release_frees_packs():
    model = tiny_model()
    linears = plain_linears(model)
    with pytest.raises(RuntimeError, match="boom"):
        with cpu_linear.packed_linears(model):
            assert len(packed_modules(model)) == len(linears) == 9  # 4 per block and the head
            assert all(m.linear in linears for m in packed_modules(model))
            raise RuntimeError("boom")
    assert not packed_modules(model) and plain_linears(model) == linears
    assert any(m in cpu_linear._packs for m in model.modules())
    cpu_linear.release(model)
    assert not any(m in cpu_linear._packs for m in model.modules())


def test_env_var_and_dtype_turn_packing_off(monkeypatch):
    model = tiny_model()
    monkeypatch.setenv(cpu_linear.ENV_VAR, "0")
    assert not cpu_linear.applies_to(model)
    with cpu_linear.packed_linears(model) as packed:
        assert not packed and not packed_modules(model)
    monkeypatch.delenv(cpu_linear.ENV_VAR)
    assert not cpu_linear.applies_to(model.double())


def test_enabled_argument_overrides_the_env_default(monkeypatch):
    model = tiny_model()
    monkeypatch.setenv(cpu_linear.ENV_VAR, "1")
    with cpu_linear.packed_linears(model, enabled=False) as packed:
        assert not packed and not packed_modules(model)
    if cpu_linear.available():
        monkeypatch.setenv(cpu_linear.ENV_VAR, "0")
        with torch.no_grad(), cpu_linear.packed_linears(model, enabled=True) as packed:
            assert packed and isinstance(model.lm_head, cpu_linear.PackedLinear)
        assert type(model.lm_head) is torch.nn.Linear


@needs_packing
@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=12, temperature=0.0),
                                    SamplingParams(max_new_tokens=12, temperature=0.9, top_k=20, seed=5)])
def test_generate_tokens_do_not_depend_on_packing(monkeypatch, params):
    model = tiny_model()
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9]]
    packed = [r.token_ids for r in generate(model, prompts, params)]
    monkeypatch.setenv(cpu_linear.ENV_VAR, "0")
    plain = [r.token_ids for r in generate(model, prompts, params)]
    assert packed == plain and all(len(t) == 12 for t in packed)
    assert not packed_modules(model)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_logits_index_equals_the_gathered_full_logits(backend):
    model = tiny_model().set_backend(backend)
    idx = torch.randint(0, 97, (3, 7))
    where = torch.tensor([6, 0, 3])
    with torch.no_grad():
        full = model(idx)
        one = model(idx, logits_index=where)
        model.setup_cache(3, 16)
        cached = model(idx, input_pos=torch.arange(7), logits_index=where)
    assert one.shape == cached.shape == (3, 1, 97)
    expected = full[torch.arange(3), where].unsqueeze(1)
    torch.testing.assert_close(one, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached, expected, rtol=1e-5, atol=1e-5)


def test_logits_index_rejects_bad_input():
    model = tiny_model()
    idx = torch.randint(0, 97, (2, 5))
    with pytest.raises(ValueError, match="outside the sequence length 5"):
        model(idx, logits_index=torch.tensor([4, 5]))
    with pytest.raises(ValueError, match=r"must be a \(2,\) integer tensor"):
        model(idx, logits_index=torch.tensor([4]))
    with pytest.raises(ValueError, match=r"must be a \(2,\) integer tensor"):
        model(idx, logits_index=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="cannot be combined with targets"):
        model(idx, targets=idx, logits_index=torch.tensor([1, 2]))


# ---- int8 layers: packed once for the C++ kernel -----------------------------------------



@pytest.fixture
def native_int8(monkeypatch):
    """Unpacked int8 layers run the op's C++ kernel, as on a CPU without the Triton
    interpreter (tests/conftest.py sets TRITON_INTERPRET=1): the math the packed layers do."""
    monkeypatch.setattr(importlib.import_module("gptfast.ops.int8_linear"), "use_triton", lambda t: False)


def int8_model(seed=0):
    return quantize(tiny_model(seed=seed), "int8")


def packed_int8_modules(model):
    return [m for m in model.modules() if isinstance(m, cpu_linear.PackedInt8Linear)]


@needs_int8_packing
def test_int8_layers_are_packed_and_put_back():
    model = int8_model()
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    with torch.no_grad(), cpu_linear.packed_linears(model) as packed:
        wrapped = packed_int8_modules(model)
        assert packed and len(wrapped) == len(layers) == 9
        assert [w.linear for w in wrapped] == layers
        head = model.lm_head
        assert head.packed.shape == (2, 32, 64) and head.weight_int8 is layers[-1].weight_int8
    assert not packed_int8_modules(model) and [m for m in model.modules() if isinstance(m, Int8Linear)] == layers
    op_cache = importlib.import_module("gptfast.ops.int8_linear")._cpu_packs
    assert all(m.weight_int8 in op_cache for m in layers)  # one cache with the op's own calls
    cpu_linear.release(model)
    assert not any(m in cpu_linear._packs for m in model.modules())
    assert not any(m.weight_int8 in op_cache for m in layers)


@needs_int8_packing
def test_packed_int8_forward_is_the_op_kernel_bit_for_bit(native_int8):
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(torch.nn.Linear(75, 131))
    wrapper = Wrapper(layer)
    with torch.no_grad():
        for shape in [(1, 75), (3, 1, 75), (64, 75), (2, 33, 75)]:
            x = torch.randn(shape)
            expected = layer(x)  # 66 rows: the op's torch path, which the wrapper falls back to as well
            with cpu_linear.packed_linears(wrapper):
                assert isinstance(wrapper.lm_head, cpu_linear.PackedInt8Linear)
                out = wrapper.lm_head(x)
                strided = wrapper.lm_head(x.transpose(0, -1).contiguous().transpose(0, -1))
            assert out.shape == expected.shape == strided.shape
            assert torch.equal(out, expected) and torch.equal(strided, expected), shape


@needs_int8_packing
def test_int8_pack_is_rebuilt_when_the_weight_changes(native_int8):
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(torch.nn.Linear(24, 40))
    wrapper = Wrapper(layer)
    x = torch.randn(2, 24)
    with torch.no_grad():
        with cpu_linear.packed_linears(wrapper):
            before = wrapper.lm_head(x)
        layer.weight_int8.neg_()  # in place
        with cpu_linear.packed_linears(wrapper):
            after = wrapper.lm_head(x)
    torch.testing.assert_close(after - layer.bias, -(before - layer.bias), rtol=1e-5, atol=1e-5)


def test_bfloat16_scaled_int8_layers_are_not_packed():
    model = quantize(tiny_model(), "int8", scale_dtype=torch.bfloat16)
    with torch.no_grad(), cpu_linear.packed_linears(model):
        assert not packed_int8_modules(model)


@needs_int8_packing
@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=12, temperature=0.0),
                                    SamplingParams(max_new_tokens=12, temperature=0.9, top_k=20, seed=5)])
def test_int8_generate_tokens_equal_packed_or_not(monkeypatch, native_int8, params):
    """Packed layers and the op's C++ path run one kernel: the same tokens (and logits)."""
    model = int8_model()
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9]]
    packed = [r.token_ids for r in generate(model, prompts, params)]
    monkeypatch.setenv(cpu_linear.ENV_VAR, "0")
    plain = [r.token_ids for r in generate(model, prompts, params)]
    assert packed == plain and all(len(t) == 12 for t in packed)
    idx = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        unpacked_logits = model(idx)
        with cpu_linear.packed_linears(model, enabled=True):
            packed_logits = model(idx)
    assert torch.equal(packed_logits, unpacked_logits)


@needs_int8_packing
def test_saved_and_loaded_int8_model_packs_the_same(tmp_path, native_int8):
    """The checkpoint keeps the public (N, K) layout; the loaded model packs to the same
    blocks and generates the same tokens."""
    model = int8_model()
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path)
    with torch.no_grad(), cpu_linear.packed_linears(model), cpu_linear.packed_linears(loaded):
        for a, b in zip(packed_int8_modules(model), packed_int8_modules(loaded)):
            assert torch.equal(a.packed, b.packed)
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    assert ([r.token_ids for r in generate(model, [[1, 2, 3]], params)]
            == [r.token_ids for r in generate(loaded, [[1, 2, 3]], params)])


@needs_packing
@needs_int8_packing
def test_bench_cpu_linear_runs(tmp_path):
    """benchmarks/bench_cpu_linear.py end to end on one block (its numbers are not judged)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    done = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_cpu_linear.py"), "--layers", "1",
                           "--rows", "1,3", "--runs", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if "GB/s of weights" in line]
    assert {line.split("|")[1].strip() for line in lines} >= {"gptfast fp32", "F.linear fp32", "gptfast int8"}
    assert len(lines) % 2 == 0 and "read of 1 GiB" in done.stdout
