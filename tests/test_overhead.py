"""The eager fast path (issue 20): the fast-launch helper's specialisation key, eager calls
against the registered ops, and the overhead benchmark suite (its table; no timing asserted)."""
import pytest
import torch

from gptfast import cli
from gptfast.bench import suites
from gptfast.kernels import _common
from gptfast.ops import _dispatch

pytestmark = pytest.mark.skipif(not _dispatch.use_triton(torch.empty(0)), reason="needs TRITON_INTERPRET=1")


# ---- the specialisation key of gptfast.kernels._common.launch --------------------------------


def _triton_binder():
    """Triton's own per-argument specialisation (what JITFunction.run keys its kernel cache
    by), for an sm_90 target: no GPU needed."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    def kernel(A, B, n, m, f, C: tl.constexpr):
        pass

    jit = JITFunction(kernel)
    return create_function_from_signature(jit.signature, jit.params, make_backend(GPUTarget("cuda", 90, 32)))


def _arg_sets():
    base = torch.empty(256, dtype=torch.float32)
    tensors = [base, base[1:], base[4:], base.to(torch.float16), base.to(torch.float16)[1:], base.to(torch.int8),
               base.to(torch.int8)[3:], None]
    ints = [0, 1, 2, 15, 16, 17, 32, -16, -1, 2**31 - 16, 2**31, 2**32, 2**63 - 1, 2**63, True, False]
    floats = [1.0, 0.5, 1e-5]
    sets = []
    for a in tensors:
        for n in ints:
            sets.append((a, base, n, 16, 1.0))
            sets.append((base, a, 7, n, 0.5))
    for f in floats:
        sets.append((base, base, 16, 1, f))
    return sets


def test_launch_key_separates_every_specialisation_triton_makes():
    """Two calls with one key must get one kernel: wherever Triton's specialisation differs
    (alignment, dtype, None, int width, 1, multiples of 16, bool), the key differs."""
    binder = _triton_binder()
    by_key = {}
    for args in _arg_sets():
        for constexpr in (1, 2):
            kwargs = {"C": constexpr, "num_warps": 4}
            key = _common.specialization_key(args, kwargs)
            spec = repr(binder(*args, **kwargs)[1])
            by_key.setdefault(key, set()).add(spec)
    assert len(by_key) > 40  # the sets do exercise many specialisations
    mixed = {k: v for k, v in by_key.items() if len(v) > 1}
    assert not mixed, f"keys shared by different Triton specialisations: {mixed}"


def test_launch_key_tells_misaligned_views_and_odd_strides_apart():
    x = torch.empty(64, 64)
    aligned = _common.specialization_key((x, x.stride(0)), {"B": 1})
    assert _common.specialization_key((x[:, 1:], x.stride(0)), {"B": 1}) != aligned  # 4-byte offset pointer
    assert _common.specialization_key((x, 63), {"B": 1}) != aligned  # row stride not a multiple of 16
    assert _common.specialization_key((x.half(), 64), {"B": 1}) != aligned  # dtype
    assert _common.specialization_key((x, 64), {"B": 2}) != aligned  # constexpr
    assert _common.specialization_key((x, 128), {"B": 1}) == aligned  # same specialisation, same key


def test_launch_key_refuses_types_it_does_not_model():
    import numpy as np

    with pytest.raises(TypeError):
        _common.specialization_key((np.int64(3),), {})


def test_host_int_helpers_match_triton():
    import triton

    assert all(_common.next_power_of_2(n) == triton.next_power_of_2(n) for n in range(0, 5000))
    assert all(_common.cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 200) for b in range(1, 33))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the compiled fast path)")
def test_launch_fast_path_on_cuda_matches_triton_path():
    """Each layer_norm call after the first of its specialisation takes the cached launcher;
    misaligned and odd-stride calls interleaved with aligned ones stay right."""
    from gptfast import ops

    base = torch.randn(64, 800, device="cuda")
    w, b = torch.randn(768, device="cuda"), torch.randn(768, device="cuda")
    views = [base[:, :768], base[:, 1:769], base[:, :768].contiguous(), base[:, 3:771].half()]
    before = len(_common._handles)
    for _ in range(3):
        for x in views:
            got = ops.layer_norm(x, w.to(x.dtype), b.to(x.dtype))
            want = torch.nn.functional.layer_norm(x.float(), (768,), w, b).to(x.dtype)
            torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    assert len(_common._handles) >= before + len(views)  # one cached handle per specialisation
    torch.cuda.synchronize()


def test_skipped_launches_leave_outputs_unwritten():
    from gptfast import ops

    x = torch.randn(3, 32)
    with _common.launches_skipped(), _common.fill_outputs(lambda t: t.fill_(float("nan"))):
        y = ops.layer_norm(x, None, None)
    assert torch.isnan(y).all()
    assert torch.isfinite(ops.layer_norm(x, None, None)).all()


# ---- eager calls give the registered ops' results ----------------------------------------------


def _grads(out, leaves, seed):
    return torch.autograd.grad(out, [t for t in leaves if t is not None], seed)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("shape,dtype", [((5, 37), torch.float32), ((2, 3, 48), torch.float16), ((1, 16), torch.float32)])
def test_layer_norm_eager_matches_registered_ops(shape, dtype, residual):
    from gptfast import ops

    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(shape[-1])).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(shape[-1])).to(dtype).requires_grad_()
    r = torch.randn(*shape, dtype=dtype, requires_grad=True) if residual else None
    seed = torch.randn(shape, dtype=dtype)
    if residual:
        y, h = ops.layer_norm(x, w, b, residual=r)
        ry, rh, _, _ = torch.ops.gptfast.add_layer_norm_fwd(x, r, w, b, 1e-5)
        eager = _grads(y * 2 + h, (x, r, w, b), seed)
        registered = _grads(ry * 2 + rh, (x, r, w, b), seed)
        torch.testing.assert_close(h, rh, rtol=0, atol=0)
    else:
        y = ops.layer_norm(x, w, b)
        ry = torch.ops.gptfast.layer_norm_fwd(x, w, b, 1e-5)[0]
        eager, registered = _grads(y, (x, w, b), seed), _grads(ry, (x, w, b), seed)
    torch.testing.assert_close(y, ry, rtol=0, atol=0)
    for e, g in zip(eager, registered):
        torch.testing.assert_close(e, g, rtol=0, atol=0)
    with torch.no_grad():  # the launcher-only path
        torch.testing.assert_close(ops.layer_norm(x, w, b), torch.ops.gptfast.layer_norm_fwd(x, w, b, 1e-5)[0],
                                   rtol=0, atol=0)


def test_layer_norm_eager_only_h_used():
    """Only the residual output reaches the loss: its gradient passes to x and residual."""
    from gptfast import ops

    x = torch.randn(4, 32, requires_grad=True)
    r = torch.randn(4, 32, requires_grad=True)
    _, h = ops.layer_norm(x, None, None, residual=r)
    dx, dr = torch.autograd.grad(h.sum(), (x, r))
    torch.testing.assert_close(dx, torch.ones_like(x))
    torch.testing.assert_close(dr, torch.ones_like(r))


@pytest.mark.parametrize("offset,kv_heads", [(0, 2), (3, 1)])
def test_causal_attention_eager_matches_registered_op(offset, kv_heads):
    from gptfast import ops

    torch.manual_seed(0)
    q = torch.randn(2, 2, 5, 16, requires_grad=True)
    k = torch.randn(2, kv_heads, 5 + offset, 16, requires_grad=True)
    v = torch.randn(2, kv_heads, 5 + offset, 16, requires_grad=True)
    key_start = torch.tensor([0, 2])
    seed = torch.randn(2, 2, 5, 16)
    out = ops.causal_attention(q, k, v, q_offset=offset, key_start=key_start)
    ref = torch.ops.gptfast.causal_attention_fwd(q, k, v, 0.25, offset, None, key_start)[0]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for e, g in zip(_grads(out, (q, k, v), seed), _grads(ref, (q, k, v), seed)):
        torch.testing.assert_close(e, g, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(ops.causal_attention(q, k, v, q_offset=offset, key_start=key_start), ref,
                                   rtol=0, atol=0)


def test_decode_and_int8_eager_match_registered_ops():
    from gptfast import ops
    from gptfast.ops.int8_linear import quantize_weight

    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 16), torch.randn(2, 2, 9, 16)
    lens = torch.tensor([9, 4], dtype=torch.int32)
    torch.testing.assert_close(ops.decode_attention(q, k, k, lens),
                               torch.ops.gptfast.decode_attention(q, k, k, lens, 0.25), rtol=0, atol=0)
    x, (w8, scale) = torch.randn(3, 32), quantize_weight(torch.randn(24, 32))
    torch.testing.assert_close(ops.int8_linear(x, w8, scale), torch.ops.gptfast.int8_linear(x, w8, scale, None),
                               rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="inference-only"):  # gradients still get the clear error
        ops.decode_attention(q.requires_grad_(), k, k, lens).sum().backward()


# ---- the overhead suite -----------------------------------------------------------------------


def test_overhead_suite_table(tmp_path, capsys):
    from gptfast.bench.suites import overhead

    assert suites.BASELINES["overhead"] == overhead.TRIVIAL
    cases, skipped = suites.collect("overhead", torch.device("cpu"), quick=True)
    assert not skipped
    assert {c.provider for c in cases} == {overhead.DISPATCH_ONLY, "torch", overhead.TRIVIAL, overhead.FLOOR}
    assert {c.mode for c in cases if c.provider == overhead.FLOOR} == {"fwd+grad", "bwd"}
    assert {c.mode for c in cases} == {"fwd", "fwd+grad", "bwd"}
    assert {c.shape.split()[0] for c in cases} == {"layer_norm", "causal_attention", "decode_attention",
                                                   "int8_linear"}
    # Run two ops' rows through the command (tiny: the table's shape and labels, not speed).
    out = tmp_path / "o.json"
    code = cli.main(["bench", "--suite", "overhead", "--quick", "--device", "cpu",
                     "--providers", f"{overhead.DISPATCH_ONLY},{overhead.TRIVIAL}", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "gptfast dispatch only" in text and "× x.add(1)" in text and "vs x.add(1)" not in text
    import json

    rows = json.loads(out.read_text())["rows"]
    keys = {(r["mode"], r["shape"]) for r in rows}
    assert {r["provider"] for r in rows} == {overhead.DISPATCH_ONLY, overhead.TRIVIAL}
    assert len(rows) == 2 * len(keys) == 2 * sum(len(modes) for _, _, modes in overhead.OPS)
    assert all(r["time_ms"] > 0 for r in rows)
    # A ratio is printed only where both timings are stable (a loaded CI machine may mark rows unstable).
    assert all(r["speedup"] > 0 if r["speedup"] is not None else r["speedup_note"] for r in rows)
