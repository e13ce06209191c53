"""``linear_cross_entropy``: the LM head and the cross-entropy loss in one op, without
ever holding the logits.

    loss = linear_cross_entropy(hidden, weight, targets, ignore_index=-100)
         = mean over counted targets of cross_entropy(hidden @ weight.T, targets)

hidden (N, C) or (B, T, C), any strides; weight (V, C) (the tied token embedding of a
GPT); targets hidden.shape[:-1] integers, those equal to ``ignore_index`` not counted.
Returns a float32 scalar. A GPT-2 batch of 8 x 1024 tokens has 8 x 1024 x 50,257 logits
(823 MB in bf16, and as much again for their gradient): this op allocates only one
chunk of them.

How. The rows are taken in chunks of ``chunk_rows`` (by default as many as fit
``CHUNK_BYTES`` of logits). For each chunk the forward computes the logits with a
matmul, then one pass over them (``gptfast.kernels.linear_cross_entropy``: a Triton
kernel on CUDA or under the interpreter, the same steps in PyTorch elsewhere) takes each
row's log-sum-exp and loss in float32 and overwrites the logits with
d(loss)/d(logits) = (softmax - onehot) / n_valid. Two more matmuls turn that into the
chunk's rows of d(loss)/d(hidden) and add its share of d(loss)/d(weight); for fp16/bf16
inputs both matmuls write float32 (cuBLAS ``out_dtype`` on CUDA). The backward then only
scales the two stored gradients by the incoming gradient of the loss and rounds them
once to the inputs' dtypes. Gradients are computed only for the inputs that
need them (none under ``torch.no_grad()``: then the op is one matmul and one pass per
chunk). Precision follows ``F.cross_entropy(F.linear(hidden, weight).float(), ...)``:
logits and their gradient in the inputs' dtype, the softmax statistics and the loss in
float32 (float64 stays float64). One difference remains: the gradient of the logits is
rounded before the incoming gradient of the loss scales it (that scale is not known in
the forward), PyTorch's after; the error-ratio rule holds, with its usual noise on very
small outputs.

Semantics (the training loop's, ``gptfast.model``): the loss is the sum over counted
targets divided by their number clamped to 1, so when every target is ignored the loss
is 0 and so are the gradients (``F.cross_entropy``'s mean would give NaN); the op does
not warn about it. A target outside [0, V) that is not ``ignore_index`` raises
ValueError for CPU targets outside ``torch.compile``; elsewhere (where checking would
sync with the device) its row's loss is NaN.

Autocast. Under ``torch.autocast`` hidden and weight are cast to the autocast dtype, as
``F.linear`` would be, and the gradients flow back to the original dtypes (the float32
parameter of an autocast training step gets a float32 gradient). Outside autocast they
must share one dtype.

Registered as ``torch.ops.gptfast.linear_cross_entropy_fwd`` (loss and both gradients)
with a fake implementation and an autograd formula, so ``torch.compile(fullgraph=True)``
sees one opaque op and CUDA graphs can capture it (no host sync). The gradient is not
itself differentiable (no double backward).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from gptfast.ops._dispatch import use_triton

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_DTYPES = KERNEL_DTYPES + (torch.float64,)
TARGET_DTYPES = (torch.int64, torch.int32)
# Bytes of logits one chunk may hold (the op's working memory besides the gradients).
CHUNK_BYTES = 64 * 2**20


def _fail(arg, message, error=ValueError):
    raise error(f"linear_cross_entropy: {arg} {message}")


def _validate(hidden, weight, targets, ignore_index, chunk_rows) -> None:
    """Types, shapes, dtypes and devices (static facts only, so torch.compile traces them)."""
    for arg, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, Tensor):
            _fail(arg, f"must be a torch.Tensor, got {type(t).__name__}", TypeError)
    for arg, t in (("hidden", hidden), ("weight", weight)):
        if t.dtype not in SUPPORTED_DTYPES:
            _fail(arg, f"has dtype {t.dtype}; supported: float16, bfloat16, float32, float64", TypeError)
    if weight.dim() != 2 or weight.shape[0] == 0:
        _fail("weight", f"must have shape (vocab, hidden) with vocab >= 1, got {tuple(weight.shape)}")
    if hidden.dim() < 2 or hidden.shape[-1] != weight.shape[1]:
        _fail("hidden", f"of shape {tuple(hidden.shape)} must be (..., {weight.shape[1]}) to match weight "
                        f"{tuple(weight.shape)}")
    if targets.dtype not in TARGET_DTYPES:
        _fail("targets", f"must hold int64 or int32 class indices, got {targets.dtype}", TypeError)
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        _fail("targets", f"must have shape {tuple(hidden.shape[:-1])} (hidden's without the last dim), "
                         f"got {tuple(targets.shape)}")
    for arg, t in (("weight", weight), ("targets", targets)):
        if t.device != hidden.device:
            _fail(arg, f"is on {t.device} but hidden is on {hidden.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) or not -2**31 <= ignore_index < 2**31:
        _fail("ignore_index", f"must be an int (32-bit), got {ignore_index!r}", TypeError)
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int)
                                   or chunk_rows < 1):
        _fail("chunk_rows", f"must be a positive int or None, got {chunk_rows!r}")


def _check_target_values(targets: Tensor, vocab: int, ignore_index: int) -> None:
    """Range check of CPU targets outside torch.compile (free of device syncs there)."""
    if targets.device.type != "cpu" or torch.compiler.is_compiling() or targets.numel() == 0:
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        value = int(targets[bad][0])
        _fail("targets", f"holds {value}, outside [0, {vocab}) and not ignore_index ({ignore_index})")


def default_chunk_rows(n_rows: int, vocab: int, itemsize: int) -> int:
    """Rows per chunk: as many as fit CHUNK_BYTES of logits (a multiple of 16 from 16 on), at least 1."""
    rows = max(1, CHUNK_BYTES // max(1, vocab * itemsize))
    if rows >= 16:
        rows -= rows % 16
    return max(1, min(rows, n_rows))


# ----------------------------------------------------------------------------- one chunk's rows


def _rows_torch_(logits: Tensor, targets: Tensor, count: Tensor, loss: Tensor, ignore_index: int,
                 write_grad: bool) -> None:
    """What the Triton kernel does (``cross_entropy_rows_``), in PyTorch: per-row loss into
    ``loss`` and, with ``write_grad``, ``logits`` overwritten by their gradient."""
    vocab = logits.shape[1]
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lse = torch.logsumexp(x, dim=1)
    ignored = targets == ignore_index
    in_range = (targets >= 0) & (targets < vocab)
    index = targets.clamp(0, vocab - 1)[:, None]
    picked = x.gather(1, index)[:, 0]
    nan = torch.full_like(lse, float("nan"))
    loss.copy_(torch.where(ignored, 0.0, torch.where(in_range, lse - picked, nan)))
    if write_grad:
        inv = 1.0 / count.clamp(min=1).to(x.dtype)
        scale = torch.where(ignored, 0.0, torch.where(in_range, inv, nan))
        x.sub_(lse[:, None]).exp_()  # softmax (in place on the float copy, or on logits themselves when float32)
        x.scatter_add_(1, index, torch.where(in_range, -1.0, 0.0).to(x.dtype)[:, None])
        x.mul_(scale[:, None])
        if x.data_ptr() != logits.data_ptr():
            logits.copy_(x)


def _rows_(logits, targets, count, loss, ignore_index, write_grad) -> None:
    if use_triton(logits) and logits.dtype in KERNEL_DTYPES:
        from gptfast.kernels import linear_cross_entropy as kernel  # imports triton: only on this path

        kernel.cross_entropy_rows_(logits, targets, count, loss, ignore_index, write_grad)
    else:
        _rows_torch_(logits, targets, count, loss, ignore_index, write_grad)


# ----------------------------------------------------------------------------- registered op


@torch.library.custom_op("gptfast::linear_cross_entropy_fwd", mutates_args=())
def _linear_cross_entropy_fwd(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, chunk_rows: int,
                              grad_hidden: bool, grad_weight: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(loss, d loss / d hidden, d loss / d weight) for hidden (N, C), weight (V, C) of one
    dtype, targets (N,) int64. A gradient not asked for comes back empty, shape (0,)."""
    with torch.autocast(hidden.device.type, enabled=False):  # dtypes are chosen by the public function
        return _forward(hidden, weight, targets, ignore_index, chunk_rows, grad_hidden, grad_weight)


def _grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for fp16/bf16 (gradients stay unrounded until the backward scales them), else the dtype."""
    return torch.promote_types(dtype, torch.float32)


class _WideMatmul:
    """``out (+)= a @ b`` into a float32 ``out`` for fp16/bf16 ``a`` and ``b``: the products
    summed in float32 and never rounded to the narrow dtype (PyTorch's own gradient, in
    one matmul, is rounded once; rounding each chunk's, then again after scaling by the
    loss's gradient, would not meet the error-ratio rule). On CUDA cuBLAS writes float32
    directly (``out_dtype``); elsewhere (and on a torch without it) the operands are
    widened to float32 first (the weight once per call)."""

    def __init__(self, weight: Tensor):
        self.weight = weight
        self.native = weight.device.type == "cuda"
        self._wide_weight = None

    def wide_weight(self) -> Tensor:
        if self._wide_weight is None:
            self._wide_weight = self.weight.float()
        return self._wide_weight

    def mm(self, a: Tensor, out: Tensor) -> None:
        """out = a @ weight."""
        if self.native:
            try:
                torch.mm(a, self.weight, out_dtype=torch.float32, out=out)
                return
            except (RuntimeError, TypeError, NotImplementedError):
                self.native = False
        torch.mm(a.float(), self.wide_weight(), out=out)

    def addmm_(self, acc: Tensor, a: Tensor, b: Tensor) -> None:
        """acc += a @ b."""
        if self.native:
            try:
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
                return
            except (RuntimeError, TypeError, NotImplementedError):
                self.native = False
        acc.addmm_(a.float(), b.float())


def _forward(hidden, weight, targets, ignore_index, chunk_rows, need_dh, need_dw):
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    dtype, device = hidden.dtype, hidden.device
    wide = _grad_dtype(dtype)
    count = (targets != ignore_index).sum().reshape(1)
    losses = torch.empty(n_rows, dtype=wide, device=device)
    d_hidden = hidden.new_empty(hidden.shape if need_dh else (0,), dtype=wide)
    d_weight = torch.zeros(weight.shape, dtype=wide, device=device) if need_dw else weight.new_empty((0,), dtype=wide)
    widen = _WideMatmul(weight) if dtype != wide else None
    buffer = torch.empty((min(chunk_rows, n_rows), vocab), dtype=dtype, device=device)
    for start in range(0, n_rows, chunk_rows):
        end = min(start + chunk_rows, n_rows)
        logits, h = buffer[:end - start], hidden[start:end]
        torch.mm(h, weight.t(), out=logits)
        _rows_(logits, targets[start:end], count, losses[start:end], ignore_index, need_dh or need_dw)
        if need_dh and widen is not None:
            widen.mm(logits, out=d_hidden[start:end])
        elif need_dh:
            torch.mm(logits, weight, out=d_hidden[start:end])
        if need_dw and widen is not None:
            widen.addmm_(d_weight, logits.t(), h)
        elif need_dw:
            d_weight.addmm_(logits.t(), h)
    loss = losses.sum() / count[0].clamp(min=1)
    return loss, d_hidden, d_weight


@_linear_cross_entropy_fwd.register_fake
def _(hidden, weight, targets, ignore_index, chunk_rows, grad_hidden, grad_weight):
    loss = hidden.new_empty((), dtype=_grad_dtype(hidden.dtype))
    d_hidden = hidden.new_empty(hidden.shape if grad_hidden else (0,), dtype=_grad_dtype(hidden.dtype))
    d_weight = weight.new_empty(weight.shape if grad_weight else (0,), dtype=_grad_dtype(weight.dtype))
    return loss, d_hidden, d_weight


def _setup_context(ctx, inputs, output):
    _loss, d_hidden, d_weight = output
    ctx.save_for_backward(d_hidden, d_weight)
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)
    ctx.mark_non_differentiable(d_hidden, d_weight)


def _scaled(grad: Tensor, grad_loss: Tensor, dtype: torch.dtype) -> Tensor:
    """``grad`` (float32 for fp16/bf16 inputs) times ``grad_loss``, then rounded once to ``dtype``."""
    return (grad * grad_loss.to(grad.dtype)).to(dtype)


def _backward(ctx, grad_loss, _grad_d_hidden, _grad_d_weight):
    d_hidden, d_weight = ctx.saved_tensors
    dh = _scaled(d_hidden, grad_loss, ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
    dw = _scaled(d_weight, grad_loss, ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
    return dh, dw, None, None, None, None, None


_linear_cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public function


def _autocast_dtype(device_type: str, dtype: torch.dtype) -> Optional[torch.dtype]:
    """The dtype autocast would run a matmul of ``dtype`` inputs in, or None when it is off
    (float64 is left alone, as autocast does)."""
    if dtype == torch.float64 or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100,
                         chunk_rows: Optional[int] = None) -> Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``; see the module docstring.

    hidden (..., C) fp16/bf16/fp32/fp64; weight (V, C), hidden's dtype (any under autocast);
    targets (...) int64/int32, ``ignore_index`` not counted. ``chunk_rows``: rows of logits
    held at a time (default: ``CHUNK_BYTES`` worth). Returns a float32 scalar (float64 for
    float64 inputs), 0 when every target is ignored. Differentiable in hidden and weight.
    """
    _validate(hidden, weight, targets, ignore_index, chunk_rows)
    amp = _autocast_dtype(hidden.device.type, hidden.dtype)
    if amp is not None:
        hidden, weight = hidden.to(amp), weight.to(amp)
    elif weight.dtype != hidden.dtype:
        _fail("weight", f"has dtype {weight.dtype} but hidden has {hidden.dtype} (outside autocast they must match)",
              TypeError)
    vocab, width = weight.shape
    flat_targets = targets.reshape(-1)
    _check_target_values(flat_targets, vocab, ignore_index)
    rows = hidden.reshape(-1, width)
    chunk = chunk_rows if chunk_rows is not None else default_chunk_rows(rows.shape[0], vocab, hidden.element_size())
    grads = torch.is_grad_enabled()
    return _linear_cross_entropy_fwd(rows, weight, flat_targets.long(), ignore_index, max(1, chunk),
                                     grads and hidden.requires_grad, grads and weight.requires_grad)[0]
