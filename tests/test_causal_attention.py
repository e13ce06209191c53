"""Fused causal attention (gptfast.ops.causal_attention, kernels/causal_attention.py) against
float64 and plain PyTorch, forward and backward.

On the CPU the kernels run under the Triton interpreter (fp32 and fp16; tiny shapes,
since every launch takes seconds); bf16 and longer sequences run on CUDA only. Every
buffer the launchers allocate is filled with NaN first (see ``poisoned_buffers``), so a
finite result proves each element was written.
"""
import functools
import importlib
import math

import pytest
import torch

from gptfast import reference
from gptfast.ops import _dispatch
attention_op = importlib.import_module("gptfast.ops.causal_attention")
from gptfast.ops.causal_attention import causal_attention
from gptfast.testing import assert_error_ratio, poisoned_kernel_outputs, randn

attention_kernels = pytest.importorskip("gptfast.kernels.causal_attention")
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

# The Triton interpreter itself converts 1-element arrays to Python ints (loop bounds).
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def poisoned_buffers():
    """Every output / scratch buffer of the launchers starts as NaN."""
    with poisoned_kernel_outputs():
        yield


_randn = functools.partial(randn, device=DEVICE)  # gptfast.testing.randn on this file's device


def _qkv(batch, heads, q_len, head_dim, dtype, q_offset=0, seed=0):
    kv_len = q_offset + q_len
    return (_randn(batch, heads, q_len, head_dim, dtype=dtype, seed=seed),
            _randn(batch, heads, kv_len, head_dim, dtype=dtype, seed=seed + 1),
            _randn(batch, heads, kv_len, head_dim, dtype=dtype, seed=seed + 2))


def _attention_and_grads(fn, q, k, v, grad_out, **kwargs):
    """fn(q, k, v) and its gradients wrt q, k, v, on fresh leaves that keep the inputs' strides."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, **kwargs)
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in leaves]


def check_against_float64(q, k, v, q_offset=0, scale=None, max_ratio=3.0, **kwargs):
    """The error-ratio rule for out, dq, dk, dv: the fused op vs float64, relative to the
    reference twin run in the inputs' dtype (plain PyTorch). ``kwargs`` (q_positions,
    key_start) go to both."""
    assert q.device.type == "cuda" or _dispatch.use_triton(q), "the Triton path must serve this test"
    grad_out = _randn(*q.shape, dtype=q.dtype, seed=99)
    kwargs.update(scale=scale, q_offset=q_offset)
    fused = _attention_and_grads(causal_attention, q, k, v, grad_out, **kwargs)
    plain = _attention_and_grads(reference.causal_attention, q, k, v, grad_out, **kwargs)
    exact = _attention_and_grads(reference.causal_attention, q.double(), k.double(), v.double(), grad_out.double(),
                                 **kwargs)
    for name, f, p, e, inp in zip(("out", "dq", "dk", "dv"), fused, plain, exact, (q, q, k, v)):
        assert f.shape == inp.shape and f.dtype == inp.dtype, f"{name}: {f.dtype} {tuple(f.shape)}"
        assert_error_ratio(f, p, e, max_ratio=max_ratio, what=f"{name} {q.dtype} q{tuple(q.shape)} q_offset={q_offset}")


# ----------------------------------------------------------------------------- numerics

# A covering set rather than a product: every T in {1, 17, 130}, every D in {32, 64, 80,
# 128} (80 exercises the padded head dimension), both CPU dtypes, B=1, H=3.
@pytest.mark.parametrize(
    "q_len,head_dim,dtype",
    [
        (1, 32, torch.float32),
        (1, 80, torch.float16),
        (17, 64, torch.float16),
        (17, 128, torch.float32),
        (130, 80, torch.float16),
        (130, 32, torch.float32),
    ],
)
def test_matches_float64(q_len, head_dim, dtype):
    check_against_float64(*_qkv(1, 3, q_len, head_dim, dtype))


@pytest.mark.parametrize(
    "q_len,q_offset,head_dim,dtype",
    [
        (5, 12, 64, torch.float32),  # a chunk of queries after a cached prefix
        (1, 16, 32, torch.float16),  # a single query: the decode shape through the prefill kernel
        (17, 40, 80, torch.float16),  # offset and length both off the block grid
    ],
)
def test_query_offset(q_len, q_offset, head_dim, dtype):
    check_against_float64(*_qkv(1, 3, q_len, head_dim, dtype, q_offset=q_offset), q_offset=q_offset)


# Grouped-query heads (H_kv dividing H) and per-row key ranges (key_start: a left-padded
# batch), alone and together, with T=1 and lengths off the block grid (interpreter tiles
# are 32 x 16 forward, 16 x 32 dK/dV).
@pytest.mark.parametrize(
    "heads,kv_heads,q_len,q_offset,head_dim,dtype,starts",
    [
        (4, 2, 17, 0, 32, torch.float32, None),
        (4, 1, 17, 0, 80, torch.float16, None),  # multi-query
        (4, 2, 1, 0, 32, torch.float16, None),
        (2, 2, 37, 0, 32, torch.float32, [0, 5, 33]),  # ragged: 33 starts in the last key block
        (2, 2, 20, 0, 64, torch.float16, [16, 3, 19]),  # 16: on a block edge; 19: one real query
        (4, 2, 9, 12, 32, torch.float32, [13, 0, 20]),  # with a cached prefix; 20 > every query
        (4, 1, 1, 0, 32, torch.float32, [0, 0, 0]),
    ],
)
def test_grouped_query_and_key_start(heads, kv_heads, q_len, q_offset, head_dim, dtype, starts):
    batch = 1 if starts is None else len(starts)
    q = _randn(batch, heads, q_len, head_dim, dtype=dtype, seed=3)
    k = _randn(batch, kv_heads, q_offset + q_len, head_dim, dtype=dtype, seed=4)
    v = _randn(batch, kv_heads, q_offset + q_len, head_dim, dtype=dtype, seed=5)
    key_start = None if starts is None else torch.tensor(starts, device=DEVICE)
    check_against_float64(q, k, v, q_offset=q_offset, key_start=key_start)


def test_key_start_rows_are_defined_and_padding_is_never_read():
    """Queries before their row's key_start output 0 with zero gradients, and NaN in the
    padded keys changes nothing (they are never read)."""
    q, k, v = _qkv(2, 2, 21, 32, torch.float32, seed=7)
    key_start = torch.tensor([6, 0], dtype=torch.int32, device=DEVICE)
    grad_out = _randn(*q.shape, dtype=q.dtype, seed=8)
    clean = _attention_and_grads(causal_attention, q, k, v, grad_out, key_start=key_start)
    dirty_k, dirty_v = k.clone(), v.clone()
    dirty_k[0, :, :6], dirty_v[0, :, :6] = float("nan"), float("nan")
    dirty = _attention_and_grads(causal_attention, q, dirty_k, dirty_v, grad_out, key_start=key_start)
    for name, c, d in zip(("out", "dq", "dk", "dv"), clean, dirty):
        assert torch.equal(c, d), name
    out, dq, dk, dv = clean
    assert torch.equal(out[0, :, :6], torch.zeros_like(out[0, :, :6]))
    assert torch.equal(dq[0, :, :6], torch.zeros_like(dq[0, :, :6]))
    assert torch.equal(dk[0, :, :6], torch.zeros_like(dk[0, :, :6]))
    assert torch.equal(dv[0, :, :6], torch.zeros_like(dv[0, :, :6]))


def test_position_tensor_over_a_static_cache_runs_the_kernel(monkeypatch):
    """q_positions (the model's compiled prefill) runs the Triton forward and backward,
    reads no key past the last query (the stale rest of the cache is NaN here) and gives
    those keys zero gradients; with grouped-query heads and key_start too."""
    calls = []
    real = attention_kernels.attention_forward
    monkeypatch.setattr(attention_kernels, "attention_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q = _randn(3, 4, 7, 32, dtype=torch.float32, seed=11)
    cache_k = _randn(3, 2, 40, 32, dtype=torch.float32, seed=12)
    cache_v = _randn(3, 2, 40, 32, dtype=torch.float32, seed=13)
    positions = torch.arange(9, 16, device=DEVICE)
    cache_k[:, :, 16:], cache_v[:, :, 16:] = float("nan"), float("nan")
    key_start = torch.tensor([0, 4, 12], device=DEVICE)
    grad_out = _randn(*q.shape, dtype=q.dtype, seed=14)
    fused = _attention_and_grads(causal_attention, q, cache_k, cache_v, grad_out, q_positions=positions,
                                 key_start=key_start)
    assert calls, "the Triton forward must serve q_positions"
    assert all(torch.isfinite(t).all() for t in fused)
    assert torch.equal(fused[2][:, :, 16:], torch.zeros_like(fused[2][:, :, 16:]))
    exact = _attention_and_grads(reference.causal_attention, q.double(), cache_k[:, :, :16].double(),
                                 cache_v[:, :, :16].double(), grad_out.double(), q_offset=9, key_start=key_start)
    plain = _attention_and_grads(reference.causal_attention, q, cache_k[:, :, :16], cache_v[:, :, :16], grad_out,
                                 q_offset=9, key_start=key_start)
    for name, f, p, e in zip(("out", "dq", "dk", "dv"), fused, plain, exact):
        assert_error_ratio(f[:, :, :16] if name in ("dk", "dv") else f, p, e, what=f"q_positions {name}")


def _row_positions_over_a_stale_cache(starts, heads, kv_heads, q_len, cache_len, head_dim, dtype, seed):
    """q and a (B, H_kv, cache_len, D) cache whose slots past each row's last query are NaN
    (the unwritten rest of a static cache), with (B, Tq) positions: row b at
    ``starts[b] .. starts[b] + Tq - 1``."""
    batch = len(starts)
    q = _randn(batch, heads, q_len, head_dim, dtype=dtype, seed=seed)
    k = _randn(batch, kv_heads, cache_len, head_dim, dtype=dtype, seed=seed + 1)
    v = _randn(batch, kv_heads, cache_len, head_dim, dtype=dtype, seed=seed + 2)
    positions = torch.tensor(starts, device=DEVICE)[:, None] + torch.arange(q_len, device=DEVICE)
    for row, start in enumerate(starts):
        k[row, :, start + q_len:], v[row, :, start + q_len:] = float("nan"), float("nan")
    return q, k, v, positions


# Per-row positions (a speculative verify step): ragged rows, starts and ends on and off
# the interpreter's block grid (32 x 16 forward, 16 x 32 dK/dV), NaN in every row's
# unwritten cache part, grouped-query k/v and key ranges.
@pytest.mark.parametrize(
    "starts,heads,kv_heads,q_len,head_dim,dtype,key_start",
    [
        ([0, 11, 30], 4, 2, 5, 32, torch.float32, None),
        ([7, 0, 26], 2, 2, 5, 80, torch.float16, None),
        ([3, 19], 4, 1, 20, 32, torch.float16, None),  # multi-query; 20 queries cross a forward block edge
        ([0, 16], 2, 2, 1, 64, torch.float32, None),  # T=1 per row
        ([12], 2, 1, 6, 32, torch.float32, None),  # batch 1
        ([9, 4, 14], 4, 2, 7, 32, torch.float32, [0, 6, 20]),  # with key ranges; row 2 sees keys 20.. only
    ],
)
def test_per_row_positions(starts, heads, kv_heads, q_len, head_dim, dtype, key_start):
    """q_positions of shape (B, Tq): each row's queries at its own positions over its own
    cache row, forward and backward by the error-ratio rule against float64; no key past a
    row's last query is read (NaN there), and those keys get zero gradients."""
    q, k, v, positions = _row_positions_over_a_stale_cache(starts, heads, kv_heads, q_len, 40, head_dim, dtype, 31)
    key_start = None if key_start is None else torch.tensor(key_start, device=DEVICE)
    check_against_float64(q, k, v, q_positions=positions, key_start=key_start)
    grad_out = _randn(*q.shape, dtype=q.dtype, seed=99)
    out, dq, dk, dv = _attention_and_grads(causal_attention, q, k, v, grad_out, q_positions=positions,
                                           key_start=key_start)
    for row, start in enumerate(starts):
        stale = slice(start + q_len, None)
        assert not dk[row, :, stale].any() and not dv[row, :, stale].any(), f"row {row}: stale keys got gradients"


def test_per_row_positions_reference_is_each_rows_own_offset():
    """The twin's (B, Tq) positions (float64, over the NaN-tailed cache) equal, row by row,
    its q_offset form over that row's written keys only."""
    starts, q_len = [0, 11, 30], 5
    q, k, v, positions = _row_positions_over_a_stale_cache(starts, 4, 2, q_len, 40, 32, torch.float64, 41)
    grad_out = _randn(*q.shape, dtype=q.dtype, seed=42)
    rows = _attention_and_grads(reference.causal_attention, q, k, v, grad_out, q_positions=positions)
    for row, start in enumerate(starts):
        end = start + q_len
        one = _attention_and_grads(reference.causal_attention, q[row:row + 1], k[row:row + 1, :, :end],
                                   v[row:row + 1, :, :end], grad_out[row:row + 1], q_offset=start)
        for name, got, want in zip(("out", "dq", "dk", "dv"), rows, one):
            got = got[row:row + 1, :, :end] if name in ("dk", "dv") else got[row:row + 1]
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"row {row} {name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_non_contiguous_qkv_split(dtype):
    """q, k, v as views of one fused projection (B, T, 3, H, D), read without copies."""
    batch, seq, heads, head_dim = 2, 17, 3, 64
    qkv = _randn(batch, seq, 3 * heads * head_dim, dtype=dtype, seed=5)
    q, k, v = qkv.view(batch, seq, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous() and q.stride(-1) == 1
    check_against_float64(q, k, v)


def test_kv_cache_slice():
    """Chunked prefill as the model does it: k, v are the first q_offset + Tq positions of
    a larger static cache (a strided view), the queries a fresh chunk."""
    q_len, q_offset, head_dim = 5, 12, 32
    q = _randn(1, 3, q_len, head_dim, dtype=torch.float16, seed=21)
    k_cache = _randn(1, 3, 64, head_dim, dtype=torch.float16, seed=22)
    v_cache = _randn(1, 3, 64, head_dim, dtype=torch.float16, seed=23)
    k, v = k_cache[:, :, : q_offset + q_len], v_cache[:, :, : q_offset + q_len]
    assert not k.is_contiguous()
    check_against_float64(q, k, v, q_offset=q_offset)


def test_custom_scale():
    q, k, v = _qkv(1, 3, 17, 32, torch.float32)
    check_against_float64(q, k, v, scale=0.3)


def test_grad_output_non_contiguous():
    """The backward reads dO through its strides (here: a transposed gradient)."""
    q, k, v = _qkv(1, 3, 17, 32, torch.float32)
    grad_out = _randn(1, 17, 3, 32, dtype=torch.float32, seed=7).transpose(1, 2)
    fused = _attention_and_grads(causal_attention, q, k, v, grad_out)
    exact = _attention_and_grads(reference.causal_attention, q.double(), k.double(), v.double(), grad_out.double())
    plain = _attention_and_grads(reference.causal_attention, q, k, v, grad_out)
    for f, p, e in zip(fused, plain, exact):
        assert_error_ratio(f, p, e, what="non-contiguous grad_out")


@pytest.mark.parametrize("padded", [False, True])
def test_inference_forward_skips_the_log_sum_exp(padded):
    """Without gradients the forward neither allocates nor writes the log-sum-exp, and
    writes the same output bits as the training forward."""
    q, k, v = _qkv(2, 2, 37, 32, torch.float32, q_offset=5)
    key_start = torch.tensor([0, 9]) if padded else None
    with poisoned_kernel_outputs():
        out, lse = attention_kernels.attention_forward(q, k, v, 0.2, 5, key_start=key_start, store_lse=False)
        want, want_lse = attention_kernels.attention_forward(q, k, v, 0.2, 5, key_start=key_start)
        with torch.no_grad():
            public = causal_attention(q, k, v, scale=0.2, q_offset=5, key_start=key_start)
    assert lse is None and want_lse.shape == (2, 2, 37)
    assert torch.equal(out, want) and torch.equal(public, want)
    with pytest.raises(ValueError, match="lse was given with store_lse=False"):  # it would stay unwritten
        attention_kernels.attention_forward(q, k, v, 0.2, 5, lse=torch.empty_like(want_lse), store_lse=False)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_shipped_gpu_tiles_under_interpreter(head_dim):
    """The sm_90 fp16/bf16 tile configurations (blocks of 32..128, unequal BLOCK_M and
    BLOCK_N) run their causal split logic here too, on the GPU-tuned tile sizes."""
    shipped = {kernel: attention_kernels.shipped_config(kernel, head_dim, torch.bfloat16)
               for kernel in ("fwd", "dkdv", "dq")}
    q, k, v = _qkv(1, 1, 130, head_dim, torch.float32, q_offset=7)
    grad_out = _randn(*q.shape, dtype=q.dtype, seed=3)
    scale = 1 / math.sqrt(head_dim)
    out, lse = attention_kernels.attention_forward(q, k, v, scale, 7, config=shipped["fwd"])
    dq, dk, dv = attention_kernels.attention_backward(grad_out, q, k, v, out, lse, scale, 7,
                                                      dkdv_cfg=shipped["dkdv"], dq_cfg=shipped["dq"])
    exact = _attention_and_grads(reference.causal_attention, q.double(), k.double(), v.double(), grad_out.double(),
                                 q_offset=7)
    plain = _attention_and_grads(reference.causal_attention, q, k, v, grad_out, q_offset=7)
    for name, f, p, e in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), plain, exact):
        assert_error_ratio(f, p, e, what=f"{name} with the D={head_dim} GPU tiles")


# The kernels' variants (attention_kernels.VARIANTS): tensor-descriptor tiles (``tma``,
# which the interpreter runs too) and the fused backward adding dQ with fp32 atomics
# (``tma_atomic_dq``), on the interpreter's small tiles, with the padded head size, lengths
# off the block grid, a cached prefix, grouped-query heads and key ranges.
_TILES = {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)}


def _variant_cfgs(fwd=None, dkdv=None, dq=None):
    return {kernel: attention_kernels.LaunchConfig(block_m=m, block_n=n, num_warps=4, variant=variant)
            for (kernel, (m, n)), variant in zip(_TILES.items(), (fwd, dkdv, dq))}


@pytest.mark.parametrize(
    "variants,batch,heads,kv_heads,q_len,q_offset,head_dim,dtype,starts",
    [
        (("tma", "tma", "tma"), 1, 2, 2, 37, 0, 80, torch.float16, None),
        (("tma", "tma_atomic_dq", None), 2, 4, 2, 21, 12, 32, torch.float32, [13, 0]),
        ((None, "tma_atomic_dq", None), 1, 3, 1, 17, 5, 64, torch.float16, None),
        (("tma", "tma", "tma"), 3, 2, 1, 20, 0, 32, torch.float32, [16, 3, 19]),
        # Persistent forwards (INTERPRETER_SMS programs a SM: several tiles each, a partial last round).
        (("persistent", "tma", None), 2, 3, 1, 37, 5, 80, torch.float16, None),
        (("tma_persistent", None, "tma"), 3, 2, 2, 45, 0, 32, torch.float32, [16, 3, 40]),
        (("persistent_x2", None, None), 1, 1, 1, 1, 0, 64, torch.float32, None),
        (("tma_persistent_x2", "tma_atomic_dq", None), 2, 2, 1, 70, 9, 32, torch.float16, [0, 30]),
        # Persistent dK/dV (first key blocks first), with the fused atomic dQ too.
        ((None, "persistent", None), 2, 3, 1, 37, 5, 80, torch.float16, None),
        (("tma", "tma_atomic_dq_persistent", None), 3, 2, 2, 45, 0, 32, torch.float32, [16, 3, 40]),
        ((None, "tma_persistent_x2", "tma"), 1, 4, 2, 1, 0, 64, torch.float32, None),
        (("persistent", "tma_atomic_dq_persistent_x2", "tma"), 2, 2, 1, 70, 9, 32, torch.float16, [0, 30]),
    ],
)
def test_variants_match_float64(variants, batch, heads, kv_heads, q_len, q_offset, head_dim, dtype, starts):
    q = _randn(batch, heads, q_len, head_dim, dtype=dtype, seed=11)
    k = _randn(batch, kv_heads, q_offset + q_len, head_dim, dtype=dtype, seed=12)
    v = _randn(batch, kv_heads, q_offset + q_len, head_dim, dtype=dtype, seed=13)
    grad_out = _randn(*q.shape, dtype=dtype, seed=14)
    key_start = None if starts is None else torch.tensor(starts, device=DEVICE)
    cfgs = _variant_cfgs(*variants)
    # Everything is 16-byte aligned here, so the descriptors really serve the tma launches.
    assert attention_kernels._tma_ready(q, k, v, grad_out)
    scale = 1 / math.sqrt(head_dim)
    out, lse = attention_kernels.attention_forward(q, k, v, scale, q_offset, key_start=key_start, config=cfgs["fwd"])
    grads = attention_kernels.attention_backward(grad_out, q, k, v, out, lse, scale, q_offset, key_start=key_start,
                                                 dkdv_cfg=cfgs["dkdv"], dq_cfg=cfgs["dq"])
    kwargs = dict(q_offset=q_offset, key_start=key_start)
    exact = _attention_and_grads(reference.causal_attention, q.double(), k.double(), v.double(), grad_out.double(),
                                 **kwargs)
    plain = _attention_and_grads(reference.causal_attention, q, k, v, grad_out, **kwargs)
    for name, f, p, e in zip(("out", "dq", "dk", "dv"), (out, *grads), plain, exact):
        assert_error_ratio(f, p, e, what=f"{name} {dtype} with variants {variants}")


def test_variant_with_unaligned_rows_takes_the_pointer_loads():
    """A descriptor needs 16-byte aligned rows: fp16 rows of 20 elements (40 bytes) are not,
    so a ``tma`` launch reads them with pointer loads instead, and is still right."""
    q, k, v = (t[..., :20] for t in _qkv(1, 2, 19, 20, torch.float16, seed=5))  # strides 20: 40-byte rows
    assert not attention_kernels._tma_ready(q, k, v)
    flags = attention_kernels._use_tma(attention_kernels.variant_flags("fwd", _variant_cfgs("tma")["fwd"]), q, k, v)
    assert flags == {"USE_TMA": False, "PERSISTENT": False}
    aligned = _qkv(1, 2, 19, 32, torch.float16)
    assert attention_kernels._use_tma({"USE_TMA": True}, *aligned) == {"USE_TMA": True}
    cfgs = _variant_cfgs("tma", "tma_atomic_dq", "tma")
    grad_out = _randn(*q.shape, dtype=q.dtype, seed=6)
    out, lse = attention_kernels.attention_forward(q, k, v, 0.25, config=cfgs["fwd"])
    grads = attention_kernels.attention_backward(grad_out, q, k, v, out, lse, 0.25, dkdv_cfg=cfgs["dkdv"],
                                                 dq_cfg=cfgs["dq"])
    exact = _attention_and_grads(reference.causal_attention, q.double(), k.double(), v.double(), grad_out.double(),
                                 scale=0.25)
    plain = _attention_and_grads(reference.causal_attention, q, k, v, grad_out, scale=0.25)
    for name, f, p, e in zip(("out", "dq", "dk", "dv"), (out, *grads), plain, exact):
        assert_error_ratio(f, p, e, what=f"{name} of an unaligned tma launch")


@pytest.mark.parametrize("variant", ["persistent", "tma_persistent"])
def test_persistent_forward_per_row_positions_and_key_ranges(variant):
    """A persistent forward with (B, Tq) positions over a NaN-tailed cache and key ranges:
    each tile reads its own row's positions and key start, whichever program runs it."""
    starts, q_len = [9, 4, 14], 37
    q, k, v, positions = _row_positions_over_a_stale_cache(starts, 4, 2, q_len, 60, 32, torch.float32, 51)
    key_start = torch.tensor([0, 6, 20], device=DEVICE)
    cfg = _variant_cfgs(variant)["fwd"]
    tiles = q.shape[0] * q.shape[1] * math.ceil(q_len / cfg.block_m)
    assert attention_kernels.persistent_programs(tiles, variant, q.device) < tiles  # programs loop over tiles
    out, lse = attention_kernels.attention_forward(q, k, v, 0.3, q_positions=positions, key_start=key_start,
                                                   config=cfg)
    kwargs = dict(scale=0.3, q_positions=positions, key_start=key_start)
    exact = reference.causal_attention(q.double(), k.double(), v.double(), **kwargs)
    assert_error_ratio(out, reference.causal_attention(q, k, v, **kwargs), exact, what=f"{variant} out")
    assert not lse.isnan().any()  # written everywhere (the buffer starts as NaN)


@triton.jit
def _record_persistent_tiles(OUT, batch_heads, q_blocks, rounds):
    """OUT[program, round] = (pid_bh, start_m, valid) as the persistent forward deals them."""
    for rnd in range(0, rounds):
        pid_bh, start_m, valid = attention_kernels._persistent_tile(rnd, batch_heads, q_blocks)
        base = OUT + (tl.program_id(0) * rounds + rnd) * 3
        tl.store(base, pid_bh)
        tl.store(base + 1, start_m)
        tl.store(base + 2, valid.to(tl.int32))


@pytest.mark.parametrize("batch_heads,q_blocks,programs", [(3, 5, 4), (8, 2, 8), (1, 7, 3), (2, 1, 2)])
def test_persistent_tiles_cover_every_tile_once_longest_first(batch_heads, q_blocks, programs):
    """The persistent forward's schedule: every (batch-head, query block) tile exactly once,
    rounds in order of work (every tile of a round has at least as many key blocks as any of
    the next round's), and no program's total work more than one tile's above another's."""
    rounds = math.ceil(batch_heads * q_blocks / programs)
    out = torch.full((programs, rounds, 3), -1, dtype=torch.int32, device=DEVICE)
    _record_persistent_tiles[(programs,)](out, batch_heads, q_blocks, rounds)
    out = out.cpu()
    valid = out[..., 2] == 1
    tiles = [tuple(t) for t in out[..., :2][valid].tolist()]
    assert sorted(tiles) == [(bh, m) for bh in range(batch_heads) for m in range(q_blocks)]
    assert not valid[:, :-1].logical_not().any()  # only the last round may be partial
    work = torch.where(valid, out[..., 1] + 1, 0)  # a causal tile's key blocks grow with its query block
    for r in range(rounds - 1):
        assert work[:, r][valid[:, r]].min() >= work[:, r + 1][valid[:, r + 1]].max(), f"round {r}"
    totals = work.sum(1)
    assert totals.max() - totals.min() <= q_blocks


def test_persistent_grid_size():
    """A few programs per SM (INTERPRETER_SMS off CUDA), never more than there are tiles."""
    cpu = torch.device("cpu")
    sms = attention_kernels.INTERPRETER_SMS
    assert attention_kernels.persistent_programs(1, "persistent", cpu) == 1
    assert attention_kernels.persistent_programs(1000, "persistent", cpu) == sms
    assert attention_kernels.persistent_programs(1000, "tma_persistent_x2", cpu) == 2 * sms
    assert set(attention_kernels.PROGRAMS_PER_SM) <= set(attention_kernels.VARIANTS["dkdv"])
    assert {v for v in attention_kernels.VARIANTS["fwd"] if v} == {"tma"} | {
        v for v in attention_kernels.PROGRAMS_PER_SM if "atomic" not in v}
    assert attention_kernels.variant_flags("dkdv", attention_kernels.LaunchConfig(
        num_warps=4, variant="tma_atomic_dq_persistent")) == {"USE_TMA": True, "ATOMIC_DQ": True, "PERSISTENT": True}
    with pytest.raises(ValueError, match="causal_attention.dq: unknown variant 'persistent'"):
        attention_kernels.variant_flags("dq", attention_kernels.LaunchConfig(num_warps=4, variant="persistent"))


def test_unknown_variant_is_rejected():
    q, k, v = _qkv(1, 1, 4, 16, torch.float32)
    with pytest.raises(ValueError, match="causal_attention.fwd: unknown variant 'atomic_dq'"):
        attention_kernels.attention_forward(q, k, v, 0.25, config=_variant_cfgs("atomic_dq")["fwd"])
    with pytest.raises(ValueError, match="LaunchConfig.variant must be None or a name"):
        attention_kernels.LaunchConfig(num_warps=4, variant="not a name")


def test_candidates_are_few_distinct_and_known():
    """At most 8 candidates per kernel and key, no repeats, the shipped config first, and
    every variant one the kernel has."""
    for kernel, by_key in attention_kernels.CANDIDATES.items():
        for key, configs in by_key.items():
            assert 1 <= len(configs) <= 8 and len(set(configs)) == len(configs), (kernel, key)
            # A short-sequence key's baseline is its long key's shipped tile.
            assert configs[0] == attention_kernels._GPU[kernel][key.removesuffix(attention_kernels.SHORT)], key
            for cfg in configs:
                attention_kernels.variant_flags(kernel, cfg)
    # The short keys are the forward's, one per long key, and the ones forward_key gives.
    for d in (64, 128):
        short = attention_kernels.forward_key(d, torch.bfloat16, attention_kernels.SHORT_MAX_LEN)
        assert short == f"d{d}_16bit_short" and short in attention_kernels.CANDIDATES["fwd"]
        assert attention_kernels.forward_key(d, torch.float16, attention_kernels.SHORT_MAX_LEN + 1) == f"d{d}_16bit"
    assert not any(key.endswith("_short") for kernel in ("dkdv", "dq") for key in attention_kernels.CANDIDATES[kernel])


def test_saved_log_sum_exp():
    """lse is the base-2 log-sum-exp of scale * log2(e) * q.k over each query's visible keys."""
    q, k, v = _qkv(1, 3, 17, 32, torch.float32, q_offset=3)
    scale = 0.2
    _, lse = attention_kernels.attention_forward(q, k, v, scale, 3)
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    visible = torch.ones(17, 20, dtype=torch.bool, device=q.device).tril(diagonal=3)
    expected = torch.logsumexp(scores.masked_fill(~visible, float("-inf")), dim=-1) / math.log(2)
    assert lse.shape == (1, 3, 17) and lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), expected, rtol=1e-6, atol=1e-5)


def test_preallocated_buffers_are_checked():
    q, k, v = _qkv(1, 1, 5, 16, torch.float32)
    with pytest.raises(ValueError, match="out must have shape"):
        attention_kernels.attention_forward(q, k, v, 0.25, 0, out=torch.empty(1, 1, 4, 16))
    with pytest.raises(ValueError, match="lse must have shape"):
        attention_kernels.attention_forward(q, k, v, 0.25, 0, lse=torch.empty(1, 1, 5, dtype=torch.float16))


def test_torch_path_matches_reference(monkeypatch):
    """Without Triton (CPU, no interpreter) the op runs SDPA, with a mask for q_offset."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = _qkv(1, 3, 6, 16, torch.float32, q_offset=4)
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    assert not _dispatch.use_triton(q)
    for q_offset, (qq, kk, vv) in ((4, (q, k, v)), (0, (q, k[:, :, :6], v[:, :, :6]))):
        grad_out = torch.randn_like(qq)
        got = _attention_and_grads(causal_attention, qq, kk, vv, grad_out, q_offset=q_offset)
        want = _attention_and_grads(reference.causal_attention, qq, kk, vv, grad_out, q_offset=q_offset)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_torch_path_grouped_query_and_key_start(monkeypatch):
    """The torch path (SDPA with enable_gqa and a mask) takes the same arguments, forward
    and backward, with the padded queries' outputs and gradients 0."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(3, 4, 6, 16)
    k, v = torch.randn(3, 2, 10, 16), torch.randn(3, 2, 10, 16)
    key_start = torch.tensor([0, 5, 9])
    grad_out = torch.randn_like(q)
    for kwargs in (dict(q_offset=4, key_start=key_start), dict(q_positions=torch.arange(4, 10), key_start=key_start),
                   dict(q_offset=4)):
        got = _attention_and_grads(causal_attention, q, k, v, grad_out, **kwargs)
        want = _attention_and_grads(reference.causal_attention, q, k, v, grad_out, **kwargs)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        if "key_start" in kwargs:  # row 2 starts at key 9: its queries at positions 4..8 see nothing
            assert not got[0][2, :, :5].any() and not got[1][2, :, :5].any()


def test_torch_path_per_row_positions(monkeypatch):
    """The torch path (SDPA with a per-row mask) takes (B, Tq) positions over a cache whose
    unwritten part is NaN, forward and backward, matching the twin in float64."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, positions = _row_positions_over_a_stale_cache([0, 11, 30], 4, 2, 5, 40, 16, torch.float64, 51)
    q, k, v, positions = q.cpu(), k.cpu(), v.cpu(), positions.cpu()
    assert not _dispatch.use_triton(q.float())
    grad_out = torch.randn_like(q)
    got = _attention_and_grads(causal_attention, q.float(), k.float(), v.float(), grad_out.float(),
                               q_positions=positions)
    want = _attention_and_grads(reference.causal_attention, q, k, v, grad_out, q_positions=positions)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5, msg=name)


def test_cpu_inference_with_positions_runs_the_cpp_kernel(monkeypatch):
    """Without Triton, float32 CPU inference with q_positions (a verify step: a few queries
    per row at its newest positions) runs the C++ decode-attention kernel on each row's T
    newest queries, once per call: per-row and shared positions, grouped-query heads, key
    ranges, NaN past every row's last query, by the error-ratio rule against the float64
    twin. With gradients, float16 or no extension it is the torch path."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    decode_op = importlib.import_module("gptfast.ops.decode_attention")
    real = decode_op.cpu_kernel()
    if real is None:
        pytest.skip("the gptfast C++ extension (with csrc/cpu_attention.cpp) is not loaded")
    calls = []
    monkeypatch.setattr(decode_op, "_cpu_kernel", [lambda *args: calls.append(args) or real(*args)])
    q, k, v, positions = _row_positions_over_a_stale_cache([0, 11, 30], 4, 2, 5, 40, 16, torch.float64, 61)
    q, k, v, positions = q.cpu(), k.cpu(), v.cpu(), positions.cpu()
    key_start = torch.tensor([0, 13, 2])
    shared = torch.arange(20, 25)
    for kwargs in (dict(q_positions=positions), dict(q_positions=positions, key_start=key_start),
                   dict(q_positions=shared)):
        kk, vv = (k, v)
        if kwargs["q_positions"] is shared:  # every row at 20..24: a 25-position cache, written throughout
            kk, vv = k[:, :, :25].nan_to_num(), v[:, :, :25].nan_to_num()
        n = len(calls)
        got = causal_attention(q.float(), kk.float(), vv.float(), **kwargs)
        assert len(calls) == n + 1, "the C++ kernel must serve this call"
        assert torch.isfinite(got).all()
        plain = reference.causal_attention(q.float(), kk.float(), vv.float(), **kwargs)
        want = reference.causal_attention(q, kk, vv, **kwargs)
        assert_error_ratio(got, plain, want, what=f"C++ verify attention {sorted(kwargs)}")
        if "key_start" in kwargs:  # row 1's queries before position 13 see nothing
            assert not got[1, :, :2].any()
    n = len(calls)
    causal_attention(q.float().requires_grad_(), k.float(), v.float(), q_positions=positions).sum().backward()
    causal_attention(q.half(), k.half(), v.half(), q_positions=positions)
    many = attention_op.CPU_KERNEL_MAX_QUERIES + 1  # a prefill's many queries: SDPA's blocked products
    long_q = torch.randn(1, 4, many, 16)
    long_kv = torch.randn(1, 2, many + 3, 16)
    causal_attention(long_q, long_kv, long_kv, q_positions=torch.arange(3, many + 3))
    monkeypatch.setattr(decode_op, "_cpu_kernel", [None])
    causal_attention(q.float(), k.float(), v.float(), q_positions=positions)
    assert len(calls) == n  # the torch path served all four


# ----------------------------------------------------------------------------- bad input


def _bad(message, *args, error=ValueError, **kwargs):
    with pytest.raises(error, match=message):
        causal_attention(*args, **kwargs)


def test_bad_inputs():
    q, k, v = _qkv(1, 2, 4, 16, torch.float32)
    _bad("must be 4-D", q[0], k, v)
    _bad("k and v must have the same shape", q, k, v[:, :, :3])
    _bad("must agree on batch and head size", q.expand(2, -1, -1, -1), k, v)
    _bad("must agree on batch and head size", q[..., :8], k, v)
    # Grouped-query k/v are fine (2 query heads on 1 kv head), but the kv heads must divide the query heads.
    _bad("k has 2 heads, which must divide the 3 query heads", _qkv(1, 3, 4, 16, torch.float32)[0], k, v)
    _bad(r"key_start must have shape \(1,\)", q, k, v, key_start=torch.zeros(2, dtype=torch.int64))
    _bad("key_start must be int32 or int64", q, k, v, key_start=torch.zeros(1), error=TypeError)
    _bad("key_start is on meta", q, k, v, key_start=torch.zeros(1, dtype=torch.int64, device="meta"))
    _bad("key_start must be a torch.Tensor", q, k, v, key_start=[0], error=TypeError)
    _bad("dtype torch.float16", q, k.half(), v.half(), error=TypeError)
    _bad("dtype torch.float64 is not supported", q.double(), k.double(), v.double(), error=TypeError)
    _bad("on meta", q, k.to("meta"), v)
    _bad("must be a torch.Tensor", q, k, v.tolist(), error=TypeError)
    _bad("q_offset with the wrong T", q, k, v, q_offset=2)
    _bad("q_offset with the wrong T", q[:, :, :3], k, v)
    _bad("q_offset must be >= 0", q, k, v, q_offset=-1)
    _bad("q_offset must be an int", q, k, v, q_offset=1.0, error=TypeError)
    _bad("empty input", q[:, :, :0], k[:, :, :0], v[:, :, :0])
    positions = torch.arange(4)
    _bad(r"q_positions must be a \(4,\) or \(1, 4\) integer tensor .* got \(2, 4\)", q, k, v,
         q_positions=positions.expand(2, 4))
    _bad(r"q_positions must be a \(4,\) or \(1, 4\) integer tensor .* got \(1, 5\)", q, k, v,
         q_positions=torch.arange(5)[None])
    _bad(r"q_positions must be a \(4,\) or \(1, 4\) integer tensor .* got \(1, 1, 4\)", q, k, v,
         q_positions=positions[None, None])
    _bad("q_positions must be .* torch.float32", q, k, v, q_positions=positions[None].float())
    _bad("q_positions must be a torch.Tensor", q, k, v, q_positions=[[0, 1, 2, 3]], error=TypeError)
    if DEVICE.type == "cpu":  # values are read only where that costs no device synchronisation
        _bad("q_positions .* outside the 4 keys", q, k, v, q_positions=positions[None] + 1)
        _bad("q_positions .* must be consecutive", q, k, v, q_positions=torch.tensor([[0, 1, 3, 2]]))
    else:
        _bad("q_positions is on cpu but q is on cuda", q, k, v, q_positions=positions[None])
    _bad("q_positions is on meta", q, k, v, q_positions=positions[None].to("meta"))
    _bad("give q_offset or q_positions, not both", q, k, v, q_offset=1, q_positions=positions[None])


def test_head_size_limit():
    q, k, v = _qkv(1, 1, 2, 257, torch.float32)
    _bad("head size D=257 is larger than the supported maximum 256", q, k, v)


# ----------------------------------------------------------------------------- torch integration


def test_opcheck():
    """Schema, fake tensor, autograd registration and AOT dispatch of both registered ops."""
    q, k, v = _qkv(1, 2, 5, 16, torch.float32, q_offset=3)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), 0.25, 3)
    torch.library.opcheck(torch.ops.gptfast.causal_attention_fwd.default, args)
    out, lse = torch.ops.gptfast.causal_attention_fwd(q.detach(), k.detach(), v.detach(), 0.25, 3)
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, 0.25, 3)
    torch.library.opcheck(torch.ops.gptfast.causal_attention_bwd.default, bwd_args)


def test_opcheck_grouped_query_positions_and_key_start():
    """The optional position and key-start tensors through both registered ops, with
    grouped-query k/v over a longer cache."""
    q = _randn(2, 4, 5, 16, dtype=torch.float32, seed=21)
    k, v = _randn(2, 2, 12, 16, dtype=torch.float32, seed=22), _randn(2, 2, 12, 16, dtype=torch.float32, seed=23)
    positions, key_start = torch.arange(4, 9, device=DEVICE), torch.tensor([0, 6], device=DEVICE)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), 0.25, 0, positions, key_start)
    torch.library.opcheck(torch.ops.gptfast.causal_attention_fwd.default, args)
    out, lse = torch.ops.gptfast.causal_attention_fwd(q.detach(), k.detach(), v.detach(), 0.25, 0, positions, key_start)
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, 0.25, 0, positions, key_start)
    torch.library.opcheck(torch.ops.gptfast.causal_attention_bwd.default, bwd_args)


def test_opcheck_per_row_positions():
    """(B, Tq) positions through both registered ops (fake tensors, autograd, AOT dispatch)."""
    q = _randn(2, 4, 5, 16, dtype=torch.float32, seed=24)
    k, v = _randn(2, 2, 12, 16, dtype=torch.float32, seed=25), _randn(2, 2, 12, 16, dtype=torch.float32, seed=26)
    positions = torch.tensor([[0], [6]], device=DEVICE) + torch.arange(5, device=DEVICE)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), 0.25, 0, positions)
    torch.library.opcheck(torch.ops.gptfast.causal_attention_fwd.default, args)
    out, lse = torch.ops.gptfast.causal_attention_fwd(q.detach(), k.detach(), v.detach(), 0.25, 0, positions)
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, 0.25, 0, positions)
    torch.library.opcheck(torch.ops.gptfast.causal_attention_bwd.default, bwd_args)


def test_torch_compile_fullgraph_no_graph_break():
    torch._dynamo.reset()
    q, k, v = _qkv(1, 2, 5, 16, torch.float32, q_offset=2)

    def loss_fn(q, k, v):
        return causal_attention(q, k, v, q_offset=2).square().sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    loss = compiled(*leaves)
    loss.backward()
    eager_leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    eager = loss_fn(*eager_leaves)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    for a, b in zip(leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad)


# ----------------------------------------------------------------------------- CUDA only


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "q_len,q_offset,head_dim",
    [(1, 0, 64), (17, 0, 128), (130, 0, 80), (1000, 0, 64), (1000, 0, 128), (300, 700, 64), (513, 0, 256)],
)
def test_cuda_16bit(dtype, q_len, q_offset, head_dim):
    check_against_float64(*_qkv(2, 3, q_len, head_dim, dtype, q_offset=q_offset), q_offset=q_offset)


@requires_cuda
@pytest.mark.gpu
def test_cuda_bf16_qkv_split():
    batch, seq, heads, head_dim = 2, 257, 4, 64
    qkv = _randn(batch, seq, 3 * heads * head_dim, dtype=torch.bfloat16, seed=11)
    check_against_float64(*qkv.view(batch, seq, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0))
