"""Weight-only int8 linear: the Triton kernel (interpreted on a CPU), the C++ CPU kernel
(every instruction set this CPU has; its packed layout, every row count 1..64) and the
torch path against the float64 reference twin by the error-ratio rule, on awkward shapes,
M = 1, 3, 17, 64 and beyond, split-K, non-contiguous inputs and poisoned outputs;
quantize_weight; bad inputs; registration."""
import importlib

import pytest
import torch

from gptfast.ops import _dispatch
from gptfast.ops.int8_linear import cpu_kernel, int8_linear, quantize_weight
from gptfast.ops.torch_path import int8_linear as _int8_linear_torch
from gptfast.reference.int8_linear import int8_linear as reference
from gptfast.testing import assert_error_ratio, poison_

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_ON_DEVICE = _dispatch.use_triton(torch.empty(0, device=DEVICE))
needs_triton = pytest.mark.skipif(not TRITON_ON_DEVICE, reason="Triton (or its CPU interpreter) not available")
needs_cpu_kernel = pytest.mark.skipif(cpu_kernel() is None, reason="the gptfast C++ extension is not loaded")

# (M, K, N): K and N not multiples of the tiles; M across the decode tiles and past them.
SHAPES = [(1, 77, 33), (3, 300, 70), (17, 64, 130), (64, 129, 65), (70, 100, 50)]


def make(m, k, n, dtype, bias=True, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen) * 0.05
    q, scale = quantize_weight(weight)
    x = torch.randn(m, k, generator=gen).to(dtype)
    b = (torch.randn(n, generator=gen) * 0.1).to(dtype) if bias else None
    to = lambda t: None if t is None else t.to(device)
    return to(x), to(q), to(scale), to(b)


def exact(x, q, scale, bias):
    return reference(x.double(), q, scale.double(), None if bias is None else bias.double())


def kernel():
    return importlib.import_module("gptfast.kernels.int8_linear")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_triton_matches_reference(m, k, n, dtype):
    x, q, scale, bias = make(m, k, n, dtype)
    out = poison_(torch.empty(m, n, dtype=dtype, device=x.device))
    kernel().int8_linear(x, q, scale, bias, out=out)
    assert_error_ratio(out, _int8_linear_torch(x, q, scale, bias), exact(x, q, scale, bias),
                       what=f"triton {m}x{k}x{n} {dtype}")


@needs_triton
@pytest.mark.parametrize("split_k", [2, 3])
def test_triton_split_k(split_k):
    x, q, scale, bias = make(5, 700, 40, torch.float32)
    out = kernel().int8_linear(x, q, scale, bias, split_k=split_k)
    assert_error_ratio(out, _int8_linear_torch(x, q, scale, bias), exact(x, q, scale, bias), what="split-K")


def test_plan_splits_decode_not_prefill():
    k = kernel()
    decode = k.tile_config(1)
    k_per_split, splits = k.plan(1, 768, 768, decode, sms=132)
    assert splits > 1 and splits * k_per_split >= 768 and (splits - 1) * k_per_split < 768
    assert k_per_split % decode.block_k == 0
    assert k.plan(1024, 768, 768, k.tile_config(1024), sms=132)[1] == 1


@needs_triton
def test_op_non_contiguous_and_batched_input():
    x, q, scale, bias = make(6, 48, 20, torch.float32)
    wide = torch.randn(2, 3, 96, device=x.device)
    strided = wide[..., ::2]  # (2, 3, 48), last-dim stride 2
    out = int8_linear(strided, q, scale, bias)
    assert out.shape == (2, 3, 20)
    assert_error_ratio(out, _int8_linear_torch(strided.contiguous(), q, scale, bias), exact(strided, q, scale, bias),
                       what="strided")


@needs_cpu_kernel
@pytest.mark.parametrize("m,k,n", SHAPES + [(2, 15, 3), (4, 1, 9), (0, 8, 8)])
@pytest.mark.parametrize("bias", [True, False])
def test_cpu_kernel_every_isa(m, k, n, bias):
    x, q, scale, b = make(m, k, n, torch.float32, bias=bias, device="cpu")
    best = torch.ops.gptfast_cpu.int8_linear_best_isa()
    plain = _int8_linear_torch(x, q, scale, b)
    for isa in range(best + 1):
        out = cpu_kernel()(x, q, scale, b, isa)
        assert out.shape == (m, n)
        assert_error_ratio(out, plain, exact(x, q, scale, b), what=f"cpu isa {isa} {m}x{k}x{n}")


def packed_ops():
    return torch.ops.gptfast_cpu.int8_pack, torch.ops.gptfast_cpu.int8_linear_packed


@needs_cpu_kernel
def test_pack_layout():
    """Blocks of 64 channels, K-major: packed[b, k, c] = w[64 b + c, k]; channels past N are 0."""
    pack, _ = packed_ops()
    w = torch.randint(-127, 128, (130, 7), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    packed = pack(w)
    assert packed.shape == (3, 7, 64) and packed.dtype == torch.int8
    padded = torch.cat([w, torch.zeros(62, 7, dtype=torch.int8)])
    assert torch.equal(packed, padded.view(3, 64, 7).transpose(1, 2))
    assert torch.equal(pack(w.t().contiguous().t()), packed)  # a non-contiguous weight packs the same


# Odd K and N (block tails, K past one 128-wide fp32 panel) and every row count 1..64: the
# direct schedule (one or two register tiles) and the panel schedule with every tile split.
PACKED_SHAPES = [(77, 33), (300, 130), (129, 65)]


@needs_cpu_kernel
@pytest.mark.parametrize("k,n", PACKED_SHAPES)
def test_packed_kernel_every_isa_every_row_count(k, n):
    pack, matmul = packed_ops()
    best = torch.ops.gptfast_cpu.int8_linear_best_isa()
    x_all, q, scale, b = make(64, k, n, torch.float32, device="cpu", seed=k)
    packed = pack(q)
    for m in range(1, 65):
        x = x_all[:m]
        for bias in (b, None):
            plain, want = _int8_linear_torch(x, q, scale, bias), exact(x, q, scale, bias)
            for isa in range(best + 1):
                out = matmul(x, packed, scale, bias, isa)
                assert out.shape == (m, n)
                assert_error_ratio(out, plain, want, what=f"packed isa {isa} {m}x{k}x{n} bias={bias is not None}")


@needs_cpu_kernel
def test_packed_kernel_equals_the_op_kernel_bit_for_bit():
    """int8_linear (packs per call) and int8_linear_packed run one kernel: identical bits."""
    pack, matmul = packed_ops()
    x, q, scale, b = make(9, 200, 100, torch.float32, device="cpu")
    assert torch.equal(matmul(x, pack(q), scale, b), cpu_kernel()(x, q, scale, b))


@needs_cpu_kernel
def test_op_packs_a_weight_once_and_again_when_it_changes(monkeypatch):
    op_module = importlib.import_module("gptfast.ops.int8_linear")
    monkeypatch.setattr(op_module, "use_triton", lambda t: False)
    x, q, scale, bias = make(2, 40, 70, torch.float32, device="cpu")
    first = op_module.cpu_packed_weight(q)
    int8_linear(x, q, scale, bias)
    assert op_module.cpu_packed_weight(q) is first  # cached: the op call reused it
    q.neg_()  # in place: a new version
    out = int8_linear(x, q, scale, bias)
    assert op_module.cpu_packed_weight(q) is not first
    assert_error_ratio(out, _int8_linear_torch(x, q, scale, bias), exact(x, q, scale, bias), what="after an update")
    op_module.drop_cpu_packed_weight(q)
    assert q not in op_module._cpu_packs


@needs_cpu_kernel
def test_packed_kernel_rejects_mismatched_operands():
    pack, matmul = packed_ops()
    x, q, scale, b = make(2, 70, 130, torch.float32, device="cpu")
    packed = pack(q)
    with pytest.raises(RuntimeError, match="blocks of 64 channels"):
        matmul(x, packed, scale[:64], b[:64])
    with pytest.raises(RuntimeError, match=r"x must be \(M, 70\)"):
        matmul(x[:, :-1], packed, scale, b)
    with pytest.raises(RuntimeError, match="made by int8_pack"):
        matmul(x, q, scale, b)
    with pytest.raises(RuntimeError, match="isa"):
        matmul(x, packed, scale, b, 7)
    with pytest.raises(RuntimeError, match="2-D int8"):
        pack(q.float())


@needs_cpu_kernel
def test_cpu_kernel_rejects_unsupported_isa():
    x, q, scale, b = make(1, 8, 8, torch.float32, device="cpu")
    with pytest.raises(RuntimeError, match="isa"):
        cpu_kernel()(x, q, scale, b, 7)


@needs_cpu_kernel
def test_op_takes_cpu_kernel_without_interpreter(monkeypatch):
    x, q, scale, bias = make(3, 100, 40, torch.float32, device="cpu")
    calls = []
    op_module = importlib.import_module("gptfast.ops.int8_linear")
    monkeypatch.setattr(op_module, "use_triton", lambda t: False)  # as on a CPU without TRITON_INTERPRET
    real = op_module._cpu_int8_linear
    monkeypatch.setattr(op_module, "_cpu_int8_linear", lambda *a: calls.append(1) or real(*a))
    out = int8_linear(x.t().contiguous().t(), q, scale, bias)  # non-contiguous in
    assert calls == [1]
    assert_error_ratio(out, _int8_linear_torch(x, q, scale, bias), exact(x, q, scale, bias), what="op via C++")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_matches_reference(dtype):
    x, q, scale, bias = make(5, 90, 31, dtype, device="cpu")
    scale = scale.to(dtype)
    out = _int8_linear_torch(x, q, scale, bias)
    assert out.dtype == dtype
    err = (out.double() - exact(x, q, scale, bias)).abs().max().item()
    assert err <= (1e-5 if dtype == torch.float32 else 0.05) * exact(x, q, scale, bias).abs().max().item()


def test_quantize_weight_round_trip():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(37, 53, generator=gen)
    w[3] = 0  # an all-zero channel gets scale 1, not a division by zero
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (37,)
    assert int(q.abs().max()) <= 127 and scale[3] == 1 and not q[3].any()
    dequant = q.float() * scale[:, None]
    assert ((dequant - w).abs() <= scale[:, None] / 2 + 1e-7).all()  # within half a step
    q16, scale16 = quantize_weight(w, torch.bfloat16)
    assert scale16.dtype == torch.bfloat16
    assert ((q16.float() * scale16.float()[:, None] - w).abs() <= scale16.float()[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("change,error,match", [
    (lambda a: dict(a, weight_int8=a["weight_int8"].float()), TypeError, "weight_int8 must be int8"),
    (lambda a: dict(a, scale=a["scale"].to(torch.int32)), TypeError, "scale has dtype torch.int32"),
    (lambda a: dict(a, scale=a["scale"].double()), TypeError, "scale has dtype torch.float64"),
    (lambda a: dict(a, scale=a["scale"][:-1]), ValueError, r"scale must have shape \(8,\)"),
    (lambda a: dict(a, x=a["x"][:, :-1]), ValueError, "does not end in the weight's K"),
    (lambda a: dict(a, x=a["x"].double()), TypeError, "x has dtype torch.float64"),
    (lambda a: dict(a, bias=a["bias"][:3]), ValueError, r"bias must have shape \(8,\)"),
    (lambda a: dict(a, bias=a["bias"].half()), TypeError, "bias has dtype torch.float16"),
    (lambda a: dict(a, weight_int8=a["weight_int8"][0]), ValueError, r"weight_int8 must have shape \(N, K\)"),
    (lambda a: dict(a, scale=a["scale"].tolist()), TypeError, "scale must be a torch.Tensor"),
    (lambda a: dict(a, x=a["x"].to("meta")), ValueError, "is on cpu but x is on meta"),
])
def test_bad_input(change, error, match):
    x, q, scale, bias = make(2, 12, 8, torch.float32, device="cpu")
    args = change(dict(x=x, weight_int8=q, scale=scale, bias=bias))
    with pytest.raises(error, match=match):
        int8_linear(**args)


def test_quantize_weight_bad_input():
    with pytest.raises(ValueError, match="2-D floating"):
        quantize_weight(torch.ones(3, 4, dtype=torch.int8))
    with pytest.raises(TypeError, match="scale_dtype"):
        quantize_weight(torch.ones(3, 4), torch.int8)


def test_registered_op_fake_and_no_backward():
    x, q, scale, bias = make(2, 12, 8, torch.float32, device="cpu")
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fx, fq, fs, fb = (mode.from_tensor(t) for t in (x, q, scale, bias))
        y = torch.ops.gptfast.int8_linear(fx, fq, fs, fb)
        assert y.shape == (2, 8) and y.dtype == torch.float32
    x.requires_grad_(True)
    with pytest.raises(RuntimeError, match="inference-only"):
        int8_linear(x, q, scale, bias).sum().backward()


def test_static_configs_listed():
    from gptfast.kernels._registry import KERNEL_MODULES

    assert "int8_linear" in KERNEL_MODULES
    configs = kernel().static_configs()
    assert {c["constexprs"]["BLOCK_M"] for c in configs} == {16, 32, 64, 128}
    assert all(c["require_hgmma"] for c in configs)
