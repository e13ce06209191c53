"""skinny_linear and skinny_linear_kv: the Triton kernel (interpreted on a CPU) and the torch
path against the float64 reference twin by the error-ratio rule, on awkward shapes (M = 1,
3, 16 and past one row tile; K and N not multiples of the tiles; non-contiguous x and
residual), every prologue / epilogue, int8 weights, split-K reduced in the launch, poisoned
outputs and workspaces; the KV-cache writes (only the addressed slots change); the kernel
count of one call; bad inputs; registration."""
import importlib

import pytest
import torch

import gptfast.ops
from gptfast.ops import _dispatch, torch_path
from gptfast.ops.int8_linear import quantize_weight
from gptfast.ops.skinny_linear import skinny_linear, skinny_linear_kv
from gptfast.reference import skinny_linear as reference, skinny_linear_kv as reference_kv
from gptfast.testing import assert_error_ratio, count_device_kernels, poisoned_kernel_outputs, randn

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_ON_DEVICE = _dispatch.use_triton(torch.empty(0, device=DEVICE))
needs_triton = pytest.mark.skipif(not TRITON_ON_DEVICE, reason="Triton (or its CPU interpreter) not available")


def kernel():
    return importlib.import_module("gptfast.kernels.skinny_linear")


def make(m, k, n, dtype, *, int8=False, ln=False, residual=False, strided=False, seed=0):
    """Inputs of one call: (x, weight, kwargs) with bias always on."""
    g = torch.Generator().manual_seed(seed)
    x = randn(m, 2 * k if strided else k, dtype=dtype, device=DEVICE, generator=g)
    x = x[:, ::2] if strided else x
    w = randn(n, k, dtype=torch.float32, generator=g, scale=0.05)
    kwargs = {"bias": randn(n, dtype=dtype, device=DEVICE, generator=g, scale=0.1)}
    if int8:
        w, kwargs["scale"] = quantize_weight(w)
        kwargs["scale"] = kwargs["scale"].to(DEVICE)
    weight = w.to(device=DEVICE, dtype=torch.int8 if int8 else dtype)
    if ln:
        kwargs["ln_weight"] = randn(k, dtype=dtype, device=DEVICE, generator=g, scale=0.1, shift=1.0)
        kwargs["ln_bias"] = randn(k, dtype=dtype, device=DEVICE, generator=g, scale=0.1)
    if residual:
        r = randn(n, m, dtype=dtype, device=DEVICE, generator=g)
        kwargs["residual"] = r.t() if strided else r.t().contiguous()
    return x, weight, kwargs


def widen(kwargs):
    return {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kwargs.items()}


# (M, K, N, variant, split_k, strided): K and N off the 64 / 128 tiles; M = 1, 3, 16 and 20
# (two row tiles); split_k None is the launcher's own plan (one chunk at these sizes).
CASES = [
    (1, 77, 33, dict(), None, False),
    (3, 300, 70, dict(ln=True, activation="gelu"), 3, True),
    (16, 130, 100, dict(int8=True, residual=True), 2, False),
    (3, 200, 40, dict(int8=True, ln=True, activation="gelu", residual=True), None, True),
    (20, 90, 65, dict(residual=True), 2, False),
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,k,n,variant,split_k,strided", CASES)
def test_kernel_matches_reference(m, k, n, variant, split_k, strided, dtype):
    variant = dict(variant)
    activation = variant.pop("activation", None)
    x, weight, kw = make(m, k, n, dtype, strided=strided, **variant)
    with poisoned_kernel_outputs():
        out = kernel().skinny_linear(x, weight, kw["bias"], scale=kw.get("scale"), ln_weight=kw.get("ln_weight"),
                                     ln_bias=kw.get("ln_bias"), gelu=activation == "gelu",
                                     residual=kw.get("residual"), split_k=split_k)
    plain = reference(x, weight, activation=activation, **kw)
    exact = reference(x.double(), weight if weight.dtype == torch.int8 else weight.double(), activation=activation,
                      **widen(kw))
    assert out.shape == (m, n) and out.dtype == dtype
    assert_error_ratio(out, plain, exact, what=f"skinny {m}x{k}->{n} {variant} {activation} split {split_k} {dtype}")


@needs_triton
def test_op_batched_strided_input_and_residual():
    x, weight, kw = make(6, 48, 20, torch.float32, ln=True, residual=True, strided=True)
    x3, r3 = x.view(2, 3, 48), kw.pop("residual").reshape(2, 3, 20)  # x3 stays a strided view
    out = gptfast.ops.skinny_linear(x3, weight, residual=r3, activation="gelu", **kw)
    assert out.shape == (2, 3, 20)
    plain = reference(x3, weight, residual=r3, activation="gelu", **kw)
    exact = reference(x3.double(), weight.double(), residual=r3.double(), activation="gelu", **widen(kw))
    assert_error_ratio(out, plain, exact, what="op, batched")


@needs_triton
def test_split_k_leaves_counters_at_zero():
    x, weight, kw = make(2, 700, 40, torch.float32)
    out = kernel().skinny_linear(x, weight, kw["bias"], split_k=3)
    assert_error_ratio(out, reference(x, weight, **kw), reference(x.double(), weight.double(), **widen(kw)),
                       what="split-K")
    buffer = kernel().counters(x.device, 1)
    assert buffer.dtype == torch.int32 and not buffer.any()


def test_plan_splits_narrow_outputs_only():
    k = kernel()
    cfg = k.builtin_config(1)
    k_per_split, splits = k.plan(1, 768, 768, cfg, sms=132)  # attention c_proj: 12 tiles
    assert splits > 1 and k_per_split % cfg.block_k == 0 and (splits - 1) * k_per_split < 768 <= splits * k_per_split
    assert k.plan(1, 768, 3072, cfg, sms=132)[1] > splits  # mlp c_proj: more K to split
    assert k.plan(1, 50257, 768, cfg, sms=132)[1] == 1  # the LM head fills the GPU by itself
    assert k.config_key(2304, 768, "16bit") == "n4096_k1024_16bit"
    assert k.tile_config(3, 768, 768, "int8") == cfg  # off CUDA: the built-in config


# --------------------------------------------------------------------------------------
# KV-cache writes
# --------------------------------------------------------------------------------------

SENTINEL = 7.0  # what every slot holds before the call


def _kv_inputs(batch, tokens, dtype, int8, ln, seed=3):
    heads, head_dim, seq_len, k = 2, 16, 12, 40
    x, weight, kw = make(batch * tokens, k, 3 * heads * head_dim, dtype, int8=int8, ln=ln, seed=seed)
    # Caches: rows 0..batch-1 of a bigger buffer (the model's static cache), every slot a sentinel.
    big = torch.full((2, batch + 1, heads, seq_len, head_dim), SENTINEL, dtype=dtype, device=DEVICE)
    positions = torch.tensor([[2 + 3 * b + t for t in range(tokens)] for b in range(batch)], device=DEVICE)
    return x.view(batch, tokens, k), weight, kw, big[0], big[1], positions


@needs_triton
@pytest.mark.parametrize("batch,tokens,int8,ln,split_k", [(3, 1, False, True, None), (2, 3, True, False, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kv_cache_write(batch, tokens, int8, ln, split_k, dtype):
    x, weight, kw, k_cache, v_cache, positions = _kv_inputs(batch, tokens, dtype, int8, ln)
    k_exact, v_exact = k_cache.double(), v_cache.double()
    k_plain, v_plain = k_cache.clone(), v_cache.clone()
    bias = kw.pop("bias")
    with poisoned_kernel_outputs():
        q = kernel().skinny_linear_kv(x.view(batch * tokens, -1), weight, bias, k_cache, v_cache,
                                      positions.int(), split_k=split_k, **kw).view(batch, tokens, -1)
    plain = reference_kv(x, weight, bias, k_plain, v_plain, positions, **kw)
    w64 = weight if int8 else weight.double()
    exact = reference_kv(x.double(), w64, bias.double(), k_exact, v_exact, positions, **widen(kw))
    assert_error_ratio(q, plain, exact, what="q")
    # Only the addressed slots changed ...
    written = torch.zeros(k_cache.shape[0], k_cache.shape[2], dtype=torch.bool, device=DEVICE)
    written[torch.arange(batch, device=DEVICE)[:, None], positions] = True
    for cache, cache_plain, cache_exact in ((k_cache, k_plain, k_exact), (v_cache, v_plain, v_exact)):
        untouched = cache.permute(0, 2, 1, 3)[~written]
        assert (untouched == SENTINEL).all()
        # ... and they hold the projection's k and v columns.
        rows, slots = written.nonzero(as_tuple=True)
        assert_error_ratio(cache[rows, :, slots], cache_plain[rows, :, slots], cache_exact[rows, :, slots],
                           what="cache slots")


@needs_triton
def test_kv_op_matches_torch_path():
    x, weight, kw, k_cache, v_cache, positions = _kv_inputs(2, 1, torch.float32, False, True)
    k2, v2 = k_cache.clone(), v_cache.clone()
    bias = kw.pop("bias")
    q = skinny_linear_kv(x, weight, bias, k_cache, v_cache, positions, **kw)
    q2 = torch_path.skinny_linear_kv(x, weight, bias, k2, v2, positions, **kw)
    assert q.shape == (2, 1, 32)
    torch.testing.assert_close(q, q2)
    torch.testing.assert_close(k_cache, k2)
    torch.testing.assert_close(v_cache, v2)


# --------------------------------------------------------------------------------------
# Kernel counts
# --------------------------------------------------------------------------------------


def test_count_device_kernels_counts_kernels_not_views_or_checks():
    a, b = torch.randn(4, 8), torch.randn(4, 8)

    def fn(a, b):
        if bool((a.abs() > 100).any()):  # an input check: a host read of a value
            raise ValueError("big")
        return (a + b).view(-1).t().sum() * 2

    result, count = count_device_kernels(fn, a, b)
    assert torch.equal(result, (a + b).sum() * 2)
    assert count.aten == ["aten::add", "aten::sum", "aten::mul"] and count.triton == [] and count.total == 3
    assert count.checks == ["aten::abs", "aten::gt", "aten::any"] and count.host_reads == ["aten::_local_scalar_dense"]


def test_count_device_kernels_of_the_torch_path():
    x, weight, kw = make(3, 64, 96, torch.float32, ln=True, residual=True)
    _, count = count_device_kernels(torch_path.skinny_linear, x, weight, activation="gelu", **kw)
    assert count.aten == ["aten::native_layer_norm", "aten::addmm", "aten::gelu", "aten::add"]


@needs_triton
def test_one_launch_per_call():
    x, weight, kw = make(3, 300, 70, torch.float32, int8=True, ln=True, residual=True)
    _, count = count_device_kernels(skinny_linear, x, weight, activation="gelu", **kw)
    assert count.triton == ["_skinny_linear_kernel"] and count.aten == [] and count.total == 1
    xk, weight, kw, k_cache, v_cache, positions = _kv_inputs(2, 2, torch.float32, False, True)
    _, count = count_device_kernels(skinny_linear_kv, xk, weight, kw.pop("bias"), k_cache, v_cache, positions, **kw)
    # The CPU-only check of the position values is not a device kernel.
    assert count.total == 1 and count.checks and count.host_reads


# --------------------------------------------------------------------------------------
# The torch path, bad inputs, registration
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("int8", [False, True])
def test_torch_path_matches_reference(int8):
    x, weight, kw = make(5, 90, 31, torch.float32, int8=int8, ln=True, residual=True)
    out = torch_path.skinny_linear(x, weight, activation="gelu", **kw)
    exact = reference(x.double(), weight if int8 else weight.double(), activation="gelu", **widen(kw))
    assert_error_ratio(out, reference(x, weight, activation="gelu", **kw), exact, what="torch path")


def _args():
    x, weight, kw = make(2, 12, 8, torch.float32, ln=True, residual=True)
    return dict(x=x, weight=weight, **kw)


@pytest.mark.parametrize("change,error,match", [
    (lambda a: dict(a, weight=a["weight"].half()), TypeError, "weight has dtype torch.float16"),
    (lambda a: dict(a, weight=a["weight"][0]), ValueError, r"weight must have shape \(N, K\)"),
    (lambda a: dict(a, x=a["x"][:, :-1]), ValueError, "does not end in the weight's K = 12"),
    (lambda a: dict(a, x=a["x"].double()), TypeError, "x has dtype torch.float64"),
    (lambda a: dict(a, weight=a["weight"].to(torch.int8)), ValueError, "scale is required with an int8 weight"),
    (lambda a: dict(a, scale=torch.ones(8)), ValueError, "scale is only for int8 weights"),
    (lambda a: dict(a, weight=a["weight"].to(torch.int8), scale=torch.ones(7)), ValueError, r"scale must have shape \(8,\)"),
    (lambda a: dict(a, bias=a["bias"][:3]), ValueError, r"bias must have shape \(8,\)"),
    (lambda a: dict(a, bias=a["bias"].half()), TypeError, "bias has dtype torch.float16"),
    (lambda a: dict(a, ln_weight=None), ValueError, "ln_bias needs ln_weight"),
    (lambda a: dict(a, ln_weight=a["ln_weight"][:5]), ValueError, r"ln_weight must have shape \(12,\)"),
    (lambda a: dict(a, ln_bias=a["ln_bias"].to(torch.int32)), TypeError, "ln_bias has dtype torch.int32"),
    (lambda a: dict(a, residual=a["residual"][:1]), ValueError, r"residual must have shape \(2, 8\)"),
    (lambda a: dict(a, residual=a["residual"].half()), TypeError, "residual has dtype torch.float16"),
    (lambda a: dict(a, activation="relu"), ValueError, "activation must be None or 'gelu', got 'relu'"),
    (lambda a: dict(a, eps=-1.0), ValueError, "eps must be a finite number >= 0, got -1.0"),
    (lambda a: dict(a, bias=a["bias"].tolist()), TypeError, "bias must be a torch.Tensor or None"),
    (lambda a: dict(a, x=a["x"].to("meta")), ValueError, "weight is on cpu but x is on meta"),
])
def test_bad_input(change, error, match):
    if DEVICE != "cpu":
        pytest.skip("the inputs are built on the CPU")
    with pytest.raises(error, match=match):
        skinny_linear(**change(_args()))


@pytest.mark.parametrize("change,error,match", [
    (lambda a: dict(a, positions=a["positions"].float()), TypeError, "positions must be int32 or int64"),
    (lambda a: dict(a, positions=a["positions"][:, :1]), ValueError, r"positions must have shape \(2, 2\)"),
    (lambda a: dict(a, positions=a["positions"] + 100), ValueError, r"positions\[0, 0\] = 102 is outside \[0, 12\)"),
    (lambda a: dict(a, positions=a["positions"] - 100), ValueError, r"is outside \[0, 12\)"),
    (lambda a: dict(a, v_cache=a["v_cache"][:, :1]), ValueError, "k_cache and v_cache must have one shape"),
    (lambda a: dict(a, k_cache=a["k_cache"][:1], v_cache=a["v_cache"][:1]), ValueError, "cannot hold 2 rows"),
    (lambda a: dict(a, k_cache=a["k_cache"].half(), v_cache=a["v_cache"].half()), TypeError, "k_cache has dtype"),
    (lambda a: dict(a, x=a["x"][0]), ValueError, r"x must have shape \(B, T, K\)"),
    (lambda a: dict(a, weight=a["weight"][:64], bias=a["bias"][:64]), ValueError, "has no q columns"),
])
def test_kv_bad_input(change, error, match):
    if DEVICE != "cpu":
        pytest.skip("the inputs are built on the CPU")
    x, weight, kw, k_cache, v_cache, positions = _kv_inputs(2, 2, torch.float32, False, False)
    args = change(dict(x=x, weight=weight, k_cache=k_cache, v_cache=v_cache, positions=positions, **kw))
    with pytest.raises(error, match=match):
        skinny_linear_kv(**args)


def test_registered_ops_fake_and_no_backward():
    args = _args()
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) for k, v in args.items()}
        y = torch.ops.gptfast.skinny_linear(fake["x"], fake["weight"], fake["bias"], None, fake["ln_weight"],
                                            fake["ln_bias"], fake["residual"], 1e-5, True)
        assert y.shape == (2, 8) and y.dtype == torch.float32
        x, weight, kw, k_cache, v_cache, positions = (mode.from_tensor(t) if isinstance(t, torch.Tensor) else t
                                                      for t in _kv_inputs(2, 2, torch.float32, False, False))
        q = torch.ops.gptfast.skinny_linear_kv(x, weight, None, k_cache, v_cache, positions, None, None, None, 1e-5)
        assert q.shape == (2, 2, 32)
    args["x"].requires_grad_(True)
    with pytest.raises(RuntimeError, match="inference-only"):
        skinny_linear(activation="gelu", **args).sum().backward()


def test_static_configs_listed():
    from gptfast.kernels._registry import KERNEL_MODULES

    assert "skinny_linear" in KERNEL_MODULES
    configs = kernel().static_configs()
    names = [c["name"] for c in configs]
    assert len(names) == len(set(names)) == 8
    assert {c["constexprs"]["QUANTIZED"] for c in configs} == {False, True}
    assert not any(c["require_hgmma"] for c in configs)
    assert all(cfgs[0] == kernel().builtin_config(1) for cfgs in kernel().CANDIDATES["fwd"].values())


@needs_triton
def test_opcheck():
    x, weight, kw = make(2, 12, 8, torch.float32, ln=True, residual=True)
    args = (x, weight, kw["bias"], None, kw["ln_weight"], kw["ln_bias"], kw["residual"], 1e-5, True)
    torch.library.opcheck(torch.ops.gptfast.skinny_linear.default, args)
    x, weight, kw, k_cache, v_cache, positions = _kv_inputs(2, 1, torch.float32, False, False)
    torch.library.opcheck(torch.ops.gptfast.skinny_linear_kv.default,
                          (x, weight, kw["bias"], k_cache, v_cache, positions, None, None, None, 1e-5))
