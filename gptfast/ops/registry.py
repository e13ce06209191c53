"""The one list of gptfast's fused ops.

Each op has one name everywhere: ``kernels/<name>.py`` (``gptfast.kernels.<name>``),
``gptfast.ops.<name>``, the benchmark suite ``gptfast.bench.suites.<name>``,
``tests/test_<name>.py``. An entry names the op's three implementations (fused, the
pure-PyTorch reference twin, the torch path) as ``module:function`` strings, resolved
on first use so that reading the registry imports neither triton nor any kernel; the
fused one is the public ``gptfast.ops.<name>`` binding (what users call and tests patch).
It also gives example inputs (for profiling and smoke runs) and the error-ratio
tolerance ``gptfast check`` judges the op by (the rule of ``gptfast.testing``).
``gptfast check``, ``gptfast profile op``, the benchmark suites and the compile report
take their op lists from here.
"""
import importlib
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch

DEFAULT_MAX_RATIO = 3.0


@dataclass(frozen=True)
class OpSpec:
    name: str
    fused: str  # gptfast.ops:<name>
    reference: str  # gptfast.reference:<name>
    torch: str  # gptfast.ops.torch_path:<name>
    grad_inputs: Tuple[str, ...] = ()  # example inputs that take gradients (empty: forward only)
    max_ratio: float = DEFAULT_MAX_RATIO  # fused error may be this multiple of plain PyTorch's

    @property
    def kernel_module(self) -> str:
        return f"gptfast.kernels.{self.name}"

    def resolve(self, which: str) -> Callable:
        """The implementation ``which`` ("fused", "reference" or "torch") as a callable."""
        module, _, attr = getattr(self, which).partition(":")
        return getattr(importlib.import_module(module), attr)

    def example_inputs(self, device, dtype: torch.dtype, large: bool = False) -> Dict[str, torch.Tensor]:
        """Random inputs in call order (``resolve(...)(*inputs.values())``): a small shape, or
        with ``large`` one that fills a GPU for a profile; the ``grad_inputs`` need grad."""
        inputs = _EXAMPLES[self.name](torch.device(device), dtype, large)
        for name in self.grad_inputs:
            inputs[name].requires_grad_(True)
        return inputs


def _layer_norm_inputs(device, dtype, large):
    rows, hidden = (16384, 768) if large else (256, 768)
    return {"x": torch.randn(rows, hidden, device=device, dtype=dtype),
            "weight": 1.0 + 0.1 * torch.randn(hidden, device=device, dtype=dtype),
            "bias": 0.1 * torch.randn(hidden, device=device, dtype=dtype)}


def _causal_attention_inputs(device, dtype, large):
    shape = (4, 12, 1024, 64) if large else (1, 2, 64, 32)
    return {name: torch.randn(shape, device=device, dtype=dtype) for name in ("q", "k", "v")}


def _decode_attention_inputs(device, dtype, large):
    batch, heads, cache_len, head_dim = (16, 12, 8192, 64) if large else (2, 2, 256, 32)
    return {"q": torch.randn(batch, heads, head_dim, device=device, dtype=dtype),
            "k_cache": torch.randn(batch, heads, cache_len, head_dim, device=device, dtype=dtype),
            "v_cache": torch.randn(batch, heads, cache_len, head_dim, device=device, dtype=dtype),
            "cache_lens": torch.full((batch,), cache_len, device=device, dtype=torch.int32)}


def _int8_linear_inputs(device, dtype, large):
    rows, n, k = (16, 3072, 768) if large else (3, 96, 64)
    weight = torch.randint(-127, 128, (n, k), device=device, dtype=torch.int8)
    return {"x": torch.randn(rows, k, device=device, dtype=dtype), "weight_int8": weight,
            "scale": 0.01 + 0.01 * torch.rand(n, device=device, dtype=torch.float32),
            "bias": 0.1 * torch.randn(n, device=device, dtype=dtype)}


def _skinny_linear_inputs(device, dtype, large):
    rows, n, k = (16, 3072, 768) if large else (3, 96, 64)
    return {"x": torch.randn(rows, k, device=device, dtype=dtype),
            "weight": 0.05 * torch.randn(n, k, device=device, dtype=dtype),
            "bias": 0.1 * torch.randn(n, device=device, dtype=dtype)}
def _linear_cross_entropy_inputs(device, dtype, large):
    rows, vocab, hidden = (8192, 50257, 768) if large else (64, 1000, 64)
    targets = torch.randint(0, vocab, (rows,), device=device)
    targets[1::7] = -100  # some ignored targets, as in fine-tuning
    return {"hidden": torch.randn(rows, hidden, device=device, dtype=dtype),
            "weight": 0.02 * torch.randn(vocab, hidden, device=device, dtype=dtype), "targets": targets}


_EXAMPLES = {"layer_norm": _layer_norm_inputs, "causal_attention": _causal_attention_inputs,
             "decode_attention": _decode_attention_inputs, "int8_linear": _int8_linear_inputs,
             "skinny_linear": _skinny_linear_inputs,
             "linear_cross_entropy": _linear_cross_entropy_inputs}


def _spec(name: str, grad_inputs: Tuple[str, ...]) -> OpSpec:
    return OpSpec(name, f"gptfast.ops:{name}", f"gptfast.reference:{name}", f"gptfast.ops.torch_path:{name}",
                  grad_inputs)


OPS: Tuple[OpSpec, ...] = (
    _spec("layer_norm", ("x", "weight", "bias")),
    _spec("causal_attention", ("q", "k", "v")),
    _spec("decode_attention", ()),
    _spec("int8_linear", ()),
    _spec("skinny_linear", ()),
    _spec("linear_cross_entropy", ("hidden", "weight")),
)
NAMES: Tuple[str, ...] = tuple(op.name for op in OPS)


def get(name: str) -> OpSpec:
    for op in OPS:
        if op.name == name:
            return op
    raise ValueError(f"unknown op {name!r}; gptfast's fused ops are {', '.join(NAMES)}")
