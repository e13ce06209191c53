"""`gptfast check`: passes on the real ops, fails (non-zero exit) when an op is made wrong.

Without CUDA the ops run through the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 on machines without CUDA) on the checker's tiny CPU grid; on a CUDA
machine the same tests run the compiled kernels on the GPU's quick grid.
"""
import json

import pytest
import torch

import gptfast.ops
from gptfast import checker, cli
from gptfast.runtime import cuda_errors
from gptfast.ops import registry

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_PATH = "triton" if DEVICE == "cuda" else "triton-interpreter"
ILLEGAL_ADDRESS = "CUDA error: an illegal memory access was encountered"


def _tiny_cases(op, dtypes=(torch.float32,)):
    return checker.build_cases(DEVICE, quick=True, ops=[op], dtypes=list(dtypes))


def test_real_ops_pass_forward_and_backward():
    results = checker.run_checks(_tiny_cases("layer_norm") + _tiny_cases("decode_attention"))
    assert results and all(r.passed for r in results), checker.format_table(results)
    directions = {(r.op, r.variant, r.direction) for r in results}
    assert ("layer_norm", "residual", "bwd") in directions and ("layer_norm", "plain", "fwd") in directions
    assert all(r.path == KERNEL_PATH for r in results)
    assert all(r.ratio is not None and r.ratio <= checker.DEFAULT_MAX_RATIO for r in results)


def test_check_command_fails_when_an_op_is_made_wrong(monkeypatch, capsys, tmp_path):
    real = gptfast.ops.decode_attention

    def off_by_a_little(q, k_cache, v_cache, cache_lens, **kw):
        return real(q, k_cache, v_cache, cache_lens, **kw) + 1e-3

    monkeypatch.setattr(gptfast.ops, "decode_attention", off_by_a_little)
    report = tmp_path / "check.json"
    code = cli.main(["check", "--quick", "--ops", "decode_attention", "--dtypes", "float32", "--json", str(report)])
    captured = capsys.readouterr()
    assert code == 1
    assert "**FAIL**" in captured.out and "FAILED" in captured.err
    rows = json.loads(report.read_text())["results"]
    assert rows and not any(r["passed"] for r in rows) and rows[0]["ratio"] > checker.DEFAULT_MAX_RATIO


def test_results_are_saved_after_every_case():
    saved = []
    cases = _tiny_cases("layer_norm")
    results = checker.run_checks(cases, progress=lambda rows: saved.append(len(rows)))
    assert len(saved) == len(cases) and saved[-1] == len(results) and saved == sorted(saved)


def test_a_wrong_gradient_is_caught_even_when_the_forward_is_right(monkeypatch):
    real = gptfast.ops.layer_norm

    class ScaleGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y):
            return y.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * 1.01

    def wrong_backward(x, weight, bias, eps=1e-5, residual=None):
        out = real(x, weight, bias, eps, residual=residual)
        return ScaleGrad.apply(out) if residual is None else (ScaleGrad.apply(out[0]), out[1])

    monkeypatch.setattr(gptfast.ops, "layer_norm", wrong_backward)
    results = checker.run_checks(_tiny_cases("layer_norm"))
    verdict = {(r.variant, r.direction): r.passed for r in results}
    assert verdict[("plain", "fwd")] and verdict[("residual", "fwd")]
    assert not verdict[("plain", "bwd")] and not verdict[("residual", "bwd")]


def test_an_op_that_raises_is_a_failed_row_not_a_crash(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("illegal memory access")

    monkeypatch.setattr(gptfast.ops, "causal_attention", broken)
    results = checker.run_checks(_tiny_cases("causal_attention"))
    assert len(results) == 1 and not results[0].passed
    assert "RuntimeError: illegal memory access" in results[0].detail


def test_after_an_ordinary_exception_the_run_goes_on(monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("q must be 4-D")

    monkeypatch.setattr(gptfast.ops, "causal_attention", broken)
    results = checker.run_checks(_tiny_cases("causal_attention") + _tiny_cases("layer_norm")[:1])
    assert "ValueError: q must be 4-D" in results[0].detail and not results[0].passed
    assert results[-1].op == "layer_norm" and checker.stopped_by_cuda_error(results) is None


def test_a_cuda_error_stops_the_run_at_the_case_that_raised_it(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError(ILLEGAL_ADDRESS)

    monkeypatch.setattr(gptfast.ops, "causal_attention", broken)
    cases = _tiny_cases("layer_norm") + _tiny_cases("causal_attention") + _tiny_cases("decode_attention")
    lines = []
    results = checker.run_checks(cases, log=lines.append)
    first_attention = next(i for i, c in enumerate(cases) if c.op == "causal_attention")
    stop = checker.stopped_by_cuda_error(results)
    assert stop is results[-1] and not stop.passed and stop.op == "causal_attention"
    assert cases[first_attention].label() in stop.detail and ILLEGAL_ADDRESS in stop.detail
    assert f"{len(cases) - first_attention - 1} later case(s) not run" in stop.detail
    assert not any(r.op == "decode_attention" for r in results)
    assert lines[-1].endswith(stop.detail)


def test_check_command_names_the_case_a_cuda_error_stopped_it_at(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError(ILLEGAL_ADDRESS)

    monkeypatch.setattr(gptfast.ops, "decode_attention", broken)
    code = cli.main(["check", "--quick", "--ops", "decode_attention,layer_norm", "--dtypes", "float32"])
    err = capsys.readouterr().err
    assert code == 1
    assert "gptfast check: STOPPED at the first CUDA error, in case layer_norm" not in err
    assert "gptfast check: STOPPED at the first CUDA error, in case decode_attention" in err


def test_out_of_memory_is_not_a_sticky_cuda_error():
    assert cuda_errors.is_cuda_error(RuntimeError(ILLEGAL_ADDRESS))
    assert cuda_errors.is_cuda_error(RuntimeError("Triton Error [CUDA]: device-side assert triggered"))
    assert not cuda_errors.is_cuda_error(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert not cuda_errors.is_cuda_error(ValueError("x must be 2-D"))


def test_sampler_runs_first_then_every_registry_op_bf16_first_on_cuda():
    cases = checker.build_cases("cuda", quick=True)
    assert cases[0].op == "sampler"
    assert [c.dtype for c in cases[1:4]] == [torch.bfloat16] * 3
    assert {c.op for c in cases[1:]} == set(registry.NAMES)
    assert checker.OPS == ("sampler",) + registry.NAMES
    assert registry.get("layer_norm").resolve("fused") is gptfast.ops.layer_norm  # the public binding


def test_quick_cuda_grid_covers_every_attention_specialisation():
    shapes = {c.shape for c in checker.build_cases("cuda", quick=True, ops=["causal_attention"])}
    variants = {c.variant for c in checker.build_cases("cuda", quick=True, ops=["causal_attention"])}
    assert any(",Tq=1," in s for s in shapes)
    for head_dim in (64, 80, 128, 256):
        assert any(s.endswith(f",D={head_dim}") for s in shapes), head_dim
    assert any(v != "q_offset=0" for v in variants)
    decode = {c.shape for c in checker.build_cases("cuda", quick=True, ops=["decode_attention"])}
    assert any(s.endswith(",D=80") for s in decode)


def test_tolerance_comes_from_the_registry_unless_overridden(monkeypatch):
    loose = registry.OpSpec(**{**registry.get("layer_norm").__dict__, "max_ratio": 1e9})
    monkeypatch.setattr(registry, "OPS", tuple(loose if s.name == "layer_norm" else s for s in registry.OPS))
    monkeypatch.setattr(registry, "get", lambda name: {s.name: s for s in registry.OPS}[name])
    real = gptfast.ops.layer_norm
    monkeypatch.setattr(gptfast.ops, "layer_norm", lambda x, w, b, eps=1e-5, residual=None:
                        real(x, w, b, eps) + 1e-2 if residual is None else real(x, w, b, eps, residual=residual))
    plain = [r for r in checker.run_checks(_tiny_cases("layer_norm")) if r.variant == "plain"]
    assert plain and all(r.passed for r in plain)  # the registry's (here absurd) tolerance was used
    strict = checker.build_cases(DEVICE, quick=True, ops=["layer_norm"], dtypes=[torch.float32], max_ratio=3.0)
    assert not all(r.passed for r in checker.run_checks(strict) if r.variant == "plain")


def test_sampler_cpp_matches_its_twin():
    results = checker.check_sampler("cpu", new_tokens=6)
    assert results and all(r.passed for r in results), checker.format_table(results)
    if not results[0].skipped:
        assert {r.variant for r in results} == set(checker.SAMPLER_MIXES)


def test_check_rejects_bad_arguments(capsys):
    assert cli.main(["check", "--dtypes", "float8"]) == 2
    assert "unknown dtype" in capsys.readouterr().err
    assert cli.main(["check", "--ops", "softmax"]) == 2
    assert "unknown op" in capsys.readouterr().err
    with pytest.raises(ValueError, match="non-contiguous attention check"):
        checker.check_causal_attention(1, 1, 4, 16, 3, torch.float32, "cpu", True, 3.0)
