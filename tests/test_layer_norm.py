"""Fused layernorm (gptfast.ops.layer_norm, kernels/layer_norm.py, gptfast.nn.LayerNorm)
against float64, the reference twin and plain PyTorch, forward and backward.

On the CPU the kernels run under the Triton interpreter (fp32 and fp16, small shapes);
bf16 and CUDA-graph capture run on CUDA only. Every buffer the launchers allocate is
filled with NaN first (see ``poisoned_buffers``), so a finite result proves each element
was written.
"""
import functools
import importlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gptfast import reference
from gptfast.nn import LayerNorm
from gptfast.ops import _dispatch
layernorm_op = importlib.import_module("gptfast.ops.layer_norm")
from gptfast.ops.layer_norm import layer_norm
from gptfast.testing import assert_error_ratio, max_abs_error, poison_, poisoned_kernel_outputs, randn

ln_kernels = pytest.importorskip("gptfast.kernels.layer_norm")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# The interpreter cannot do bf16 faithfully; the GPU covers it.
DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if DEVICE.type == "cuda" else ())


@pytest.fixture(autouse=True)
def poisoned_buffers():
    """Every output / scratch buffer of the launchers starts as NaN."""
    with poisoned_kernel_outputs():
        yield


_randn = functools.partial(randn, device=DEVICE)  # gptfast.testing.randn on this file's device


def _view(kind: str, shape, dtype, seed):
    """A tensor of ``shape`` laid out as ``kind``: contiguous or one of three non-contiguous views."""
    if kind == "contiguous":
        return _randn(*shape, dtype=dtype, seed=seed)
    if kind == "transposed":  # leading dims swapped: rows cannot be one strided matrix, so they are copied
        return _randn(shape[1], shape[0], *shape[2:], dtype=dtype, seed=seed).transpose(0, 1)
    if kind == "row_slice":  # a slice of wider rows: read in place with a row stride
        return _randn(*shape[:-1], shape[-1] + 37, dtype=dtype, seed=seed)[..., 5:5 + shape[-1]]
    if kind == "strided_hidden":  # every other element of the hidden dimension
        return _randn(*shape[:-1], 2 * shape[-1], dtype=dtype, seed=seed)[..., ::2]
    raise ValueError(kind)


def _forward_and_grads(fn, x, weight, bias, residual, grad_y, grad_h, eps=1e-5):
    """Outputs of ``fn`` and the gradients of every tensor input, on fresh leaves keeping the inputs' strides.

    Returns a dict: y, (h,) dx, (dresidual,) dweight, dbias for the inputs that are given.
    """
    leaves = {name: t.detach().requires_grad_() for name, t in
              (("x", x), ("weight", weight), ("bias", bias), ("residual", residual)) if t is not None}
    out = fn(leaves["x"], leaves.get("weight"), leaves.get("bias"), eps, residual=leaves.get("residual"))
    y, h = (out, None) if residual is None else out
    loss = (y.float() * grad_y.float()).sum()
    if h is not None and grad_h is not None:
        loss = loss + (h.float() * grad_h.float()).sum()
    loss.backward()
    result = {"y": y.detach()}
    if h is not None:
        result["h"] = h.detach()
    result.update({f"d{name}": t.grad for name, t in leaves.items()})
    return result


def _plain_torch(x, weight, bias, eps, residual=None):
    """What a PyTorch user writes, in the inputs' dtype."""
    h = x if residual is None else x + residual
    y = F.layer_norm(h, h.shape[-1:], weight, bias, eps)
    return y if residual is None else (y, h)


def check_layer_norm(x, weight, bias, residual=None, grad_h=True, max_ratio=3.0, seed=100):
    """The error-ratio rule for y (h) and every gradient, fused vs float64 relative to plain
    PyTorch in the same dtype; plus closeness to the reference twin run in that dtype."""
    assert _dispatch.use_triton(x), "the Triton path must serve this test"
    grad_y = _randn(*x.shape, dtype=x.dtype, seed=seed)
    grad_h = _randn(*x.shape, dtype=x.dtype, seed=seed + 1) if residual is not None and grad_h else None
    args = (x, weight, bias, residual, grad_y, grad_h)
    fused = _forward_and_grads(layer_norm, *args)
    plain = _forward_and_grads(_plain_torch, *args)
    twin = _forward_and_grads(reference.layer_norm, *args)
    double = lambda t: None if t is None else t.double()  # noqa: E731
    exact = _forward_and_grads(reference.layer_norm, *(double(t) for t in args))
    what = f"{x.dtype} x{tuple(x.shape)} stride{x.stride()} residual={residual is not None}"
    assert fused.keys() == exact.keys()
    for name, value in fused.items():
        like = {"y": x, "h": x, "dx": x, "dresidual": residual, "dweight": weight, "dbias": bias}[name]
        assert value.shape == like.shape and value.dtype == like.dtype, f"{name}: {value.dtype} {tuple(value.shape)}"
        assert torch.isfinite(value).all(), f"{name} has NaN/inf (an unwritten poisoned element?) {what}"
        assert_error_ratio(value, plain[name], exact[name], max_ratio=max_ratio, what=f"{name} {what}")
        # Fused and twin may each be off the exact answer by their own rounding (ill-conditioned
        # rows make the twin's own error dominate), hence the twin's error in the tolerance.
        tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 8e-2}[x.dtype]
        atol = tol * max(1.0, twin[name].abs().max().item()) + max_abs_error(twin[name], exact[name])
        torch.testing.assert_close(value, twin[name], atol=atol, rtol=tol,
                                   msg=lambda m: f"{name} vs reference twin {what}: {m}")
    return fused


def _params(hidden, dtype, seed=10):
    return _randn(hidden, dtype=dtype, seed=seed, scale=0.5, shift=1.0), _randn(hidden, dtype=dtype, seed=seed + 1)


# ----------------------------------------------------------------------------- numerics

# A covering set: one row, 3x7x1000 (hidden not a power of two, rows spread over a 3-D
# leading shape), GPT-2's 768 and 1600, and three kinds of non-contiguous input.
@pytest.mark.parametrize(
    "shape,kind,dtype",
    [
        ((1, 768), "contiguous", torch.float32),
        ((1, 768), "contiguous", torch.float16),
        ((3, 7, 1000), "contiguous", torch.float32),
        ((3, 7, 1000), "contiguous", torch.float16),
        ((4, 1600), "contiguous", torch.float16),
        ((5, 3, 768), "transposed", torch.float32),
        ((6, 768), "row_slice", torch.float16),
        ((2, 3, 100), "strided_hidden", torch.float32),
        # 45 narrow rows: several rows a program (step), and a backward program owning fewer.
        ((5, 9, 100), "contiguous", torch.float16),
    ],
)
def test_matches_float64(shape, kind, dtype):
    x = _view(kind, shape, dtype, seed=1)
    weight, bias = _params(shape[-1], dtype)
    check_layer_norm(x, weight, bias)


@pytest.mark.parametrize(
    "shape,dtype,kind",
    [
        ((3, 7, 1000), torch.float32, "contiguous"),
        ((3, 7, 1000), torch.float16, "contiguous"),
        ((1, 768), torch.float16, "contiguous"),
        ((4, 1600), torch.float32, "row_slice"),
    ],
)
def test_residual_variant_matches_float64(shape, dtype, kind):
    x = _view(kind, shape, dtype, seed=2)
    residual = _view("transposed" if len(shape) == 3 else "contiguous", shape, dtype, seed=3)
    weight, bias = _params(shape[-1], dtype)
    fused = check_layer_norm(x, weight, bias, residual=residual)
    # h is exactly the input-dtype sum, and x and residual get the same gradient.
    torch.testing.assert_close(fused["h"], x + residual, rtol=0, atol=0)
    torch.testing.assert_close(fused["dx"], fused["dresidual"], rtol=0, atol=0)


def test_one_process_serves_changing_specialisations_in_sequence():
    """The eager fast path caches per specialisation (gptfast.kernels._common.launch, the
    config lookups): aligned then misaligned pointers, row strides that are and are not
    multiples of 16, dtype changes and widths crossing block sizes, one after another in
    one process, each still right. (On CUDA this exercises the cached compiled launchers.)"""
    hidden = 48
    base = _randn(9, hidden + 16, dtype=torch.float32, seed=3)
    sequence = [
        base[:, :hidden],  # aligned, row stride 64
        base[:, 1:hidden + 1],  # pointer 4 bytes off, same row stride
        base[:, :hidden].contiguous(),  # aligned, row stride 48
        _randn(9, hidden + 5, dtype=torch.float32, seed=4)[:, :hidden],  # row stride 53
        base[:, :hidden].half(),  # dtype change
        base[:, :hidden],  # back to the first specialisation
        _randn(9, 16, dtype=torch.float32, seed=5),  # block 16
        _randn(9, 17, dtype=torch.float32, seed=6),  # block 32
        _randn(9, 33, dtype=torch.float32, seed=7),  # block 64
    ]
    for x in sequence:
        check_layer_norm(x, *_params(x.shape[-1], x.dtype), residual=x.flip(0) if x.shape[-1] == hidden else None)


def test_residual_variant_with_unused_h():
    """Only y reaches the loss: h's incoming gradient is zero."""
    x, residual = _randn(5, 64, seed=4), _randn(5, 64, seed=5)
    weight, bias = _params(64, torch.float32)
    check_layer_norm(x, weight, bias, residual=residual, grad_h=False)


@pytest.mark.parametrize("has_weight,has_bias", [(False, False), (True, False), (False, True)])
def test_optional_weight_and_bias(has_weight, has_bias):
    x = _randn(3, 5, 100, seed=6)
    weight, bias = _params(100, torch.float32)
    check_layer_norm(x, weight if has_weight else None, bias if has_bias else None)


def test_strided_parameters():
    """weight every other element of a buffer, bias at an odd offset: both read correctly."""
    x = _randn(3, 5, 100, seed=41)
    weight = _randn(200, seed=42, scale=0.5, shift=1.0)[::2]
    bias = _randn(103, seed=43)[3:]
    assert not weight.is_contiguous() and bias.data_ptr() % 16
    check_layer_norm(x, weight, bias)


def test_mixed_parameter_dtype():
    """float32 parameters with float16 activations (autocast-style training): y stays float16,
    the parameter gradients come back in float32."""
    x = _randn(4, 7, 64, dtype=torch.float16, seed=7)
    weight, bias = _params(64, torch.float32)
    grad_y = _randn(4, 7, 64, dtype=torch.float16, seed=8)
    fused = _forward_and_grads(layer_norm, x, weight, bias, None, grad_y, None)
    exact = _forward_and_grads(reference.layer_norm, x.double(), weight.double(), bias.double(), None,
                               grad_y.double(), None)
    assert fused["y"].dtype == torch.float16 and fused["dx"].dtype == torch.float16
    assert fused["dweight"].dtype == torch.float32 and fused["dbias"].dtype == torch.float32
    for name in fused:
        torch.testing.assert_close(fused[name].double(), exact[name], atol=2e-2, rtol=1e-2)


def test_large_mean_small_variance():
    """Rows far from zero with a small spread: the two-pass variance keeps its precision."""
    x = _randn(4, 256, seed=9, scale=1e-2, shift=300.0)
    weight, bias = _params(256, torch.float32)
    check_layer_norm(x, weight, bias)


@pytest.mark.parametrize("hidden,shift", [(256, 300.0), (1000, 1e4)])
def test_far_from_zero_rows_keep_their_digits(hidden, shift):
    """Rows far from zero with a spread of 1e-2, fp32: the statistics taken about a pivot
    (the forward) and corrected about the saved mean (the backward) keep y, dx and dweight
    far more accurate than plain PyTorch on the CPU, which folds the mean into a bias. On
    CUDA, PyTorch's (Welford) layer norm is much better than on the CPU, and statistics
    summed from the raw values failed test_large_mean_small_variance's rule there; under
    the interpreter those unshifted sums reach 0.4 to 0.9 of plain PyTorch's CPU error here
    and fail this test's 0.1 bound (dbias does not depend on the statistics)."""
    x = _randn(4, hidden, seed=9, scale=1e-2, shift=shift)
    weight, bias = _params(hidden, torch.float32)
    check_layer_norm(x, weight, bias)
    grad_y = _randn(4, hidden, seed=100)
    args = (x, weight, bias, None, grad_y, None)
    fused = _forward_and_grads(layer_norm, *args)
    plain = _forward_and_grads(_plain_torch, *args)
    exact = _forward_and_grads(reference.layer_norm, *(None if t is None else t.double() for t in args))
    for name in ("y", "dx", "dweight"):
        assert_error_ratio(fused[name], plain[name], exact[name], max_ratio=0.1, what=f"{name} shift {shift}")


def test_broadcast_upstream_gradient():
    """y.sum().backward() hands the backward an expanded (stride-0) gradient."""
    x = _randn(3, 96, seed=11)
    weight, bias = _params(96, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    layer_norm(*leaves).sum().backward()
    exact = [t.double().requires_grad_() for t in (x, weight, bias)]
    reference.layer_norm(*exact).sum().backward()
    for got, want in zip(leaves, exact):
        torch.testing.assert_close(got.grad.double(), want.grad, atol=1e-4, rtol=1e-4)


def test_wide_misaligned_rows_are_realigned():
    """Rows above MAX_HIDDEN_UNALIGNED are compiled only for 16-aligned data: a misaligned
    view is copied to an aligned tensor first, and the answer is unchanged."""
    hidden = ln_kernels.MAX_HIDDEN_UNALIGNED + 16
    x = _randn(2, hidden + 1, seed=12)[:, 1:]  # data pointer 4 bytes past alignment
    assert x.data_ptr() % 16 != 0
    weight, bias = _params(hidden, torch.float32)
    check_layer_norm(x, weight, bias)


def test_no_rows():
    x = torch.zeros(0, 4, 32, device=DEVICE, requires_grad=True)
    weight, bias = [t.requires_grad_() for t in _params(32, torch.float32)]
    y = layer_norm(x, weight, bias)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(weight.grad, torch.zeros_like(weight))
    assert torch.equal(bias.grad, torch.zeros_like(bias))


def test_launchers_fill_prepoisoned_out_buffers():
    """The launchers write every element of caller-provided output buffers."""
    x, residual = _randn(9, 200, seed=13), _randn(9, 200, seed=14)
    weight, bias = _params(200, torch.float32)
    bufs = {name: poison_(torch.empty(shape, device=DEVICE)) for name, shape in
            (("out", (9, 200)), ("h_out", (9, 200)), ("mean_out", (9,)), ("rstd_out", (9,)))}
    y, h, mean, rstd = ln_kernels.layer_norm_fwd(x, weight, bias, 1e-5, residual=residual, **bufs)
    assert y is bufs["out"] and h is bufs["h_out"] and mean is bufs["mean_out"] and rstd is bufs["rstd_out"]
    want_y, want_h = reference.layer_norm(x, weight, bias, 1e-5, residual=residual)
    torch.testing.assert_close(y, want_y)
    torch.testing.assert_close(h, want_h, rtol=0, atol=0)
    torch.testing.assert_close(mean, want_h.mean(-1))
    torch.testing.assert_close(rstd, torch.rsqrt(want_h.var(-1, unbiased=False) + 1e-5))

    dy = _randn(9, 200, seed=15)
    dx_out = poison_(torch.empty(9, 200, device=DEVICE))
    dx, dw, db = ln_kernels.layer_norm_bwd(dy, h, weight, mean, rstd, dx_out=dx_out)
    assert dx is dx_out
    leaves = [t.double().requires_grad_() for t in (want_h, weight, bias)]
    reference.layer_norm(*leaves).backward(dy.double())
    for got, leaf in zip((dx, dw, db), leaves):
        torch.testing.assert_close(got.double(), leaf.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("residual", [False, True])
def test_inference_forward_skips_the_statistics(residual):
    """Without gradients the forward neither allocates nor writes mean and rstd, and
    writes the same y (and h) bits as the forward that stores them."""
    x, res = _randn(5, 3, 96, seed=17), (_randn(5, 3, 96, seed=18) if residual else None)
    weight, bias = _params(96, torch.float32)
    rows = x.reshape(-1, 96)
    with poisoned_kernel_outputs():
        y, h, mean, rstd = ln_kernels.layer_norm_fwd(rows, weight, bias, 1e-5, None if res is None else
                                                     res.reshape(-1, 96), store_stats=False)
        want = ln_kernels.layer_norm_fwd(rows, weight, bias, 1e-5, None if res is None else res.reshape(-1, 96))
        with torch.no_grad():
            public = layer_norm(x, weight, bias, residual=res)
    assert mean is None and rstd is None
    assert torch.equal(y, want[0]) and (h is None if res is None else torch.equal(h, want[1]))
    public = (public,) if res is None else public
    assert torch.equal(public[0], y.view(x.shape)) and (res is None or torch.equal(public[1], h.view(x.shape)))
    for buffer in ("mean_out", "rstd_out"):  # a statistics buffer would stay unwritten: refused
        with pytest.raises(ValueError, match="with store_stats=False, which writes no statistics"):
            ln_kernels.layer_norm_fwd(rows, weight, bias, 1e-5, store_stats=False,
                                      **{buffer: torch.empty(rows.shape[0], device=rows.device)})


def test_launcher_rejects_wrong_out_buffer():
    x = _randn(3, 64, seed=16)
    with pytest.raises(ValueError, match="out must have shape"):
        ln_kernels.layer_norm_fwd(x, None, None, 1e-5, out=torch.empty(3, 65, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous along its last dimension"):
        ln_kernels.layer_norm_fwd(x, None, None, 1e-5, out=torch.empty(64, 3, device=DEVICE).t())


# ----------------------------------------------------------------------------- torch path


def test_torch_path_matches_reference(monkeypatch):
    """Off the Triton path (a CPU without the interpreter) the op is F.layer_norm, with the
    same results and the same return structure."""
    monkeypatch.setattr(layernorm_op, "use_triton", lambda t: False)
    x, residual = _randn(2, 3, 48, seed=17), _randn(2, 3, 48, seed=18)
    weight, bias = _params(48, torch.float32)
    torch.testing.assert_close(layer_norm(x, weight, bias), reference.layer_norm(x, weight, bias))
    y, h = layer_norm(x, weight, bias, residual=residual)
    want_y, want_h = reference.layer_norm(x, weight, bias, residual=residual)
    torch.testing.assert_close(y, want_y)
    torch.testing.assert_close(h, want_h)
    # float16 parameters with float32 activations are cast to x's dtype there too.
    torch.testing.assert_close(layer_norm(x, weight.half(), None), reference.layer_norm(x, weight.half().float(), None))


def test_float64_takes_the_torch_path():
    x = _randn(3, 40, dtype=torch.float64, seed=19)
    weight, bias = _params(40, torch.float64)
    torch.testing.assert_close(layer_norm(x, weight, bias), reference.layer_norm(x, weight, bias), rtol=1e-12,
                               atol=1e-12)


# ----------------------------------------------------------------------------- bad input


def _bad_case(case):
    x = _randn(2, 3, 64, seed=20)
    weight, bias = _params(64, torch.float32)
    kwargs = dict(x=x, weight=weight, bias=bias, eps=1e-5, residual=None)
    if case == "integer x":
        kwargs["x"] = torch.ones(2, 64, dtype=torch.int32, device=DEVICE)
    elif case == "x not a tensor":
        kwargs["x"] = [[1.0] * 64]
    elif case == "0-d x":
        kwargs.update(x=torch.tensor(1.0, device=DEVICE), weight=None, bias=None)
    elif case == "empty hidden":
        kwargs.update(x=torch.zeros(2, 0, device=DEVICE), weight=None, bias=None)
    elif case == "weight shape":
        kwargs["weight"] = _randn(63, seed=21)
    elif case == "bias shape":
        kwargs["bias"] = _randn(1, 64, seed=21)
    elif case == "integer weight":
        kwargs["weight"] = torch.ones(64, dtype=torch.int64, device=DEVICE)
    elif case == "weight on another device":
        kwargs["weight"] = torch.ones(64, device="meta")
    elif case == "residual on another device":
        kwargs["residual"] = torch.ones(2, 3, 64, device="meta")
    elif case == "residual shape":
        kwargs["residual"] = _randn(2, 1, 64, seed=22)
    elif case == "residual dtype":
        kwargs["residual"] = _randn(2, 3, 64, dtype=torch.float16, seed=22)
    elif case == "negative eps":
        kwargs["eps"] = -1e-5
    elif case == "nan eps":
        kwargs["eps"] = float("nan")
    elif case == "hidden too wide":
        kwargs.update(x=torch.zeros(1, ln_kernels.MAX_HIDDEN + 1, device=DEVICE), weight=None, bias=None)
    elif case == "wide hidden not a multiple of 16":
        kwargs.update(x=torch.zeros(1, ln_kernels.MAX_HIDDEN_UNALIGNED + 4, device=DEVICE), weight=None, bias=None)
    return kwargs


@pytest.mark.parametrize(
    "case,error,match",
    [
        ("integer x", TypeError, "x has dtype torch.int32"),
        ("x not a tensor", TypeError, "x must be a torch.Tensor"),
        ("0-d x", ValueError, "non-empty last"),
        ("empty hidden", ValueError, "non-empty last"),
        ("weight shape", ValueError, r"weight must have shape \(64,\)"),
        ("bias shape", ValueError, r"bias must have shape \(64,\)"),
        ("integer weight", TypeError, "weight has dtype torch.int64"),
        ("weight on another device", ValueError, "weight is on meta"),
        ("residual on another device", ValueError, "residual is on meta"),
        ("residual shape", ValueError, "residual must have x's shape"),
        ("residual dtype", TypeError, "residual has dtype torch.float16"),
        ("negative eps", ValueError, "eps must be a finite number"),
        ("nan eps", ValueError, "eps must be a finite number"),
        ("hidden too wide", ValueError, "exceeds the fused kernel's maximum"),
        ("wide hidden not a multiple of 16", ValueError, "not a multiple of 16"),
    ],
)
def test_bad_input_raises_clear_error(case, error, match):
    kwargs = _bad_case(case)
    with pytest.raises(error, match=match):
        layer_norm(kwargs.pop("x"), **kwargs)


# ----------------------------------------------------------------------------- registration


def test_opcheck_registered_ops():
    x, residual = _randn(2, 3, 16, seed=23), _randn(2, 3, 16, seed=24)
    weight, bias = _params(16, torch.float32)
    leaf = lambda t: t.clone().requires_grad_()  # noqa: E731
    cases = [
        (layernorm_op._layer_norm_fwd, (leaf(x), leaf(weight), leaf(bias), 1e-5)),
        (layernorm_op._layer_norm_fwd, (x, None, None, 1e-5)),
        (layernorm_op._add_layer_norm_fwd, (leaf(x), leaf(residual), leaf(weight), None, 1e-5)),
    ]
    _, mean, rstd = layernorm_op._layer_norm_fwd(x, weight, bias, 1e-5)
    dy = _randn(2, 3, 16, seed=25)
    cases += [
        (layernorm_op._layer_norm_bwd, (dy, residual, x, weight, mean, rstd, True, True)),
        (layernorm_op._layer_norm_bwd, (dy, None, x, None, mean, rstd, False, True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_forward_and_backward():
    """One graph for a residual layernorm followed by a plain one, forward and backward
    (aot_eager: Dynamo + AOTAutograd over the fake and autograd registrations, without
    Inductor's slow C++ codegen on a CPU)."""

    def block(x, residual, weight, bias):
        y, h = layer_norm(x, weight, bias, residual=residual)
        return layer_norm(y * 2.0, weight, None) + h

    inputs = [_randn(2, 5, 32, seed=26), _randn(2, 5, 32, seed=27), *_params(32, torch.float32)]
    eager_leaves = [t.clone().requires_grad_() for t in inputs]
    compiled_leaves = [t.clone().requires_grad_() for t in inputs]
    want = block(*eager_leaves)
    got = torch.compile(block, fullgraph=True, backend="aot_eager")(*compiled_leaves)
    grad = _randn(2, 5, 32, seed=28)
    want.backward(grad)
    got.backward(grad)
    torch.testing.assert_close(got, want)
    for g, w in zip(compiled_leaves, eager_leaves):
        torch.testing.assert_close(g.grad, w.grad)


def test_importing_ops_and_nn_does_not_import_triton():
    code = "import sys, gptfast.ops, gptfast.nn, gptfast.ops.layer_norm; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, TRITON_INTERPRET="0"),
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ----------------------------------------------------------------------------- gptfast.nn.LayerNorm


def test_nn_layernorm_is_a_drop_in():
    ours, theirs = LayerNorm(48, eps=1e-6), torch.nn.LayerNorm(48, eps=1e-6)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    with torch.no_grad():
        theirs.weight.copy_(_randn(48, seed=29))
        theirs.bias.copy_(_randn(48, seed=30))
    ours.load_state_dict(theirs.state_dict())
    ours, theirs = ours.to(DEVICE), theirs.to(DEVICE)
    x = _randn(3, 48, seed=31)
    torch.testing.assert_close(ours(x), theirs(x))
    y, h = ours(x, residual=x)
    torch.testing.assert_close(h, x + x)
    torch.testing.assert_close(y, theirs(x + x))
    assert repr(ours).startswith("LayerNorm((48,), eps=1e-06, elementwise_affine=True")


@pytest.mark.parametrize("kwargs", [{"bias": False}, {"elementwise_affine": False}])
def test_nn_layernorm_without_parameters_matches_torch(kwargs):
    ours, theirs = LayerNorm(32, **kwargs).to(DEVICE), torch.nn.LayerNorm(32, **kwargs).to(DEVICE)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = _randn(4, 32, seed=32)
    torch.testing.assert_close(ours(x), theirs(x))


def test_nn_layernorm_multi_dim_normalized_shape():
    ours, theirs = LayerNorm((4, 8)).to(DEVICE), torch.nn.LayerNorm((4, 8)).to(DEVICE)
    with torch.no_grad():
        theirs.weight.copy_(_randn(4, 8, seed=33))
    ours.load_state_dict(theirs.state_dict())
    x = _randn(3, 4, 8, seed=34)
    torch.testing.assert_close(ours(x), theirs(x))
    with pytest.raises(ValueError, match="does not end in normalized_shape"):
        ours(_randn(3, 8, 4, seed=35))


# ----------------------------------------------------------------------------- CUDA only


@requires_cuda
@pytest.mark.parametrize("hidden", [768, 1000, 1600, 4096, 8192])
def test_cuda_bf16_and_wide_rows(hidden):
    x, residual = _randn(64, 3, hidden, dtype=torch.bfloat16, seed=36), _randn(64, 3, hidden, dtype=torch.bfloat16,
                                                                                 seed=37)
    weight, bias = _params(hidden, torch.bfloat16)
    check_layer_norm(x, weight, bias)
    check_layer_norm(x, weight, bias, residual=residual)


@requires_cuda
def test_cuda_graph_capture():
    x, residual = _randn(8, 768, seed=38), _randn(8, 768, seed=39)
    weight, bias = _params(768, torch.float32)
    layer_norm(x, weight, bias, residual=residual)  # compile the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, h = layer_norm(x, weight, bias, residual=residual)
    x.copy_(_randn(8, 768, seed=40))
    graph.replay()
    want_y, want_h = reference.layer_norm(x, weight, bias, residual=residual)
    torch.testing.assert_close(y, want_y)
    torch.testing.assert_close(h, want_h)
