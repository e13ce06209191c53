"""Bad input, each case where it enters: the exception type, and a message naming the
argument (or path) and the value (issue 24)."""
import math

import pytest
import torch

from gptfast import ops


@pytest.mark.parametrize("scale, error", [(float("nan"), ValueError), (float("inf"), ValueError), (0.0, ValueError),
                                          (-0.5, ValueError), ("abc", TypeError), (True, TypeError),
                                          (torch.tensor(0.5), TypeError)])
@pytest.mark.parametrize("op", ["causal_attention", "decode_attention"])
def test_attention_scale_must_be_a_finite_positive_number(op, scale, error):
    q = torch.randn(1, 2, 3, 8)
    call = {"causal_attention": lambda: ops.causal_attention(q, q, q, scale=scale),
            "decode_attention": lambda: ops.decode_attention(q[:, :, 0], q, q, torch.tensor([3]), scale=scale)}[op]
    shown = "str 'abc'" if scale == "abc" else ("tensor" if isinstance(scale, torch.Tensor) else repr(scale))
    with pytest.raises(error, match=rf"{op}: scale must be .*{shown}" if shown != "tensor" else rf"{op}: scale"):
        call()


def test_attention_scale_default_and_numbers_still_work():
    q = torch.randn(1, 2, 3, 8)
    want = ops.causal_attention(q, q, q, scale=1 / math.sqrt(8))
    torch.testing.assert_close(ops.causal_attention(q, q, q), want)
    ops.causal_attention(q, q, q, scale=1)  # an int is a number
