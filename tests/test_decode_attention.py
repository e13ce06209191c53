"""Decode attention (flash-decoding over a KV cache): the Triton kernel (interpreted on a
CPU), the C++ CPU kernel (csrc/cpu_attention.cpp, on every instruction set this CPU has)
and the torch path against the float64 reference, per-row cache lengths, forced
splits, strided caches, stale garbage, poisoned buffers, bad inputs and torch.library
registration (the sm_90 build of the shipped configurations: tests/test_compile_report.py)."""
import importlib
import re

import pytest
import torch

from gptfast import reference
from gptfast.ops import _dispatch
decode_op = importlib.import_module("gptfast.ops.decode_attention")
from gptfast.ops import decode_attention
from gptfast.testing import assert_error_ratio, poison_, poisoned_kernel_outputs

# Triton's interpreter converts 1-element arrays to loop bounds in a way NumPy deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_ON_DEVICE = _dispatch.use_triton(torch.empty(0, device=DEVICE))
needs_triton = pytest.mark.skipif(not TRITON_ON_DEVICE, reason="Triton (or its CPU interpreter) not available")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def kernel_module():
    return importlib.import_module("gptfast.kernels.decode_attention")


def make_inputs(batch, heads, seq_len, head_dim, lens, dtype, device=DEVICE, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, head_dim, generator=gen)
    k = torch.randn(batch, heads, seq_len, head_dim, generator=gen)
    v = torch.randn(batch, heads, seq_len, head_dim, generator=gen)
    cache_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), cache_lens


def exact(q, k, v, cache_lens, scale=None):
    return reference.decode_attention(q.double(), k.double(), v.double(), cache_lens, scale=scale)


def check_against_reference(out, q, k, v, cache_lens, scale=None, what=""):
    """Error-ratio rule: fused vs float64, against the reference run in q's dtype."""
    assert out.shape == q.shape and out.dtype == q.dtype
    plain = reference.decode_attention(q, k, v, cache_lens, scale=scale)
    assert_error_ratio(out, plain, exact(q, k, v, cache_lens, scale), what=what)


def force_torch_path(monkeypatch):
    """Route the op to the torch path: no Triton, and no C++ kernel (float32 on the CPU)."""
    monkeypatch.setattr(decode_op, "use_triton", lambda t: False)
    monkeypatch.setattr(decode_op, "_cpu_kernel", [None])


def blank_stale_positions(cache, cache_lens, fill):
    """A copy of ``cache`` with every position at or past its row's length set to ``fill``."""
    positions = torch.arange(cache.shape[2], device=cache.device)
    stale = positions[None, :] >= cache_lens[:, None].to(cache.device)
    return cache.masked_fill(stale[:, None, :, None], fill)


# A covering set, not a cartesian product: each case adds something (B=1, H=3, head sizes
# 32/64/80/128, per-row lengths including 1 and S, S not a multiple of BLOCK_N, S=1).
CASES = [
    # (batch, heads, seq_len, head_dim, cache_lens, dtype)
    (1, 3, 37, 32, [37], torch.float32),
    (2, 3, 37, 64, [1, 37], torch.float16),
    (3, 2, 70, 80, [1, 70, 33], torch.float32),
    (2, 1, 20, 128, [20, 7], torch.float16),
    (2, 2, 1, 64, [1, 1], torch.float32),
]


@needs_triton
@pytest.mark.parametrize("batch,heads,seq_len,head_dim,lens,dtype", CASES)
def test_matches_float64_reference(batch, heads, seq_len, head_dim, lens, dtype):
    q, k, v, cache_lens = make_inputs(batch, heads, seq_len, head_dim, lens, dtype)
    out = decode_attention(q, k, v, cache_lens)
    check_against_reference(out, q, k, v, cache_lens, what=f"decode {dtype} D={head_dim}")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forced_splits_with_per_row_lengths(dtype):
    """Several splits per row: some rows end inside the first split, one mid-split, one at
    S (not a multiple of the block), so empty splits and partial blocks all occur."""
    kernel = kernel_module()
    q, k, v, cache_lens = make_inputs(4, 2, 61, 32, [1, 61, 17, 40], dtype)
    for num_splits in (2, 4, 64):  # 64 is more than the cache has blocks: the plan trims it
        out = kernel.decode_attention(q, k, v, cache_lens, 0.3, num_splits=num_splits, block_n=16)
        check_against_reference(out, q, k, v, cache_lens, scale=0.3, what=f"{num_splits} splits")


@needs_triton
def test_heuristic_splits_long_cache():
    """A cache long enough that the default heuristic itself splits it."""
    kernel = kernel_module()
    seq_len = 2 * kernel.MIN_KEYS_PER_SPLIT + 5
    assert kernel.choose_num_splits(2, seq_len) > 1
    q, k, v, cache_lens = make_inputs(2, 1, seq_len, 16, [seq_len, kernel.MIN_KEYS_PER_SPLIT + 1], torch.float32)
    check_against_reference(decode_attention(q, k, v, cache_lens), q, k, v, cache_lens, what="long cache")


@needs_triton
def test_strided_inputs_and_int64_lengths():
    """Caches sliced out of a bigger static buffer, one in (B, S, H, D) layout; q taken
    from a fused qkv projection; int64 cache lengths."""
    batch, heads, seq_len, head_dim = 2, 3, 29, 64
    gen = torch.Generator().manual_seed(1)
    k_buffer = torch.randn(5, heads, seq_len + 11, head_dim, generator=gen).to(DEVICE)
    k = k_buffer[:batch, :, :seq_len]  # non-contiguous batch and sequence
    v = torch.randn(5, seq_len, heads, head_dim, generator=gen).to(DEVICE)[:batch].transpose(1, 2)
    qkv = torch.randn(batch, 3 * heads * head_dim, generator=gen).to(DEVICE)
    q = qkv.view(batch, 3, heads, head_dim)[:, 1]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    cache_lens = torch.tensor([seq_len, 3], dtype=torch.int64, device=DEVICE)
    out = decode_attention(q, k, v, cache_lens)
    check_against_reference(out, q, k, v, cache_lens, what="strided")


@needs_triton
@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), 3e4])
def test_stale_cache_entries_are_ignored(garbage):
    """Whatever sits past a row's length (NaN from an uninitialised cache, inf, huge
    values) leaves the output bit-for-bit unchanged."""
    kernel = kernel_module()
    q, k, v, cache_lens = make_inputs(3, 2, 45, 32, [1, 45, 20], torch.float16)
    clean = kernel.decode_attention(q, k, v, cache_lens, 0.2, num_splits=3, block_n=16)
    dirty_k = blank_stale_positions(k, cache_lens, garbage)
    dirty_v = blank_stale_positions(v, cache_lens, garbage)
    dirty = kernel.decode_attention(q, dirty_k, dirty_v, cache_lens, 0.2, num_splits=3, block_n=16)
    assert torch.isfinite(dirty).all()
    assert torch.equal(dirty, clean)


# Grouped-query caches (H_kv dividing H: one program serves a whole group) and per-row key
# starts (left padding), through the public op and forced splits; a start at or past the
# row's length (nothing to read) outputs 0.
GQA_CASES = [
    # (batch, heads, kv_heads, seq_len, head_dim, cache_lens, key_start, dtype, num_splits)
    (2, 4, 2, 37, 32, [37, 20], None, torch.float32, None),
    (2, 4, 1, 37, 80, [30, 1], None, torch.float16, 3),
    (3, 2, 2, 50, 32, [50, 41, 20], [0, 17, 19], torch.float32, 4),
    (3, 4, 2, 50, 64, [50, 41, 9], [33, 40, 0], torch.float16, 2),
    (2, 3, 1, 24, 32, [24, 10], [5, 10], torch.float32, 2),  # row 1: start == length, no key
]


@needs_triton
@pytest.mark.parametrize("batch,heads,kv_heads,seq_len,head_dim,lens,starts,dtype,splits", GQA_CASES)
def test_grouped_query_and_key_start(batch, heads, kv_heads, seq_len, head_dim, lens, starts, dtype, splits):
    q, _, _, cache_lens = make_inputs(batch, heads, seq_len, head_dim, lens, dtype)
    _, k, v, _ = make_inputs(batch, kv_heads, seq_len, head_dim, lens, dtype, seed=1)
    key_start = None if starts is None else torch.tensor(starts, device=DEVICE)
    if key_start is not None:  # the padding is never read
        before = torch.arange(seq_len, device=DEVICE)[None, :] < key_start[:, None]
        k = k.masked_fill(before[:, None, :, None], float("nan"))
        v = v.masked_fill(before[:, None, :, None], float("nan"))
    if splits is None:
        out = decode_attention(q, k, v, cache_lens, key_start=key_start)
    else:
        out = kernel_module().decode_attention(q, k, v, cache_lens, q.shape[-1] ** -0.5, key_start=key_start,
                                               num_splits=splits, block_n=16)
    plain = reference.decode_attention(q, k, v, cache_lens, key_start=key_start)
    want = reference.decode_attention(q.double(), k.double(), v.double(), cache_lens, key_start=key_start)
    assert torch.isfinite(out).all()
    assert_error_ratio(out, plain, want, what=f"decode gqa {heads}/{kv_heads} starts={starts}")
    if starts is not None:
        empty = key_start >= cache_lens
        assert torch.equal(out[empty], torch.zeros_like(out[empty]))


# Every group size the tensor-core products pad (1, 2, 4, 8 query heads per kv head, and
# 16: no padding), one pass and forced splits, lengths 1 and not a multiple of the key
# block, batch 1, caches sliced from bigger buffers (one in (B, S, H, D) layout).
GROUP_CASES = [
    # (batch, kv_heads, group, seq_len, head_dim, cache_lens, dtype, num_splits)
    (1, 2, 1, 45, 64, [45], torch.float16, 1),
    (1, 1, 2, 45, 32, [1], torch.float32, 3),
    (2, 2, 4, 53, 64, [53, 17], torch.float16, 1),
    (2, 1, 4, 53, 80, [1, 40], torch.float32, 4),
    (3, 1, 8, 37, 32, [37, 16, 1], torch.float16, 2),
    (1, 2, 8, 70, 128, [69], torch.float32, 1),
    (1, 1, 16, 33, 16, [33], torch.float16, 2),
]


@needs_triton
@pytest.mark.parametrize("batch,kv_heads,group,seq_len,head_dim,lens,dtype,splits", GROUP_CASES)
def test_group_sizes_one_pass_and_splits(batch, kv_heads, group, seq_len, head_dim, lens, dtype, splits):
    kernel = kernel_module()
    heads = kv_heads * group
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(batch, 2 * heads, head_dim, generator=gen).to(DEVICE, dtype)[:, ::2]  # strided heads
    k = torch.randn(batch + 1, kv_heads, 2 * seq_len, head_dim, generator=gen).to(DEVICE, dtype)[:batch, :, ::2]
    v = torch.randn(batch, seq_len + 3, kv_heads + 1, head_dim, generator=gen).to(DEVICE, dtype)
    v = v[:, :seq_len, :kv_heads].transpose(1, 2)  # (B, S, H, D) layout
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    cache_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    stale = torch.arange(seq_len, device=DEVICE)[None, :] >= cache_lens[:, None]
    for cache in (k, v):  # in place, keeping the views: past each row's length is NaN
        cache.masked_fill_(stale[:, None, :, None], float("nan"))
    with poisoned_kernel_outputs():
        out = kernel.decode_attention(q, k, v, cache_lens, head_dim ** -0.5, num_splits=splits, block_n=16)
    plain = reference.decode_attention(q, k, v, cache_lens)
    want = reference.decode_attention(q.double(), k.double(), v.double(), cache_lens)
    assert_error_ratio(out, plain, want, what=f"decode group {group} {splits} split(s) {dtype}")


@needs_triton
def test_one_pass_writes_the_output_directly(monkeypatch):
    """One split: the split kernel normalises and writes ``out`` itself (no reduction
    launch, no workspace), with key ranges (an empty row outputs 0) and at the heuristic's
    choice for a short cache."""
    kernel = kernel_module()
    assert kernel.choose_num_splits(1, kernel.ONE_PASS_MAX_KEYS) == 1
    assert kernel.choose_num_splits(1, kernel.ONE_PASS_MAX_KEYS + 1) > 1
    launched = []
    real_reduce = kernel._decode_reduce_kernel

    class Spy:
        def __getitem__(self, grid):
            launched.append(grid)
            return real_reduce[grid]

    monkeypatch.setattr(kernel, "_decode_reduce_kernel", Spy())
    q, _, _, cache_lens = make_inputs(3, 4, 40, 32, [40, 9, 30], torch.float16)
    _, k, v, _ = make_inputs(3, 2, 40, 32, [40, 9, 30], torch.float16, seed=2)
    key_start = torch.tensor([3, 9, 0], device=DEVICE)
    with poisoned_kernel_outputs():
        out = kernel.decode_attention(q, k, v, cache_lens, 0.2, key_start=key_start, block_n=16)
        split = kernel.decode_attention(q, k, v, cache_lens, 0.2, key_start=key_start, num_splits=3, block_n=16)
    assert len(launched) == 1  # only the forced split ran the reduction
    plain = reference.decode_attention(q, k, v, cache_lens, scale=0.2, key_start=key_start)
    want = reference.decode_attention(q.double(), k.double(), v.double(), cache_lens, scale=0.2, key_start=key_start)
    for result in (out, split):
        assert_error_ratio(result, plain, want, what="one pass vs split")
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_torch_path_grouped_query_and_key_start(monkeypatch):
    """The torch path (SDPA with enable_gqa and a mask) takes the same arguments."""
    force_torch_path(monkeypatch)
    q, _, _, cache_lens = make_inputs(3, 4, 30, 32, [30, 12, 5], torch.float32, device="cpu")
    _, k, v, _ = make_inputs(3, 2, 30, 32, [30, 12, 5], torch.float32, device="cpu", seed=1)
    key_start = torch.tensor([3, 0, 5])
    out = decode_attention(q, k, v, cache_lens, key_start=key_start)
    plain = reference.decode_attention(q, k, v, cache_lens, key_start=key_start)
    want = reference.decode_attention(q.double(), k.double(), v.double(), cache_lens, key_start=key_start)
    assert_error_ratio(out, plain, want, what="torch path gqa key_start")
    assert torch.equal(out[2], torch.zeros_like(out[2]))


@needs_triton
def test_poisoned_output_and_workspace_are_fully_written():
    kernel = kernel_module()
    q, k, v, cache_lens = make_inputs(2, 2, 50, 80, [1, 50], torch.float32)
    out = poison_(torch.empty_like(q))
    with poisoned_kernel_outputs():  # the split kernel's workspace starts as NaN too
        o_part, lse_part = kernel.allocate_workspace(4, 2, 80, DEVICE)
        assert torch.isnan(o_part).all() and torch.isnan(lse_part).all()
        result = kernel.decode_attention(q, k, v, cache_lens, 0.1, out=out, num_splits=4, block_n=16)
    assert result is out
    check_against_reference(out, q, k, v, cache_lens, scale=0.1, what="poisoned")


@needs_triton
def test_kernel_clamps_out_of_range_lengths():
    """Unchecked lengths (CUDA without the opt-in check) are clamped into [1, S]: the kernel
    never reads outside the cache."""
    kernel = kernel_module()
    q, k, v, _ = make_inputs(3, 1, 24, 32, [1, 1, 1], torch.float32)
    lens = torch.tensor([0, 24 + 9, 2**40], dtype=torch.int64, device=DEVICE)
    out = kernel.decode_attention(q, k, v, lens, 0.5, num_splits=2, block_n=16)
    check_against_reference(out, q, k, v, lens.clamp(1, 24), scale=0.5, what="clamped")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_path(monkeypatch, dtype):
    """The fallback path (no Triton) meets the same contract, stale NaN included."""
    force_torch_path(monkeypatch)
    q, k, v, cache_lens = make_inputs(3, 2, 21, 80, [1, 21, 8], dtype)
    out = decode_attention(q, blank_stale_positions(k, cache_lens, float("nan")),
                           blank_stale_positions(v, cache_lens, float("nan")), cache_lens)
    check_against_reference(out, q, k, v, cache_lens, what=f"torch path {dtype}")


@pytest.mark.parametrize("lens, kv_heads", [([13], 2), ([9, 9, 9], 4), ([21], 4)])
def test_torch_path_equal_lengths_reads_only_the_written_prefix(monkeypatch, lens, kv_heads):
    """Host-readable lengths all equal (batch 1 always): the torch path cuts the caches to
    that length and runs SDPA unmasked; stale NaN past it is never read (CPU)."""
    force_torch_path(monkeypatch)
    q, _, _, cache_lens = make_inputs(len(lens), 4, 21, 48, lens, torch.float32, device="cpu")
    _, k, v, _ = make_inputs(len(lens), kv_heads, 21, 48, lens, torch.float32, device="cpu", seed=1)
    out = decode_attention(q, blank_stale_positions(k, cache_lens, float("nan")),
                           blank_stale_positions(v, cache_lens, float("nan")), cache_lens)
    plain = reference.decode_attention(q, k, v, cache_lens)
    want = reference.decode_attention(q.double(), k.double(), v.double(), cache_lens)
    assert_error_ratio(out, plain, want, what=f"torch path, equal lengths {lens}")


@pytest.mark.parametrize("use_kernel", [True, False])
def test_empty_batch(monkeypatch, use_kernel):
    if use_kernel and not TRITON_ON_DEVICE:
        pytest.skip("Triton (interpreter) not available")
    if not use_kernel:
        force_torch_path(monkeypatch)
    q, k, v, cache_lens = make_inputs(0, 2, 5, 16, [], torch.float32)
    assert decode_attention(q, k, v, cache_lens).shape == (0, 2, 16)


@needs_cuda
@pytest.mark.parametrize("head_dim", [64, 128, 80])
def test_bf16_on_gpu(head_dim):
    q, k, v, cache_lens = make_inputs(2, 3, 300, head_dim, [1, 300], torch.bfloat16)
    check_against_reference(decode_attention(q, k, v, cache_lens), q, k, v, cache_lens, what="bf16")


@needs_cuda
def test_cuda_graph_capture_reads_lengths_at_replay(monkeypatch):
    """Captured once, replayed with new cache lengths: lengths are read on the device
    (the opt-in host check stands aside while capturing)."""
    monkeypatch.setenv(decode_op.CHECK_CUDA_LENS_ENV, "1")
    q, k, v, cache_lens = make_inputs(2, 3, 300, 64, [5, 300], torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (Triton compilation) outside the capture
        decode_attention(q, k, v, cache_lens)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k, v, cache_lens)
    cache_lens.copy_(torch.tensor([300, 1], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    check_against_reference(out, q, k, v, cache_lens, what="graph replay")


@needs_cuda
def test_cuda_length_check_is_opt_in(monkeypatch):
    q, k, v, _ = make_inputs(2, 1, 8, 16, [1, 1], torch.float16)
    bad = torch.tensor([4, 9], dtype=torch.int32, device="cuda")
    monkeypatch.setenv(decode_op.CHECK_CUDA_LENS_ENV, "1")
    with pytest.raises(ValueError, match=re.escape("cache_lens[1] = 9 is outside [1, 8]")):
        decode_attention(q, k, v, bad)
    monkeypatch.setenv(decode_op.CHECK_CUDA_LENS_ENV, "0")  # unchecked: clamped to the cache
    check_against_reference(decode_attention(q, k, v, bad), q, k, v, bad.clamp(1, 8), what="clamped on CUDA")


def _bad_inputs():
    """(description, builder of (q, k, v, cache_lens), exception type, message fragment)."""
    def base(**over):
        q, k, v, lens = make_inputs(2, 3, 8, 16, [8, 4], torch.float32, device="cpu")
        args = {"q": q, "k": k, "v": v, "lens": lens}
        args.update(over)
        return args["q"], args["k"], args["v"], args["lens"]

    def cache(*shape, **kw):
        return torch.randn(*shape, **kw)

    def lens(*values, **kw):
        return torch.tensor(values, **kw)

    return [
        ("q not 3-d", lambda: base(q=cache(2, 3, 1, 16)), ValueError, "(B, H, D)"),
        ("cache not 4-d", lambda: base(k=cache(2, 3, 16)), ValueError, "(B, H, S, D)"),
        ("k/v shapes differ", lambda: base(v=cache(2, 3, 9, 16)), ValueError, "differ in shape"),
        ("batch mismatch", lambda: base(k=cache(3, 3, 8, 16), v=cache(3, 3, 8, 16)), ValueError, "do not match q"),
        ("head count mismatch", lambda: base(k=cache(2, 4, 8, 16), v=cache(2, 4, 8, 16)), ValueError,
         "k_cache has 4 heads, which must divide the 3 query heads"),
        ("head size mismatch", lambda: base(k=cache(2, 3, 8, 32), v=cache(2, 3, 8, 32)), ValueError, "do not match q"),
        ("head size > 256", lambda: base(q=cache(2, 3, 257), k=cache(2, 3, 8, 257), v=cache(2, 3, 8, 257)),
         ValueError, "head size 257"),
        ("empty cache", lambda: base(k=cache(2, 3, 0, 16), v=cache(2, 3, 0, 16)), ValueError, "S = 0"),
        ("mixed dtypes", lambda: base(k=cache(2, 3, 8, 16, dtype=torch.float16)), TypeError, "dtype"),
        ("float64", lambda: base(q=cache(2, 3, 16, dtype=torch.float64), k=cache(2, 3, 8, 16, dtype=torch.float64),
                                  v=cache(2, 3, 8, 16, dtype=torch.float64)), TypeError, "not supported"),
        ("mixed devices", lambda: base(v=cache(2, 3, 8, 16, device="meta")), ValueError, "meta"),
        ("cache_lens on another device", lambda: base(lens=torch.ones(2, dtype=torch.int32, device="meta")),
         ValueError, "cache_lens is on"),
        ("cache_lens float", lambda: base(lens=lens(8.0, 4.0)), TypeError, "int32 or int64"),
        ("cache_lens wrong shape", lambda: base(lens=torch.ones(2, 1, dtype=torch.int32)), ValueError, "shape (2,)"),
        ("cache_lens wrong batch", lambda: base(lens=lens(8, 4, 2)), ValueError, "shape (2,)"),
        ("cache_lens not a tensor", lambda: base(lens=[8, 4]), TypeError, "torch.Tensor"),
        ("cache length beyond the cache", lambda: base(lens=lens(8, 9, dtype=torch.int32)), ValueError,
         "cache_lens[1] = 9 is outside [1, 8]"),
        ("cache length 0", lambda: base(lens=lens(0, 4)), ValueError, "cache_lens[0] = 0"),
    ]


@pytest.mark.parametrize("what,build,exc,match", _bad_inputs(), ids=[case[0] for case in _bad_inputs()])
def test_bad_inputs_raise_clear_errors(what, build, exc, match):
    q, k, v, cache_lens = build()
    with pytest.raises(exc, match=re.escape(match)):
        decode_attention(q, k, v, cache_lens)


def test_bad_key_start_raises_clear_errors():
    q, k, v, cache_lens = make_inputs(2, 2, 8, 16, [8, 4], torch.float32)
    for key_start, exc, match in ((torch.zeros(3, dtype=torch.int64), ValueError, "key_start must have shape (2,)"),
                                  (torch.zeros(2), TypeError, "key_start must be int32 or int64"),
                                  (torch.zeros(2, dtype=torch.int64, device="meta"), ValueError, "key_start is on"),
                                  ([0, 0], TypeError, "key_start must be a torch.Tensor")):
        with pytest.raises(exc, match=re.escape(match)):
            decode_attention(q, k, v, cache_lens, key_start=key_start)


def test_backward_is_refused_clearly():
    q, k, v, cache_lens = make_inputs(1, 1, 4, 16, [4], torch.float32, device="cpu")
    q.requires_grad_(True)
    out = decode_attention(q, k, v, cache_lens)
    with pytest.raises(RuntimeError, match="inference-only"):
        out.sum().backward()


def test_opcheck():
    q, k, v, cache_lens = make_inputs(2, 2, 5, 16, [5, 2], torch.float32)
    torch.library.opcheck(torch.ops.gptfast.decode_attention.default, (q, k, v, cache_lens, 0.25))
    _, k_gqa, v_gqa, _ = make_inputs(2, 1, 5, 16, [5, 2], torch.float32, seed=1)  # grouped-query, key_start
    key_start = torch.tensor([1, 0], device=DEVICE)
    torch.library.opcheck(torch.ops.gptfast.decode_attention.default, (q, k_gqa, v_gqa, cache_lens, 0.25, key_start))


def test_compiles_without_graph_break():
    q, k, v, cache_lens = make_inputs(2, 2, 6, 16, [6, 1], torch.float32)

    def step(q, k, v, cache_lens):  # the op between two ordinary ones, in one graph
        return decode_attention(q * 2.0, k, v, cache_lens) + 1.0

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    check_against_reference(compiled(q, k, v, cache_lens) - 1.0, q * 2.0, k, v, cache_lens, what="compiled")


def test_split_heuristic_fills_the_gpu():
    kernel = kernel_module()
    sms = kernel.DEFAULT_NUM_SMS
    # Batch 1, GPT-2's 12 heads, 32k context: several programs per SM.
    splits = kernel.choose_num_splits(12, 32768, sms)
    _, splits = kernel.split_plan(32768, splits, kernel.block_sizes(64)[1])
    assert 2 * sms <= 12 * splits <= 4 * sms
    assert kernel.choose_num_splits(16 * 12 * 4, 32768, sms) == 1  # a big batch needs no split
    assert kernel.choose_num_splits(1, 100, sms) == 1  # a short cache is not worth splitting
    for seq_len in (1, 15, 16, 17, 1000, 32768):
        for asked in (1, 3, 64):
            chunk, n = kernel.split_plan(seq_len, asked, 16)
            assert chunk % 16 == 0 and 1 <= n <= asked and (n - 1) * chunk < seq_len <= n * chunk


def test_static_configs_describe_the_kernels():
    kernel = kernel_module()
    configs = kernel.static_configs()
    assert {c["name"] for c in configs} == {
        f"decode_attention_{part}_d{d}_bf16" for part in ("split", "reduce") for d in (64, 128)} | {
        f"decode_attention_split_d{d}_bf16_gqa4_key_start" for d in (64, 128)} | {
        "decode_attention_split_d64_bf16_one_pass", "decode_attention_split_d128_bf16_gqa8"}
    for c in configs:
        assert set(c) >= {"name", "fn", "signature", "constexprs", "num_warps", "num_stages", "require_hgmma"}
        assert list(c["signature"]) == c["fn"].arg_names, c["name"]
        assert {n for n, t in c["signature"].items() if t == "constexpr"} == set(c["constexprs"]), c["name"]
        # Every bf16 split config runs both products on Hopper's tensor cores.
        assert c["require_hgmma"] is ("_split_" in c["name"]), c["name"]
        assert set(c["divisible_by_16"]) <= {n for n, t in c["signature"].items() if t == "i32"}, c["name"]
    for c in kernel.candidate_configs():
        assert c["require_hgmma"] and c["num_stages"] >= 2, c["name"]


def test_builtin_configs_pipeline_within_shared_memory():
    """Every built-in split config keeps at least two stages of K and V blocks (loads in
    flight) within one SM's shared memory, and two programs per SM at 16-bit D <= 128."""
    kernel = kernel_module()
    for head_dim in (16, 32, 64, 80, 128, 256):
        for itemsize in (2, 4):
            cfg = kernel._builtin_split(head_dim, itemsize)
            stage = 2 * cfg.block_n * kernel.padded_head_dim(head_dim) * itemsize
            assert cfg.num_stages >= 2 and cfg.num_stages * stage <= kernel.MAX_STAGE_BYTES, (head_dim, itemsize)
            if itemsize == 2 and head_dim <= 128:
                assert cfg.block_n >= 64 and cfg.num_stages * stage <= kernel.STAGE_BUDGET, head_dim


# ---- the C++ CPU kernel (csrc/cpu_attention.cpp) ------------------------------------------
# Called straight (torch.ops.gptfast_cpu.decode_attention_isa on every instruction set this
# CPU supports, and the plain op), so these run whatever TRITON_INTERPRET says; the public
# op reaches it on the CPU for float32 once Triton is out of the way.


@pytest.fixture
def cpp_isas():
    """The instruction sets of the C++ kernel this CPU runs (0 one lane, 1 AVX2, 2 AVX-512)."""
    if decode_op.cpu_kernel() is None:
        pytest.skip("the gptfast C++ extension (with csrc/cpu_attention.cpp) is not loaded")
    return list(range(torch.ops.gptfast_cpu.decode_attention_best_isa() + 1))


def cpp_decode(q, k, v, cache_lens, scale, key_start=None, isa=None):
    if isa is None:
        return torch.ops.gptfast_cpu.decode_attention(q, k, v, cache_lens, scale, key_start)
    return torch.ops.gptfast_cpu.decode_attention_isa(q, k, v, cache_lens, scale, key_start, isa)


def laid_out(t, layout):
    """``t`` (contiguous) copied into a view of the given layout, NaN everywhere around it:
    "contiguous"; "sliced" (a slice of a bigger buffer: the first rows of a longer cache, or
    one part of a fused QKV projection); "permuted" (the caches stored (B, S, H, D), q stored
    (B, D, H): transposed views); "strided" (last dim not unit-stride: the one-lane path)."""
    nan = float("nan")
    if layout == "contiguous":
        return t.clone()
    if layout == "sliced":
        if t.dim() == 4:  # a cache: batch rows and positions of a longer one
            b, h, s, d = t.shape
            buf = torch.full((b + 2, h, s + 7, d), nan)
            buf[:b, :, :s] = t
            return buf[:b, :, :s]
        b, h, d = t.shape  # q: the middle third of a (B, 3, H, D) projection
        buf = torch.full((b, 3, h, d), nan)
        buf[:, 1] = t
        return buf[:, 1]
    if layout == "permuted":
        if t.dim() == 4:
            b, h, s, d = t.shape
            buf = torch.full((b, s + 3, h, d), nan)
            buf[:, :s] = t.transpose(1, 2)
            return buf[:, :s].transpose(1, 2)
        buf = torch.full((t.shape[0], t.shape[2], t.shape[1]), nan)
        buf.copy_(t.transpose(1, 2))
        return buf.transpose(1, 2)
    assert layout == "strided"
    buf = torch.full((*t.shape, 2), nan)
    buf[..., 0] = t
    return buf[..., 0]


def poison_unread(cache, cache_lens, key_start=None):
    """In place (through the view): NaN at every position a row must not read, those at or
    past its (clamped) length and those before its key_start."""
    positions = torch.arange(cache.shape[2])[None, :]
    unread = positions >= cache_lens.clamp(1, cache.shape[2])[:, None]
    if key_start is not None:
        unread |= positions < key_start[:, None]
    cache.masked_fill_(unread[:, None, :, None], float("nan"))


# (batch, heads, kv_heads, seq_len, head_dim, cache_lens, key_start, scale): B = 1 and > 1,
# lengths 1 and S, S = 1, head sizes 32/64/80 (and 13: all of it the one-lane remainder),
# grouped-query 12/4 and 12/1, key ranges (one empty: start == length; one negative), a
# large scale (scores far apart: the exp's clamped tail).
CPP_CASES = [
    (1, 12, 12, 80, 64, [80], None, None),
    (3, 12, 4, 37, 64, [1, 37, 20], None, None),
    (2, 12, 1, 50, 80, [50, 9], None, 0.3),
    (4, 2, 2, 1, 32, [1, 1, 1, 1], None, None),
    (3, 4, 2, 45, 32, [45, 30, 10], [0, 29, 10], None),
    (2, 3, 3, 24, 80, [24, 5], [-4, 3], None),
    (2, 12, 4, 29, 13, [29, 2], None, None),
    (2, 4, 4, 64, 64, [64, 40], None, 4.0),
]


@pytest.mark.parametrize("layout", ["contiguous", "sliced", "permuted", "strided"])
@pytest.mark.parametrize("lens_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("batch,heads,kv_heads,seq_len,head_dim,lens,starts,scale", CPP_CASES)
def test_cpp_kernel_matches_float64_reference(cpp_isas, layout, lens_dtype, batch, heads, kv_heads, seq_len,
                                              head_dim, lens, starts, scale):
    gen = torch.Generator().manual_seed(head_dim + seq_len)
    q = torch.randn(batch, heads, head_dim, generator=gen)
    k = torch.randn(batch, kv_heads, seq_len, head_dim, generator=gen)
    v = torch.randn(batch, kv_heads, seq_len, head_dim, generator=gen)
    cache_lens = torch.tensor(lens, dtype=lens_dtype)
    key_start = None if starts is None else torch.tensor(starts, dtype=lens_dtype)
    plain = reference.decode_attention(q, k, v, cache_lens, scale=scale, key_start=key_start)
    want = reference.decode_attention(q.double(), k.double(), v.double(), cache_lens, scale=scale,
                                      key_start=key_start)
    qv, kv, vv = laid_out(q, layout), laid_out(k, layout), laid_out(v, layout)
    assert layout == "contiguous" or not (kv.is_contiguous() or vv.is_contiguous())
    assert layout == "contiguous" or batch == 1 or not qv.is_contiguous()  # (batch 1: q's slice is contiguous)
    for cache in (kv, vv):  # what a row must not read is NaN (around the views too)
        poison_unread(cache, cache_lens, key_start)
    used_scale = head_dim ** -0.5 if scale is None else scale
    for isa in [None] + cpp_isas:
        out = cpp_decode(qv, kv, vv, cache_lens, used_scale, key_start, isa)
        assert out.shape == q.shape and out.dtype == torch.float32 and out.is_contiguous()
        assert torch.isfinite(out).all(), f"isa {isa}: NaN from an unread position"
        assert_error_ratio(out, plain, want, what=f"C++ decode isa {isa} {layout} D={head_dim} starts={starts}")
        if key_start is not None:
            empty = key_start.clamp(min=0) >= cache_lens
            assert torch.equal(out[empty], torch.zeros_like(out[empty]))


# (batch, heads, kv_heads, seq_len, head_dim, T, cache_lens, key_start): T queries per row at
# its T newest positions (a verify step): T = 2 and 5, batch 1 and ragged, grouped-query,
# a row whose cache holds exactly T, key ranges hiding some of a row's queries (they output 0).
CPP_MULTI_CASES = [
    (1, 4, 4, 40, 64, 5, [23], None),
    (3, 12, 4, 37, 64, 2, [2, 37, 20], None),
    (2, 6, 2, 30, 80, 5, [30, 5], None),
    (3, 4, 2, 45, 13, 4, [45, 30, 12], [0, 28, 10]),
    (2, 2, 1, 16, 32, 3, [16, 9], [-2, 8]),
]


@pytest.mark.parametrize("layout", ["qkv", "contiguous", "strided"])
@pytest.mark.parametrize("batch,heads,kv_heads,seq_len,head_dim,tokens,lens,starts", CPP_MULTI_CASES)
def test_cpp_kernel_several_queries_per_row(cpp_isas, layout, batch, heads, kv_heads, seq_len, head_dim, tokens,
                                            lens, starts):
    """q (B, H, T, D): each row's T queries at its T newest positions, causal among them: the
    float64 causal-attention twin with those q_positions, by the error-ratio rule; unread
    cache positions are NaN; the output is (B, H, T, D) over (B, T, H, D) memory."""
    gen = torch.Generator().manual_seed(head_dim + tokens)
    q = torch.randn(batch, heads, tokens, head_dim, generator=gen)
    k = torch.randn(batch, kv_heads, seq_len, head_dim, generator=gen)
    v = torch.randn(batch, kv_heads, seq_len, head_dim, generator=gen)
    cache_lens = torch.tensor(lens)
    key_start = None if starts is None else torch.tensor(starts)
    positions = cache_lens[:, None] - tokens + torch.arange(tokens)  # (B, T)
    plain = reference.causal_attention(q, k, v, q_positions=positions, key_start=key_start)
    want = reference.causal_attention(q.double(), k.double(), v.double(), q_positions=positions,
                                      key_start=key_start)
    if layout == "qkv":  # the query columns of a (B, T, 3 * H * D) projection, as a verify step has them
        qkv = torch.full((batch, tokens, 3, heads, head_dim), float("nan"))
        qkv[:, :, 1] = q.transpose(1, 2)
        qv = qkv[:, :, 1].transpose(1, 2)
    else:
        qv = laid_out(q, layout) if layout == "contiguous" else laid_out(q.reshape(batch, heads * tokens, head_dim),
                                                                         layout).view(batch, heads, tokens, head_dim)
    kv, vv = laid_out(k, "sliced"), laid_out(v, "permuted")
    for cache in (kv, vv):
        poison_unread(cache, cache_lens, key_start)
    for isa in [None] + cpp_isas:
        out = cpp_decode(qv, kv, vv, cache_lens, head_dim ** -0.5, key_start, isa)
        assert out.shape == q.shape and out.transpose(1, 2).is_contiguous()
        assert torch.isfinite(out).all(), f"isa {isa}: NaN from an unread position"
        assert_error_ratio(out, plain, want, what=f"C++ T={tokens} isa {isa} {layout} starts={starts}")
        if key_start is not None:  # queries before their row's key_start see nothing
            hidden = positions < key_start[:, None].clamp(min=0)
            assert torch.equal(out.transpose(1, 2)[hidden], torch.zeros_like(out.transpose(1, 2)[hidden]))


def test_cpp_kernel_one_query_as_four_dims_is_the_decode_step(cpp_isas):
    """T = 1 given as (B, H, 1, D) is the (B, H, D) decode step, bit for bit."""
    q, k, v, cache_lens = make_inputs(3, 4, 20, 64, [20, 3, 11], torch.float32, device="cpu")
    for isa in [None] + cpp_isas:
        one = cpp_decode(q, k, v, cache_lens, 0.125, None, isa)
        assert torch.equal(cpp_decode(q[:, :, None], k, v, cache_lens, 0.125, None, isa)[:, :, 0], one)


def test_cpp_kernel_clamps_lengths_into_the_cache(cpp_isas):
    """Lengths outside [1, S] (a direct call: the public op refuses them on the CPU) are
    clamped, as the Triton kernel and the torch path do: 0 and negatives read position 0,
    longer ones the whole cache, and nothing outside it is read."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(4, 2, 32, generator=gen)
    buf_k = torch.full((4, 2, 30, 32), float("nan"))
    buf_v = torch.full((4, 2, 30, 32), float("nan"))
    k, v = buf_k[:, :, :24], buf_v[:, :, :24]  # NaN just past the cache
    k.copy_(torch.randn(4, 2, 24, 32, generator=gen))
    v.copy_(torch.randn(4, 2, 24, 32, generator=gen))
    for dtype in (torch.int32, torch.int64):
        lens = torch.tensor([0, -7, 24 + 9, 2**31 - 1], dtype=dtype)
        clamped = lens.clamp(1, 24)
        plain = reference.decode_attention(q, k, v, clamped, scale=0.2)
        want = reference.decode_attention(q.double(), k.double(), v.double(), clamped, scale=0.2)
        for isa in [None] + cpp_isas:
            assert_error_ratio(cpp_decode(q, k, v, lens, 0.2, None, isa), plain, want, what=f"clamped {dtype}")


def test_cpp_kernel_empty_batch_and_heads(cpp_isas):
    q, k, v, cache_lens = make_inputs(0, 2, 5, 16, [], torch.float32, device="cpu")
    assert cpp_decode(q, k, v, cache_lens, 0.25).shape == (0, 2, 16)
    k = v = torch.zeros(2, 1, 5, 16)  # no query heads (0 is a multiple of the one kv head)
    assert cpp_decode(torch.zeros(2, 0, 16), k, v, torch.tensor([5, 1]), 0.25).shape == (2, 0, 16)


def test_public_op_runs_the_cpp_kernel_on_cpu_float32(monkeypatch, cpp_isas):
    """Without Triton, the public op sends CPU float32 to the C++ kernel (once per call,
    with the values check before it), other dtypes to the torch path, and everything to the
    torch path when the extension is missing."""
    monkeypatch.setattr(decode_op, "use_triton", lambda t: False)
    real = decode_op.cpu_kernel()
    calls = []

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(decode_op, "_cpu_kernel", [counting])
    q, _, _, cache_lens = make_inputs(3, 4, 30, 64, [30, 12, 5], torch.float32, device="cpu")
    _, k, v, _ = make_inputs(3, 2, 30, 64, [30, 12, 5], torch.float32, device="cpu", seed=1)
    key_start = torch.tensor([3, 0, 5])
    plain = reference.decode_attention(q, k, v, cache_lens, key_start=key_start)
    want = reference.decode_attention(q.double(), k.double(), v.double(), cache_lens, key_start=key_start)
    out = decode_attention(q, blank_stale_positions(k, cache_lens, float("nan")),
                           blank_stale_positions(v, cache_lens, float("nan")), cache_lens, key_start=key_start)
    assert len(calls) == 1 and calls[0][4] == 64 ** -0.5 and calls[0][5] is key_start
    assert_error_ratio(out, plain, want, what="public op, C++ path")
    assert torch.equal(out[2], torch.zeros_like(out[2]))

    with torch.no_grad():
        decode_attention(q, k, v, cache_lens, scale=0.5)
    assert len(calls) == 2 and calls[1][4] == 0.5
    with pytest.raises(ValueError, match=re.escape("cache_lens[1] = 31 is outside [1, 30]")):
        decode_attention(q, k, v, torch.tensor([30, 31, 1]))
    assert len(calls) == 2  # checked before the kernel
    decode_attention(q.half(), k.half(), v.half(), cache_lens)  # not float32: the torch path
    assert len(calls) == 2

    monkeypatch.setattr(decode_op, "_cpu_kernel", [None])  # no extension: the torch path
    fallback = decode_attention(q, k, v, cache_lens, key_start=key_start)
    assert len(calls) == 2
    assert_error_ratio(fallback, plain, want, what="public op, torch path")


# (description, keyword overrides of the good call, message fragment)
CPP_BAD_INPUTS = [
    ("q float64", dict(q=torch.zeros(2, 3, 16, dtype=torch.float64)), "must be float32"),
    ("cache float16", dict(k=torch.zeros(2, 3, 8, 16, dtype=torch.float16)), "must be float32"),
    ("q 2-d", dict(q=torch.zeros(2, 16)), "q must have shape (B, H, D) or (B, H, T, D)"),
    ("cache not 4-d", dict(k=torch.zeros(2, 3, 16)), "must have shape (B, H_kv, S, D)"),
    ("k/v shapes differ", dict(v=torch.zeros(2, 3, 9, 16)), "differ in shape"),
    ("batch mismatch", dict(k=torch.zeros(3, 3, 8, 16), v=torch.zeros(3, 3, 8, 16)), "do not match q"),
    ("head size mismatch", dict(k=torch.zeros(2, 3, 8, 32), v=torch.zeros(2, 3, 8, 32)), "do not match q"),
    ("heads not dividing", dict(k=torch.zeros(2, 2, 8, 16), v=torch.zeros(2, 2, 8, 16)), "must divide the 3"),
    ("empty cache", dict(k=torch.zeros(2, 3, 0, 16), v=torch.zeros(2, 3, 0, 16)), "S = 0"),
    ("lens float", dict(lens=torch.tensor([8.0, 4.0])), "cache_lens must be int32 or int64"),
    ("lens wrong shape", dict(lens=torch.ones(2, 1, dtype=torch.int32)), "cache_lens must have shape (2,)"),
    ("lens wrong batch", dict(lens=torch.ones(3, dtype=torch.int32)), "cache_lens must have shape (2,)"),
    ("key_start int8", dict(key_start=torch.zeros(2, dtype=torch.int8)), "key_start must be int32 or int64"),
    ("key_start wrong batch", dict(key_start=torch.zeros(5, dtype=torch.int64)), "key_start must have shape (2,)"),
    ("scale NaN", dict(scale=float("nan")), "scale must be finite"),
    ("isa unknown", dict(isa=7), "isa 7 is not supported"),
]


@pytest.mark.parametrize("what,over,match", CPP_BAD_INPUTS, ids=[case[0] for case in CPP_BAD_INPUTS])
def test_cpp_kernel_bad_inputs_raise(cpp_isas, what, over, match):
    """Called straight, bad operands raise a RuntimeError (TORCH_CHECK), never crash."""
    q, k, v, lens = make_inputs(2, 3, 8, 16, [8, 4], torch.float32, device="cpu")
    args = dict(q=q, k=k, v=v, lens=lens, scale=0.25, key_start=None, isa=-1)
    args.update(over)
    with pytest.raises(RuntimeError, match=re.escape(match)):
        torch.ops.gptfast_cpu.decode_attention_isa(args["q"], args["k"], args["v"], args["lens"], args["scale"],
                                                   args["key_start"], args["isa"])
    if "isa" not in over:
        with pytest.raises(RuntimeError, match=re.escape(match)):
            cpp_decode(args["q"], args["k"], args["v"], args["lens"], args["scale"], args["key_start"])


def test_cpp_kernel_refuses_other_devices(cpp_isas):
    """A tensor on another device (meta here) is refused with a RuntimeError too."""
    q, k, v, lens = make_inputs(2, 3, 8, 16, [8, 4], torch.float32, device="cpu")
    for args in ((q.to("meta"), k.to("meta"), v.to("meta"), lens.to("meta")), (q, k, v, lens.to("meta")),
                 (q, k.to("meta"), v, lens)):
        with pytest.raises(RuntimeError):
            cpp_decode(*args, 0.25)
