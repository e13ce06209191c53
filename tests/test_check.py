"""`gptfast check`: passes on the real ops, fails (non-zero exit) when an op is made wrong.

The ops run through the Triton interpreter here (tests/conftest.py sets TRITON_INTERPRET=1
on machines without CUDA), on the checker's tiny CPU grid.
"""
import json

import pytest
import torch

import gptfast.ops
from gptfast import checker, cli


def _tiny_cases(op, dtypes=(torch.float32,)):
    return checker.build_cases("cpu", quick=True, ops=[op], dtypes=list(dtypes))


def test_real_ops_pass_forward_and_backward():
    results = checker.run_checks(_tiny_cases("layer_norm") + _tiny_cases("decode_attention"))
    assert results and all(r.passed for r in results), checker.format_table(results)
    directions = {(r.op, r.variant, r.direction) for r in results}
    assert ("layer_norm", "residual", "bwd") in directions and ("layer_norm", "plain", "fwd") in directions
    assert all(r.path == "triton-interpreter" for r in results)
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
