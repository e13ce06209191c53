"""``gptfast check``: every fused op against its reference twin on this device.

For each op, dtype and shape of a grid, forward and backward:

    fused  = gptfast.ops.<op>(inputs in dtype)             the op under test
    plain  = gptfast.reference.<op>(inputs in dtype)       plain PyTorch in the same dtype
    exact  = gptfast.reference.<op>(inputs in float64)     the answer

and the error-ratio rule of ``gptfast.testing``: ``max|fused - exact|`` may be at most
``max_ratio`` times ``max|plain - exact|`` (per output and per gradient; the worst one is
reported). The float64 inputs are the dtype inputs widened, so all three see the same
numbers. Gradients use the same random output gradient for all three.

The sampler is checked differently: the C++ extension and its Python twin must choose
identical tokens for the same seed over a few parameter mixes. It runs first: it is the
only check of the C++ loop on CUDA, and on a GPU with little time the last cases are
the ones lost. The op list is ``gptfast.ops.registry`` (each op's implementations and
its error-ratio tolerance); this module holds the grid of shapes for each.

A CUDA error that breaks the context (an illegal address, say) stops the run at that
case, with a line naming it (``gptfast.runtime.cuda_errors``): every later case in the
same process would fail with the same message.

On a machine without CUDA the ops run through the Triton interpreter (``TRITON_INTERPRET=1``
must be set before triton is imported; ``gptfast check`` does that) on small shapes.
"""
import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from gptfast.runtime.cuda_errors import STOPPED, is_cuda_error, short_error, stop_message
from gptfast.runtime.devices import dtype_name
from gptfast.ops import registry
from gptfast.testing import error_ratio, max_abs_error, randn

OPS = ("sampler",) + registry.NAMES  # in run order
DEFAULT_MAX_RATIO = registry.DEFAULT_MAX_RATIO


@dataclass
class CheckResult:
    op: str
    variant: str
    shape: str
    dtype: str
    direction: str  # fwd | bwd | tokens
    path: str  # triton | triton-interpreter | torch | cpp | python
    passed: bool
    ratio: Optional[float] = None
    fused_error: Optional[float] = None
    plain_error: Optional[float] = None
    worst: str = ""  # which output or gradient gave the worst ratio
    detail: str = ""
    seconds: float = 0.0
    skipped: bool = False  # nothing to compare here (e.g. no C++ extension); not a failure


@dataclass
class CheckCase:
    op: str
    variant: str
    shape: str
    dtype: torch.dtype
    run: Callable[[], List[CheckResult]]

    def label(self) -> str:
        return f"{self.op} {self.variant} [{self.shape}] {dtype_name(self.dtype)}"


# ---------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------


def kernel_path(t: torch.Tensor) -> str:
    from gptfast.ops._dispatch import interpreting, use_triton

    if not use_triton(t):
        return "torch"
    return "triton-interpreter" if interpreting() else "triton"


def _fused(op: str) -> Callable:
    return registry.get(op).resolve("fused")


def _reference(op: str) -> Callable:
    return registry.get(op).resolve("reference")


def _compare(names: Sequence[str], fused, plain, exact, max_ratio: float):
    """Worst error ratio over matching tensors: (passed, ratio, fused err, plain err, name)."""
    worst = (-1.0, 0.0, 0.0, "")
    for name, f, p, e in zip(names, fused, plain, exact):
        ratio = error_ratio(f, p, e)  # the project's rule, with its default floor
        if ratio > worst[0] or math.isnan(ratio):
            worst = (ratio, max_abs_error(f, e) if torch.isfinite(f.double()).all() else float("inf"),
                     max_abs_error(p, e), name)
    ratio, fused_error, plain_error, name = worst
    return ratio <= max_ratio, ratio, fused_error, plain_error, name


def _leaf(t: torch.Tensor, dtype=None) -> torch.Tensor:
    """A fresh leaf with the same values (and the same strides pattern where possible)."""
    return (t.detach().to(dtype) if dtype is not None else t.detach().clone()).requires_grad_(True)


def _fwd_bwd(op_name, variant, shape, dtype, path, fn_fused, fn_reference, inputs, out_names, grad_names,
             max_ratio, generator, backward=True) -> List[CheckResult]:
    """Forward (and backward) of the fused op against the reference in ``dtype`` and in float64.

    ``fn_*`` take the input tensors and return a tuple of outputs; ``inputs`` are in
    ``dtype`` (possibly non-contiguous views); gradients are taken for the inputs named
    in ``grad_names`` (the first ``len(grad_names)`` inputs).
    """
    n_grad = len(grad_names) if backward else 0
    # The fused op gets the inputs themselves (views keep their strides: it must read them in place).
    fused_in = [t.requires_grad_(True) if i < n_grad else t for i, t in enumerate(inputs)]
    plain_in = [_leaf(t) if i < n_grad else t.detach().clone() for i, t in enumerate(inputs)]
    exact_in = [_leaf(t, torch.float64) if i < n_grad else _to64(t) for i, t in enumerate(inputs)]

    started = time.perf_counter()
    fused_out = fn_fused(*fused_in)
    plain_out = fn_reference(*plain_in)
    exact_out = fn_reference(*exact_in)
    ok, ratio, f_err, p_err, worst = _compare(out_names, fused_out, plain_out, exact_out, max_ratio)
    results = [CheckResult(op_name, variant, shape, dtype_name(dtype), "fwd", path, ok, ratio, f_err, p_err, worst,
                           seconds=time.perf_counter() - started)]
    if not backward:
        return results

    started = time.perf_counter()
    seeds = [randn(*o.shape, dtype=dtype, device=o.device, generator=generator) for o in fused_out]
    fused_grads = torch.autograd.grad(fused_out, fused_in[:n_grad], seeds)
    plain_grads = torch.autograd.grad(plain_out, plain_in[:n_grad], seeds)
    exact_grads = torch.autograd.grad(exact_out, exact_in[:n_grad], [s.double() for s in seeds])
    ok, ratio, f_err, p_err, worst = _compare(["d" + n for n in grad_names], fused_grads, plain_grads, exact_grads,
                                              max_ratio)
    results.append(CheckResult(op_name, variant, shape, dtype_name(dtype), "bwd", path, ok, ratio, f_err, p_err, worst,
                               seconds=time.perf_counter() - started))
    return results


def _to64(t):
    return t.detach().to(torch.float64) if t.is_floating_point() else t


# ---------------------------------------------------------------------------------
# layer_norm
# ---------------------------------------------------------------------------------


def check_layer_norm(shape, dtype, device, residual: bool, non_contiguous: bool, max_ratio: float,
                     eps: float = 1e-5) -> List[CheckResult]:
    fused_op, reference_op = _fused("layer_norm"), _reference("layer_norm")
    g = torch.Generator().manual_seed(1234)
    hidden = shape[-1]
    if non_contiguous:  # every other row of a wider buffer: a strided view
        x = randn(*shape[:-1], 2 * hidden, dtype=dtype, device=device, generator=g)[..., ::2]
    else:
        x = randn(*shape, dtype=dtype, device=device, generator=g)
    weight = randn(hidden, dtype=dtype, device=device, generator=g, scale=0.1, shift=1.0)
    bias = randn(hidden, dtype=dtype, device=device, generator=g, scale=0.1)
    variant = ("residual" if residual else "plain") + (", non-contiguous" if non_contiguous else "")
    shape_text = "x".join(str(s) for s in shape)
    if residual:
        r = randn(*shape, dtype=dtype, device=device, generator=g)

        def fused(x, r, w, b):
            return tuple(fused_op(x, w, b, eps, residual=r))

        def ref(x, r, w, b):
            return tuple(reference_op(x, w, b, eps, residual=r))

        return _fwd_bwd("layer_norm", variant, shape_text, dtype, kernel_path(x), fused, ref, [x, r, weight, bias],
                        ["y", "h"], ["x", "residual", "weight", "bias"], max_ratio, g)

    def fused(x, w, b):
        return (fused_op(x, w, b, eps),)

    def ref(x, w, b):
        return (reference_op(x, w, b, eps),)

    return _fwd_bwd("layer_norm", variant, shape_text, dtype, kernel_path(x), fused, ref, [x, weight, bias],
                    ["y"], ["x", "weight", "bias"], max_ratio, g)


# ---------------------------------------------------------------------------------
# causal_attention
# ---------------------------------------------------------------------------------


def check_causal_attention(batch, heads, q_len, head_dim, q_offset, dtype, device, non_contiguous: bool,
                           max_ratio: float) -> List[CheckResult]:
    fused_op, reference_op = _fused("causal_attention"), _reference("causal_attention")
    g = torch.Generator().manual_seed(4321)
    kv_len = q_offset + q_len
    if non_contiguous:  # q, k, v split out of one fused qkv projection, as in the model
        if q_offset:
            raise ValueError("non-contiguous attention check is defined for q_offset=0")
        qkv = randn(batch, q_len, 3, heads, head_dim, dtype=dtype, device=device, generator=g)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=2))
    else:
        q = randn(batch, heads, q_len, head_dim, dtype=dtype, device=device, generator=g)
        k = randn(batch, heads, kv_len, head_dim, dtype=dtype, device=device, generator=g)
        v = randn(batch, heads, kv_len, head_dim, dtype=dtype, device=device, generator=g)
    variant = f"q_offset={q_offset}" + (", non-contiguous" if non_contiguous else "")

    def fused(q, k, v):
        return (fused_op(q, k, v, q_offset=q_offset),)

    def ref(q, k, v):
        return (reference_op(q, k, v, q_offset=q_offset),)

    return _fwd_bwd("causal_attention", variant, f"B={batch},H={heads},Tq={q_len},D={head_dim}", dtype,
                    kernel_path(q), fused, ref, [q, k, v], ["out"], ["q", "k", "v"], max_ratio, g)


# ---------------------------------------------------------------------------------
# decode_attention
# ---------------------------------------------------------------------------------


def check_decode_attention(batch, heads, cache_len, head_dim, lens, dtype, device, max_ratio: float) -> List[CheckResult]:
    """Forward only (decode has no backward). The caches are a slice of a bigger buffer whose
    stale positions (at or past each row's length) hold NaN: the op must never read them."""
    fused_op, reference_op = _fused("decode_attention"), _reference("decode_attention")

    g = torch.Generator().manual_seed(99)
    q = randn(batch, heads, head_dim, dtype=dtype, device=device, generator=g)
    big_k = randn(batch + 1, heads, cache_len + 5, head_dim, dtype=dtype, device=device, generator=g)
    big_v = randn(batch + 1, heads, cache_len + 5, head_dim, dtype=dtype, device=device, generator=g)
    cache_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    stale = torch.arange(cache_len + 5, device=device)[None, :] >= torch.tensor(lens + [0], device=device)[:, None]
    clean_k, clean_v = big_k[:batch, :, :cache_len].clone(), big_v[:batch, :, :cache_len].clone()
    big_k[stale[:, None, :, None].expand_as(big_k)] = float("nan")
    big_v[stale[:, None, :, None].expand_as(big_v)] = float("nan")
    k_view, v_view = big_k[:batch, :, :cache_len], big_v[:batch, :, :cache_len]
    shape = f"B={batch},H={heads},S={cache_len},D={head_dim},lens={lens}"

    started = time.perf_counter()
    with torch.no_grad():
        fused = fused_op(q, k_view, v_view, cache_lens)
        plain = reference_op(q, clean_k, clean_v, cache_lens)
        exact = reference_op(q.double(), clean_k.double(), clean_v.double(), cache_lens)
    ok, ratio, f_err, p_err, worst = _compare(["out"], [fused], [plain], [exact], max_ratio)
    return [CheckResult("decode_attention", "cache view, NaN past lens", shape, dtype_name(dtype), "fwd",
                        kernel_path(q), ok, ratio, f_err, p_err, worst, seconds=time.perf_counter() - started)]


# ---------------------------------------------------------------------------------
# int8_linear
# ---------------------------------------------------------------------------------


def check_int8_linear(rows, n, k, dtype, device, non_contiguous: bool, max_ratio: float) -> List[CheckResult]:
    """Forward only (inference op). The weight is an int8 quantization of a random matrix;
    plain PyTorch and the answer dequantise it, in ``dtype`` and in float64."""
    fused_op, reference_op = _fused("int8_linear"), _reference("int8_linear")
    g = torch.Generator().manual_seed(7)
    weight = (torch.randn(n, k, generator=g) * 40).round().clamp(-127, 127).to(device=device, dtype=torch.int8)
    scale = (0.01 + 0.01 * torch.rand(n, generator=g)).to(device)
    bias = randn(n, dtype=dtype, device=device, generator=g, scale=0.1)
    x = randn(rows, 2 * k if non_contiguous else k, dtype=dtype, device=device, generator=g)
    x = x[:, ::2] if non_contiguous else x
    shape = f"M={rows},N={n},K={k}" + (",strided" if non_contiguous else "")
    started = time.perf_counter()
    with torch.no_grad():
        fused = fused_op(x, weight, scale, bias)
        plain = reference_op(x, weight, scale, bias)
        exact = reference_op(x.double(), weight, scale.double(), bias.double())
    ok, ratio, f_err, p_err, worst = _compare(["out"], [fused], [plain], [exact], max_ratio)
    return [CheckResult("int8_linear", "bias", shape, dtype_name(dtype), "fwd", kernel_path(x), ok, ratio, f_err,
                        p_err, worst, seconds=time.perf_counter() - started)]


# ---------------------------------------------------------------------------------
# skinny_linear
# ---------------------------------------------------------------------------------


def check_skinny_linear(variant, rows, n, k, dtype, device, non_contiguous: bool, max_ratio: float) -> List[CheckResult]:
    """Forward only (inference op), one fused variant: layer norm + GELU (float weight),
    int8 weight + residual, or layer norm + the KV-cache write (``skinny_linear_kv``: the
    q output and both whole caches judged; the weight keeps the first 6 * (N // 6) rows:
    q, k and v of 2 heads of N // 6 each, one token per row at its own position)."""
    import gptfast.ops
    from gptfast import reference

    g = torch.Generator().manual_seed(11)
    x = randn(rows, 2 * k if non_contiguous else k, dtype=dtype, device=device, generator=g)
    x = x[:, ::2] if non_contiguous else x
    bias = randn(n, dtype=dtype, device=device, generator=g, scale=0.1)
    kw, kw64 = {}, {}
    if "layer_norm" in variant:
        kw["ln_weight"] = randn(k, dtype=dtype, device=device, generator=g, scale=0.1, shift=1.0)
        kw["ln_bias"] = randn(k, dtype=dtype, device=device, generator=g, scale=0.1)
    if "int8" in variant:
        weight = (torch.randn(n, k, generator=g) * 40).round().clamp(-127, 127).to(device=device, dtype=torch.int8)
        kw["scale"] = (0.001 + 0.001 * torch.rand(n, generator=g)).to(device)
        weight64 = weight
    else:
        weight = randn(n, k, dtype=dtype, device=device, generator=g, scale=k ** -0.5)
        weight64 = weight.double()
    kw64 = {name: t.double() for name, t in kw.items()}
    shape = f"M={rows},N={n},K={k}" + (",strided" if non_contiguous else "")
    path = kernel_path(x)
    started = time.perf_counter()
    with torch.no_grad():
        if variant.endswith("kv_cache"):
            heads, head_dim = 2, n // 6
            weight, weight64, bias = weight[:6 * head_dim], weight64[:6 * head_dim], bias[:6 * head_dim]
            shape = f"M={rows},N={6 * head_dim},K={k},H=2,D={head_dim}" + (",strided" if non_contiguous else "")
            seq_len = 2 * rows + 3
            positions = (torch.arange(rows, device=device) * 2 + 1).view(rows, 1)
            caches = [torch.zeros(rows + 1, heads, seq_len, head_dim, dtype=d, device=device)
                      for d in (dtype, dtype, dtype, dtype, torch.float64, torch.float64)]
            x3 = x.view(rows, 1, k)
            fused = gptfast.ops.skinny_linear_kv(x3, weight, bias, caches[0], caches[1], positions, **kw)
            plain = reference.skinny_linear_kv(x3, weight, bias, caches[2], caches[3], positions, **kw)
            exact = reference.skinny_linear_kv(x3.double(), weight64, bias.double(), caches[4], caches[5], positions,
                                               **kw64)
            ok, ratio, f_err, p_err, worst = _compare(["q", "k_cache", "v_cache"], [fused] + caches[:2],
                                                      [plain] + caches[2:4], [exact] + caches[4:], max_ratio)
        else:
            activation = "gelu" if "gelu" in variant else None
            residual = randn(rows, n, dtype=dtype, device=device, generator=g) if "residual" in variant else None
            fused = gptfast.ops.skinny_linear(x, weight, bias, activation=activation, residual=residual, **kw)
            plain = reference.skinny_linear(x, weight, bias, activation=activation, residual=residual, **kw)
            exact = reference.skinny_linear(x.double(), weight64, bias.double(), activation=activation,
                                            residual=None if residual is None else residual.double(), **kw64)
            ok, ratio, f_err, p_err, worst = _compare(["out"], [fused], [plain], [exact], max_ratio)
    return [CheckResult("skinny_linear", variant, shape, dtype_name(dtype), "fwd", path, ok, ratio, f_err, p_err,
                        worst, seconds=time.perf_counter() - started)]
# linear_cross_entropy
# ---------------------------------------------------------------------------------


def check_linear_cross_entropy(rows, vocab, hidden, dtype, device, variant: str, max_ratio: float,
                               chunk_rows: Optional[int] = None) -> List[CheckResult]:
    """Loss and the gradients of hidden and weight. ``variant``: "some ignored" (every
    fifth target from the second is -100), "all ignored" (loss 0, gradients 0) or "non-contiguous"
    (hidden a strided view). ``chunk_rows`` forces several chunks on small shapes."""
    fused_op, reference_op = _fused("linear_cross_entropy"), _reference("linear_cross_entropy")
    g = torch.Generator().manual_seed(2357)
    if variant == "non-contiguous":
        h = randn(rows, 2 * hidden, dtype=dtype, device=device, generator=g)[:, ::2]
    else:
        h = randn(rows, hidden, dtype=dtype, device=device, generator=g)
    weight = randn(vocab, hidden, dtype=dtype, device=device, generator=g, scale=hidden ** -0.5)
    targets = torch.randint(0, vocab, (rows,), generator=g).to(device)
    if variant == "all ignored":
        targets.fill_(-100)
    elif variant == "some ignored":
        targets[1::5] = -100

    def fused(h, w, t):
        return (fused_op(h, w, t, chunk_rows=chunk_rows),)

    def ref(h, w, t):
        return (reference_op(h, w, t),)

    shape = f"N={rows},V={vocab},C={hidden}" + (f",chunk={chunk_rows}" if chunk_rows else "")
    return _fwd_bwd("linear_cross_entropy", variant, shape, dtype, kernel_path(h), fused, ref, [h, weight, targets],
                    ["loss"], ["hidden", "weight"], max_ratio, g)


# ---------------------------------------------------------------------------------
# the grid
# ---------------------------------------------------------------------------------


def default_dtypes(device) -> Tuple[torch.dtype, ...]:
    """fp32 and fp16 everywhere; bf16 on CUDA, first (what GPUs run; the interpreter's bf16
    is not faithful, so not on the CPU)."""
    if torch.device(device).type == "cuda":
        return (torch.bfloat16, torch.float16, torch.float32)
    return (torch.float32, torch.float16)


def _shapes(device, quick: bool) -> Dict[str, list]:
    """Shapes per op. On CUDA: awkward sizes (not multiples of a block, T=1, batch 1,
    hidden sizes that are not powers of two). The quick grid keeps one small case of
    each attention path the kernels specialise for: q_offset > 0, T=1, head sizes 64,
    80, 128 and 256, a non-contiguous input. Under the interpreter each launch costs
    seconds, so the CPU grid is tiny."""
    if torch.device(device).type == "cuda":
        full = {
            "layer_norm": [((1, 768), False), ((3, 7, 1000), False), ((64, 1600), True), ((257, 4096), False),
                           ((33, 8192), False)],
            "causal_attention": [(1, 3, 1, 64, 0, False), (1, 3, 130, 64, 0, False), (2, 4, 257, 128, 0, True),
                                 (1, 3, 17, 80, 0, False), (1, 2, 70, 64, 100, False), (1, 2, 33, 256, 0, False)],
            "decode_attention": [(4, 12, 1000, 64, [1, 333, 999, 1000]), (2, 8, 4100, 128, [4100, 17]),
                                 (1, 3, 130, 80, [130])],
            "int8_linear": [(1, 3072, 768, False), (17, 1000, 776, True), (64, 768, 3072, False),
                            (300, 2304, 768, False)],
            # (M, N, K, strided x); N, K GPT-2's and awkward ones; M = 1, 3 (verify), 16.
            "skinny_linear": [(1, 768, 768, False), (3, 3072, 768, True), (16, 768, 3072, False),
                              (1, 1000, 1600, False)],
            # (rows, vocab, hidden, variant, chunk_rows): GPT-2's vocabulary over several chunks,
            # one row, vocabularies that are not a multiple of the kernel's step
            "linear_cross_entropy": [(1000, 50257, 768, "some ignored", None), (1, 50257, 768, "some ignored", None),
                                     (300, 5000, 200, "non-contiguous", 64), (64, 4097, 128, "all ignored", 16)],
        }
        if quick:  # every attention case is small already; layernorm keeps the awkward and the strided one
            full = {**full, "layer_norm": full["layer_norm"][1:3]}
        return full
    full = {
        "layer_norm": [((1, 768), False), ((3, 7, 100), False), ((5, 64), True)],
        "causal_attention": [(1, 2, 17, 32, 0, False), (1, 2, 5, 64, 12, False), (1, 2, 9, 16, 0, True)],
        "decode_attention": [(3, 2, 40, 64, [1, 17, 40]), (1, 2, 9, 80, [9])],
        "int8_linear": [(1, 70, 48, False), (17, 33, 40, True)],
        "skinny_linear": [(3, 96, 70, True)],
        "linear_cross_entropy": [(19, 300, 32, "some ignored", 8), (1, 77, 64, "some ignored", None),
                                 (9, 50, 24, "non-contiguous", 4), (6, 40, 16, "all ignored", None)],
    }
    if quick:
        full = {k: v[:1] for k, v in full.items()}
        full["causal_attention"] = [(1, 2, 5, 32, 4, False)]  # quick still covers q_offset
    return full


def _layer_norm_cases(shapes, dtype, device, max_ratio) -> List[CheckCase]:
    return [CheckCase("layer_norm", "residual" if residual else "plain", str(shape), dtype,
                      _bind(check_layer_norm, shape, dtype, device, residual, non_contiguous, max_ratio))
            for shape, non_contiguous in shapes for residual in (False, True)]


def _causal_attention_cases(shapes, dtype, device, max_ratio) -> List[CheckCase]:
    return [CheckCase("causal_attention", f"q_offset={offset}", f"B={b},H={h},Tq={t},D={d}", dtype,
                      _bind(check_causal_attention, b, h, t, d, offset, dtype, device, non_contiguous, max_ratio))
            for b, h, t, d, offset, non_contiguous in shapes]


def _decode_attention_cases(shapes, dtype, device, max_ratio) -> List[CheckCase]:
    return [CheckCase("decode_attention", "", f"B={b},H={h},S={s},D={d}", dtype,
                      _bind(check_decode_attention, b, h, s, d, lens, dtype, device, max_ratio))
            for b, h, s, d, lens in shapes]


def _int8_linear_cases(shapes, dtype, device, max_ratio) -> List[CheckCase]:
    return [CheckCase("int8_linear", "bias", f"M={m},N={n},K={k}", dtype,
                      _bind(check_int8_linear, m, n, k, dtype, device, strided, max_ratio))
            for m, n, k, strided in shapes]


SKINNY_VARIANTS = ("layer_norm+gelu", "int8+residual", "layer_norm+kv_cache")


def _skinny_linear_cases(shapes, dtype, device, max_ratio) -> List[CheckCase]:
    return [CheckCase("skinny_linear", variant, f"M={m},N={n},K={k}", dtype,
                      _bind(check_skinny_linear, variant, m, n, k, dtype, device, strided, max_ratio))
            for m, n, k, strided in shapes for variant in SKINNY_VARIANTS]
def _linear_cross_entropy_cases(shapes, dtype, device, max_ratio) -> List[CheckCase]:
    return [CheckCase("linear_cross_entropy", variant, f"N={n},V={v},C={c}", dtype,
                      _bind(check_linear_cross_entropy, n, v, c, dtype, device, variant, max_ratio, chunk))
            for n, v, c, variant, chunk in shapes]


# The grid of each registry op (a new op in the registry needs its entry here).
CASE_BUILDERS = {"layer_norm": _layer_norm_cases, "causal_attention": _causal_attention_cases,
                 "decode_attention": _decode_attention_cases, "int8_linear": _int8_linear_cases,
                 "skinny_linear": _skinny_linear_cases,
                 "linear_cross_entropy": _linear_cross_entropy_cases}


def build_cases(device, quick: bool = False, ops: Optional[Sequence[str]] = None,
                dtypes: Optional[Sequence[torch.dtype]] = None, max_ratio: Optional[float] = None) -> List[CheckCase]:
    """The cases in run order: the sampler first, then every op per dtype (bf16 first on
    CUDA). ``max_ratio`` overrides each op's registry tolerance."""
    device = torch.device(device)
    ops = list(ops) if ops else list(OPS)
    unknown = set(ops) - set(OPS)
    if unknown:
        raise ValueError(f"unknown op(s) {sorted(unknown)}; choose from {OPS}")
    missing = [name for name in registry.NAMES if name not in CASE_BUILDERS]
    if missing:
        raise ValueError(f"op(s) {missing} are in gptfast.ops.registry but gptfast.checker has no grid for them")
    dtypes = list(dtypes) if dtypes else list(default_dtypes(device))
    shapes = _shapes(device, quick)
    cases: List[CheckCase] = []
    if "sampler" in ops:
        cases.append(CheckCase("sampler", "C++ vs twin", "", torch.float32, _bind(check_sampler, device)))
    for dtype in dtypes:
        for spec in registry.OPS:
            if spec.name in ops:
                limit = max_ratio if max_ratio is not None else spec.max_ratio
                cases += CASE_BUILDERS[spec.name](shapes[spec.name], dtype, device, limit)
    return cases


def _bind(fn, *args):
    return lambda: fn(*args)


def _failed_row(case: CheckCase, detail: str, seconds: float = 0.0) -> CheckResult:
    return CheckResult(case.op, case.variant, case.shape, dtype_name(case.dtype), "fwd", "?", False, detail=detail,
                       seconds=seconds)


def run_checks(cases: Sequence[CheckCase], log: Optional[Callable[[str], None]] = None,
               progress: Optional[Callable[[List[CheckResult]], None]] = None) -> List[CheckResult]:
    """Run every case; an exception is a failed row (with its message), never a lost run.
    ``progress(results)`` is called after every case (to save what is done).

    Two things end the run early, each with a failed row after the results so far:
    Ctrl-C (or SIGTERM turned into KeyboardInterrupt), and a CUDA error, whose row and
    log line name the case (the context is broken; later cases would all fail)."""
    results: List[CheckResult] = []
    for i, case in enumerate(cases):
        started = time.perf_counter()
        try:
            rows = case.run()
        except KeyboardInterrupt:
            results.append(_failed_row(case, f"interrupted: {len(cases) - i} case(s) not run"))
            break
        except Exception as exc:
            rows = [_failed_row(case, short_error(exc, 160), time.perf_counter() - started)]
            if is_cuda_error(exc):
                rows[0].detail = stop_message(case.label(), exc, len(cases) - i - 1)
                results += rows
                if log:
                    log(f"[{i + 1}/{len(cases)}] {rows[0].detail}")
                break
        results += rows
        if log:
            for r in rows:
                log(f"[{i + 1}/{len(cases)}] {format_line(r)}")
        if progress:
            progress(results)
    return results


def stopped_by_cuda_error(results: Sequence[CheckResult]) -> Optional[CheckResult]:
    """The row a CUDA error stopped the run at, if one did."""
    return next((r for r in results if r.detail.startswith(STOPPED)), None)


# ---------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------


def _verdict(r: CheckResult) -> str:
    return "SKIP" if r.skipped else "PASS" if r.passed else "**FAIL**"


def format_line(r: CheckResult) -> str:
    ratio = "" if r.ratio is None else f"ratio {r.ratio:.2f}"
    return f"{_verdict(r).strip('*')} {r.op} {r.variant} [{r.shape}] {r.dtype} {r.direction} {ratio} {r.detail}"


def _num(value, spec=".2e") -> str:
    if value is None:
        return ""
    if math.isinf(value):
        return "inf"
    return format(value, spec)


def format_table(results: Sequence[CheckResult], max_ratio: float = DEFAULT_MAX_RATIO) -> str:
    header = ("op", "variant", "shape", "dtype", "dir", "path", "max err fused", "max err plain", "ratio",
              "worst", "result")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = (r.op, r.variant, r.shape, r.dtype, r.direction, r.path, _num(r.fused_error), _num(r.plain_error),
                 _num(r.ratio, ".2f"), r.worst, _verdict(r) + (f" {r.detail}" if r.detail else ""))
        lines.append("| " + " | ".join(cells) + " |")
    failed = sum(not r.passed for r in results)
    skipped = sum(r.skipped for r in results)
    lines.append("")
    lines.append(f"{len(results) - failed - skipped}/{len(results)} passed, {failed} failed, {skipped} skipped "
                 f"(error ratio limit {max_ratio:g}: fused error vs float64 at most that multiple of plain "
                 "PyTorch's error in the same dtype; the sampler must pick identical tokens)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------
# the sampler: C++ extension against its Python twin
# ---------------------------------------------------------------------------------

# Parameter mixes: each list is one batch (rows may differ).
SAMPLER_MIXES = {
    "greedy": [dict(temperature=0.0)],
    "top-k": [dict(temperature=0.8, top_k=20, seed=1), dict(temperature=1.2, top_k=5, seed=2)],
    "top-p + repetition": [dict(temperature=0.9, top_p=0.8, repetition_penalty=1.3, seed=3)],
    "min-p + presence/frequency": [dict(temperature=1.0, min_p=0.05, presence_penalty=0.5, frequency_penalty=0.3,
                                        seed=4)],
    "mixed rows": [dict(temperature=0.0), dict(temperature=0.7, top_k=40, top_p=0.9, seed=5),
                   dict(temperature=1.0, logit_bias={7: 5.0}, seed=6)],
}


def check_sampler(device, new_tokens: int = 12) -> List[CheckResult]:
    """Generate with the C++ loop and with the Python twin loop on a tiny random model:
    every row must get identical tokens. Skipped (not failed) when the extension cannot
    be loaded here: gptfast then generates with the twin itself."""
    from gptfast.generation.generate import generate
    from gptfast.generation.sampling_params import SamplingParams
    from gptfast.config import GPTConfig
    from gptfast.model import GPT
    from gptfast.runtime.extension import extension_status, load_extension

    device = torch.device(device)
    started = time.perf_counter()
    if load_extension() is None:
        return [CheckResult("sampler", "C++ vs twin", "", "float32", "tokens", "python", True, skipped=True,
                            detail=f"SKIPPED: {extension_status()}", seconds=time.perf_counter() - started)]
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny"), backend="torch").to(device).eval()
    results = []
    for name, mix in SAMPLER_MIXES.items():
        params = [SamplingParams(max_new_tokens=new_tokens, **p) for p in mix]
        prompts = [[(7 * row + 3 * i) % 256 for i in range(4 + row)] for row in range(len(mix))]
        cpp = generate(model, prompts, params, engine="cpp")
        twin = generate(model, prompts, params, engine="python")
        same = sum(a.token_ids == b.token_ids for a, b in zip(cpp, twin))
        detail = f"{same}/{len(mix)} rows identical"
        results.append(CheckResult("sampler", name, f"B={len(mix)}, {new_tokens} tokens", "float32", "tokens", "cpp",
                                   same == len(mix), detail=detail, seconds=time.perf_counter() - started))
        started = time.perf_counter()
    return results
