"""Fused linear + cross-entropy (gptfast.ops.linear_cross_entropy, kernels/linear_cross_entropy.py)
against float64, the reference twin and plain PyTorch, loss and gradients, by the
error-ratio rule; awkward shapes (vocabulary not a multiple of the kernel's step, one
row, several chunks, non-contiguous hidden), all targets ignored, autocast, bad input,
registration (opcheck, fake, torch.compile fullgraph) and the memory bound (no buffer of
all the logits).

On the CPU the kernel runs under the Triton interpreter (fp32 and fp16, small shapes);
without it the op runs the same chunked loop with the row step in PyTorch, tested here
too. Every buffer the launchers allocate is filled with NaN first.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from gptfast import reference
from gptfast.ops import _dispatch, torch_path
from gptfast.ops.linear_cross_entropy import default_chunk_rows, linear_cross_entropy
from gptfast.testing import assert_error_ratio, poisoned_kernel_outputs, randn

op_module = importlib.import_module("gptfast.ops.linear_cross_entropy")
kernel = pytest.importorskip("gptfast.kernels.linear_cross_entropy")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON_HERE = _dispatch.use_triton(torch.empty(0, device=DEVICE))
needs_triton = pytest.mark.skipif(not TRITON_HERE, reason="Triton (or its CPU interpreter) not available")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if DEVICE.type == "cuda" else ())


@pytest.fixture(autouse=True)
def poisoned_buffers():
    with poisoned_kernel_outputs():
        yield


def make(rows, vocab, width, dtype=torch.float32, seed=0, ignore_every=4, strided=False):
    g = torch.Generator().manual_seed(seed)
    if strided:  # every other column of a wider buffer
        hidden = randn(rows, 2 * width, dtype=dtype, device=DEVICE, generator=g)[:, ::2]
    else:
        hidden = randn(rows, width, dtype=dtype, device=DEVICE, generator=g)
    weight = randn(vocab, width, dtype=dtype, device=DEVICE, generator=g, scale=width ** -0.5)
    targets = torch.randint(0, vocab, (rows,), generator=g).to(DEVICE)
    if ignore_every:
        targets[1::ignore_every] = -100
    return hidden, weight, targets


def loss_and_grads(fn, hidden, weight, targets, dtype=None, grad_loss=1.3):
    """fn's loss and the gradients of hidden and weight, on fresh leaves (strides kept unless cast)."""
    h = (hidden.detach().to(dtype) if dtype else hidden.detach()).requires_grad_(True)
    w = (weight.detach().to(dtype) if dtype else weight.detach().clone()).requires_grad_(True)
    loss = fn(h, w, targets)
    dh, dw = torch.autograd.grad(loss, (h, w), torch.tensor(grad_loss, dtype=loss.dtype, device=loss.device))
    return loss.detach(), dh, dw


def check(hidden, weight, targets, **op_kwargs):
    """Fused against plain PyTorch (the twin) in the same dtype and float64: loss, dhidden, dweight."""
    fused = loss_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, **op_kwargs), hidden, weight, targets)
    plain = loss_and_grads(reference.linear_cross_entropy, hidden, weight, targets)
    exact = loss_and_grads(reference.linear_cross_entropy, hidden, weight, targets, dtype=torch.float64)
    assert fused[0].dtype == (torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    assert fused[1].dtype == hidden.dtype and fused[2].dtype == weight.dtype
    for name, f, p, e in zip(("loss", "dhidden", "dweight"), fused, plain, exact):
        assert f.shape == e.shape, name
        assert_error_ratio(f, p, e, what=f"{name} {tuple(hidden.shape)} V={weight.shape[0]} {hidden.dtype}")
    return fused


# ----------------------------------------------------------------------------- numerics


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,vocab,width,chunk", [
    # one row; 64 wide: the op rounds d(logits) before the loss's gradient scales them,
    # PyTorch after, so over the 16 values of a narrower row the max error is a noisy draw
    (1, 77, 64, None),
    (37, 301, 24, 8),  # several chunks, the last one short; vocabulary odd
    (20, 4100, 32, 7),  # vocabulary just past the kernel's step (4096): two steps, the second of 4
    (16, 16, 16, None),  # exactly one step
])
def test_matches_float64(dtype, rows, vocab, width, chunk):
    check(*make(rows, vocab, width, dtype), chunk_rows=chunk)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_and_batched_hidden(dtype):
    hidden, weight, targets = make(12, 90, 20, dtype, strided=True)
    assert not hidden.is_contiguous()
    check(hidden, weight, targets, chunk_rows=5)
    # (B, T, C) with (B, T) targets: the same as the flattened rows
    batched = check(hidden.reshape(3, 4, 20), weight, targets.reshape(3, 4))
    flat = loss_and_grads(linear_cross_entropy, hidden, weight, targets)
    torch.testing.assert_close(batched[0], flat[0])
    torch.testing.assert_close(batched[1].reshape(12, 20), flat[1])


@pytest.mark.parametrize("triton", [pytest.param(True, marks=needs_triton), False])
def test_all_targets_ignored_gives_zero_loss_and_zero_grads(triton, monkeypatch):
    if not triton:
        monkeypatch.setattr(op_module, "use_triton", lambda t: False)
    hidden, weight, targets = make(9, 50, 16)
    targets.fill_(-100)
    loss, dh, dw = loss_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_rows=4), hidden, weight, targets)
    assert loss.item() == 0.0 and not dh.any() and not dw.any()
    # what the training loop's loss gives (gptfast.model: the sum over a count clamped to 1)
    assert torch_path.linear_cross_entropy(hidden, weight, targets).item() == 0.0
    assert torch.isnan(F.cross_entropy(hidden @ weight.t(), targets))  # F's own mean would be NaN


def test_custom_ignore_index_and_int32_targets():
    hidden, weight, targets = make(10, 40, 16, ignore_every=0)
    targets[::3] = 7
    fused = linear_cross_entropy(hidden, weight, targets.int(), ignore_index=7)
    want = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=7)
    torch.testing.assert_close(fused, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_torch_row_step_matches_float64(dtype, monkeypatch):
    """Without Triton (a CPU without the interpreter, float64) the op runs its chunked loop
    with the row step in PyTorch: still chunked, still judged by the same rule."""
    monkeypatch.setattr(op_module, "use_triton", lambda t: False)
    if dtype == torch.float64:  # float64 is its own exact answer: compare with F.cross_entropy
        hidden, weight, targets = make(23, 130, 24, dtype)
        fused = loss_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_rows=6), hidden, weight, targets)
        plain = loss_and_grads(torch_path.linear_cross_entropy, hidden, weight, targets)
        for f, p in zip(fused, plain):
            torch.testing.assert_close(f, p, rtol=1e-12, atol=1e-14)
        return
    check(*make(23, 130, 24, dtype), chunk_rows=6)


@needs_triton
def test_kernel_writes_loss_and_gradient_rows():
    """The row kernel alone: per-row loss, the gradient over the logits in place, NaN for a
    target outside the vocabulary, zeros for an ignored row, scaled by 1 / count."""
    g = torch.Generator().manual_seed(5)
    logits = randn(5, 100, generator=g, device=DEVICE, scale=3.0)
    targets = torch.tensor([3, -100, 100, 0, 99], device=DEVICE)
    count = torch.tensor([7], device=DEVICE)  # the whole batch's count, not these rows'
    loss = torch.full((5,), float("nan"), device=DEVICE)
    grad = logits.clone()
    kernel.cross_entropy_rows_(grad, targets, count, loss, -100, True)
    x = logits.double().requires_grad_(True)
    safe = targets.clamp(0, 99)
    want = F.cross_entropy(x, safe, reduction="none")
    (want.sum() / 7).backward()
    for row in (0, 3, 4):
        torch.testing.assert_close(loss[row].double(), want[row].detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad[row].double(), x.grad[row], rtol=1e-5, atol=1e-7)
    assert loss[1] == 0 and not grad[1].any()
    assert torch.isnan(loss[2]) and torch.isnan(grad[2]).all()
    loss_only = logits.clone()
    kernel.cross_entropy_rows_(loss_only, targets, count, loss, -100, False)
    assert torch.equal(loss_only, logits)  # without the gradient pass the logits stay


# ----------------------------------------------------------------------------- memory and chunks


def test_chunks_bound_the_logits_buffer(monkeypatch):
    """No tensor of all the logits: every buffer the op allocates for logits has at most
    chunk_rows rows, and the rows are walked chunk by chunk."""
    hidden, weight, targets = make(50, 64, 16)
    seen = []
    real = op_module._rows_

    def spy(logits, *args):
        seen.append(tuple(logits.shape))
        return real(logits, *args)

    monkeypatch.setattr(op_module, "_rows_", spy)
    check(hidden, weight, targets, chunk_rows=16)
    assert seen == [(16, 64), (16, 64), (16, 64), (2, 64)]


def test_default_chunk_rows():
    assert default_chunk_rows(8192, 50257, 2) * 50257 * 2 <= op_module.CHUNK_BYTES
    assert default_chunk_rows(8192, 50257, 2) % 16 == 0
    assert default_chunk_rows(3, 50257, 4) == 3
    assert default_chunk_rows(10, 10**9, 4) == 1


def test_no_gradients_computed_without_grad(monkeypatch):
    hidden, weight, targets = make(8, 30, 16)
    calls = []
    monkeypatch.setattr(op_module, "_rows_", lambda *a: calls.append(a[-1]) or op_module._rows_torch_(*a))
    with torch.no_grad():
        loss = linear_cross_entropy(hidden.requires_grad_(), weight, targets)
    torch.testing.assert_close(loss, torch_path.linear_cross_entropy(hidden, weight, targets))
    assert calls == [False]  # the loss-only pass: no gradient written, no gradient matmuls


def test_only_the_needed_gradient(monkeypatch):
    """A frozen weight: only d hidden is computed (the weight's matmul is skipped)."""
    hidden, weight, targets = make(8, 30, 16)
    flags = []
    real = op_module._forward
    monkeypatch.setattr(op_module, "_forward", lambda *a: flags.append(a[-2:]) or real(*a))
    h = hidden.clone().requires_grad_(True)
    linear_cross_entropy(h, weight, targets).backward()
    assert flags == [(True, False)] and weight.grad is None
    h_plain = hidden.clone().requires_grad_(True)
    reference.linear_cross_entropy(h_plain, weight, targets).backward()
    torch.testing.assert_close(h.grad, h_plain.grad)


# ----------------------------------------------------------------------------- autocast


def test_autocast_casts_like_a_linear_layer_and_returns_fp32_grads():
    """Under autocast hidden and weight run in the autocast dtype (as F.linear would) and the
    float32 leaves get float32 gradients: the same numbers as the op on fp16 copies."""
    hidden, weight, targets = make(10, 60, 16)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        loss = linear_cross_entropy(h, w, targets, chunk_rows=4)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    want = loss_and_grads(lambda a, b, t: linear_cross_entropy(a, b, t, chunk_rows=4), hidden, weight, targets,
                          dtype=torch.float16, grad_loss=1.0)
    torch.testing.assert_close(loss, want[0])
    torch.testing.assert_close(h.grad, want[1].float())
    torch.testing.assert_close(w.grad, want[2].float())


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("change,error,match", [
    (lambda a: dict(a, hidden=a["hidden"].tolist()), TypeError, "hidden must be a torch.Tensor"),
    (lambda a: dict(a, hidden=a["hidden"].int()), TypeError, "hidden has dtype torch.int32"),
    (lambda a: dict(a, weight=a["weight"][:, :-1]), ValueError, r"hidden of shape \(6, 16\) must be"),
    (lambda a: dict(a, weight=a["weight"][0]), ValueError, r"weight must have shape \(vocab, hidden\)"),
    (lambda a: dict(a, weight=a["weight"].half()), TypeError, "weight has dtype torch.float16 but hidden"),
    (lambda a: dict(a, hidden=a["hidden"][0]), ValueError, r"hidden of shape \(16,\)"),
    (lambda a: dict(a, targets=a["targets"].float()), TypeError, "targets must hold int64 or int32"),
    (lambda a: dict(a, targets=a["targets"][:-1]), ValueError, r"targets must have shape \(6,\)"),
    (lambda a: dict(a, targets=a["targets"].to("meta")), ValueError, "targets is on meta but hidden is on"),
    (lambda a: dict(a, targets=a["targets"].clone().fill_(20)), ValueError, r"targets holds 20, outside \[0, 20\)"),
    (lambda a: dict(a, ignore_index=1.5), TypeError, "ignore_index must be an int"),
    (lambda a: dict(a, chunk_rows=0), ValueError, "chunk_rows must be a positive int or None, got 0"),
])
def test_bad_input(change, error, match):
    hidden, weight, targets = make(6, 20, 16)
    args = change(dict(hidden=hidden.cpu(), weight=weight.cpu(), targets=targets.cpu()))
    with pytest.raises(error, match=match):
        linear_cross_entropy(**args)


# ----------------------------------------------------------------------------- registration


def test_opcheck_registered_op():
    hidden, weight, targets = make(7, 30, 16)
    leaf = lambda t: t.clone().requires_grad_()  # noqa: E731
    for args in [(leaf(hidden), leaf(weight), targets, -100, 3, True, True),
                 (hidden, leaf(weight), targets, -100, 16, False, True),
                 (hidden, weight, targets, -100, 4, False, False)]:
        torch.library.opcheck(op_module._linear_cross_entropy_fwd, args)


def test_fake_shapes_and_dtypes():
    hidden, weight, targets = make(7, 30, 16, dtype=torch.float16)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fh, fw, ft = (mode.from_tensor(t) for t in (hidden, weight, targets))
        loss, dh, dw = torch.ops.gptfast.linear_cross_entropy_fwd(fh, fw, ft, -100, 4, True, True)
        assert loss.shape == () and loss.dtype == torch.float32
        # float32 until the backward scales them and rounds once to float16
        assert dh.shape == (7, 16) and dh.dtype == torch.float32
        assert dw.shape == (30, 16) and dw.dtype == torch.float32
        _, dh, dw = torch.ops.gptfast.linear_cross_entropy_fwd(fh, fw, ft, -100, 4, False, False)
        assert dh.shape == (0,) and dw.shape == (0,)


def test_torch_compile_fullgraph_forward_and_backward():
    """The LM head + loss of a model step in one graph (aot_eager: Dynamo + AOTAutograd
    over the fake and autograd registrations)."""
    hidden, weight, targets = make(3 * 5, 40, 16)

    def step(h, w, t):
        return linear_cross_entropy(torch.tanh(h), w, t, chunk_rows=4) * 2.0

    eager = loss_and_grads(step, hidden, weight, targets)
    compiled = loss_and_grads(torch.compile(step, fullgraph=True, backend="aot_eager"), hidden, weight, targets)
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------- CUDA only


@requires_cuda
def test_cuda_bf16_gpt2_vocab():
    check(*make(700, 50257, 768, torch.bfloat16))  # two chunks of the default size


@requires_cuda
def test_cuda_graph_capture():
    hidden, weight, targets = make(64, 1000, 64)
    linear_cross_entropy(hidden, weight, targets)  # compile the kernel outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = linear_cross_entropy(hidden, weight, targets)
    hidden.copy_(randn(64, 64, seed=9, device=DEVICE))
    graph.replay()
    torch.testing.assert_close(loss, reference.linear_cross_entropy(hidden, weight, targets))
